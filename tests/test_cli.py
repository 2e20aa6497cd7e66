"""End to end: `inpformer train` -> `inpformer test` on generated datasets, with the tiny random backbone."""

import csv
import json

import numpy as np
import pytest
import torch
from synthetic import make_mvtec, tiny_cli

from inpformer import INPFormer, load_mvtec
from inpformer.cli import main
from inpformer.metrics import METRIC_NAMES, compute_metrics

TINY = tiny_cli()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_mvtec(tmp_path_factory.mktemp("data"), categories=("bolt", "tile"), n_train=8, n_good_test=4,
                      defect_types={"crack": 3, "hole": 2})


@pytest.mark.slow
def test_train_then_test_single_setting(dataset, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--data", str(dataset), "--setting", "single", "--out", str(run), *TINY]) == 0
    info = json.loads((run / "run.json").read_text())
    assert set(info["models"]) == {"bolt", "tile"}
    assert (run / "models" / "bolt.pt").is_file() and (run / "train.log").read_text()

    assert main(["test", str(run), "--save-maps", "--quiet"]) == 0
    table = capsys.readouterr().out
    assert "bolt" in table and "mean" in table and "AUPRO" in table
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["categories"]) == {"bolt", "tile"}
    for values in [*metrics["categories"].values(), metrics["mean"]]:
        assert set(values) == set(METRIC_NAMES)
        assert all(0.0 <= v <= 1.0 for v in values.values())

    with np.load(run / "maps.npz") as saved:
        assert saved["maps"].shape == (18, 256, 256) and saved["maps"].dtype == np.float32
        assert saved["masks"].shape == (18, 256, 256) and set(np.unique(saved["masks"])) == {0, 1}
        bolt = saved["categories"] == "bolt"
        recomputed = compute_metrics(saved["labels"][bolt], saved["scores"][bolt], saved["masks"][bolt],
                                     saved["maps"][bolt])
    for name in METRIC_NAMES:
        assert recomputed[name] == pytest.approx(metrics["categories"]["bolt"][name], abs=1e-9)

    with open(run / "scores.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 18 and {r["category"] for r in rows} == {"bolt", "tile"}
    with open(run / "metrics.csv") as f:
        assert [r["category"] for r in csv.DictReader(f)] == ["bolt", "tile", "mean"]


@pytest.mark.slow
def test_multi_setting_trains_one_model_and_reports_each_category(dataset, tmp_path):
    run = tmp_path / "run"
    assert main(["train", "--data", str(dataset), "--setting", "multi", "--categories", "tile,bolt",
                 "--out", str(run), *TINY]) == 0
    assert list((run / "models").iterdir()) == [run / "models" / "all.pt"]
    assert main(["test", str(run), "--quiet"]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["categories"]) == {"bolt", "tile"}
    assert metrics["mean"]["I-AUROC"] == pytest.approx(
        np.mean([metrics["categories"][c]["I-AUROC"] for c in ("bolt", "tile")]))


@pytest.mark.slow
def test_single_category_folder_and_defects_are_found(tmp_path):
    data = make_mvtec(tmp_path / "data", categories=("plate",), n_train=10, n_good_test=4,
                      defect_types={"spot": 4})
    run = tmp_path / "run"
    options = [o if o != "30" else "80" for o in TINY]
    assert main(["train", "--data", str(data / "plate"), "--out", str(run), *options]) == 0
    assert main(["test", str(run), "--quiet"]) == 0
    metrics = json.loads((run / "metrics.json").read_text())["categories"]["plate"]
    # Even a random tiny encoder sees solid discs: the trained decoder must separate them from good images.
    assert metrics["I-AUROC"] >= 0.9
    assert metrics["P-AUROC"] >= 0.9


def test_python_api_round_trip_is_exact(dataset, tmp_path):
    model = INPFormer(preset="cpu", backbone="tiny_random", image_size=64, crop_size=56, iterations=5,
                      batch_size=4, warmup_iterations=2)
    model.fit(load_mvtec(dataset, "train", ["bolt"]), progress=False)
    path = model.save(tmp_path / "bolt.pt")
    loaded = INPFormer.load(path)
    assert loaded.categories == ["bolt"] and loaded.config == model.config
    test = load_mvtec(dataset, "test", ["bolt"])
    before, after = model.score(test), loaded.score(test)
    np.testing.assert_array_equal(before.maps, after.maps)
    np.testing.assert_array_equal(before.scores, after.scores)
    prediction = loaded.predict(test[0].path)  # deployed: the whole 64 px image, at 70 px (multiple of 14)
    assert prediction.score == pytest.approx(loaded.score(test, deployment=True).scores[0], rel=1e-5)
    assert (prediction.anomaly_map > 0).all()  # no margin left uninspected, although training crops 56 of 64
    assert loaded.calibration == model.calibration
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["backbone"]["name"] == "tiny_random" and "torch" in checkpoint["versions"]
    assert not any(k.startswith("encoder.") for k in checkpoint["state_dict"])
    assert not list(tmp_path.glob("*.tmp"))


def test_training_is_reproducible(dataset):
    def fit():
        model = INPFormer(preset="cpu", backbone="tiny_random", image_size=64, crop_size=56, iterations=4,
                          batch_size=4, warmup_iterations=2)
        return model.fit(load_mvtec(dataset, "train", ["tile"]), progress=False).training_log.losses

    assert fit() == fit()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["test", "{tmp}/nothing"], "run.json: not found"),
        (["train", "--data", "{tmp}/missing", "--out", "{tmp}/run"], "missing"),
        (["train", "--data", "{data}", "--categories", "nope", "--out", "{tmp}/run"], "nope"),
        (["train", "--data", "{data}", "--crop-size", "50", "--out", "{tmp}/run"], "multiple of the patch size"),
    ],
)
def test_bad_input_gets_one_line_error(argv, message, dataset, tmp_path, capsys):
    argv = [a.format(tmp=tmp_path, data=dataset) for a in argv]
    assert main(argv) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("inpformer: error:") and message in errors[0]


def test_corrupt_checkpoint_gets_clear_error(dataset, tmp_path, capsys):
    run = tmp_path / "run"
    (run / "models").mkdir(parents=True)
    (run / "models" / "all.pt").write_bytes(b"not a checkpoint")
    (run / "run.json").write_text(json.dumps({"data": [{"root": str(dataset)}], "models": {
        "all": {"file": "models/all.pt", "categories": ["bolt"]}}}))
    assert main(["test", str(run)]) == 2
    err = capsys.readouterr().err
    assert "all.pt: not a readable inpformer checkpoint" in err
    (run / "run.json").write_text(json.dumps({"data": [str(tmp_path)], "models": {}}))
    assert main(["test", str(run)]) == 2
    assert "run.json: not a run file" in capsys.readouterr().err


def test_demo_uses_a_disjoint_seeded_split_of_the_shipped_elpv_images():
    from inpformer.demo import elpv_samples

    train, test = elpv_samples()
    assert len(train) == 150 and all(s.label == 0 for s in train)
    assert sum(s.label for s in test) == 50 and len(test) == 100
    assert not {s.path for s in train} & {s.path for s in test}
    assert all(s.path.is_file() for s in train + test)
    assert [s.path for s in train] == [s.path for s in elpv_samples()[0]]
