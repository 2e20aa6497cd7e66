"""Bad input on the command line and in files: one-line errors (exit 2) before any work, nothing overwritten,
model files that cannot point outside their run, files readable per the umask, runs that never half-exist."""

import json
import os
import shutil

import onnx
import pytest
import torch
from synthetic import make_mvtec, tiny_cli

from inpformer import INPFormer
from inpformer.cli import main
from inpformer.errors import InpformerError
from inpformer.files import write_atomically

TINY = tiny_cli(20)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_mvtec(tmp_path_factory.mktemp("data"), categories=("bolt", "tile"), n_train=6, n_good_test=3,
                      defect_types={"crack": 2})


@pytest.fixture(scope="module")
def trained(dataset, tmp_path_factory):
    run = tmp_path_factory.mktemp("trained") / "run"
    assert main(["train", "--data", str(dataset), "--out", str(run), *TINY]) == 0
    assert main(["test", str(run), "--quiet"]) == 0
    return run


@pytest.fixture
def run(trained, tmp_path):
    """A private copy of the trained run."""
    return shutil.copytree(trained, tmp_path / "run")


def one_line_error(capsys, *words: str) -> str:
    err = capsys.readouterr().err  # progress lines may come first; the error is the last line, and the only one
    errors = [line for line in err.splitlines() if line.startswith("inpformer: error:")]
    assert len(errors) == 1 and err.strip().endswith(errors[0]) and "Traceback" not in err, err
    for word in words:
        assert word in errors[0], errors[0]
    return errors[0]


@pytest.mark.parametrize(("option", "value"), [
    ("--iterations", "-1"), ("--iterations", "0"), ("--epochs", "-1"), ("--warmup-iterations", "-1"),
    ("--num-inps", "0"), ("--lr", "nan"), ("--lr", "inf"), ("--lr", "0"), ("--final-lr", "-1"),
    ("--grad-clip", "nan"), ("--coherence-weight", "-0.5"), ("--batch-size", "0"), ("--seed", "-1"),
    ("--val-fraction", "1"), ("--max-false-reject", "nan"), ("--train-tokens", "0"), ("--tile-scale", "0"),
])
def test_training_options_are_checked_before_any_work(dataset, tmp_path, capsys, option, value):
    out = tmp_path / "run"
    options = [o for i, o in enumerate(TINY) if o != option and (i == 0 or TINY[i - 1] != option)]
    assert main(["train", "--data", str(dataset), "--out", str(out), *options, f"{option}={value}"]) == 2
    one_line_error(capsys, option)
    assert not out.exists()


@pytest.mark.parametrize(("options", "named"), [
    (["--setting", "few-shot", "--shots", "-1"], "--shots"),
    (["--setting", "few-shot", "--shots", "0"], "--shots"),
    (["--setting", "few-shot", "--shots", "2", "--repeats", "0"], "--repeats"),
    (["--setting", "single", "--shots", "2"], "--shots"),
])
def test_setting_options_are_checked(dataset, tmp_path, capsys, options, named):
    assert main(["train", "--data", str(dataset), "--out", str(tmp_path / "run"), *TINY, *options]) == 2
    one_line_error(capsys, named)
    assert not (tmp_path / "run" / "run.json").exists()


def test_out_that_is_a_file_or_under_a_file(dataset, tmp_path, capsys):
    file = tmp_path / "file.txt"
    file.write_text("keep me")
    for out in (file, file / "run"):
        assert main(["train", "--data", str(dataset), "--out", str(out), *TINY]) == 2
        one_line_error(capsys, "--out", str(out))
    assert file.read_text() == "keep me"


@pytest.mark.parametrize("rate", ["nan", "2", "0"])
def test_calibrate_checks_its_rate(run, capsys, rate):
    before = (run / "models" / "bolt.pt").read_bytes()
    assert main(["calibrate", str(run), "--max-false-reject", rate, "--quiet"]) == 2
    one_line_error(capsys, "--max-false-reject")
    assert (run / "models" / "bolt.pt").read_bytes() == before


def test_predict_and_export_outputs_are_checked(run, dataset, tmp_path, capsys):
    image = next((dataset / "bolt" / "test" / "good").iterdir())
    assert main(["predict", str(run / "models" / "bolt.pt"), str(image), "--out", "/dev/null/x", "--quiet"]) == 2
    one_line_error(capsys, "--out", "/dev/null/x")
    assert main(["export", str(run / "models" / "bolt.pt"), "--onnx", str(tmp_path)]) == 2
    one_line_error(capsys, "--onnx", "folder")
    assert main(["predict", str(run / "models" / "bolt.pt"), str(image), "--out", str(tmp_path / "p"),
                 "--max-pixels", "0", "--quiet"]) == 2
    one_line_error(capsys, "--max-pixels")


def test_a_diverging_loss_is_a_one_line_error(dataset, tmp_path, capsys, monkeypatch):
    import inpformer.training as training

    original = training.training_loss
    monkeypatch.setattr(training, "training_loss", lambda output, config: original(output, config) * float("nan"))
    assert main(["train", "--data", str(dataset), "--categories", "bolt", "--out", str(tmp_path / "run"),
                 *TINY]) == 2
    one_line_error(capsys, "diverged at step 1 of 20", "--lr")


def test_test_on_data_without_the_runs_categories_overwrites_nothing(run, tmp_path, capsys):
    other = make_mvtec(tmp_path / "other", categories=("plate",), n_train=2, n_good_test=2,
                       defect_types={"spot": 1})
    before = (run / "metrics.json").read_bytes()
    assert main(["test", str(run), "--data", str(other), "--quiet"]) == 2
    one_line_error(capsys, "bolt, tile", "plate")
    assert (run / "metrics.json").read_bytes() == before


@pytest.mark.parametrize("checkpoint", [
    {"format": "inpformer-checkpoint"},
    {"format": "inpformer-checkpoint", "config": "not a dict", "state_dict": {}, "categories": []},
    {"format": "inpformer-checkpoint", "config": {"lr": -1}, "state_dict": {}, "categories": []},
])
def test_malformed_checkpoints_are_one_line_errors(dataset, tmp_path, capsys, checkpoint):
    path = tmp_path / "m.pt"
    torch.save(checkpoint, path)
    image = next((dataset / "bolt" / "test" / "good").iterdir())
    assert main(["predict", str(path), str(image), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    one_line_error(capsys, str(path), "malformed checkpoint")


def test_a_checkpoint_with_broken_thresholds_is_refused(run, tmp_path):
    checkpoint = torch.load(run / "models" / "bolt.pt", weights_only=True)
    checkpoint["calibration"]["thresholds"][""]["image"] = "high"
    torch.save(checkpoint, tmp_path / "m.pt")
    with pytest.raises(InpformerError, match=r"m\.pt: malformed checkpoint .*thresholds"):
        INPFormer.load(tmp_path / "m.pt")


@pytest.mark.parametrize("change", ["not json", "categories", "top_ratio", "version"])
def test_malformed_onnx_metadata_is_a_one_line_error(run, dataset, tmp_path, capsys, change):
    path = tmp_path / "m.onnx"
    assert main(["export", str(run / "models" / "bolt.pt"), "--onnx", str(path)]) == 0
    model = onnx.load(path)
    props = {p.key: p.value for p in model.metadata_props}
    metadata = json.loads(props["inpformer"])
    if change == "not json":
        props["inpformer"] = "{not json"
    elif change == "categories":
        props["inpformer"] = json.dumps(metadata | {"calibration": {"thresholds": 5}})
    elif change == "top_ratio":
        props["inpformer"] = json.dumps(metadata | {"config": metadata["config"] | {"top_ratio": "all"}})
    else:
        props["inpformer_format_version"] = "two"
    onnx.helper.set_model_props(model, props)
    onnx.save(model, path)
    capsys.readouterr()
    image = next((dataset / "bolt" / "test" / "good").iterdir())
    assert main(["predict", str(path), str(image), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    one_line_error(capsys, str(path))


@pytest.mark.parametrize("content", ["{not json", "[]", '{"models": {"bolt": {"file": 5}}, "data": []}',
                                     '{"models": {}, "data": []}', '{"models": {"a": {"file": "a.pt"}}, "data": 3}',
                                     '{"models": {"a": {"file": "a.pt", "categories": []}}, "data": [{"root": "/", '
                                     '"colour": "red"}]}'])
def test_malformed_run_files_are_one_line_errors(run, capsys, content):
    (run / "run.json").write_text(content)
    assert main(["test", str(run), "--quiet"]) == 2
    one_line_error(capsys, "run.json")


@pytest.mark.parametrize("escape", ["absolute", "dotdot", "symlink"])
def test_model_files_outside_the_run_are_refused(run, tmp_path, capsys, escape):
    outside = tmp_path / "outside.pt"
    shutil.copy(run / "models" / "bolt.pt", outside)
    before = outside.read_bytes()
    info = json.loads((run / "run.json").read_text())
    if escape == "symlink":
        (run / "models" / "link.pt").symlink_to(outside)
    info["models"]["bolt"]["file"] = {"absolute": str(outside), "dotdot": "../outside.pt",
                                      "symlink": "models/link.pt"}[escape]
    (run / "run.json").write_text(json.dumps(info))
    for command in (["calibrate", str(run), "--model", "bolt", "--quiet"],
                    ["predict", str(run), str(outside), "--model", "bolt", "--out", str(tmp_path / "p"), "--quiet"]):
        assert main(command) == 2
        one_line_error(capsys, "outside the run directory")
    assert outside.read_bytes() == before and not outside.with_suffix(".onnx").exists()


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_files_are_written_per_the_umask_and_flushed(tmp_path, monkeypatch, umask):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or real_fsync(fd))
    old = os.umask(umask)
    try:
        path = write_atomically(tmp_path / "model.pt", lambda tmp: open(tmp, "wb").close())
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    assert str(tmp_path) in synced and any(s.endswith(".tmp") for s in synced)  # the file, then its folder


def test_an_interrupted_retrain_leaves_the_old_run(run, dataset, capsys, monkeypatch):
    before = {p.name: p.read_bytes() for p in (run / "models").iterdir()}
    run_json = (run / "run.json").read_text()
    fitted = []
    original = INPFormer.fit

    def fit_then_interrupt(self, *args, **kwargs):
        if fitted:
            raise KeyboardInterrupt
        fitted.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(INPFormer, "fit", fit_then_interrupt)
    assert main(["train", "--data", str(dataset), "--out", str(run), *TINY, "--seed", "7"]) == 130
    assert {p.name: p.read_bytes() for p in (run / "models").iterdir()} == before
    assert (run / "run.json").read_text() == run_json
    monkeypatch.undo()
    assert main(["test", str(run), "--quiet"]) == 0


def test_a_run_interrupted_while_replacing_is_refused_until_retrained(run, dataset, capsys, monkeypatch):
    import inpformer.runs as runs

    (run / "models" / "bolt.onnx").write_bytes(b"an export of the old model")
    moved = []
    real_replace = os.replace

    def replace_once(source, target):  # moves the first new model into place, then is killed
        if str(source).endswith(".pt"):
            if moved:
                raise KeyboardInterrupt
            moved.append(target)
        return real_replace(source, target)

    monkeypatch.setattr(runs.os, "replace", replace_once)
    assert main(["train", "--data", str(dataset), "--out", str(run), *TINY]) == 130
    monkeypatch.undo()
    capsys.readouterr()
    assert main(["test", str(run), "--quiet"]) == 2
    one_line_error(capsys, "incomplete run")
    assert main(["predict", str(run), str(run / "run.json"), "--out", str(run / "p"), "--model", "bolt"]) == 2
    one_line_error(capsys, "incomplete run")

    assert main(["train", "--data", str(dataset), "--out", str(run), *TINY]) == 0
    assert not (run / "INCOMPLETE").exists() and not (run / ".staging").exists()
    assert sorted(p.name for p in (run / "models").iterdir()) == ["bolt.pt", "tile.pt"]  # old export gone
    assert not (run / "metrics.json").exists()  # the old models' results went with them
    assert main(["test", str(run), "--quiet"]) == 0
