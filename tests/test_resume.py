"""Training that stops and goes on: states saved every N steps and at SIGINT / SIGTERM, `--resume` (and
`fit(resume=True)`) to the bit-identical result of an uninterrupted training, and optional experiment logs."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from synthetic import make_mvtec, tiny_cli

from inpformer import INPFormer, InpformerError, TrainingStopped, load_mvtec, training
from inpformer.cli import main
from inpformer.runs import read_run

TINY = tiny_cli()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_mvtec(tmp_path_factory.mktemp("data"), categories=("bolt", "tile"), n_train=8, n_good_test=4,
                      defect_types={"crack": 3})


OPTIMIZER_STEP = training.StableAdamW.step


def at_step(monkeypatch, step, action):
    """Calls `action()` right after the `step`-th optimizer step from now on (0: never); returns the list of the
    steps taken, which grows as they are."""
    steps = []

    def step_then_act(self, *args, **kwargs):
        result = OPTIMIZER_STEP(self, *args, **kwargs)
        steps.append(len(steps) + 1)
        if len(steps) == step:
            action()
        return result

    monkeypatch.setattr(training.StableAdamW, "step", step_then_act)
    return steps


def signal_self(signum):
    return lambda: os.kill(os.getpid(), signum)


def crash():
    raise RuntimeError("power cut")


def trained(path):
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    return checkpoint["state_dict"], checkpoint["training"]


def assert_same_model(path, reference):
    weights, log = trained(path)
    expected_weights, expected_log = trained(reference)
    assert weights.keys() == expected_weights.keys()
    assert all(torch.equal(weights[k], expected_weights[k]) for k in weights)  # bit for bit
    assert log["losses"] == expected_log["losses"] and len(log["losses"]) == 30


def last_line(text):
    """The message a command ended with (after its log lines), checked to come without a traceback."""
    assert "Traceback" not in text, text
    return text.strip().splitlines()[-1]


@pytest.mark.slow
@pytest.mark.parametrize(("options", "signum"), [
    ([], signal.SIGTERM),
    (["--train-tokens", "8"], signal.SIGINT),
    (["--no-feature-cache"], signal.SIGTERM),
    (["--no-feature-cache", "--train-tokens", "8"], signal.SIGINT),
], ids=["feature-cache", "cache-token-subsets", "no-cache", "no-cache-token-subsets"])
def test_a_training_stopped_by_a_signal_resumes_to_the_same_model(dataset, tmp_path, monkeypatch, capsys, options,
                                                                  signum):
    command = ["train", "--data", str(dataset / "bolt"), *TINY, *options]
    assert main([*command, "--out", str(tmp_path / "reference")]) == 0
    run = tmp_path / "run"
    steps = at_step(monkeypatch, 12, signal_self(signum))
    capsys.readouterr()
    assert main([*command, "--out", str(run)]) == 128 + signum  # 143 for SIGTERM, 130 for SIGINT
    assert len(steps) == 12  # the step under way when the signal came was finished, and no other
    assert last_line(capsys.readouterr().err) == (
        f"inpformer: model bolt: training stopped by {signal.Signals(signum).name} at step 12 of 30; its state is "
        f"saved in {run}/.staging/state/bolt.pt; resume with: inpformer train --resume {run}")
    with pytest.raises(InpformerError, match=re.escape(f"interrupted: go on with `inpformer train --resume {run}`")):
        read_run(run)

    steps = at_step(monkeypatch, 0, lambda: None)
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    assert len(steps) == 18
    assert_same_model(run / "models" / "bolt.pt", tmp_path / "reference" / "models" / "bolt.pt")
    assert trained(run / "models" / "bolt.pt")[1]["resumed_at"] == [12]
    assert not (run / ".staging").exists()
    assert json.loads((run / "run.json").read_text())["models"].keys() == {"bolt"}


@pytest.mark.slow
def test_a_crash_resumes_from_the_last_periodic_state_and_finished_models_are_kept(dataset, tmp_path, monkeypatch):
    monkeypatch.chdir(dataset.parent)  # a relative --data: resumed from anywhere
    command = ["train", "--data", dataset.name, *TINY, "--checkpoint-every", "5"]
    assert main([*command, "--out", str(tmp_path / "reference")]) == 0
    run = tmp_path / "run"
    at_step(monkeypatch, 30 + 17, crash)  # the second model (tile), at its step 17
    with pytest.raises(RuntimeError, match="power cut"):
        main([*command, "--out", str(run)])
    assert (run / ".staging" / "models" / "bolt.pt").is_file()
    state = torch.load(run / ".staging" / "state" / "tile.pt", weights_only=True)
    assert state["step"] == 15 and len(state["log"]["losses"]) == 15

    steps = at_step(monkeypatch, 0, lambda: None)
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    assert len(steps) == 15  # bolt was kept; tile went on from step 15
    for name in ("bolt", "tile"):
        assert_same_model(run / "models" / f"{name}.pt", tmp_path / "reference" / "models" / f"{name}.pt")
    assert trained(run / "models" / "tile.pt")[1]["resumed_at"] == [15]


@pytest.mark.slow
def test_resuming_with_other_options_is_refused_naming_the_option(dataset, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    command = ["train", "--data", str(dataset / "bolt"), *TINY]
    at_step(monkeypatch, 3, signal_self(signal.SIGTERM))
    assert main([*command, "--out", str(run)]) == 143
    monkeypatch.undo()
    capsys.readouterr()
    for given, option in [(["--lr", "0.01"], "--lr"), (["--setting", "multi"], "--setting"),
                          (["--data", str(dataset)], "--data"), (["--preset", "cpu"], "--backbone")]:
        assert main(["train", "--resume", str(run), *given, "--quiet"]) == 2
        error = last_line(capsys.readouterr().err)
        assert error.startswith(f"inpformer: error: --resume {run}: {option} differs: ")
    assert (run / ".staging" / "state" / "bolt.pt").is_file()  # still resumable
    # the same options given again are accepted, and so are those of how training runs
    assert main([*command, "--resume", str(run), "--device", "cpu"]) == 0
    assert main(["train", "--resume", str(run)]) == 2
    assert "no interrupted training to resume (its training finished)" in last_line(capsys.readouterr().err)


@pytest.mark.slow
def test_a_new_training_into_the_folder_discards_the_interrupted_one(dataset, tmp_path, monkeypatch, caplog):
    run = tmp_path / "run"
    command = ["train", "--data", str(dataset / "bolt"), *TINY, "--out", str(run)]
    at_step(monkeypatch, 3, signal_self(signal.SIGINT))
    assert main(command) == 130
    monkeypatch.undo()
    assert main(command) == 0
    assert "discarding the interrupted training" in (run / "train.log").read_text()
    assert trained(run / "models" / "bolt.pt")[1]["resumed_at"] == []


@pytest.mark.slow
def test_a_real_process_stopped_by_sigterm_resumes_to_the_same_model(dataset, tmp_path):
    """SIGTERM from outside, to a process slowed down so that it arrives mid-training."""
    command = ["train", "--data", str(dataset / "bolt"), *TINY, "--checkpoint-every", "5"]
    assert main([*command, "--out", str(tmp_path / "reference")]) == 0
    run = tmp_path / "run"
    slowed = ("import sys, time\nfrom inpformer import training\nfrom inpformer.cli import main\n"
              "step = training.StableAdamW.step\n"
              "training.StableAdamW.step = lambda *args, **kwargs: (time.sleep(0.2), step(*args, **kwargs))[1]\n"
              "sys.exit(main(sys.argv[1:]))\n")
    environment = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}  # the same arithmetic
    process = subprocess.Popen([sys.executable, "-c", slowed, *command, "--out", str(run)], env=environment,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (run / ".staging" / "state" / "bolt.pt").exists() and process.poll() is None:
        assert time.monotonic() < deadline, "no training state was written"
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    _, errors = process.communicate(timeout=120)
    assert process.returncode == 143, errors
    assert "Traceback" not in errors
    assert errors.strip().splitlines()[-1].startswith("inpformer: model bolt: training stopped by SIGTERM at step ")
    assert errors.strip().endswith(f"resume with: inpformer train --resume {run}")

    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    assert_same_model(run / "models" / "bolt.pt", tmp_path / "reference" / "models" / "bolt.pt")
    assert trained(run / "models" / "bolt.pt")[1]["resumed_at"][0] >= 5


@pytest.mark.slow
def test_fit_resumes_from_its_training_state(dataset, tmp_path, monkeypatch):
    samples = load_mvtec(dataset / "bolt", "train")
    settings = {"backbone": "tiny_random", "image_size": 64, "crop_size": 56, "iterations": 20, "batch_size": 4,
                "warmup_iterations": 5, "train_tokens": 8}
    reference = INPFormer(**settings).fit(samples, progress=False)
    state = tmp_path / "state.pt"
    at_step(monkeypatch, 7, signal_self(signal.SIGTERM))
    with pytest.raises(TrainingStopped, match=re.escape(f"at step 7 of 20; its state is saved in {state}")):
        INPFormer(**settings).fit(samples, progress=False, training_state=state, checkpoint_every=0)
    monkeypatch.undo()
    assert set(torch.load(state, weights_only=True)) == {"format", "identity", "step", "weights", "optimizer",
                                                          "batches", "tokens", "rng", "log"}

    with pytest.raises(InpformerError, match=r"--lr differs: 0\.002 here, 0\.001 in the interrupted training"):
        INPFormer(**settings, lr=0.002).fit(samples, progress=False, training_state=state, resume=True)
    with pytest.raises(InpformerError, match="the list of training images differs: '7 images"):
        INPFormer(**settings).fit(samples[1:], progress=False, training_state=state, resume=True)
    resumed = INPFormer(**settings).fit(samples, progress=False, training_state=state, resume=True)
    expected = reference.net.trainable_state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in resumed.net.trainable_state_dict().items())
    assert resumed.training_log.losses == reference.training_log.losses
    assert resumed.calibration.thresholds[""].image == reference.calibration.thresholds[""].image
    with pytest.raises(InpformerError, match="training state not found; train anew"):
        INPFormer(**settings).fit(samples, progress=False, training_state=tmp_path / "none.pt", resume=True)


@pytest.mark.slow
def test_tensorboard_logs_every_step_once_also_across_a_resume(dataset, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    at_step(monkeypatch, 13, crash)
    with pytest.raises(RuntimeError):
        main(["train", "--data", str(dataset / "bolt"), *TINY, "--checkpoint-every", "5", "--log", "tensorboard",
              "--out", str(run)])
    monkeypatch.undo()
    assert main(["train", "--resume", str(run), "--quiet"]) == 0  # steps 11-13 are logged again
    assert main(["test", str(run), "--log", "tensorboard", "--quiet"]) == 0

    folders = sorted((run / "tensorboard").iterdir())
    assert [f.name.split("-")[-1] for f in folders] == ["bolt", "test"]
    events = EventAccumulator(str(folders[0]))
    events.Reload()
    losses = events.Scalars("train/loss")
    _, log = trained(run / "models" / "bolt.pt")
    assert [e.step for e in losses] == list(range(1, 31))
    np.testing.assert_array_equal([e.value for e in losses], np.float32(log["losses"]))
    schedule = training.warm_cosine_schedule(1e-3, 1e-4, 30, 5)
    np.testing.assert_array_equal([e.value for e in events.Scalars("train/lr")], np.float32(schedule))
    threshold = torch.load(run / "models" / "bolt.pt", weights_only=True)["calibration"]["thresholds"][""]["image"]
    assert events.Scalars("calibration/image_threshold")[0].value == np.float32(threshold)

    test = EventAccumulator(str(folders[1]))
    test.Reload()
    metrics = json.loads((run / "metrics.json").read_text())["categories"]["bolt"]
    assert test.Scalars("test/bolt/I-AUROC")[0].value == np.float32(metrics["I-AUROC"])


@pytest.mark.slow
def test_mlflow_logs_training_and_test_metrics_in_a_local_store(dataset, tmp_path):
    from mlflow import MlflowClient

    run = tmp_path / "run"
    assert main(["train", "--data", str(dataset / "bolt"), *TINY, "--log", "mlflow", "--out", str(run)]) == 0
    assert main(["test", str(run), "--log", "mlflow", "--quiet"]) == 0

    client = MlflowClient(tracking_uri=f"sqlite:///{run / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("run")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert runs.keys() == {"bolt", "test"} and all(r.info.status == "FINISHED" for r in runs.values())
    _, log = trained(run / "models" / "bolt.pt")
    history = client.get_metric_history(runs["bolt"].info.run_id, "train/loss")
    assert sorted((m.step, m.value) for m in history) == list(enumerate(log["losses"], start=1))
    assert runs["bolt"].data.params["iterations"] == "30" and runs["bolt"].data.params["backbone"] == "tiny_random"
    metrics = json.loads((run / "metrics.json").read_text())["categories"]["bolt"]
    assert runs["test"].data.metrics["test/bolt/I-AUROC"] == pytest.approx(metrics["I-AUROC"], abs=0)


@pytest.mark.parametrize(("kind", "module"), [("tensorboard", "torch.utils.tensorboard"), ("mlflow", "mlflow")])
def test_a_missing_logging_package_is_a_one_line_error(dataset, tmp_path, monkeypatch, capsys, kind, module):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if it were not installed
    assert main(["train", "--data", str(dataset / "bolt"), *TINY, "--log", kind, "--out", str(tmp_path / "r")]) == 2
    assert last_line(capsys.readouterr().err) == (f"inpformer: error: --log {kind} needs the {kind} package: "
                                                 f"pip install 'inpformer[{kind}]'")


def test_importing_inpformer_imports_no_logging_package():
    code = ("import sys, inpformer, inpformer.cli\n"
            "loaded = [m for m in sys.modules if m.split('.')[0] in ('tensorboard', 'mlflow')"
            " or m.startswith('torch.utils.tensorboard')]\n"
            "assert not loaded, loaded\n")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.slow
def test_ctrl_c_stops_every_process_of_a_multi_process_training_at_one_step(dataset, tmp_path):
    """Ctrl-C in a terminal signals the whole process group: the launcher and each training process."""
    run = tmp_path / "run"
    options = [*TINY, "--checkpoint-every", "5", "--devices", "2"]
    slowed = ("import sys, time\nfrom inpformer import training\nfrom inpformer.cli import main\n"
              "step = training.StableAdamW.step\n"
              "training.StableAdamW.step = lambda *args, **kwargs: (time.sleep(0.3), step(*args, **kwargs))[1]\n"
              "sys.exit(main(sys.argv[1:]))\n")
    process = subprocess.Popen([sys.executable, "-c", slowed, "train", "--data", str(dataset / "bolt"), *options,
                                "--out", str(run)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    deadline = time.monotonic() + 120
    while not (run / ".staging" / "state" / "bolt.pt").exists() and process.poll() is None:
        assert time.monotonic() < deadline, "no training state was written"
        time.sleep(0.1)
    os.killpg(process.pid, signal.SIGINT)
    _, errors = process.communicate(timeout=120)
    assert process.returncode == 130, errors
    stopped = [line for line in errors.splitlines() if "training stopped by SIGINT" in line]
    assert len(stopped) == 1 and "Traceback" not in errors, errors
    assert main(["train", "--resume", str(run), "--quiet", "--devices", "2"]) == 0
    assert trained(run / "models" / "bolt.pt")[1]["resumed_at"][0] >= 5
