"""Training-set audit: a "good" folder from a real line often holds a few defective parts. Every training image
of a run is scored out-of-fold (k folds, each scored by a model fitted on the other folds only, trained from one
shared feature cache) and ranked, so the most suspicious ones can be checked and removed before retraining.

    RUN_DIR/audit/audit.csv     every training image: rank, path, category, out-of-fold score, robust z-score
    RUN_DIR/audit/report.html   the most suspicious images with their anomaly maps
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch.utils.data import Subset

from .config import Config
from .data.images import ImageDataset, Sample
from .detector import INPFormer
from .errors import InpformerError
from .files import write_text_atomically
from .report import GalleryItem, write_report
from .results import ScoredImages
from .runs import DataSource, gallery_items, load_samples, log_to_file, read_run, select_models
from .training import encode_dataset, train

log = logging.getLogger("inpformer")


@dataclass
class Suspect:
    """A training image, with its out-of-fold score and how far that lies above its category's good images."""

    rank: int
    path: str
    category: str
    score: float
    z_score: float  # (score - category median) / (1.4826 * median absolute deviation): ~N(0, 1) for good images


def audit_run(run_dir: str | Path, folds: int = 5, iterations: int | None = None, model: str | None = None,
              top: int = 20, progress: bool = True) -> list[Suspect]:
    """Scores every training image of a run's models out-of-fold; writes RUN_DIR/audit/ and returns all images,
    most suspicious first. `iterations` shortens each fold's training (default: the run's own)."""
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
        raise InpformerError(f"--folds must be at least 2, got {folds!r}")
    if top < 1:
        raise InpformerError(f"--top must be at least 1, got {top}")
    run_dir = Path(run_dir)
    run = read_run(run_dir)
    models = select_models(run, model, False)
    sources = [DataSource(**d) for d in run["data"]]
    out = run_dir / "audit"
    out.mkdir(exist_ok=True)
    suspects, gallery = [], []
    with log_to_file(out / "audit.log"):
        samples = load_samples(sources, "train")
        for name, info in models.items():
            items = [s for s in samples if s.label == 0 and s.category in set(info["categories"])]
            if isinstance(info.get("training_images"), list):  # few-shot: only the drawn images were trained on
                drawn = set(info["training_images"])
                items = [s for s in items if str(s.path) in drawn]
            config = INPFormer.load(run_dir / info["file"]).config
            if iterations is not None:
                config = dataclasses.replace(config, iterations=iterations, epochs=None)
            scored, detectors = _out_of_fold(items, config, folds, progress)
            log.info("model %s: %d training images scored out-of-fold (%d folds)", name, len(items), folds)
            model_suspects = _rank(scored)
            suspects += model_suspects
            worst = {s.path for s in model_suspects[:top]}
            for fold_scored, detector in zip(scored, detectors, strict=True):
                chosen = [i for i, s in enumerate(fold_scored.samples) if str(s.path) in worst]
                gallery += gallery_items(detector, _subset(fold_scored, chosen))
    suspects.sort(key=lambda s: -s.z_score)
    for rank, suspect in enumerate(suspects, 1):
        suspect.rank = rank
    z_of = {s.path: s.z_score for s in suspects}
    gallery = [dataclasses.replace(g, score=z_of[g.source], decision=None) for g in gallery]
    _write(out, suspects, gallery, folds, top)
    return suspects


def _out_of_fold(samples: list[Sample], config: Config, folds: int,
                 progress: bool) -> tuple[list[ScoredImages], list[INPFormer]]:
    """Per fold, the scores (and maps) of its images by a model fitted on the other folds."""
    if config.tiling() is not None:
        raise InpformerError("audit does not support tiled models (--tile-scale) yet; audit an untiled run")
    if len(samples) < folds:
        raise InpformerError(f"{len(samples)} training images cannot be split into --folds {folds}; use fewer folds")
    assignment = _assign_folds(samples, folds, config.seed)
    base = INPFormer.from_config(config)
    base.net = base._build()
    dataset = ImageDataset(samples, base.preprocess)
    features = encode_dataset(base.net, dataset, storage=config.feature_cache_storage, progress=progress)
    scored, detectors = [], []
    for fold in range(folds):
        fitting = np.flatnonzero(assignment != fold)
        held_out = np.flatnonzero(assignment == fold)
        detector = INPFormer.from_config(config)
        detector.categories = sorted({s.category for s in samples})
        detector.backbone_source = base.backbone_source
        detector.net = detector._build(shared_encoder=base.net.encoder)
        detector.training_log = train(detector.net, Subset(dataset, fitting.tolist()), config, progress=progress,
                                      features=features[fitting])
        detector.net.eval()
        scored.append(detector.score([samples[i] for i in held_out], progress=progress))
        detectors.append(detector)
    return scored, detectors


def _assign_folds(samples: list[Sample], folds: int, seed: int) -> np.ndarray:
    """A fold per sample: each category's images shuffled with `seed` and dealt round-robin, so every fold holds
    every category."""
    assignment = np.empty(len(samples), dtype=int)
    rng = np.random.default_rng(seed)
    for category in sorted({s.category for s in samples}):
        indices = np.flatnonzero([s.category == category for s in samples])
        assignment[rng.permutation(indices)] = np.arange(len(indices)) % folds
    return assignment


def _rank(scored: list[ScoredImages]) -> list[Suspect]:
    """The images of all folds, most suspicious first, by their score's robust z within the category."""
    paths = [str(s.path) for fold in scored for s in fold.samples]
    categories = np.array([s.category for fold in scored for s in fold.samples])
    scores = np.concatenate([fold.scores for fold in scored]).astype(np.float64)
    z = np.empty_like(scores)
    for category in set(categories.tolist()):
        selected = categories == category
        median = np.median(scores[selected])
        spread = 1.4826 * np.median(np.abs(scores[selected] - median))
        z[selected] = (scores[selected] - median) / max(spread, 1e-12)
    order = np.argsort(-z, kind="stable")
    return [Suspect(0, paths[i], str(categories[i]), float(scores[i]), float(z[i])) for i in order]


def _subset(scored: ScoredImages, indices: list[int]) -> ScoredImages:
    return ScoredImages([scored.samples[i] for i in indices], scored.scores[indices],
                        None if scored.maps is None else [scored.maps[i] for i in indices])


def _write(out: Path, suspects: list[Suspect], gallery: list[GalleryItem], folds: int, top: int) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["rank", "path", "category", "score", "z_score"])
    writer.writerows([s.rank, s.path, s.category, f"{s.score:.6f}", f"{s.z_score:.3f}"] for s in suspects)
    write_text_atomically(out / "audit.csv", buffer.getvalue())
    summary = {"images": str(len(suspects)), "folds": str(folds), "shown": f"the {len(gallery)} most suspicious",
               "score shown": "robust z-score of the out-of-fold image score within its category (good images: "
                              "about -2..3; much higher: look at the image)",
               "next": "remove the defective images from the training folder and retrain"}
    write_report(out / "report.html", "inpformer training-set audit", gallery, summary)
    log.info("audit: %s, %s (top: %s)", out / "audit.csv", out / "report.html",
             ", ".join(f"{Path(s.path).name} z={s.z_score:.1f}" for s in suspects[:min(top, 5)]))
