"""Issue 4: calibrated thresholds, predictions at the original resolution, bad input, reports, ONNX runtime."""

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image
from synthetic import add_defect, make_mvtec, textured_image, tiny_cli

from inpformer import INPFormer
from inpformer.calibration import Calibration, Thresholds, calibrate
from inpformer.cli import main
from inpformer.data.geometry import Geometry
from inpformer.inference import find_defects

TINY = tiny_cli()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_mvtec(tmp_path_factory.mktemp("data"), categories=("bolt", "tile"), n_train=10, n_good_test=4,
                      defect_types={"crack": 3})


@pytest.fixture(scope="module")
def run(dataset, tmp_path_factory):
    run = tmp_path_factory.mktemp("run") / "multi"
    assert main(["train", "--data", str(dataset), "--setting", "multi", "--val-fraction", "0.2", "--out", str(run),
                 *TINY]) == 0
    return run


@pytest.fixture(scope="module")
def images(dataset, tmp_path_factory):
    """A folder of good, defective and awkward-but-valid images (16-bit, gray, RGBA, EXIF-rotated, wide)."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    good = textured_image(rng, 64)
    defective, _ = add_defect(rng, textured_image(rng, 64))
    Image.fromarray(good).save(folder / "good.png")
    Image.fromarray(defective).save(folder / "defective.jpg", quality=95)
    Image.fromarray(good[:, :, 0].astype(np.uint16) * 257).save(folder / "sixteen_bit.png")
    Image.fromarray(good[:, :, 1]).save(folder / "gray.png")
    Image.fromarray(np.dstack([good, np.full((64, 64), 200, np.uint8)])).save(folder / "rgba.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees on display
    Image.fromarray(textured_image(rng, 64)[:, :48]).save(folder / "rotated.jpg", exif=exif)
    Image.fromarray(textured_image(rng, 96)[:40]).save(folder / "wide.png")
    (folder / "notes.txt").write_text("not an image, skipped in folders")
    return folder


def _write_bad_files(folder):
    good = folder / "good.png"
    (folder / "truncated.png").write_bytes(good.read_bytes()[:200])
    (folder / "text.png").write_text("this is not a png")
    Image.fromarray(np.zeros((300, 300, 3), np.uint8)).save(folder / "huge.png")
    return ["truncated.png", "text.png", "huge.png"]


def test_false_reject_thresholds_bound_the_good_rejections():
    rng = np.random.default_rng(0)
    scores = rng.normal(1.0, 0.1, size=200)
    maps = rng.normal(0.5, 0.05, size=(200, 8, 8))
    calibration = calibrate(["a"] * 200, np.zeros(200, int), scores, maps, np.ones((200, 4)) / 2,
                            max_false_reject=0.05)
    thresholds = calibration.for_category("a")
    assert (scores > thresholds.image).mean() <= 0.05 and thresholds.false_reject <= 0.05
    assert (maps.reshape(200, -1).max(1) > thresholds.pixel).mean() <= 0.05
    assert thresholds.normalize_scores(thresholds.image) == pytest.approx(0.5)
    assert thresholds.normalize_scores(np.median(scores)) == pytest.approx(0.1, abs=1e-6)
    assert calibration.thresholds[""] == thresholds


def test_f1_thresholds_separate_labelled_images():
    labels = np.array([0] * 6 + [1] * 4)
    scores = np.array([0.1, 0.2, 0.15, 0.3, 0.25, 0.12, 0.5, 0.6, 0.28, 0.7])
    masks = np.zeros((10, 4, 4), np.uint8)
    masks[6:, :2] = 1
    maps = masks * 0.8 + 0.1
    thresholds = calibrate(["a"] * 10, labels, scores, maps, np.ones((10, 2)), masks, method="f1").for_category("a")

    def f1(predicted):
        return 2 * (predicted & (labels == 1)).sum() / (predicted.sum() + labels.sum())

    assert f1(scores > thresholds.image) == max(f1(scores >= t) for t in scores)  # brute force over all cuts
    assert np.array_equal(maps > thresholds.pixel, masks.astype(bool))
    with pytest.raises(Exception, match="needs defective images"):
        calibrate(["a"] * 6, labels[:6], scores[:6], maps[:6], np.ones((6, 2)), masks[:6], method="f1")


def test_calibration_round_trip_and_category_inference():
    thresholds = Thresholds(0.3, 0.4, 0.1, 0.1, "false-reject", 10)
    calibration = Calibration({"": thresholds, "a": thresholds, "b": thresholds},
                              {"a": [1.0, 0.0], "b": [0.0, 1.0]})
    assert Calibration.from_dict(json.loads(json.dumps(calibration.to_dict()))) == calibration
    assert calibration.infer_categories(np.array([[0.9, 0.1], [0.2, 0.8]])) == ["a", "b"]
    with pytest.raises(Exception, match="this model knows: a, b"):
        calibration.for_category("c")


def test_maps_return_to_the_original_geometry():
    crop_map = np.zeros((8, 8), np.float32)
    crop_map[:, :4] = 1  # left half of the crop
    full = Geometry((64, 64), (48, 48)).to_original(crop_map, (100, 200))
    assert full.shape == (100, 200)
    border_x, border_y = round(8 * 200 / 64), round(8 * 100 / 64)
    assert full[:, :border_x].max() == 0 and full[:border_y].max() == 0  # outside the crop: not inspected
    assert full[50, border_x + 5] > 0.9 and full[50, 200 - border_x - 5] < 0.1
    mask = np.zeros((20, 20), bool)
    mask[2:5, 3:9] = True
    mask[10:12, 10:11] = True
    _, regions = find_defects(mask, mask * np.linspace(0, 1, 20)[None])
    assert [(r.x0, r.y0, r.x1, r.y1, r.area) for r in regions] == [(10, 10, 11, 12, 2), (3, 2, 9, 5, 18)]


@pytest.mark.slow
def test_python_predict_returns_decisions_at_original_resolution(run, images):
    model = INPFormer.load(run / "models" / "all.pt")
    assert model.calibration is not None and set(model.calibration.thresholds) == {"", "bolt", "tile"}
    prediction = model.predict(images / "wide.png")
    assert prediction.anomaly_map.shape == prediction.mask.shape == (40, 96)
    assert prediction.category in ("bolt", "tile") and prediction.decision in ("good", "defective")
    assert (prediction.normalized_score > 0.5) == prediction.is_defective == (prediction.score > prediction.threshold)
    array = np.asarray(Image.open(images / "good.png"))
    by_array, by_path = model.predict([array], category="bolt")[0], model.predict(images / "good.png", "bolt")
    assert by_array.score == by_path.score and by_array.threshold == model.calibration.thresholds["bolt"].image
    assert model.predict(images / "rotated.jpg").mask.shape == (48, 64)  # EXIF orientation applied


@pytest.mark.slow
def test_predict_cli_writes_outputs_and_survives_bad_files(run, images, tmp_path, capsys):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for path in images.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    bad = _write_bad_files(folder)
    out = tmp_path / "predictions"
    code = main(["predict", str(run), str(folder), "--out", str(out), "--max-pixels", "50000", "--quiet"])
    assert code == 1  # some files failed, the others were predicted
    errors = capsys.readouterr().err
    for name in bad:
        assert sum(name in line for line in errors.splitlines()) >= 1
    assert "Traceback" not in errors
    with open(out / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    predicted = {r["source"].rsplit("/", 1)[-1] for r in rows if not r["error"]}
    assert predicted == {"good.png", "defective.jpg", "sixteen_bit.png", "gray.png", "rgba.png", "rotated.jpg",
                         "wide.png"}
    assert {r["source"].rsplit("/", 1)[-1] for r in rows if r["error"]} == set(bad)
    content = json.loads((out / "predictions.json").read_text())
    first = content["predictions"][0]
    assert {"score", "normalized_score", "decision", "threshold", "category", "regions"} <= set(first)
    assert Image.open(out / first["mask"]).size == Image.open(first["source"]).size
    assert Image.open(out / first["overlay"]).size == Image.open(first["source"]).size
    report = (out / "report.html").read_text()
    assert report.count("data:image/jpeg;base64") == 7 and "http" not in report.replace("http-equiv", "")
    assert main(["predict", str(run), str(folder / "good.png"), "--out", str(tmp_path / "one"), "--quiet"]) == 0
    assert main(["predict", str(run), str(folder), "--out", str(tmp_path / "none"), "--batch-size", "0"]) == 2
    assert "--batch-size must be at least 1" in capsys.readouterr().err


@pytest.mark.slow
def test_calibrate_recomputes_thresholds_and_test_writes_a_report(run, tmp_path):
    checkpoint = run / "models" / "all.pt"
    before = torch.load(checkpoint, weights_only=True)["calibration"]
    assert main(["calibrate", str(run), "--method", "f1", "--quiet"]) == 0
    after = torch.load(checkpoint, weights_only=True)["calibration"]
    assert after["thresholds"][""]["method"] == "f1" and after["thresholds"][""]["num_defective"] > 0
    assert after != before
    assert main(["calibrate", str(run), "--max-false-reject", "0.5", "--quiet"]) == 0
    assert torch.load(checkpoint, weights_only=True)["calibration"]["thresholds"][""]["method"] == "false-reject"
    assert main(["test", str(run), "--report", "--out", str(tmp_path / "test"), "--quiet"]) == 0
    report = (tmp_path / "test" / "report.html").read_text()
    assert "ROC" in report and "I-AUROC" in report and "truth: defective" in report


@pytest.mark.slow
def test_onnx_runtime_matches_torch(run, images, tmp_path):
    onnx_file = tmp_path / "model.onnx"
    assert main(["export", str(run), "--onnx", str(onnx_file)]) == 0
    torch_out, onnx_out = tmp_path / "torch", tmp_path / "onnx"
    assert main(["predict", str(run), str(images), "--out", str(torch_out), "--quiet"]) == 0
    assert main(["predict", str(onnx_file), str(images), "--out", str(onnx_out), "--runtime", "onnx", "--quiet"]) == 0
    by_torch = json.loads((torch_out / "predictions.json").read_text())["predictions"]
    by_onnx = json.loads((onnx_out / "predictions.json").read_text())["predictions"]
    assert [p["decision"] for p in by_torch] == [p["decision"] for p in by_onnx]
    assert [p["category"] for p in by_torch] == [p["category"] for p in by_onnx]
    np.testing.assert_allclose([p["score"] for p in by_torch], [p["score"] for p in by_onnx], atol=1e-5)
    for row in by_torch:
        torch_mask = np.asarray(Image.open(torch_out / row["mask"]))
        onnx_mask = np.asarray(Image.open(onnx_out / row["mask"]))
        assert (torch_mask != onnx_mask).mean() < 1e-3  # only pixels within float error of the threshold may flip
