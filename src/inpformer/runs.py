"""Run directories: train one detector per category (single) or one for all (multi), test them, write results.

Layout of RUN_DIR:
    run.json            setting, data roots, categories, config, model files
    models/<name>.pt    one checkpoint per category (single) or models/all.pt (multi)
    train.log, test.log
    metrics.json, metrics.csv, scores.csv, maps.npz (with save_maps)   written by `test_run`
"""

from __future__ import annotations

import csv
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .config import Config
from .data import Sample, find_categories, load_mvtec
from .detector import Evaluation, INPFormer
from .errors import InpformerError
from .metrics import METRIC_NAMES

log = logging.getLogger("inpformer")
SETTINGS = ("single", "multi")
MULTI_MODEL_NAME = "all"


def load_samples(roots: Sequence[str | Path], split: str, categories: Sequence[str] | None = None) -> list[Sample]:
    """Samples of `split` from one or several MVTec-layout roots (each a dataset root or a category folder)."""
    samples: list[Sample] = []
    for root in roots:
        wanted = None
        if categories:
            available = set(find_categories(root))
            wanted = [c for c in categories if c in available]
            if not wanted:
                continue
        samples += load_mvtec(root, split, wanted)
    if categories:
        missing = sorted(set(categories) - {s.category for s in samples})
        if missing:
            raise InpformerError(f"categories {', '.join(missing)} not found under {', '.join(map(str, roots))}; "
                                 "check --categories against the folder names")
    return samples


def train_run(data: Sequence[str | Path], out: str | Path, config: Config, setting: str = "single",
              categories: Sequence[str] | None = None, progress: bool = True) -> dict:
    """Trains the detector(s) of a run and writes RUN_DIR/run.json; returns its content."""
    if setting not in SETTINGS:
        raise InpformerError(f"unknown --setting {setting!r}; choose one of: {', '.join(SETTINGS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with log_to_file(out / "train.log"):
        samples = load_samples(data, "train", categories)
        found = sorted({s.category for s in samples})
        log.info("run %s: setting %s, %d categories (%s), %d training images", out, setting, len(found),
                 ", ".join(found), len(samples))
        groups = {MULTI_MODEL_NAME: samples} if setting == "multi" else {
            c: [s for s in samples if s.category == c] for c in found}
        models, seconds = {}, {}
        for name, items in groups.items():
            start = time.perf_counter()
            detector = INPFormer.from_config(config).fit(items, progress=progress)
            file = Path("models") / f"{name}.pt"
            detector.save(out / file)
            seconds[name] = time.perf_counter() - start
            models[name] = {"file": str(file), "categories": detector.categories}
            log.info("model %s: trained in %.1f min, saved %s", name, seconds[name] / 60, out / file)
        run = {
            "setting": setting,
            "data": [str(Path(d).resolve()) for d in data],
            "categories": found,
            "models": models,
            "config": config.to_dict(),
            "train_seconds": seconds,
        }
        (out / "run.json").write_text(json.dumps(run, indent=2))
    return run


def read_run(run_dir: str | Path) -> dict:
    path = Path(run_dir) / "run.json"
    if not path.is_file():
        raise InpformerError(f"{path}: not found; pass a run directory written by `inpformer train --out RUN_DIR`")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InpformerError(f"{path}: unreadable run file ({error}); retrain into a new --out folder") from None


def test_run(run_dir: str | Path, data: Sequence[str | Path] | None = None, save_maps: bool = False,
             progress: bool = True) -> Evaluation:
    """Evaluates every model of a run on its categories' test images; writes metrics and scores files."""
    run_dir = Path(run_dir)
    run = read_run(run_dir)
    roots = data or run["data"]
    with log_to_file(run_dir / "test.log"):
        metrics: dict[str, dict[str, float]] = {}
        scored = []
        start = time.perf_counter()
        for name, model in run["models"].items():
            detector = INPFormer.load(run_dir / model["file"])
            samples = load_samples(roots, "test", model["categories"])
            log.info("model %s: testing on %d images", name, len(samples))
            evaluation = detector.evaluate(samples, progress=progress)
            metrics.update(evaluation.metrics)
            scored += evaluation.images
        seconds = time.perf_counter() - start
        num_images = sum(len(s.samples) for s in scored)
        log.info("tested %d images in %.1f s (%.1f images/s)", num_images, seconds, num_images / seconds)
        mean = {m: float(np.mean([v[m] for v in metrics.values()])) for m in METRIC_NAMES}
        evaluation = Evaluation(metrics, mean, scored)
        write_results(run_dir, evaluation, save_maps)
    return evaluation


def write_results(run_dir: Path, evaluation: Evaluation, save_maps: bool) -> None:
    """metrics.json / metrics.csv (fractions; null / empty where not computable), scores.csv per image and,
    optionally, maps.npz."""
    def finite(values: dict[str, float]) -> dict[str, float | None]:
        return {m: (None if np.isnan(v) else v) for m, v in values.items()}

    content = {"categories": {c: finite(v) for c, v in evaluation.metrics.items()}, "mean": finite(evaluation.mean)}
    (run_dir / "metrics.json").write_text(json.dumps(content, indent=2))
    with open(run_dir / "metrics.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["category", *METRIC_NAMES])
        for name, values in [*evaluation.metrics.items(), ("mean", evaluation.mean)]:
            writer.writerow([name, *("" if np.isnan(values[m]) else f"{values[m]:.6f}" for m in METRIC_NAMES)])
    with open(run_dir / "scores.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "category", "defect_type", "label", "score"])
        for scored in evaluation.images:
            for sample, score in zip(scored.samples, scored.scores, strict=True):
                writer.writerow([sample.path, sample.category, sample.defect_type, sample.label, f"{score:.6f}"])
    if save_maps:
        images = evaluation.images
        np.savez_compressed(
            run_dir / "maps.npz",
            paths=np.array([str(s.path) for i in images for s in i.samples]),
            categories=np.array([s.category for i in images for s in i.samples]),
            labels=np.array([s.label for i in images for s in i.samples], dtype=np.uint8),
            scores=np.concatenate([i.scores for i in images]).astype(np.float32),
            maps=np.concatenate([i.maps for i in images]).astype(np.float32),
            masks=np.concatenate([i.masks for i in images]).astype(np.uint8),
        )


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
