"""From images to decisions: a `Predictor` runs a runtime (PyTorch or ONNX) and turns its raw output into
`Prediction`s at each image's original resolution, with calibrated thresholds.

Everything a predictor needs is in the model's metadata (sizes, normalisation, calibration, categories), so an
exported ONNX file alone is enough to predict, exactly as the checkpoint it came from.

The decision rule (`decide`, the one place it is applied: predict, serve and both reports use it):
    defect regions   the connected regions of the pixel-threshold mask at the image's original resolution; with a
                     minimum defect area, smaller regions are dropped (from the regions, the mask and the overlay)
    decision         defective when the image score exceeds the image threshold and, with a minimum defect area,
                     at least one region reaches it; without one, the score alone decides
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from .calibration import Calibration, Thresholds, area_pixels, describe_area
from .data.geometry import Geometry, Size
from .data.images import IMAGENET_MEAN, IMAGENET_STD, MAX_PIXELS, Preprocess, is_image_file, read_image
from .data.tiling import parse_tiling
from .errors import InpformerError
from .runtime import RuntimeOutput, run_in_batches
from .scoring import top_mean
from .visualize import prediction_overlay

log = logging.getLogger("inpformer")
Runtime = Callable[[np.ndarray, np.ndarray], RuntimeOutput]  # (images, valid boxes) -> outputs


@dataclass
class Region:
    """One connected defect region of a predicted mask, in original-image pixels (x1, y1 exclusive)."""

    x0: int
    y0: int
    x1: int
    y1: int
    area: int
    peak: float  # highest normalised map value in the region

    def to_json(self) -> dict:
        return {"box": [self.x0, self.y0, self.x1, self.y1], "area": self.area, "peak": round(self.peak, 4)}


@dataclass
class Prediction:
    """The verdict on one image. Maps and masks are at the image's original resolution and cover all of it
    (deployment never crops)."""

    source: str
    score: float  # raw image score (mean of the top 1% map values)
    normalized_score: float  # 0.5 at the threshold, comparable across categories
    is_defective: bool
    threshold: float  # raw image threshold the score was compared with
    category: str
    anomaly_map: np.ndarray = field(repr=False)  # (H, W) float32, normalised: 0.5 at the pixel threshold
    mask: np.ndarray = field(repr=False)  # (H, W) bool, predicted defect pixels
    regions: list[Region] = field(default_factory=list)
    image: np.ndarray | None = field(default=None, repr=False)  # the RGB input, for overlays

    @property
    def decision(self) -> str:
        return "defective" if self.is_defective else "good"

    def overlay(self) -> np.ndarray:
        """The image with the anomaly heat map and the predicted defect outlines, (H, W, 3) uint8."""
        return prediction_overlay(_rgb(self.image), self.anomaly_map, self.mask)

    def to_json(self) -> dict:
        """The fields of predictions.json / the REST API, without the arrays."""
        return {
            "source": self.source,
            "category": self.category,
            "score": round(self.score, 6),
            "normalized_score": round(self.normalized_score, 4),
            "threshold": round(self.threshold, 6),
            "decision": self.decision,
            "defect_pixels": int(self.mask.sum()),
            "regions": [r.to_json() for r in self.regions],
        }


@dataclass
class Failure:
    """An input that could not be predicted, with the one-line reason."""

    source: str
    message: str


def model_metadata(config: dict, geometry: Geometry, categories: Sequence[str], calibration: Calibration | None,
                   **extra) -> dict:
    """What a predictor (and an exported ONNX file) needs besides the network: the deployment geometry,
    normalisation, thresholds."""
    return {
        "image_size": _size_json(geometry.image_size),
        "crop_size": _size_json(geometry.crop_size),
        "resize_mode": geometry.resize_mode,
        "tiling": ({"scale": config["tile_scale"], "overlap": config["tile_overlap"]}
                   if config.get("tile_scale") else None),
        "map_size": config["map_size"],
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "backbone": config["backbone"],
        "categories": list(categories),
        "calibration": calibration.to_dict() if calibration else None,
        "config": config,
        **extra,
    }


class Predictor:
    """Images -> `Prediction`s with one runtime; `metadata` as built by `model_metadata`."""

    def __init__(self, runtime: Runtime, metadata: dict, max_pixels: int = MAX_PIXELS):
        if not metadata.get("calibration"):
            raise InpformerError("this model has no calibrated thresholds (an imported model, or one trained by an "
                                 "older version); run `inpformer calibrate RUN_DIR` (or MODEL.pt --data ROOT) first")
        self.runtime = runtime
        self.metadata = metadata
        self.calibration = Calibration.from_dict(metadata["calibration"])
        self.categories: list[str] = list(metadata["categories"])
        self.preprocess = Preprocess(metadata["image_size"], metadata["crop_size"], metadata["mean"], metadata["std"],
                                     metadata.get("resize_mode", "stretch"))
        tiles = metadata.get("tiling")
        self.tiling = parse_tiling(metadata["crop_size"], tiles["scale"], tiles["overlap"]) if tiles else None
        self.top_ratio = float(metadata["config"]["top_ratio"])
        if not 0 < self.top_ratio <= 1:
            raise ValueError(f"top_ratio {self.top_ratio} is not in (0, 1]")
        self.max_pixels = max_pixels
        self.min_defect_area: float | None = None  # overrides the model's minimum defect area of every category

    def predict(self, images: Sequence[np.ndarray], sources: Sequence[str] | None = None,
                category: str | None = None) -> list[Prediction]:
        """Predictions for RGB uint8 arrays (H, W, 3) (or gray (H, W)). Without `category`, a multi-class model
        recognises each image's category from its embedding."""
        if category is not None:
            self.calibration.for_category(category)  # fails early, naming the known categories
        if not images:
            return []
        sources = list(sources) if sources is not None else ["<array>"] * len(images)
        if self.tiling:
            output = self._stitched(images)
        else:
            batch = np.stack([self.preprocess(image).numpy() for image in images])
            valid = np.stack([self.preprocess.valid_box(image.shape).numpy() for image in images])
            output = self.runtime(batch, valid)
        categories = [category] * len(images) if category else self._categories(output.embeddings)
        return [self._prediction(*item) for item in zip(images, sources, categories, output.maps, output.scores,
                                                           strict=True)]

    def _stitched(self, images: Sequence[np.ndarray]) -> RuntimeOutput:
        """Tiled models: per image, its tiles' maps stitched, the score on the stitched map, the mean embedding."""
        maps, scores, embeddings = [], [], []
        for image in images:
            tiles = np.stack([self.preprocess.normalize(view).numpy() for view in self.tiling.views(image)])
            output = run_in_batches(self.runtime, tiles, self.tiling.valid_boxes(image.shape))
            maps.append(self.tiling.stitch(output.maps, image.shape))
            scores.append(float(top_mean(torch.from_numpy(maps[-1])[None], self.top_ratio)))
            mean = output.embeddings.mean(axis=0)
            embeddings.append(mean / max(float(np.linalg.norm(mean)), 1e-12))
        return RuntimeOutput(maps, np.array(scores), np.stack(embeddings))

    def predict_paths(self, paths: Iterable[str | Path], batch_size: int = 8,
                      category: str | None = None) -> Iterator[Prediction | Failure]:
        """Reads and predicts files in batches; an unreadable file yields a `Failure` and the others go on."""
        pending: list[tuple[np.ndarray, str]] = []
        for path in paths:
            try:
                pending.append((read_image(path, max_pixels=self.max_pixels), str(path)))
            except InpformerError as error:
                yield Failure(str(path), str(error))
            if len(pending) == batch_size:
                yield from self.predict([p[0] for p in pending], [p[1] for p in pending], category)
                pending = []
        if pending:
            yield from self.predict([p[0] for p in pending], [p[1] for p in pending], category)

    def _categories(self, embeddings: np.ndarray) -> list[str]:
        if len(self.categories) == 1:
            return self.categories * len(embeddings)
        return self.calibration.infer_categories(embeddings)

    def _prediction(self, image: np.ndarray, source: str, category: str, token_map: np.ndarray,
                    score: float) -> Prediction:
        thresholds = self.calibration.for_category(category or None)
        geometry = self.tiling or self.preprocess.geometry
        area = thresholds.min_defect_area if self.min_defect_area is None else self.min_defect_area
        return decide(geometry.to_original(token_map, image.shape[:2]), float(score), thresholds,
                      area_pixels(area, image.shape), category, source, image)


def decide(raw_map: np.ndarray, score: float, thresholds: Thresholds, min_pixels: int, category: str,
           source: str = "<array>", image: np.ndarray | None = None) -> Prediction:
    """The decision rule (see the module's docstring) for an image's raw score and raw anomaly map (at its
    original resolution, or any view of it with `min_pixels` in that view's pixels); 0 `min_pixels`: no minimum."""
    normalised = thresholds.normalize_maps(raw_map)
    mask, regions = find_defects(raw_map > thresholds.pixel, normalised, min_pixels)
    return Prediction(
        source=source,
        score=score,
        normalized_score=float(thresholds.normalize_scores(score)),
        is_defective=is_defective(score, thresholds, regions, min_pixels),
        threshold=thresholds.image,
        category=category,
        anomaly_map=normalised,
        mask=mask,
        regions=regions,
        image=image,
    )


def is_defective(score: float, thresholds: Thresholds, regions: Sequence[Region] = (), min_pixels: int = 0) -> bool:
    """The decision: the score exceeds the image threshold and, with a minimum area, a region reaches it."""
    return bool(score > thresholds.image) and (min_pixels == 0 or any(r.area >= min_pixels for r in regions))


def describe_rule(min_defect_area: float | None) -> str:
    """The decision rule in words, for reports; `min_defect_area` None: one per category."""
    rule = "defective when the score exceeds the image threshold (normalised score > 0.5)"
    if min_defect_area == 0:
        return rule
    area = "its category's minimum defect area" if min_defect_area is None else describe_area(min_defect_area)
    return f"{rule} and a region of the pixel-threshold mask covers at least {area}; smaller regions are ignored"


def _size_json(size: Size) -> int | list[int]:
    return size[0] if size[0] == size[1] else list(size)


def find_defects(mask: np.ndarray, anomaly_map: np.ndarray, min_area: int = 0) -> tuple[np.ndarray, list[Region]]:
    """The connected regions (8-connectivity) of a mask of at least `min_area` pixels, largest peak first, and the
    mask without the smaller ones."""
    labels, count = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    if count == 0:
        return mask, []
    index = np.arange(1, count + 1)
    peaks = ndimage.maximum(anomaly_map, labels, index)
    areas = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    kept = areas >= min_area
    if not kept.all():
        mask = np.concatenate([[False], kept])[labels]
    regions = [Region(s[1].start, s[0].start, s[1].stop, s[0].stop, int(a), float(p))
               for s, a, p, k in zip(ndimage.find_objects(labels), areas, peaks, kept, strict=True) if k]
    return mask, sorted(regions, key=lambda r: -r.peak)


def _rgb(image: np.ndarray) -> np.ndarray:
    return np.repeat(image[:, :, None], 3, axis=2) if image.ndim == 2 else image


def find_images(inputs: Sequence[str | Path]) -> list[Path]:
    """Image files named directly, or found (recursively, sorted) in the folders given. Files named directly are
    kept whatever their extension, so that a wrong file is reported rather than silently skipped."""
    found: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            images = sorted(p for p in item.rglob("*") if is_image_file(p))
            if not images:
                log.warning("%s: no images found in this folder", item)
            found += images
        else:
            found.append(item)
    return found
