"""Issue 13: decision rules. Thresholds set by hand (recorded who / when / how), a minimum defect area applied by
the one decision rule of every runtime, and per-defect-type recall in `test`."""

import csv
import datetime as dt
import getpass
import json
import math

import numpy as np
import pytest
from synthetic import make_mvtec, textured_image, tiny_cli

from inpformer import INPFormer
from inpformer.calibration import Calibration, Thresholds
from inpformer.cli import main
from inpformer.config import make_config
from inpformer.data.images import Sample
from inpformer.deploy import load_predictor
from inpformer.errors import InpformerError
from inpformer.export import read_onnx_metadata
from inpformer.inference import Predictor, find_defects, model_metadata
from inpformer.runtime import RuntimeOutput

TINY = tiny_cli(8, warmup=2)
PIXEL = 2.0  # between the fake runtime's map of the dark texture (below 1) and of white paint (~2.4)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_mvtec(tmp_path_factory.mktemp("data"), categories=("bolt", "tile"), n_train=8, n_good_test=4,
                      defect_types={"crack": 3, "hole": 2})


@pytest.fixture(scope="module")
def run(dataset, tmp_path_factory):
    run = tmp_path_factory.mktemp("run") / "multi"
    assert main(["train", "--data", str(dataset), "--setting", "multi", "--val-fraction", "0.25", "--out", str(run),
                 *TINY]) == 0
    return run


def _calibration(image=0.5, pixel=PIXEL, min_defect_area=0.0) -> Calibration:
    thresholds = Thresholds(image, pixel, 0.2, 0.3, "false-reject", 10, min_defect_area=min_defect_area)
    return Calibration({"": thresholds, "part": Thresholds(**vars(thresholds))}, {"part": [1.0]}, "10 good images")


def _painted_runtime(images: np.ndarray, valid: np.ndarray) -> RuntimeOutput:
    """A stand-in network whose anomaly map is the brightness of the (normalised) input: paint is the defect."""
    maps = images.mean(axis=1)
    return RuntimeOutput(maps, maps.reshape(len(maps), -1).max(axis=1), np.ones((len(maps), 1), np.float32))


def _predictor(calibration: Calibration) -> Predictor:
    config = make_config("cpu", backbone="tiny_random", image_size=112, crop_size=112)
    return Predictor(_painted_runtime, model_metadata(config.to_dict(), config.deployment_geometry(), ["part"],
                                                      calibration))


def _painted(small: bool = True, large: bool = True) -> np.ndarray:
    """A 112 x 112 part with white paint: a 3 x 3 spot at (20, 20) and / or a 20 x 20 square at (60, 60)."""
    image = textured_image(np.random.default_rng(1), 112, base=(90, 90, 90))
    if small:
        image[20:23, 20:23] = 255
    if large:
        image[60:80, 60:80] = 255
    return image


def test_thresholds_set_by_hand_keep_scales_and_record_who_when_how():
    calibration = _calibration()
    old = calibration.thresholds["part"]
    change = calibration.set_by_hand(image=0.8, how="a test")
    for name in ("", "part"):
        thresholds = calibration.thresholds[name]
        assert (thresholds.image, thresholds.pixel, thresholds.method) == (0.8, PIXEL, "manual")
        assert (thresholds.image_scale, thresholds.pixel_scale) == (old.image_scale, old.pixel_scale)
        assert thresholds.normalize_scores(0.8) == pytest.approx(0.5)
    assert change["by"] == getpass.getuser() and change["how"] == "a test" and change["category"] == "all categories"
    assert abs(dt.datetime.fromisoformat(change["at"]) - dt.datetime.now(dt.timezone.utc)) < dt.timedelta(minutes=1)
    assert calibration.history == [change] and "set by hand by" in calibration.source
    assert "(the pixel threshold: 10 good images)" in calibration.source
    calibration.set_by_hand(pixel=2.0, category="part", min_defect_area=0.01)
    assert calibration.thresholds["part"].pixel == 2.0 and calibration.thresholds[""].pixel == PIXEL
    assert calibration.thresholds["part"].min_defect_area == 0.01 and calibration.thresholds[""].min_defect_area == 0
    assert Calibration.from_dict(json.loads(json.dumps(calibration.to_dict()))) == calibration
    for values, option in [({"image": math.nan}, "--image-threshold"), ({"pixel": -1.0}, "--pixel-threshold"),
                           ({"image": math.inf}, "--image-threshold"), ({"min_defect_area": 2.5}, "--min-defect-area"),
                           ({"min_defect_area": -0.1}, "--min-defect-area"), ({}, "nothing to set"),
                           ({"image": 1.0, "category": "bolt"}, "this model knows: part")]:
        with pytest.raises(InpformerError, match=option):
            calibration.set_by_hand(**values)
    recalibrated = _calibration()
    recalibrated.inherit(calibration)  # a new calibration on images keeps the areas and the history
    assert recalibrated.thresholds["part"].min_defect_area == 0.01 and len(recalibrated.history) == 2


def test_only_regions_reaching_the_minimum_area_make_a_part_defective():
    image = _painted()
    without = _predictor(_calibration()).predict([image])[0]
    assert without.is_defective and sorted(r.area for r in without.regions)[0] < 20
    assert len(without.regions) == 2
    for area in (50, 50 / 112**2):  # pixels, or the same as a fraction of the image
        prediction = _predictor(_calibration(min_defect_area=area)).predict([image])[0]
        assert prediction.is_defective and len(prediction.regions) == 1
        region = prediction.regions[0]
        assert (region.x0, region.y0) == pytest.approx((60, 60), abs=2) and region.area > 300
        assert not prediction.mask[15:28, 15:28].any() and prediction.mask[65:75, 65:75].all()
        assert prediction.to_json()["defect_pixels"] == region.area
        outline = (prediction.overlay() == 255).all(axis=2)
        assert outline[55:85, 55:85].any() and not outline[15:28, 15:28].any()  # the small spot is not drawn
    small_only = _predictor(_calibration(min_defect_area=50)).predict([_painted(large=False)])[0]
    assert small_only.score > small_only.threshold and small_only.decision == "good" and not small_only.regions
    predictor = _predictor(_calibration(min_defect_area=50))
    predictor.min_defect_area = 0  # predict --min-defect-area 0 overrides the model's
    assert predictor.predict([_painted(large=False)])[0].decision == "defective"
    clean = _predictor(_calibration(image=3.0)).predict([image])[0]
    assert clean.decision == "good" and len(clean.regions) == 2  # the score decides first; regions are still shown


def test_find_defects_drops_small_regions_from_the_mask():
    mask = np.zeros((10, 10), bool)
    mask[0:2, 0:2] = mask[5:9, 5:9] = True
    kept, regions = find_defects(mask, mask.astype(float), min_area=5)
    assert [r.area for r in regions] == [16] and kept.sum() == 16 and not kept[0:2, 0:2].any()
    assert find_defects(mask, mask.astype(float))[0] is mask


def test_manual_thresholds_by_cli_persist_in_checkpoints_and_onnx(run, tmp_path, capsys):
    checkpoint = run / "models" / "all.pt"
    assert main(["calibrate", str(run), "--image-threshold", "0.25", "--pixel-threshold", "0.5"]) == 0
    assert "all: image threshold 0.250000, pixel threshold 0.500000 (manual)" in capsys.readouterr().out
    model = INPFormer.load(checkpoint)
    assert {(t.image, t.pixel, t.method) for t in model.calibration.thresholds.values()} == {(0.25, 0.5, "manual")}
    change = model.calibration.history[-1]
    assert change["by"] == getpass.getuser() and change["method"] == "manual"
    assert change["how"] == f"inpformer calibrate {run} --image-threshold 0.25 --pixel-threshold 0.5"
    assert model.calibration.history[0]["how"] == "training (INPFormer.fit)"

    assert main(["calibrate", str(run), "--image-threshold", "0.3", "--category", "bolt",
                 "--min-defect-area", "0.002"]) == 0
    thresholds = INPFormer.load(checkpoint).calibration.thresholds
    assert (thresholds["bolt"].image, thresholds["bolt"].pixel, thresholds["bolt"].min_defect_area) == (0.3, 0.5, 0.002)
    assert (thresholds["tile"].image, thresholds["tile"].min_defect_area) == (0.25, 0.0)
    assert main(["calibrate", str(run), "--min-defect-area", "40"]) == 0  # alone: the thresholds stay
    thresholds = INPFormer.load(checkpoint).calibration.thresholds
    assert {t.min_defect_area for t in thresholds.values()} == {40} and thresholds["bolt"].image == 0.3

    onnx_file = tmp_path / "model.onnx"
    assert main(["export", str(run), "--onnx", str(onnx_file)]) == 0
    exported = read_onnx_metadata(onnx_file)["calibration"]
    assert exported == INPFormer.load(checkpoint).calibration.to_dict() and len(exported["history"]) == 4

    copy = tmp_path / "copy.pt"  # a single checkpoint needs no --data for values set by hand
    copy.write_bytes(checkpoint.read_bytes())
    assert main(["calibrate", str(copy), "--pixel-threshold", "0.45"]) == 0
    assert INPFormer.load(copy).calibration.thresholds[""].pixel == 0.45
    model.set_thresholds(image=0.35, category="tile")
    assert model.calibration.history[-1]["how"] == "INPFormer.set_thresholds(image=0.35, category='tile')"
    model.save(copy)
    assert INPFormer.load(copy).calibration == model.calibration


@pytest.mark.parametrize("options, message", [
    (["--image-threshold", "nan"], "--image-threshold must be a finite number"),
    (["--image-threshold", "-1"], "--image-threshold must be a finite number"),
    (["--pixel-threshold", "inf"], "--pixel-threshold must be a finite number"),
    (["--min-defect-area", "2.5"], "--min-defect-area must be 0 (none), a fraction"),
    (["--image-threshold", "0.2", "--method", "f1"], "drop --data, --method and --max-false-reject"),
    (["--image-threshold", "0.2", "--category", "nut"], "--category nut: no model of"),
    (["--category", "bolt"], "--category applies to thresholds set by hand"),
])
def test_calibrate_refuses_bad_values_in_one_line(run, options, message, capsys):
    before = (run / "models" / "all.pt").read_bytes()
    assert main(["calibrate", str(run), *options]) == 2
    error = capsys.readouterr().err
    assert message in error and sum(line.startswith("inpformer: error:") for line in error.splitlines()) == 1
    assert "Traceback" not in error
    assert (run / "models" / "all.pt").read_bytes() == before


def test_torch_and_onnx_predictors_make_the_same_decisions(run, dataset, tmp_path):
    model = INPFormer.load(run / "models" / "all.pt")
    images = sorted((dataset / "bolt" / "test").rglob("*.png"))
    samples = [Sample(p, "bolt", int(p.parent.name != "good"), p.parent.name, None) for p in images]
    scored = model.score(samples, deployment=True)
    model.set_thresholds(image=0.0, pixel=float(np.quantile(scored.maps.astype(np.float32), 0.9)),
                         min_defect_area=0.0)
    everything = list(model.predictor().predict_paths(images, category="bolt"))
    areas = sorted({r.area for p in everything for r in p.regions})
    gap = int(np.argmax(np.diff(areas)))
    model.set_thresholds(min_defect_area=float((areas[gap] + areas[gap + 1]) // 2))  # between two region sizes
    checkpoint = model.save(tmp_path / "model.pt")
    by_torch = list(load_predictor(checkpoint).predict_paths(images, category="bolt"))
    by_onnx = list(load_predictor(checkpoint, "onnx").predict_paths(images, category="bolt"))
    assert sum(len(p.regions) for p in by_torch) < sum(len(p.regions) for p in everything)  # small ones dropped
    assert [p.decision for p in by_torch] == [p.decision for p in by_onnx]
    assert [len(p.regions) for p in by_torch] == [len(p.regions) for p in by_onnx]
    for a, b in zip(by_torch, by_onnx, strict=True):
        np.testing.assert_allclose([r.area for r in a.regions], [r.area for r in b.regions], atol=3)


def test_test_reports_recall_per_defect_type(run, dataset, tmp_path, capsys):
    checkpoint = run / "models" / "all.pt"
    assert main(["test", str(run), "--out", str(tmp_path / "first"), "--quiet"]) == 0
    with open(tmp_path / "first" / "scores.csv") as f:
        scores = sorted(float(r["score"]) for r in csv.DictReader(f))
    threshold = (scores[len(scores) // 2] + scores[len(scores) // 2 + 1]) / 2  # a clean cut between two scores
    assert main(["calibrate", str(run), "--image-threshold", str(threshold), "--min-defect-area", "0"]) == 0
    capsys.readouterr()
    assert main(["test", str(run), "--out", str(tmp_path / "test"), "--report", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "decisions at the calibrated thresholds" in out and "all defects" in out and "false reject" in out

    with open(tmp_path / "test" / "scores.csv") as f:
        rows = list(csv.DictReader(f))
    expected = {}
    for row in rows:
        key = (row["category"], "good" if row["label"] == "0" else row["defect_type"])
        expected.setdefault(key, []).append(float(row["score"]) > threshold)
        if row["label"] == "1":
            expected.setdefault((row["category"], "all defects"), []).append(float(row["score"]) > threshold)
    with open(tmp_path / "test" / "recall.csv") as f:
        recall = list(csv.DictReader(f))
    assert [(r["category"], r["defect_type"]) for r in recall] == [
        (c, t) for c in ("bolt", "tile") for t in ("crack", "hole", "all defects", "good")]
    for r in recall:
        caught = expected[(r["category"], r["defect_type"])]
        assert (int(r["images"]), int(r["decided_defective"])) == (len(caught), sum(caught))
        assert float(r["rate"]) == pytest.approx(sum(caught) / len(caught), abs=1e-6)
        assert r["measure"] == ("false reject" if r["defect_type"] == "good" else "recall")
        assert float(r["image_threshold"]) == pytest.approx(threshold, abs=1e-6)
    assert 0 < sum(sum(v) for k, v in expected.items() if k[1] != "all defects") < len(rows)
    metrics = json.loads((tmp_path / "test" / "metrics.json").read_text())
    assert set(metrics) == {"categories", "mean"}  # metrics.json keeps its keys
    report = (tmp_path / "test" / "report.html").read_text()
    assert "Decisions per defect type" in report and "all defects" in report

    assert main(["calibrate", str(run), "--min-defect-area", "0.99"]) == 0  # no region covers 99 % of a part
    assert main(["test", str(run), "--out", str(tmp_path / "area"), "--report", "--quiet"]) == 0
    with open(tmp_path / "area" / "recall.csv") as f:
        assert {r["decided_defective"] for r in csv.DictReader(f)} == {"0"}
    report = (tmp_path / "area" / "report.html").read_text()
    assert "badge defective" not in report and "covers at least 99 % of the image" in report

    uncalibrated = INPFormer.load(checkpoint)
    uncalibrated.calibration = None
    uncalibrated.save(tmp_path / "raw.pt")
    capsys.readouterr()
    assert main(["test", str(tmp_path / "raw.pt"), "--data", str(dataset), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "no calibrated thresholds (set them with `inpformer calibrate`), so no recall per" in captured.err
    assert "decisions at" not in captured.out and not (tmp_path / "raw-test" / "recall.csv").exists()


def test_predict_cli_overrides_the_minimum_area(run, dataset, tmp_path, capsys):
    folder = dataset / "tile" / "test" / "crack"
    assert main(["predict", str(run), str(folder), "--out", str(tmp_path / "p"), "--min-defect-area", "0.999",
                 "--quiet"]) == 0
    predictions = json.loads((tmp_path / "p" / "predictions.json").read_text())["predictions"]
    assert {p["decision"] for p in predictions} == {"good"} and not any(p["regions"] for p in predictions)
    assert main(["predict", str(run), str(folder), "--out", str(tmp_path / "q"), "--min-defect-area", "-1"]) == 2
    assert "--min-defect-area must be 0 (none)" in capsys.readouterr().err
