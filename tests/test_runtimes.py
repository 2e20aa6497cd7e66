"""Runtimes of a trained run (tiny random backbone): OpenVINO and static int8 ONNX predict like PyTorch, the int8
thresholds are recalibrated on the int8 model's own scores of the images the fp32 ones came from, and bad options
are one-line errors."""

import json
import sys

import numpy as np
import onnx
import pytest
from synthetic import make_mvtec, tiny_cli

from inpformer import INPFormer
from inpformer.calibration import calibrate
from inpformer.cli import main
from inpformer.data.images import read_image
from inpformer.deploy import export_model, load_predictor
from inpformer.export import OnnxRuntime, read_metadata
from inpformer.quantize import _DECODER_MLP_INPUT, _channel_maxima, _smooth_decoder_mlp_inputs
from inpformer.runs import held_out_images
from inpformer.runtime import full_boxes

TINY = tiny_cli(8, warmup=2)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_mvtec(tmp_path_factory.mktemp("data"), categories=("plate",), n_train=16, n_good_test=4,
                      defect_types={"spot": 4})


@pytest.fixture(scope="module")
def run(dataset, tmp_path_factory):
    run = tmp_path_factory.mktemp("run") / "plate"
    assert main(["train", "--data", str(dataset), "--val-fraction", "0.25", "--out", str(run), *TINY]) == 0
    return run


@pytest.fixture(scope="module")
def checkpoint(run):
    return run / "models" / "plate.pt"


@pytest.fixture(scope="module")
def static_int8(run, tmp_path_factory):
    path = tmp_path_factory.mktemp("int8") / "model.int8.onnx"
    assert main(["export", str(run), "--onnx", str(path), "--int8"]) == 0
    return path


def _predictions(run, dataset, tmp_path, runtime):
    out = tmp_path / runtime
    main(["predict", str(run), str(dataset / "plate" / "test"), "--out", str(out), "--runtime", runtime, "--quiet"])
    return {row["source"]: row for row in json.loads((out / "predictions.json").read_text())["predictions"]}


def test_openvino_runtime_predicts_like_torch(run, checkpoint, dataset, tmp_path):
    pytest.importorskip("openvino")
    torch_rows = _predictions(run, dataset, tmp_path, "torch")
    openvino_rows = _predictions(run, dataset, tmp_path, "openvino")
    assert (checkpoint.parent / "plate.openvino" / "model.xml").is_file()  # exported next to the checkpoint
    assert openvino_rows.keys() == torch_rows.keys() and len(torch_rows) == 8
    for source, row in torch_rows.items():
        assert openvino_rows[source]["decision"] == row["decision"]
        assert openvino_rows[source]["score"] == pytest.approx(row["score"], abs=1e-5)
    assert {row["decision"] for row in torch_rows.values()} == {"good", "defective"}

    # the exported folder alone predicts the same, with the checkpoint's metadata
    folder = checkpoint.parent / "plate.openvino"
    predictor = load_predictor(folder)
    assert type(predictor.runtime).__name__ == "OpenVinoRuntime"
    assert predictor.metadata == read_metadata(folder) == json.loads(json.dumps(INPFormer.load(checkpoint).metadata()))


def test_static_int8_is_quantised_and_recalibrated_on_its_own_scores(run, checkpoint, static_int8):
    detector = INPFormer.load(checkpoint)
    metadata = OnnxRuntime(static_int8).metadata
    assert metadata["precision"] == "int8" and metadata["quantization"] == "static"
    # every product with a weight matrix takes int8 operands, the decoder's MLP inputs too (smoothed first); the
    # attention products stay float
    nodes = onnx.load(static_int8).graph.node
    producers = {output: n.op_type for n in nodes for output in n.output}
    products = {n.name: [producers.get(i) for i in n.input] for n in nodes if n.op_type == "MatMul"}
    assert {f"/net/decoder.{i}/mlp/fc1/MatMul" for i in range(8)} <= products.keys()
    for name, operands in products.items():
        quantised = "attn/MatMul" not in name or "qkv" in name or "proj" in name
        assert (operands == ["DequantizeLinear"] * 2) == quantised, name

    # the same held-out images as the fp32 thresholds, scored by the int8 model, give the stored thresholds
    images, source = held_out_images(run, checkpoint, detector.config)
    assert len(images) == 4 and source == detector.calibration.source
    scored = detector.score(images, deployment=True, runtime=OnnxRuntime(static_int8))
    expected = calibrate([s.category for s in images], np.zeros(len(images)), scored.scores, scored.maps,
                         scored.embeddings, max_false_reject=detector.config.max_false_reject)
    stored = metadata["calibration"]
    for name in ("image", "pixel", "image_scale", "pixel_scale"):
        assert stored["thresholds"][""][name] == pytest.approx(getattr(expected.thresholds[""], name), rel=1e-6)
    assert stored["thresholds"][""]["image"] != detector.calibration.thresholds[""].image  # int8 scores differ
    assert stored["source"] == source
    assert stored["history"][:-1] == detector.calibration.history
    assert "int8" in stored["history"][-1]["how"]

    # the graph's own decision output uses the recalibrated threshold
    [decision] = [n for n in onnx.load(static_int8).graph.node if "decision" in n.output]
    [constant] = [i for i in onnx.load(static_int8).graph.initializer if i.name == decision.input[1]]
    assert onnx.numpy_helper.to_array(constant) == np.float32(stored["thresholds"][""]["image"])


def test_openvino_int8_runs_the_static_int8_model_with_its_thresholds(run, static_int8, dataset, tmp_path):
    pytest.importorskip("openvino")
    folder = tmp_path / "openvino-int8"
    assert main(["export", str(run), "--openvino", str(folder), "--int8"]) == 0
    assert sorted(p.name for p in folder.iterdir()) == ["model.bin", "model.xml"]
    int8, openvino = OnnxRuntime(static_int8), load_predictor(folder).runtime
    assert openvino.metadata["quantization"] == "static"  # thresholds recalibrated on the same images' int8 scores
    assert openvino.metadata["calibration"]["thresholds"] == int8.metadata["calibration"]["thresholds"]
    preprocess = load_predictor(folder).preprocess
    images = np.stack([preprocess(read_image(p)).numpy() for p in sorted((dataset / "plate" / "test").rglob("*.png"))])
    expected, got = int8(images, full_boxes(images)), openvino(images, full_boxes(images))
    # the same int8 ranges; the two runtimes round their int8 arithmetic alike but not bit for bit
    np.testing.assert_allclose(got.scores, expected.scores, atol=0.02 * np.ptp(expected.scores))


def test_smoothing_keeps_the_fp32_function_and_evens_the_channels(checkpoint, tmp_path):
    [path] = export_model(checkpoint, tmp_path / "fp32.onnx")
    size = OnnxRuntime(path).input_size
    images = np.random.default_rng(0).standard_normal((4, 3, *size)).astype(np.float32)
    batches = [(images[:2], full_boxes(images[:2])), (images[2:], full_boxes(images[2:]))]
    model = onnx.load(path)
    producers = {output: n for n in model.graph.node for output in n.output}
    inputs = [n.input[0] for n in model.graph.node if _DECODER_MLP_INPUT.search(n.name)]
    assert len(inputs) == 8 and {producers[i].op_type for i in inputs} == {"LayerNormalization"}
    before = _channel_maxima(model, inputs, batches)
    _smooth_decoder_mlp_inputs(model, batches)
    after = _channel_maxima(model, inputs, batches)
    for old, new in zip(before, after, strict=True):
        assert new.max() / np.median(new) < old.max() / np.median(old)  # the channels' ranges are closer
    smoothed = tmp_path / "smoothed.onnx"
    onnx.save(model, smoothed)
    original, changed = OnnxRuntime(path)(images), OnnxRuntime(smoothed)(images)
    np.testing.assert_allclose(changed.maps, original.maps, atol=1e-5)
    np.testing.assert_allclose(changed.scores, original.scores, atol=1e-5)


def test_static_int8_predicts_close_to_torch(run, checkpoint, dataset, tmp_path):
    torch_rows = _predictions(run, dataset, tmp_path, "torch")
    int8_rows = _predictions(run, dataset, tmp_path, "onnx-int8")  # exported next to the checkpoint, calibrated
    assert OnnxRuntime(checkpoint.with_suffix(".int8.onnx")).metadata["quantization"] == "static"
    scores = np.array([row["score"] for row in torch_rows.values()])
    differences = np.array([int8_rows[source]["score"] - row["score"] for source, row in torch_rows.items()])
    margin = np.abs(differences).max()
    assert margin <= 0.05 * np.ptp(scores)
    # each runtime decides with its own thresholds: the same, except for scores within int8's noise of them
    for source, row in torch_rows.items():
        int8 = int8_rows[source]
        if min(abs(row["score"] - row["threshold"]), abs(int8["score"] - int8["threshold"])) > margin:
            assert int8["decision"] == row["decision"], source


def test_static_int8_from_a_checkpoint_calibrates_on_a_folder(checkpoint, dataset, tmp_path, capsys):
    alone = tmp_path / "alone.pt"  # a checkpoint outside its run: no record of its held-out images
    alone.write_bytes(checkpoint.read_bytes())
    path = tmp_path / "int8.onnx"
    assert main(["export", str(alone), "--onnx", str(path), "--int8", "static"]) == 2
    message = capsys.readouterr().err.strip()
    assert "--calibration-data DIR" in message and str(alone) in message and "\n" not in message
    test_images = str(dataset / "plate" / "test")
    assert main(["predict", str(alone), test_images, "--out", str(tmp_path / "out"), "--runtime", "onnx-int8"]) == 2
    message = capsys.readouterr().err.strip()
    assert f"inpformer export {alone} --onnx {tmp_path / 'alone.int8.onnx'} --int8 --calibration-data DIR" in message
    assert "\n" not in message and not path.exists()
    good = dataset / "plate" / "test" / "good"
    assert main(["export", str(checkpoint), "--onnx", str(path), "--int8", "--calibration-data", str(good)]) == 0
    calibration = OnnxRuntime(path).metadata["calibration"]
    assert calibration["source"] == f"4 good images of {good}"
    assert calibration["thresholds"][""]["num_good"] == 4


@pytest.mark.parametrize(("options", "message"), [
    ([], "nothing to export: give --onnx FILE and/or --openvino DIR"),
    (["--openvino", "OUT", "--int8", "dynamic"], "--openvino exports fp32 or --int8 static"),
    (["--onnx", "OUT.onnx", "--calibration-data", "DATA"], "--calibration-data calibrates --int8 static"),
    (["--onnx", "OUT.onnx", "--int8", "dynamic", "--calibration-data", "DATA"], "--calibration-data calibrates"),
    (["--onnx", "OUT.onnx", "--int8", "--calibration-data", "MISSING"], "--calibration-data MISSING: folder of good "
                                                                         "training images not found"),
])
def test_bad_export_options_are_one_line_errors(run, tmp_path, monkeypatch, capsys, options, message):
    monkeypatch.chdir(tmp_path)
    assert main(["export", str(run), *options]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("inpformer: error: ") and message in error and "\n" not in error
    assert not any(tmp_path.iterdir())  # nothing written


def test_openvino_runtime_without_the_extra_is_a_one_line_error(run, dataset, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` raises ImportError
    out = tmp_path / "out"
    assert main(["predict", str(run), str(dataset / "plate" / "test"), "--out", str(out), "--runtime", "openvino",
                 "--quiet"]) == 2
    assert capsys.readouterr().err.strip() == ("inpformer: error: OpenVINO is not installed; "
                                               "pip install 'inpformer[openvino]'")
