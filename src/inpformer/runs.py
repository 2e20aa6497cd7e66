"""Run directories: the settings of the paper as choices of data, one training loop for all of them.

    single       one model per category
    multi        one model for all categories (with several data roots: super-multi-class)
    few-shot     K images per category drawn with the seed, each expanded x22, one model on the union;
                 `repeats` independent draws, reported as mean ± std
    zero-shot    (at test time) a run's model applied to categories it never saw; map = token-to-INP distance

Layout of RUN_DIR:
    run.json            setting, data sources, categories, config, model files
    models/<name>.pt    one checkpoint per category (single), all.pt (multi) or repeat-<i>.pt (few-shot)
    INCOMPLETE          only while a (re)training replaces the run's files, or after it was interrupted doing so:
                        such a run is refused. Training writes its checkpoints into .staging/ and replaces the
                        old run in one short step at the end, so a killed training leaves the old run intact.
    .staging/           while training: resume.json (its options, finished models, trackers), models/ (the finished
                        ones) and state/<name>.pt (the training state of the model in progress), for --resume
    tensorboard/, mlflow.db   experiment logs (train --log, test --log)
    train.log, test.log
    metrics.json, metrics.csv, scores.csv, recall.csv, maps.npz (with save_maps)   written by `test_run`
    zero-shot/          the same files for a zero-shot test
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
import os
import resource
import shutil
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .calibration import METHODS, Calibration, Thresholds, area_pixels, check_manual_values, describe_area
from .config import Config, config_from_dict
from .data.augment import draw_shots
from .data.datasets import DATASET_KINDS, load_dataset, load_folder
from .data.geometry import Geometry
from .data.images import Sample, image_shape, read_image
from .detector import INPFormer, split_validation, training_calibration_source
from .distributed import is_main_process, largest
from .errors import InpformerError, TrainingStopped
from .files import output_folder, write_atomically, write_text_atomically
from .inference import Prediction, decide, describe_rule, is_defective
from .metrics import METRIC_NAMES
from .report import GalleryItem, image_uri, write_report
from .results import Evaluation, RecallRow, ScoredImages, combine_repeats, merge, recall_rows, recall_table
from .tracking import open_tracker
from .training import RUNTIME_SETTINGS, stop_signals
from .visualize import overlay

log = logging.getLogger("inpformer")
SETTINGS = ("single", "multi", "super-multi", "few-shot")
INCOMPLETE, STAGING, RESUME_RECORD = "INCOMPLETE", ".staging", "resume.json"
RESULT_FILES = ("metrics.json", "metrics.csv", "scores.csv", "recall.csv", "maps.npz", "report.html",
                "zero-shot")  # of `test_run`


@dataclass(frozen=True)
class DataSource:
    """A dataset root of a supported layout (`kind` "auto" detects it), or plain folders (`kind` "folder":
    `root` holds good training images; optional folders of good and defective test images and masks)."""

    root: str
    kind: str = "auto"
    test_good: str | None = None
    test_defective: str | None = None
    masks: str | None = None
    json_dir: str | None = None  # Real-IAD: e.g. "realiad_jsons_sv" for the single-view split

    @property
    def name(self) -> str:
        return Path(self.root).resolve().name

    def load(self, split: str) -> list[Sample]:
        if self.kind == "folder":
            train, test = load_folder(self.root, self.test_good, self.test_defective, self.masks)
            return train if split == "train" else test
        if self.kind not in ("auto", *DATASET_KINDS):
            raise InpformerError(f"unknown --dataset {self.kind!r}; choose auto or one of {', '.join(DATASET_KINDS)}")
        return load_dataset(self.root, split, kind=self.kind, json_dir=self.json_dir)

    def to_json(self) -> dict:
        paths = ("root", "test_good", "test_defective", "masks")
        values = {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
        return {k: str(Path(v).resolve()) if k in paths else v for k, v in values.items()}


def load_samples(sources: Sequence[DataSource], split: str, categories: Sequence[str] | None = None) -> list[Sample]:
    """Samples of `split` from every source; with several sources, categories are named "<root name>/<category>"
    so that equal names in different datasets stay apart."""
    qualify = len(sources) > 1
    samples = []
    for source in sources:
        loaded = source.load(split)
        if qualify:
            loaded = [dataclasses.replace(s, category=f"{source.name}/{s.category}") for s in loaded]
        samples += loaded
    if categories:
        available = sorted({s.category for s in samples})
        missing = [c for c in categories if c not in available]
        if missing:
            raise InpformerError(f"categories {', '.join(missing)} not found; available: {', '.join(available)} "
                                 "(check --categories)")
        samples = [s for s in samples if s.category in set(categories)]
    return samples


def train_run(sources: Sequence[DataSource], out: str | Path, config: Config, setting: str = "single",
              categories: Sequence[str] | None = None, shots: int | None = None, repeats: int = 1,
              progress: bool = True, extra_good: str | Path | None = None, resume: bool = False,
              checkpoint_every: int = 100, tracking: str | None = None) -> dict:
    """Trains the detector(s) of a run and writes RUN_DIR/run.json; returns its content. Retraining into an existing
    run replaces it only once every new model is trained (see the module's docstring). `extra_good`: a plain folder
    of more good images of the one category trained (e.g. an operator's feedback/good), fitted on, never held out.

    The training state is saved in RUN_DIR/.staging every `checkpoint_every` optimizer steps (0: never) and when a
    SIGINT or SIGTERM stops training after its current step (raising `TrainingStopped`). With `resume`, the training
    interrupted in `out` goes on with the same options (`resumable_training`; others are refused): the models it
    finished are kept, and the one in progress continues from its saved state to the result of an uninterrupted
    training. `tracking` ("tensorboard" or "mlflow") logs every model's training under RUN_DIR (see tracking.py);
    a resumed training keeps logging as it did, unless given another."""
    _check_setting(setting, sources, shots, repeats)
    out = output_folder(out, "--resume" if resume else "--out")
    staging = out / STAGING
    options = json.loads(json.dumps({
        "data": [s.to_json() for s in sources], "setting": setting, "categories": categories, "shots": shots,
        "repeats": repeats, "extra_good": str(Path(extra_good).resolve()) if extra_good else None,
        "config": config.to_dict()}))  # as stored in JSON
    with log_to_file(out / "train.log"), stop_signals:
        if resume:
            record = _resume_record(out)
            _check_same_options(record["options"], options, out)
            tracking = tracking or record.get("tracking")
        samples = load_samples(sources, "train", categories)
        found = sorted({s.category for s in samples})
        if not samples:
            raise InpformerError(f"no good training images in {', '.join(s.root for s in sources)}; check --data")
        log.info("run %s: setting %s, %d categories (%s), %d training images", out, setting, len(found),
                 ", ".join(found), len(samples))
        plans = _training_plans(setting, samples, found, config.seed, shots, repeats)
        extra = _extra_good(extra_good, found, setting) if extra_good else []
        if not resume:
            if is_main_process():
                if (staging / RESUME_RECORD).is_file():
                    log.warning("discarding the interrupted training in %s (to go on with it instead: inpformer "
                                "train --resume %s)", out, out)
                shutil.rmtree(staging, ignore_errors=True)  # what an interrupted training left
            record = {"options": options, "models": {}, "train_seconds": {}, "trackers": {}}
        record["tracking"] = tracking
        for name, (items, repeat) in plans.items():
            file = Path("models") / f"{name}.pt"
            if name in record["models"] and (staging / file).is_file():
                log.info("model %s: trained before the interruption", name)
                continue
            _stop_if_asked(f"before training model {name}", out)
            start = time.perf_counter()
            detector = INPFormer.from_config(dataclasses.replace(config, seed=config.seed + repeat))
            tracker = None
            if tracking and is_main_process():
                kind, known = record["trackers"].get(name, (None, None))
                tracker = open_tracker(tracking, out, name, resume=known if kind == tracking else None)
                record["trackers"][name] = [tracking, tracker.id]
            _write_record(staging, record)
            state = staging / "state" / f"{name}.pt"
            try:
                detector.fit(items, augment=setting == "few-shot", progress=progress, extra_good=extra,
                             training_state=state, checkpoint_every=checkpoint_every,
                             resume=resume and state.is_file(), tracker=tracker)
            except TrainingStopped as stopped:
                raise TrainingStopped(f"model {name}: {stopped}; resume with: inpformer train --resume {out}",
                                      stopped.signal) from None
            finally:
                if tracker is not None:
                    tracker.close(finished=detector.calibration is not None)
            if is_main_process():  # the processes of a data-parallel run hold the same model
                detector.save(staging / file)
            record["train_seconds"][name] = time.perf_counter() - start
            record["models"][name] = {"file": str(file), "categories": detector.categories, "repeat": repeat,
                                      "training_images": [str(s.path) for s in items] if setting == "few-shot"
                                      else len(items)}
            if extra:
                record["models"][name]["extra_good"] = {"folder": options["extra_good"], "images": len(extra)}
            _write_record(staging, record)
            state.unlink(missing_ok=True)
            log.info("model %s: trained in %.1f min", name, record["train_seconds"][name] / 60)
        _stop_if_asked("before saving the run", out)
        run = {"setting": setting, "data": options["data"], "categories": found, "shots": shots, "repeats": repeats,
               "models": record["models"], "config": config.to_dict(), "train_seconds": record["train_seconds"]}
        if is_main_process():
            _replace_run(out, run)
            log.info("saved run %s (%s)", out, ", ".join(str(out / m["file"]) for m in run["models"].values()))
    return run


def resumable_training(run_dir: str | Path) -> dict:
    """The options of the training interrupted in `run_dir`, as `train_run`'s keyword arguments (sources, config,
    setting, categories, shots, repeats, extra_good)."""
    options = _resume_record(Path(run_dir))["options"]
    try:
        return {"sources": [DataSource(**source) for source in options["data"]],
                "config": config_from_dict(options["config"]),
                **{key: options[key] for key in ("setting", "categories", "shots", "repeats", "extra_good")}}
    except (KeyError, TypeError) as error:
        raise InpformerError(f"{Path(run_dir) / STAGING / RESUME_RECORD}: malformed ({error}); train anew with "
                             f"--out {run_dir}") from None


def _resume_record(run_dir: Path) -> dict:
    """The record of the training interrupted in `run_dir`: its options, finished models and trackers."""
    path = run_dir / STAGING / RESUME_RECORD
    if not path.is_file():
        finished = " (its training finished)" if (run_dir / "run.json").is_file() else ""
        raise InpformerError(f"--resume {run_dir}: no interrupted training to resume{finished}; train anew with "
                             f"--out {run_dir}")
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InpformerError(f"{path}: unreadable ({error}); train anew with --out {run_dir}") from None
    if not isinstance(record, dict) or not all(isinstance(record.get(key), dict)
                                               for key in ("options", "models", "train_seconds", "trackers")):
        raise InpformerError(f"{path}: not a training record of this version; train anew with --out {run_dir}")
    return record


def _write_record(staging: Path, record: dict) -> None:
    if is_main_process():
        write_text_atomically(staging / RESUME_RECORD, json.dumps(record, indent=2))


def _check_same_options(stored: dict, given: dict, run_dir: Path) -> None:
    """Refuses options that differ from the interrupted training's, naming the first (settings of how training
    runs, such as --device, may change)."""
    pairs = [(key, stored.get(key), value) for key, value in given.items() if key != "config"]
    pairs += [(key, stored["config"].get(key), value) for key, value in given["config"].items()
              if key not in RUNTIME_SETTINGS]
    for key, before, now in pairs:
        if before != now:
            raise InpformerError(f"--resume {run_dir}: --{key.replace('_', '-')} differs: {now!r} here, {before!r} "
                                 "in the interrupted training; resume without it (its own options are used), or "
                                 f"train anew with --out {run_dir}")


def _stop_if_asked(where: str, run_dir: Path) -> None:
    """Raises `TrainingStopped` if a SIGINT or SIGTERM asked training to stop (in any process)."""
    received = largest(stop_signals.received or 0)
    if received:
        raise TrainingStopped(f"training stopped by {signal.Signals(received).name} {where}; resume with: inpformer "
                              f"train --resume {run_dir}", received)


def _extra_good(folder: str | Path, categories: list[str], setting: str) -> list[Sample]:
    if setting == "few-shot" or len(categories) != 1:
        raise InpformerError(f"--extra-good adds good images to one category, and this training has {len(categories)}"
                             f" ({', '.join(categories)}); train one category (--categories NAME), not few-shot")
    return load_folder(folder, category=categories[0])[0]


def _check_setting(setting: str, sources: Sequence[DataSource], shots: int | None, repeats: int) -> None:
    if setting not in SETTINGS:
        raise InpformerError(f"unknown --setting {setting!r}; choose one of: {', '.join(SETTINGS)}")
    if setting == "few-shot":
        if shots is None:
            raise InpformerError("--setting few-shot needs --shots K (images per category, e.g. 4)")
        if isinstance(shots, bool) or not isinstance(shots, int) or shots < 1:
            raise InpformerError(f"--shots must be at least 1, got {shots!r}")
        if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
            raise InpformerError(f"--repeats must be at least 1, got {repeats!r}")
    elif shots is not None or repeats != 1:
        raise InpformerError(f"--shots and --repeats apply to --setting few-shot, not {setting}")
    if setting == "super-multi" and len(sources) < 2:
        raise InpformerError("--setting super-multi trains on several datasets: give --data ROOT1 ROOT2 ...")


def _replace_run(out: Path, run: dict) -> None:
    """Moves the staged checkpoints into place and writes run.json. The INCOMPLETE marker covers the few
    milliseconds in which the run holds a mix of old and new files; files of the old run that the new one does not
    have (models, their ONNX exports, test results) are removed, since they no longer describe it."""
    marker = out / INCOMPLETE
    write_text_atomically(marker, f"training replaced this run's files at {time.strftime('%Y-%m-%d %H:%M:%S')} "
                                  f"(pid {os.getpid()}) and was interrupted; retrain into this folder\n")
    old_files = set((out / "models").glob("*")) if (out / "models").is_dir() else set()
    stale_results = [out / name for name in RESULT_FILES if (out / name).exists()]
    (out / "models").mkdir(exist_ok=True)
    for info in run["models"].values():
        os.replace(out / STAGING / info["file"], out / info["file"])
        old_files.discard(out / info["file"])  # the rest, ONNX exports included, belongs to the old models
    for path in sorted(old_files) + stale_results:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    if stale_results:
        log.info("removed the previous models' results: %s", ", ".join(p.name for p in stale_results))
    write_text_atomically(out / "run.json", json.dumps(run, indent=2))
    marker.unlink()
    shutil.rmtree(out / STAGING, ignore_errors=True)


def _training_plans(setting: str, samples: list[Sample], categories: list[str], seed: int, shots: int | None,
                    repeats: int) -> dict[str, tuple[list[Sample], int]]:
    """Model name -> (its training samples, repeat index)."""
    if setting == "single":
        return {c.replace("/", "__"): ([s for s in samples if s.category == c], 0) for c in categories}
    if setting == "few-shot":
        return {f"repeat-{r}": (draw_shots(samples, shots, seed + r), r) for r in range(repeats)}
    return {"all": (samples, 0)}


def read_run(run_dir: str | Path) -> dict:
    """run.json of a complete run, checked: every model file it names lies inside the run directory."""
    run_dir = Path(run_dir)
    path = run_dir / "run.json"
    if (run_dir / INCOMPLETE).is_file():
        raise InpformerError(f"{run_dir}: incomplete run (a training into it was interrupted while replacing its "
                             f"files); retrain with `inpformer train ... --out {run_dir}`")
    if not path.is_file():
        hint = " (its training is still running or was interrupted)" if (run_dir / STAGING).is_dir() else ""
        if (run_dir / STAGING / RESUME_RECORD).is_file():
            hint = f" (its training is running, or was interrupted: go on with `inpformer train --resume {run_dir}`)"
        raise InpformerError(f"{path}: not found{hint}; pass a run directory written by "
                             "`inpformer train --out RUN_DIR`")
    try:
        run = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InpformerError(f"{path}: unreadable run file ({error}); retrain into a new --out folder") from None
    problem = _run_problem(run, run_dir)
    if problem:
        raise InpformerError(f"{path}: {problem}; retrain into a new --out folder")
    return run


def _run_problem(run: object, run_dir: Path) -> str | None:
    """What makes `run` not a valid run.json of `run_dir`, or None."""
    if not isinstance(run, dict) or not isinstance(run.get("models"), dict) or not run["models"]:
        return "not a run file of this version (needs a 'models' entry)"
    fields = {f.name for f in dataclasses.fields(DataSource)}
    if not isinstance(run.get("data"), list) or not all(
            isinstance(d, dict) and isinstance(d.get("root"), str) and set(d) <= fields
            and all(isinstance(v, str) for v in d.values()) for d in run["data"]):
        return f"not a run file of this version (needs a 'data' list of sources with the entries {sorted(fields)})"
    inside = run_dir.resolve()
    for name, info in run["models"].items():
        if not isinstance(info, dict) or not isinstance(info.get("file"), str) or not isinstance(
                info.get("categories"), list) or not all(isinstance(c, str) for c in info["categories"]):
            return f"model {name!r} needs a 'file' and a list of 'categories'"
        if not isinstance(info.get("repeat", 0), int):
            return f"model {name!r}: 'repeat' must be an integer"
        file = Path(info["file"])
        if file.is_absolute() or ".." in file.parts or not (run_dir / file).resolve().is_relative_to(inside):
            return f"model {name!r}: file {info['file']!r} lies outside the run directory, which is refused"
    return None


def test_run(run_dir: str | Path, sources: Sequence[DataSource] | None = None,
             categories: Sequence[str] | None = None, model: str | None = None, zero_shot: bool = False,
             save_maps: bool = False, out: str | Path | None = None, progress: bool = True,
             report: bool = False, tracking: str | None = None) -> Evaluation:
    """Evaluates the models of a run on their categories' test images (or, zero-shot, one model on any
    categories); writes metrics.json / metrics.csv / scores.csv (and maps.npz) into `out`: by default the run
    directory, or RUN_DIR/zero-shot for zero-shot tests, so they never overwrite the run's own results.
    With calibrated thresholds (not zero-shot), also the decisions per defect type: recall.csv and
    `Evaluation.recall` (few-shot runs: of the first draw).
    With `report`, also report.html: metrics, curves, histograms and a gallery with the calibrated decisions.
    With `tracking` ("tensorboard" or "mlflow"), the metrics also go to the run's experiment logs (a test named "test").
    `run_dir` may also be a single checkpoint (e.g. an imported model): it is tested on every category of
    `sources` (required), and the results go by default to the folder <checkpoint name>-test beside it."""
    target = Path(run_dir)
    if target.is_file():
        sources = _checkpoint_sources(target, sources, "test")
        samples = load_samples(sources, "test", categories)
        run_dir, run, default_out = target.parent, _checkpoint_run(target, samples), target.with_name(
            f"{target.stem}-test")
    else:
        run_dir = default_out = target
        run = read_run(run_dir)
        sources = sources or [DataSource(**d) for d in run["data"]]
        samples = load_samples(sources, "test", categories)
    models = select_models(run, model, zero_shot)
    roots = ", ".join(s.root for s in sources)
    if not samples:
        raise InpformerError(f"no labelled test images in {roots}; add a test split (or --data-test-good / "
                             "--data-test-defect for plain folders)")
    known = {c for info in models.values() for c in info["categories"]}
    if not zero_shot and not known & {s.category for s in samples}:
        raise InpformerError(f"{run_dir}: none of the run's categories ({', '.join(sorted(known))}) is in {roots} "
                             f"(found: {', '.join(sorted({s.category for s in samples}))}); pass the data the run "
                             "was trained on with --data, or use --zero-shot for unseen categories")
    out = output_folder(out if out else default_out / "zero-shot" if zero_shot else default_out, "--out")
    tracker, finished = None, False
    if tracking:
        name = "zero-shot test" if zero_shot else "test"
        tracker = open_tracker(tracking, out if target.is_file() else run_dir, name)
    try:
        evaluation = _test_models(target, run_dir, run, models, samples, roots, zero_shot, save_maps, out, progress,
                                  report)
        if tracker is not None:
            tracker.log_params({"run": str(target), "zero_shot": zero_shot, "models": ",".join(models)})
            tracker.log_metrics({f"test/{name}/{metric}": value for name, values, _ in evaluation.rows()
                                 for metric, value in values.items()}, 0)
        finished = True
    finally:
        if tracker is not None:
            tracker.close(finished)
    return evaluation


def _test_models(target: Path, run_dir: Path, run: dict, models: dict, samples: list[Sample], roots: str,
                 zero_shot: bool, save_maps: bool, out: Path, progress: bool, report: bool) -> Evaluation:
    """`test_run` once its models and images are chosen."""
    with log_to_file(out / "test.log"):
        by_repeat: dict[int, list[Evaluation]] = {}
        gallery: list[GalleryItem] = []
        thresholds: dict[str, str] = {}
        decisions: list[tuple[Sample, bool, float, float]] = []
        start = time.perf_counter()
        for name, info in models.items():
            detector = INPFormer.load(run_dir / info["file"])
            wanted = None if zero_shot else set(info["categories"])
            items = [s for s in samples if wanted is None or s.category in wanted]
            if not items:
                log.warning("model %s: no test images of its categories (%s) in %s", name,
                            ", ".join(info["categories"]), roots)
                continue
            log.info("model %s: testing on %d images%s", name, len(items), " (zero-shot)" if zero_shot else "")
            decide_here = detector.calibration is not None and not zero_shot and info.get("repeat", 0) == 0
            area_rule = decide_here and any(t.min_defect_area for t in detector.calibration.thresholds.values())
            evaluation = detector.evaluate(items, zero_shot=zero_shot, progress=progress,
                                           keep_maps=save_maps or report or area_rule)
            by_repeat.setdefault(info.get("repeat", 0), []).append(evaluation)
            if decide_here:
                decisions += [d for scored in evaluation.images for d in _decisions(detector, scored)]
            elif detector.calibration is None or zero_shot:
                reason = ("zero-shot maps do not follow its thresholds" if zero_shot else
                          "no calibrated thresholds (set them with `inpformer calibrate`)")
                log.info("model %s: %s, so no recall per defect type", name, reason)
            if report and info.get("repeat", 0) == 0:
                gallery += [item for scored in evaluation.images for item in gallery_items(detector, scored)]
                if detector.calibration:
                    thresholds[f"image threshold ({name})"] = _describe(detector.calibration)
        seconds = time.perf_counter() - start
        evaluation = combine_repeats([merge(evaluations) for evaluations in by_repeat.values()])
        num_images = sum(len(s.samples) for s in evaluation.images)
        log.info("tested %d images in %.1f s (%.1f images/s), peak memory %.0f MB", num_images, seconds,
                 num_images / seconds, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        _warn_missing_metrics(evaluation)
        evaluation.recall = recall_rows(decisions) if decisions else None
        write_results(out, evaluation, save_maps)
        if evaluation.recall:
            log.debug("decisions at the calibrated thresholds:\n%s", recall_table(evaluation.recall))
        if report:
            areas = {area for *_, area in decisions} or {0.0}
            summary = {"run": str(target), "setting": run.get("setting", ""), "images": str(num_images),
                       "zero-shot": str(zero_shot), **thresholds,
                       "decision": describe_rule(areas.pop() if len(areas) == 1 else None)}
            metrics = {name: values for name, values, _ in evaluation.rows()}
            tables = [("Decisions per defect type at the calibrated thresholds", RECALL_COLUMNS,
                       _recall_cells(evaluation.recall))] if evaluation.recall else []
            log.info("report: %s", write_report(out / "report.html", "inpformer test report", gallery, summary,
                                                 metrics, tables))
    return evaluation


def select_models(run: dict, model: str | None, zero_shot: bool) -> dict:
    models = run["models"]
    if model is not None:
        if model not in models:
            raise InpformerError(f"--model {model}: not in this run; available: {', '.join(models)}")
        return {model: models[model]}
    if zero_shot and len(models) > 1:
        raise InpformerError(f"zero-shot applies one model, this run has {len(models)} ({', '.join(models)}); "
                             "choose one with --model NAME")
    return models


def calibrate_run(run_dir: str | Path, sources: Sequence[DataSource] | None = None, method: str | None = None,
                  max_false_reject: float | None = None, model: str | None = None, progress: bool = True,
                  image_threshold: float | None = None, pixel_threshold: float | None = None,
                  category: str | None = None, min_defect_area: float | None = None, how: str = "") -> dict:
    """Recomputes the thresholds of a run's models without retraining, and saves them into the checkpoints.

    Images: with `sources`, their test split (false-reject uses its good images, f1 good and defective ones with
    masks; plain folders also give their good images, e.g. an operator's feedback/good, to a one-category model);
    without, f1 uses the run's own test split and false-reject the run's held-out good training images
    (the same split as at training, so only --max-false-reject changes). Returns model name -> pooled thresholds.
    `run_dir` may also be a single checkpoint (e.g. an imported model), calibrated on `sources` (required): their
    test split, and for plain folders also the good images of --data-good; it logs to <checkpoint>.calibrate.log.

    By hand instead: `image_threshold` / `pixel_threshold` (raw units), or `min_defect_area` alone, set those
    values without images (see `INPFormer.set_thresholds`), for `category` or every category. A `min_defect_area`
    given with images is set after calibrating; otherwise the models' minimum areas are kept. Every change is
    recorded in the models' calibration history with `how` (e.g. the command line)."""
    check_manual_values(image_threshold, pixel_threshold, min_defect_area)
    by_hand = image_threshold is not None or pixel_threshold is not None
    if by_hand or (min_defect_area is not None and not sources and method is None and max_false_reject is None):
        if sources or method is not None or max_false_reject is not None:
            raise InpformerError("--image-threshold and --pixel-threshold set thresholds by hand, without images: "
                                 "drop --data, --method and --max-false-reject (or the thresholds)")
        return _set_by_hand(Path(run_dir), model, category, image_threshold, pixel_threshold, min_defect_area, how)
    if category is not None:
        raise InpformerError("--category applies to thresholds set by hand (--image-threshold, --pixel-threshold, "
                             "or --min-defect-area alone); calibrating on images sets every category")
    method = method or "false-reject"
    if method not in METHODS:
        raise InpformerError(f"unknown --method {method!r}; choose one of: {', '.join(METHODS)}")
    target = Path(run_dir)
    checkpoint = target.is_file()
    folders = bool(sources) and all(s.kind == "folder" for s in sources)  # e.g. --data-good FEEDBACK/good
    if checkpoint:
        sources, held_out = _checkpoint_sources(target, sources, "calibrate"), False
        samples = load_samples(sources, "test")
        if all(s.kind == "folder" for s in sources):
            samples = load_samples(sources, "train") + samples
        run_dir, run, log_file = target.parent, _checkpoint_run(target, samples), target.with_suffix(".calibrate.log")
    else:
        run_dir, log_file = target, target / "calibrate.log"
        run = read_run(run_dir)
        held_out = sources is None and method == "false-reject"
        sources = sources or [DataSource(**d) for d in run["data"]]
    models = select_models(run, model, False)
    results = {}
    with log_to_file(log_file):
        if not checkpoint:
            samples = load_samples(sources, "train" if held_out else "test")
            if folders:
                samples = _in_model_category(load_samples(sources, "train") + samples, models)
        for name, info in models.items():
            path = run_dir / info["file"]
            detector = INPFormer.load(path)
            items = [s for s in samples if s.category in set(info["categories"])]
            if held_out:
                items, source = _held_out(items, info, detector.config)
            else:
                good, defective = sum(s.label == 0 for s in items), sum(s.label != 0 for s in items)
                source = (f"{good} good{f' and {defective} defective' if method == 'f1' else ''} "
                          f"{'' if checkpoint or folders else 'test '}images of {', '.join(s.root for s in sources)}")
            if not items:
                raise InpformerError(f"no calibration images for model {name} ({', '.join(info['categories'])}) in "
                                     f"{', '.join(s.root for s in sources)}; check --data")
            detector.calibrate(items, method, max_false_reject, progress=progress, source=source, how=how)
            if min_defect_area is not None:
                detector.set_thresholds(min_defect_area=min_defect_area, how=how)
            detector.save(path)
            results[name] = detector.calibration.thresholds[""]
            log.info("model %s: thresholds saved to %s", name, path)
    return results


def held_out_images(run_dir: str | Path, checkpoint: str | Path, config: Config) -> tuple[list[Sample], str]:
    """The good training images whose scores set the training thresholds of the run's model in `checkpoint` (the
    split `calibrate RUN_DIR` uses too), and which they are in words."""
    run = read_run(run_dir)
    infos = [info for info in run["models"].values()
             if (Path(run_dir) / info["file"]).resolve() == Path(checkpoint).resolve()]
    if not infos:
        raise InpformerError(f"{checkpoint}: not a model of the run {run_dir}; check run.json")
    items = load_samples([DataSource(**d) for d in run["data"]], "train", infos[0]["categories"])
    return _held_out(items, infos[0], config)


def _held_out(items: list[Sample], info: dict, config: Config) -> tuple[list[Sample], str]:
    """Of a model's training images (`info`: its run.json entry), those held out of fitting (or, without any, the
    fitted ones), and which they are in words."""
    if isinstance(info.get("training_images"), list):  # few-shot: the drawn images
        drawn = set(info["training_images"])
        items = [s for s in items if str(s.path) in drawn]
    fitting, validation = split_validation(items, config.val_fraction, config.seed)
    return validation or fitting, training_calibration_source(fitting, validation)


def _set_by_hand(target: Path, model: str | None, category: str | None, image: float | None, pixel: float | None,
                 min_defect_area: float | None, how: str) -> dict[str, Thresholds]:
    """`calibrate_run` by hand: the models of a run (those that know `category`, if given) or one checkpoint.
    Returns model name -> the thresholds of `category` (or the pooled ones)."""
    if target.is_file():
        run_dir, log_file = target.parent, target.with_suffix(".calibrate.log")
        models = select_models({"models": {target.stem: {"file": target.name}}}, model, False)
    else:
        run_dir, log_file, run = target, target / "calibrate.log", read_run(target)
        models = select_models(run, model, False)
        if category is not None:
            models = {name: info for name, info in models.items() if category in info["categories"]}
            if not models:
                known = sorted({c for info in run["models"].values() for c in info["categories"]})
                raise InpformerError(f"--category {category}: no model of {target} knows it; known: "
                                     f"{', '.join(known)}")
    results = {}
    with log_to_file(log_file):
        for name, info in models.items():
            path = run_dir / info["file"]
            detector = INPFormer.load(path)
            change = detector.set_thresholds(image, pixel, category, min_defect_area, how)
            detector.save(path)
            results[name] = detector.calibration.thresholds[category or ""]
            log.info("model %s: %s set by hand by %s at %s (%s); saved to %s", name, ", ".join(
                f"{key} {value:g}" for key, value in change.items() if key in ("image", "pixel", "min_defect_area")),
                change["by"], change["at"], change["category"], path)
    return results


def _in_model_category(samples: list[Sample], models: dict) -> list[Sample]:
    """Images of plain folders, which name no category, as images of the one model's one category."""
    categories = [c for info in models.values() for c in info["categories"]]
    if len(categories) != 1:
        raise InpformerError(f"plain folders (--data-good) hold images of one category, and these models have "
                             f"{len(categories)} ({', '.join(categories)}); choose a model of one category with "
                             "--model NAME")
    return [dataclasses.replace(s, category=categories[0]) for s in samples]


def _checkpoint_sources(path: Path, sources: Sequence[DataSource] | None, command: str) -> Sequence[DataSource]:
    if not sources:
        raise InpformerError(f"{path}: a single checkpoint keeps no record of its data; give the images to {command} "
                             "it on with --data ROOT (or --data-good DIR)")
    return sources


def _checkpoint_run(path: Path, samples: Sequence[Sample]) -> dict:
    """A single checkpoint seen as a run of one model, for every category of `samples` (the data given with it)."""
    return {"models": {path.stem: {"file": path.name, "categories": sorted({s.category for s in samples})}},
            "data": []}


def _describe(calibration: Calibration) -> str:
    pooled = calibration.thresholds[""]
    area = f"; minimum defect area {describe_area(pooled.min_defect_area)}" if pooled.min_defect_area else ""
    return f"{pooled.image:.6f} ({pooled.method}; set on {calibration.source or 'unrecorded images'}{area})"


def gallery_items(detector: INPFormer, scored: ScoredImages) -> list[GalleryItem]:
    """Report items for evaluated images, with ground truth: the overlay on the centre crop the model saw (tiled
    models: on the whole image) and, with calibrated thresholds, the decision and defect outlines of `decide`."""
    items = []
    crop = detector.preprocess.crop_size
    for sample, score, anomaly_map in zip(scored.samples, scored.scores, scored.maps, strict=True):
        image = read_image(sample.path)
        if detector.calibration:
            prediction = _evaluated_prediction(detector, sample, float(score), anomaly_map, image)
            picture, normalised, decision = prediction.overlay(), prediction.normalized_score, prediction.decision
        else:
            crop_map = Geometry(crop, crop).to_original(anomaly_map.astype(np.float32), crop)
            limits = np.percentile(np.concatenate([np.ravel(m) for m in scored.maps]), [1, 99.9])
            picture, normalised, decision = overlay(detector.preprocess.view(image), crop_map, *limits), None, None
        items.append(GalleryItem(str(sample.path), sample.category, float(score), normalised, decision,
                                 image_uri(picture), label=sample.label))
    return items


def _decisions(detector: INPFormer, scored: ScoredImages) -> list[tuple[Sample, bool, float, float]]:
    """(sample, decided defective, image threshold, minimum defect area) of evaluated images, by the rule of
    `decide` (the maps are needed only with a minimum defect area)."""
    decisions = []
    for index, (sample, score) in enumerate(zip(scored.samples, scored.scores, strict=True)):
        thresholds = _thresholds(detector.calibration, sample.category)
        if thresholds.min_defect_area:
            defective = _evaluated_prediction(detector, sample, float(score), scored.maps[index]).is_defective
        else:
            defective = is_defective(float(score), thresholds)
        decisions.append((sample, defective, thresholds.image, thresholds.min_defect_area))
    return decisions


def _evaluated_prediction(detector: INPFormer, sample: Sample, score: float, anomaly_map: np.ndarray,
                          image: np.ndarray | None = None) -> Prediction:
    """`decide` on an evaluated image's map: on the centre crop the model saw, with the minimum defect area
    scaled from the original image's pixels to the crop's (tiled models: at the original resolution)."""
    thresholds = _thresholds(detector.calibration, sample.category)
    shape = image.shape[:2] if image is not None else image_shape(sample.path)
    anomaly_map = anomaly_map.astype(np.float32)
    min_pixels = area_pixels(thresholds.min_defect_area, shape)
    tiling = detector.config.tiling()
    if tiling:
        return decide(tiling.to_original(anomaly_map, shape), score, thresholds, min_pixels, sample.category,
                      str(sample.path), image)
    crop = detector.preprocess.crop_size
    resized = detector.preprocess.geometry.placement(shape).resized
    scale = resized[0] * resized[1] / (shape[0] * shape[1])
    return decide(Geometry(crop, crop).to_original(anomaly_map, crop), score, thresholds,
                  math.ceil(min_pixels * scale), sample.category, str(sample.path),
                  None if image is None else detector.preprocess.view(image))


def _thresholds(calibration: Calibration, category: str) -> Thresholds:
    """A category's thresholds; the pooled ones for categories the calibration did not see (a checkpoint tested
    on other data)."""
    return calibration.thresholds.get(category, calibration.thresholds[""])


def _warn_missing_metrics(evaluation: Evaluation) -> None:
    for category, values in evaluation.metrics.items():
        missing = [m for m in METRIC_NAMES if np.isnan(values[m])]
        if missing:
            log.warning("%s: cannot compute %s (needs good and defective test images%s)", category,
                        ", ".join(missing), " and defect masks" if missing[0].startswith(("P-", "AU")) else "")


def write_results(run_dir: Path, evaluation: Evaluation, save_maps: bool) -> None:
    """metrics.json / metrics.csv (fractions; null / empty where not computable), scores.csv per image and,
    optionally, maps.npz with the exact maps and masks the metrics used."""
    write_text_atomically(run_dir / "metrics.json", json.dumps(evaluation.to_json(), indent=2))
    rows = [["category", *METRIC_NAMES, *(f"{m} std" for m in METRIC_NAMES if evaluation.std)]]
    for name, values, std in evaluation.rows():
        cells = [values[m] for m in METRIC_NAMES] + ([std[m] for m in METRIC_NAMES] if std else [])
        rows.append([name, *("" if np.isnan(v) else f"{v:.6f}" for v in cells)])
    write_text_atomically(run_dir / "metrics.csv", _csv(rows))
    images = evaluation.images
    rows = [["path", "category", "defect_type", "label", "score"]]
    for scored in images:
        for sample, score in zip(scored.samples, scored.scores, strict=True):
            rows.append([sample.path, sample.category, sample.defect_type, sample.label, f"{score:.6f}"])
    write_text_atomically(run_dir / "scores.csv", _csv(rows))
    if evaluation.recall:
        rows = [["category", "defect_type", "images", "decided_defective", "rate", "measure", "image_threshold",
                 "min_defect_area"]]
        rows += [[r.category, r.defect_type, r.images, r.defective, f"{r.rate:.6f}", r.measure,
                  f"{r.image_threshold:.6f}", f"{r.min_defect_area:g}"] for r in evaluation.recall]
        write_text_atomically(run_dir / "recall.csv", _csv(rows))
    else:  # no decisions this time: a recall.csv of an earlier test would not describe these results
        (run_dir / "recall.csv").unlink(missing_ok=True)
    if save_maps:
        maps = [m.astype(np.float32) for i in images for m in i.maps]
        masks = [m.astype(np.uint8) for i in images for m in i.masks]
        if len({m.shape for m in maps}) == 1:
            arrays = {"maps": np.stack(maps), "masks": np.stack(masks)}
        else:  # tiled models: each image's stitched map has that image's size
            arrays = {f"{kind}_{n}": m for kind, items in (("map", maps), ("mask", masks)) for n, m in enumerate(items)}
        columns = {
            "paths": np.array([str(s.path) for i in images for s in i.samples]),
            "categories": np.array([s.category for i in images for s in i.samples]),
            "labels": np.array([s.label for i in images for s in i.samples], dtype=np.uint8),
            "scores": np.concatenate([i.scores for i in images]).astype(np.float32),
            **arrays,
        }

        def save(tmp: str) -> None:
            with open(tmp, "wb") as file:  # a file object: given a name, numpy would append ".npz" to it
                np.savez_compressed(file, **columns)

        write_atomically(run_dir / "maps.npz", save)


RECALL_COLUMNS = ("category", "defect type", "defective / images", "rate (%)", "measure", "image threshold",
                  "minimum defect area")


def _recall_cells(rows: Sequence[RecallRow]) -> list[list[str]]:
    return [[r.category, r.defect_type, f"{r.defective} / {r.images}", f"{100 * r.rate:.2f}", r.measure,
             f"{r.image_threshold:.6f}", describe_area(r.min_defect_area)] for r in rows]


def _csv(rows: list[list]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer).writerows(rows)
    return buffer.getvalue()


class log_to_file:
    """Context manager: the "inpformer" logger writes to `path` (everything) and to the console (info and up,
    through tqdm.write so progress bars stay intact)."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self) -> log_to_file:
        self.file_handler = logging.FileHandler(self.path)
        self.file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        self.console_handler = _TqdmHandler()
        self.console_handler.setLevel(logging.INFO)
        log.addHandler(self.file_handler)
        log.addHandler(self.console_handler)
        log.setLevel(logging.DEBUG)
        log.propagate = False
        return self

    def __exit__(self, *exc) -> None:
        for handler in (self.file_handler, self.console_handler):
            log.removeHandler(handler)
            handler.close()


class _TqdmHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        tqdm.write(self.format(record), file=sys.stderr)
