"""ONNX export and runtimes on the tiny random backbone: same outputs as torch, metadata, errors, int8."""

import numpy as np
import onnx
import pytest
from onnx import helper

from inpformer.detector import INPFormer
from inpformer.errors import InpformerError
from inpformer.export import OnnxRuntime, export_onnx, quantize_int8, read_onnx_metadata
from inpformer.runtime import InferenceGraph, TorchRuntime

SIZE = 28
METADATA = {"categories": ["bolt"], "image_threshold": 0.5, "preprocess": {"image_size": 32, "crop_size": SIZE}}


@pytest.fixture(scope="module")
def parts():
    detector = INPFormer(preset="cpu", backbone="tiny_random", crop_size=SIZE, image_size=32)
    images = np.random.default_rng(0).standard_normal((3, 3, SIZE, SIZE)).astype(np.float32)
    return detector._build().eval(), detector.scorer, images


@pytest.fixture(scope="module")
def exported(parts, tmp_path_factory):
    """An exported graph whose threshold lies between the scores, so the decisions differ across the batch."""
    net, scorer, images = parts
    scores = np.sort(TorchRuntime(InferenceGraph(net, scorer))(images).scores)
    graph = InferenceGraph(net, scorer, image_threshold=float(scores[:2].mean()))
    path = export_onnx(graph, tmp_path_factory.mktemp("onnx") / "model.onnx", SIZE, METADATA)
    return graph, path


@pytest.mark.parametrize("batch", [1, 3])
def test_onnx_matches_torch(parts, exported, batch):
    graph, path = exported
    images = parts[2][:batch]
    expected = TorchRuntime(graph)(images)
    runtime = OnnxRuntime(path)
    got = runtime(images)
    assert got.maps.shape == (batch, 256, 256) and got.scores.shape == (batch,)
    assert np.abs(got.maps - expected.maps).max() <= 1e-4
    np.testing.assert_allclose(got.scores, expected.scores, atol=1e-5)
    np.testing.assert_allclose(got.embeddings, expected.embeddings, atol=1e-5)

    valid = np.tile(np.array([0, 0, 1, 1], np.float32), (batch, 1))
    decisions = runtime.session.run(["decision"], {"images": images, "valid": valid})[0]
    expected_decisions = (expected.scores > graph.image_threshold.item())
    assert decisions.dtype == bool
    np.testing.assert_array_equal(decisions, expected_decisions)
    if batch == 3:
        assert expected_decisions.any() and not expected_decisions.all()


def test_metadata_round_trip(exported):
    path = exported[1]
    runtime = OnnxRuntime(path, threads=1)
    assert runtime.name == "onnx" and runtime.path == path and runtime.input_size == (SIZE, SIZE)
    assert runtime.metadata == METADATA == read_onnx_metadata(path)
    props = {p.key: p.value for p in onnx.load(path).metadata_props}
    assert props["inpformer_format_version"] == "2"
    assert [p.name for p in path.parent.iterdir()] == ["model.onnx"]  # the atomic write left no temporary file


def _foreign_onnx(path):
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "foreign",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph), path)


@pytest.mark.parametrize(("make", "reason"), [
    (lambda path: None, "not found"),
    (lambda path: path.write_bytes(b"\x00garbage\xff" * 50), "not an ONNX model"),
    (_foreign_onnx, "without inpformer metadata"),
])
def test_unusable_files_raise_one_line_errors(tmp_path, make, reason):
    path = tmp_path / "model.onnx"
    make(path)
    for load in (read_onnx_metadata, OnnxRuntime):
        with pytest.raises(InpformerError) as error:
            load(path)
        message = str(error.value)
        assert str(path) in message and reason in message and "inpformer export" in message
        assert "\n" not in message


def test_old_opset_is_refused(exported, tmp_path):
    with pytest.raises(InpformerError, match="opset 16"):
        export_onnx(exported[0], tmp_path / "old.onnx", SIZE, METADATA, opset=16)


def test_int8_model_runs_like_fp32(parts, exported, tmp_path):
    images = parts[2]
    path = quantize_int8(exported[1], tmp_path / "int8.onnx")
    runtime = OnnxRuntime(path)
    assert runtime.metadata == {**METADATA, "precision": "int8"}
    got, fp32 = runtime(images), OnnxRuntime(exported[1])(images)
    for name in ("maps", "scores", "embeddings"):
        value = getattr(got, name)
        assert value.shape == getattr(fp32, name).shape and np.isfinite(value).all()

    nodes = onnx.load(path).graph.node
    assert any(n.op_type == "MatMulInteger" for n in nodes)
    fp32_matmuls = {n.name for n in nodes if n.op_type == "MatMul"}
    assert {f"/net/decoder.{i}/mlp/fc1/MatMul" for i in range(8)} <= fp32_matmuls
