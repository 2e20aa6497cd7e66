"""End to end through the CLI: few-shot, zero-shot, super-multi-class, VisA / Real-IAD / plain-folder data."""

import json

import pytest
from synthetic import make_folder, make_mvtec, make_realiad, make_visa_raw, tiny_cli

from inpformer.cli import main
from inpformer.metrics import METRIC_NAMES

TINY = tiny_cli(12, warmup=3)


def metrics_of(run):
    return json.loads((run / "metrics.json").read_text())


@pytest.fixture(scope="module")
def mvtec(tmp_path_factory):
    return make_mvtec(tmp_path_factory.mktemp("mvtec"), categories=("bolt", "tile"), n_train=6, n_good_test=3,
                      defect_types={"crack": 3})


@pytest.mark.slow
def test_few_shot_repeats_report_mean_and_std(mvtec, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--data", str(mvtec), "--setting", "few-shot", "--shots", "2", "--repeats", "2",
                 "--out", str(run), *TINY]) == 0
    info = json.loads((run / "run.json").read_text())
    assert set(info["models"]) == {"repeat-0", "repeat-1"}
    draws = [info["models"][m]["training_images"] for m in ("repeat-0", "repeat-1")]
    assert all(len(d) == 4 for d in draws)  # 2 shots x 2 categories, one model on the union
    assert draws[0] != draws[1]
    assert main(["test", str(run), "--quiet"]) == 0
    assert "±" in capsys.readouterr().out
    metrics = metrics_of(run)
    assert len(metrics["repeats"]) == 2 and set(metrics["std"]) == {"bolt", "tile", "mean"}
    for metric in METRIC_NAMES:
        values = [r["categories"]["bolt"][metric] for r in metrics["repeats"]]
        assert metrics["categories"]["bolt"][metric] == pytest.approx(sum(values) / 2)


def test_few_shot_needs_shots(mvtec, tmp_path, capsys):
    assert main(["train", "--data", str(mvtec), "--setting", "few-shot", "--out", str(tmp_path), *TINY]) == 2
    assert "--shots" in capsys.readouterr().err


@pytest.mark.slow
def test_zero_shot_applies_a_model_to_unseen_categories(mvtec, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--data", str(mvtec), "--categories", "bolt", "--out", str(run), *TINY]) == 0
    assert main(["test", str(run), "--data", str(mvtec), "--categories", "tile", "--zero-shot", "--quiet"]) == 0
    assert not (run / "metrics.json").exists()
    metrics = metrics_of(run / "zero-shot")
    assert set(metrics["categories"]) == {"tile"}
    assert all(0 <= v <= 1 for v in metrics["mean"].values())

    both = tmp_path / "both"
    assert main(["train", "--data", str(mvtec), "--out", str(both), *TINY]) == 0
    capsys.readouterr()
    assert main(["test", str(both), "--zero-shot"]) == 2
    assert "--model" in capsys.readouterr().err
    assert main(["test", str(both), "--zero-shot", "--model", "bolt", "--categories", "tile", "--quiet"]) == 0


@pytest.mark.slow
def test_super_multi_class_over_three_layouts(tmp_path, capsys):
    roots = [make_mvtec(tmp_path / "mvtec", categories=("widget",), n_train=4, n_good_test=2),
             make_visa_raw(tmp_path / "visa", categories=("widget",), n_normal=6, n_anomaly=2),
             make_realiad(tmp_path / "realiad", categories=("widget",), n_train=4, n_good_test=2, n_defect=2)]
    run = tmp_path / "run"
    assert main(["train", "--data", *map(str, roots), "--setting", "super-multi", "--out", str(run), *TINY]) == 0
    assert list((run / "models").iterdir()) == [run / "models" / "all.pt"]
    assert main(["test", str(run), "--quiet"]) == 0
    metrics = metrics_of(run)
    assert set(metrics["categories"]) == {"mvtec/widget", "visa/widget", "realiad/widget"}
    assert set(metrics["datasets"]) == {"mvtec", "visa", "realiad"}
    assert "realiad (mean)" in capsys.readouterr().out


def test_super_multi_needs_several_roots(mvtec, tmp_path, capsys):
    assert main(["train", "--data", str(mvtec), "--setting", "super-multi", "--out", str(tmp_path)]) == 2
    assert "several datasets" in capsys.readouterr().err


@pytest.mark.slow
def test_plain_folders(tmp_path, capsys):
    folders = make_folder(tmp_path / "parts")
    only_good = tmp_path / "only_good"
    assert main(["train", "--data-good", str(folders["good"]), "--out", str(only_good), *TINY]) == 0
    capsys.readouterr()
    assert main(["test", str(only_good)]) == 2
    assert "no labelled test images" in capsys.readouterr().err

    run = tmp_path / "run"
    assert main(["train", "--data-good", str(folders["good"]), "--data-test-good", str(folders["test_good"]),
                 "--data-test-defect", str(folders["test_defective"]), "--data-masks", str(folders["masks"]),
                 "--out", str(run), *TINY]) == 0
    assert main(["test", str(run), "--quiet"]) == 0
    assert all(v is not None for v in metrics_of(run)["categories"]["parts"].values())

    no_masks = tmp_path / "no_masks"
    assert main(["train", "--data-good", str(folders["good"]), "--data-test-good", str(folders["test_good"]),
                 "--data-test-defect", str(folders["test_defective"]), "--out", str(no_masks), *TINY]) == 0
    assert main(["test", str(no_masks), "--quiet"]) == 0
    values = metrics_of(no_masks)["categories"]["parts"]
    assert values["I-AUROC"] is not None and values["P-AUROC"] is None and values["AUPRO"] is None
