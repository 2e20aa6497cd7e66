"""ONNX and OpenVINO exports and their runtimes on the tiny random backbone: same outputs as torch, metadata,
errors, dynamic int8 (static int8 from a trained run: test_runtimes.py)."""

import sys

import numpy as np
import onnx
import pytest
from onnx import helper

from inpformer.detector import INPFormer
from inpformer.errors import InpformerError
from inpformer.export import (
    OnnxRuntime,
    OpenVinoRuntime,
    export_onnx,
    export_openvino,
    read_metadata,
    read_onnx_metadata,
    read_openvino_model,
)
from inpformer.quantize import quantize_int8
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


@pytest.fixture(scope="module")
def openvino_folder(exported, tmp_path_factory):
    pytest.importorskip("openvino")
    return export_openvino(exported[1], tmp_path_factory.mktemp("openvino") / "model")


def _open(kind, exported, request):
    return OnnxRuntime(exported[1]) if kind == "onnx" else OpenVinoRuntime(request.getfixturevalue("openvino_folder"))


def _decisions(runtime, images):
    """The graph's own `decision` output (against the threshold traced into it)."""
    inputs = {"images": images, "valid": np.tile(np.array([0, 0, 1, 1], np.float32), (len(images), 1))}
    if isinstance(runtime, OnnxRuntime):
        return runtime.session.run(["decision"], inputs)[0]
    return runtime.compiled.create_infer_request().infer(inputs)[runtime.compiled.output("decision")]


@pytest.mark.parametrize("kind", ["onnx", "openvino"])
@pytest.mark.parametrize("batch", [1, 3])
def test_exports_match_torch(parts, exported, request, kind, batch):
    graph = exported[0]
    images = parts[2][:batch]
    expected = TorchRuntime(graph)(images)
    runtime = _open(kind, exported, request)
    got = runtime(images)
    assert got.maps.shape == (batch, 256, 256) and got.scores.shape == (batch,)
    assert np.abs(got.maps - expected.maps).max() <= 1e-4
    np.testing.assert_allclose(got.scores, expected.scores, atol=1e-5)
    np.testing.assert_allclose(got.embeddings, expected.embeddings, atol=1e-5)

    decisions = _decisions(runtime, images)
    expected_decisions = (expected.scores > graph.image_threshold.item())
    assert decisions.dtype == bool
    np.testing.assert_array_equal(decisions, expected_decisions)
    if batch == 3:
        assert expected_decisions.any() and not expected_decisions.all()


def test_metadata_round_trip(exported):
    path = exported[1]
    runtime = OnnxRuntime(path, threads=1)
    assert runtime.name == "onnx" and runtime.path == path and runtime.input_size == (SIZE, SIZE)
    assert runtime.metadata == METADATA == read_onnx_metadata(path) == read_metadata(path)
    props = {p.key: p.value for p in onnx.load(path).metadata_props}
    assert props["inpformer_format_version"] == "2"
    assert [p.name for p in path.parent.iterdir()] == ["model.onnx"]  # the atomic write left no temporary file


def test_openvino_metadata_round_trip(openvino_folder):
    runtime = OpenVinoRuntime(openvino_folder, threads=1)
    assert runtime.name == "openvino" and runtime.path == openvino_folder and runtime.input_size == (SIZE, SIZE)
    assert runtime.metadata == METADATA == read_metadata(openvino_folder)
    model = read_openvino_model(openvino_folder)[0]
    assert model.get_rt_info("inpformer_format_version").astype(str) == "2"
    assert sorted(p.name for p in openvino_folder.iterdir()) == ["model.bin", "model.xml"]  # no temporary files


def _assert_one_line_errors(loaders, path, *fragments):
    """Each loader refuses `path` with one line naming it and holding every fragment (the problem and the fix)."""
    for load in loaders:
        with pytest.raises(InpformerError) as error:
            load(path)
        message = str(error.value)
        assert "\n" not in message and all(part in message for part in (str(path), *fragments)), message


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
    _assert_one_line_errors((read_onnx_metadata, OnnxRuntime), path, reason, "inpformer export")


def _openvino_ir(folder, onnx_path, **rt_info):
    import openvino as ov

    model = ov.convert_model(str(onnx_path))
    for key, value in rt_info.items():
        model.set_rt_info(value, key)
    ov.save_model(model, str(folder / "model.xml"))


def _foreign_ir(folder):
    _foreign_onnx(folder / "foreign.onnx")
    _openvino_ir(folder, folder / "foreign.onnx")


@pytest.mark.parametrize(("make", "reason"), [
    (lambda folder, onnx_path: None, "no OpenVINO model (model.xml) in this folder"),
    (lambda folder, onnx_path: (folder / "model.xml").write_text("<net>garbage"), "not a readable OpenVINO model"),
    (lambda folder, onnx_path: _foreign_ir(folder), "without inpformer metadata"),
    (lambda folder, onnx_path: _openvino_ir(folder, onnx_path, inpformer="{}", inpformer_format_version="1"),
     "inpformer format '1', this version reads 2"),
])
def test_unusable_openvino_folders_raise_one_line_errors(exported, tmp_path, make, reason):
    pytest.importorskip("openvino")
    folder = tmp_path / "model"
    folder.mkdir()
    make(folder, exported[1])
    _assert_one_line_errors((read_metadata, OpenVinoRuntime), folder, reason, "inpformer export RUN_DIR --openvino DIR")


def test_missing_openvino_extra_is_a_one_line_error(exported, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` raises ImportError
    for call in (lambda: export_openvino(exported[1], tmp_path / "openvino"), lambda: OpenVinoRuntime(tmp_path)):
        with pytest.raises(InpformerError) as error:
            call()
        assert str(error.value) == "OpenVINO is not installed; pip install 'inpformer[openvino]'"
    assert not (tmp_path / "openvino").exists()


def test_old_opset_is_refused(exported, tmp_path):
    with pytest.raises(InpformerError, match="opset 16"):
        export_onnx(exported[0], tmp_path / "old.onnx", SIZE, METADATA, opset=16)


def test_dynamic_int8_model_runs_like_fp32(parts, exported, tmp_path):
    images = parts[2]
    path = quantize_int8(exported[1], tmp_path / "int8.onnx", "dynamic")
    runtime = OnnxRuntime(path)
    assert runtime.metadata == {**METADATA, "precision": "int8", "quantization": "dynamic"}
    got, fp32 = runtime(images), OnnxRuntime(exported[1])(images)
    for name in ("maps", "scores", "embeddings"):
        value = getattr(got, name)
        assert value.shape == getattr(fp32, name).shape and np.isfinite(value).all()

    nodes = onnx.load(path).graph.node
    assert any(n.op_type == "MatMulInteger" for n in nodes)
    fp32_matmuls = {n.name for n in nodes if n.op_type == "MatMul"}
    assert {f"/net/decoder.{i}/mlp/fc1/MatMul" for i in range(8)} <= fp32_matmuls
