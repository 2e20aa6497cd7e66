"""Decision thresholds and score normalisation, calibrated on images the model was not fitted on.

Two ways to set the thresholds of a category:

    false-reject   from good images only: the image threshold is the (1 - r) quantile of their scores, the pixel
                   threshold the (1 - r) quantile of their maps' maxima, so at most a fraction r of good images is
                   rejected and at most r of them show any defect pixel ("higher" quantiles keep this true on the
                   calibration images themselves).
    f1             from labelled good and defective images: the thresholds that maximise the image F1 and the pixel
                   F1 (the thresholds behind I-F1max and P-F1max).

They can also be set by hand (method "manual", `Calibration.set_by_hand`), and a minimum defect area can be added to
the decision rule (see inference.py). Every change is recorded in `Calibration.history`: who, when and how.

Normalised values put the threshold at 0.5: sigmoid((x - threshold) / scale), with the scale chosen so that the
median good value maps to 0.1. Scores normalised this way are in units of the spread of good images, so they are
comparable across categories and models.
"""

from __future__ import annotations

import datetime as dt
import getpass
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from numbers import Real

import numpy as np
from sklearn.metrics import precision_recall_curve

from .errors import InpformerError

METHODS = ("false-reject", "f1")  # computed from images
MANUAL = "manual"  # thresholds set by hand
_GOOD_MEDIAN_TARGET = 0.1  # where the median good value lands on the normalised scale
_LOGIT_SPAN = math.log((1 - _GOOD_MEDIAN_TARGET) / _GOOD_MEDIAN_TARGET)


@dataclass
class Thresholds:
    """Thresholds of one category (raw score and map units) and the scales of their normalisation."""

    image: float
    pixel: float
    image_scale: float
    pixel_scale: float
    method: str
    num_good: int
    num_defective: int = 0
    false_reject: float = 0.0  # fraction of the good calibration images the image threshold rejects
    # regions of the pixel-threshold mask smaller than this do not make a part defective: below 1 a fraction of the
    # image area, else pixels; 0: no minimum
    min_defect_area: float = 0.0

    def normalize_scores(self, scores: np.ndarray | float) -> np.ndarray:
        return _sigmoid((np.asarray(scores, dtype=np.float64) - self.image) / self.image_scale)

    def normalize_maps(self, maps: np.ndarray) -> np.ndarray:
        return _sigmoid((np.asarray(maps, dtype=np.float64) - self.pixel) / self.pixel_scale).astype(np.float32)


@dataclass
class Calibration:
    """Thresholds per category (key "" pools all categories) and each category's mean image embedding, with
    which a multi-class model recognises the category of an unlabelled image."""

    thresholds: dict[str, Thresholds]
    centroids: dict[str, list[float]] = field(default_factory=dict)
    source: str = ""  # which images set the thresholds, in words (shown by test, predict and serve)
    history: list[dict] = field(default_factory=list)  # each change: at, by, how, method and what it set

    def for_category(self, category: str | None) -> Thresholds:
        if category is None:
            return self.thresholds[""]
        if category not in self.thresholds:
            known = ", ".join(c for c in self.thresholds if c)
            raise InpformerError(f"unknown category {category!r}; this model knows: {known}")
        return self.thresholds[category]

    def set_by_hand(self, image: float | None = None, pixel: float | None = None, category: str | None = None,
                    min_defect_area: float | None = None, how: str = "") -> dict:
        """Sets the image and pixel thresholds (raw units) and the minimum defect area of one category, or without
        `category` of every category and the pooled ones. What is not given is kept; so are the normalisation
        scales, so normalised values still put the threshold at 0.5. Returns the recorded change."""
        check_manual_values(image, pixel, min_defect_area)
        if image is None and pixel is None and min_defect_area is None:
            raise InpformerError("nothing to set: give --image-threshold, --pixel-threshold or --min-defect-area")
        names = list(self.thresholds) if category is None else [category]
        if category is not None:
            self.for_category(category)  # fails naming the known categories
        values = {"image": image, "pixel": pixel, "min_defect_area": min_defect_area}
        values = {k: float(v) for k, v in values.items() if v is not None}
        manual = {"method": MANUAL, "num_good": 0, "num_defective": 0, "false_reject": 0.0}
        for name in names:
            self.thresholds[name] = replace(self.thresholds[name], **values,
                                            **(manual if image is not None or pixel is not None else {}))
        change = change_record(MANUAL if image is not None or pixel is not None else "min-defect-area", how,
                               category=category or "all categories", **values)
        if category is None and (image is not None or pixel is not None):
            kept = "pixel" if pixel is None else "image" if image is None else None
            self.source = (f"set by hand by {change['by']} at {change['at']}"
                           + (f" (the {kept} threshold: {self.source or 'unrecorded images'})" if kept else ""))
        self.history.append(change)
        return change

    def inherit(self, previous: Calibration) -> None:
        """Keeps from the calibration this one replaces what images do not set: the minimum defect areas and the
        history."""
        for name, thresholds in self.thresholds.items():
            thresholds.min_defect_area = previous.thresholds.get(name, previous.thresholds[""]).min_defect_area
        self.history = [*previous.history, *self.history]

    def infer_categories(self, embeddings: np.ndarray) -> list[str]:
        """The category whose centroid is most similar to each embedding (cosine; embeddings are unit vectors)."""
        names = list(self.centroids)
        if len(names) <= 1:
            return [names[0] if names else ""] * len(embeddings)
        similarity = np.asarray(embeddings) @ np.asarray([self.centroids[n] for n in names]).T
        return [names[i] for i in similarity.argmax(axis=1)]

    def to_dict(self) -> dict:
        return {"thresholds": {c: asdict(t) for c, t in self.thresholds.items()}, "centroids": self.centroids,
                "source": self.source, "history": self.history}

    @classmethod
    def from_dict(cls, values: dict) -> Calibration:
        """Rebuilds `to_dict`'s output (from a model file): raises ValueError, TypeError or KeyError if malformed."""
        thresholds = {c: Thresholds(**t) for c, t in values["thresholds"].items()}
        for category, t in thresholds.items():
            numbers = (t.image, t.pixel, t.image_scale, t.pixel_scale)
            if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in numbers) or min(numbers[2:]) <= 0:
                raise ValueError(f"the thresholds of {category or 'all categories'} are not finite numbers with "
                                 "positive scales")
            check_min_defect_area(t.min_defect_area)
        if "" not in thresholds:
            raise ValueError("the thresholds for all categories (key '') are missing")
        centroids = dict(values.get("centroids", {}))
        if len({len(c) for c in centroids.values()}) > 1 or not all(
                isinstance(v, (int, float)) for c in centroids.values() for v in c):
            raise ValueError("the category centroids are not vectors of one length")
        history = values.get("history", [])
        if not isinstance(history, list) or not all(isinstance(h, dict) for h in history):
            raise ValueError("the calibration history is not a list of records")
        return cls(thresholds, centroids, str(values.get("source", "")), [dict(h) for h in history])


def check_manual_values(image: float | None, pixel: float | None, min_defect_area: float | None) -> None:
    """Raises InpformerError, naming the option, for a threshold that is not a finite number >= 0 or an invalid
    minimum defect area (None: not given)."""
    for option, value in (("--image-threshold", image), ("--pixel-threshold", pixel)):
        if value is not None and not (isinstance(value, Real) and math.isfinite(value) and value >= 0):
            raise InpformerError(f"{option} must be a finite number >= 0 (raw score units), got {value!r}")
    if min_defect_area is not None:
        check_min_defect_area(min_defect_area)


def check_min_defect_area(value: float) -> float:
    """`value` if it is a valid minimum defect area (0, a fraction below 1, or whole pixels), else InpformerError."""
    if not (isinstance(value, Real) and math.isfinite(value) and value >= 0) or (
            value >= 1 and value != int(value)):
        raise InpformerError(f"--min-defect-area must be 0 (none), a fraction of the image area below 1 (e.g. 0.001) "
                             f"or a whole number of pixels, got {value!r}")
    return value


def area_pixels(min_defect_area: float, shape: Sequence[int]) -> int:
    """A minimum defect area in pixels of an image of `shape`: values below 1 are a fraction of its area."""
    if min_defect_area >= 1:
        return int(min_defect_area)
    return math.ceil(min_defect_area * shape[0] * shape[1])


def describe_area(min_defect_area: float) -> str:
    """A minimum defect area in words."""
    if not min_defect_area:
        return "none"
    if min_defect_area >= 1:
        return f"{int(min_defect_area)} pixels"
    return f"{100 * min_defect_area:g} % of the image"


def change_record(method: str, how: str, **details: object) -> dict:
    """A history entry: when (UTC, ISO 8601), by whom (the user name), how (e.g. the command line), what."""
    return {"at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "by": _user(), "how": how,
            "method": method, **details}


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no login name and no passwd entry (e.g. a container's arbitrary uid)
        return f"uid {os.getuid()}"


def calibrate(categories: Sequence[str], labels: np.ndarray, scores: np.ndarray,
              maps: np.ndarray | Sequence[np.ndarray], embeddings: np.ndarray,
              masks: np.ndarray | Sequence[np.ndarray] | None = None, method: str = "false-reject",
              max_false_reject: float = 0.01) -> Calibration:
    """Thresholds for every category and for all categories pooled (key ""), from scored calibration images.

    `maps` [N, H, W] are the anomaly maps at map size (or a list of maps of different sizes); `masks` (alike, for
    method "f1") the ground truth.
    """
    if method not in METHODS:
        raise InpformerError(f"unknown calibration method {method!r}; choose one of: {', '.join(METHODS)}")
    if not 0 < max_false_reject < 1:  # also refuses NaN
        raise InpformerError(f"--max-false-reject must be in (0, 1), got {max_false_reject}")
    categories = np.asarray(categories)
    labels = np.asarray(labels)
    groups = {"": np.ones(len(labels), dtype=bool)} | {c: categories == c for c in sorted(set(categories.tolist()))}
    thresholds = {}
    for name, selected in groups.items():
        selected_masks = None if masks is None else _take(masks, selected)
        thresholds[name] = _category_thresholds(labels[selected], scores[selected], _take(maps, selected),
                                                selected_masks, method, max_false_reject, name)
    good = labels == 0
    centroids = {}
    for name, selected in groups.items():
        if name:
            mean = embeddings[selected & good].mean(axis=0) if (selected & good).any() else embeddings[selected].mean(0)
            centroids[name] = (mean / max(np.linalg.norm(mean), 1e-12)).astype(float).tolist()
    return Calibration(thresholds, centroids)


def _category_thresholds(labels: np.ndarray, scores: np.ndarray, maps: np.ndarray, masks: np.ndarray | None,
                         method: str, max_false_reject: float, name: str) -> Thresholds:
    good = labels == 0
    where = f"category {name!r}" if name else "the calibration images"
    if not good.any():
        raise InpformerError(f"no good images in {where}; calibration needs images of defect-free parts")
    good_maps = _take(maps, good)
    good_scores, good_maxima = scores[good], np.array([m.max() for m in good_maps])
    if method == "f1":
        if good.all() or masks is None:
            raise InpformerError(f"calibration method f1 needs defective images with masks in {where}; "
                                 "add them or use --method false-reject")
        image = _f1_threshold(labels, scores)
        pixel = _f1_threshold(_flat(masks).astype(bool), _flat(maps))
    else:
        image = float(np.quantile(good_scores, 1 - max_false_reject, method="higher"))
        pixel = float(np.quantile(good_maxima, 1 - max_false_reject, method="higher"))
    return Thresholds(
        image=image,
        pixel=pixel,
        image_scale=_scale(image, good_scores),
        pixel_scale=_scale(pixel, _image_pixels(_flat(good_maps))),
        method=method,
        num_good=int(good.sum()),
        num_defective=int((~good).sum()),
        false_reject=float((good_scores > image).mean()),
    )


def _take(maps: np.ndarray | Sequence[np.ndarray], selected: np.ndarray) -> list[np.ndarray]:
    """The selected images' maps (an (N, H, W) array, or a list of maps of different sizes)."""
    return [maps[i] for i in np.flatnonzero(selected)]


def _flat(maps: Sequence[np.ndarray]) -> np.ndarray:
    return np.concatenate([np.ravel(m) for m in maps])


def _image_pixels(values: np.ndarray) -> np.ndarray:
    """Map values without the padding of aspect-preserving resizes, which scoring sets to exactly 0 (a real
    pixel's 1 - cosine, blurred, is never exactly 0)."""
    kept = values[values > 0]
    return kept if kept.size else values


def _f1_threshold(labels: np.ndarray, values: np.ndarray) -> float:
    """The value above which (strictly) calling positives maximises F1."""
    precision, recall, thresholds = precision_recall_curve(labels, values)
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    best = int(np.argmax(f1[:-1]))
    # precision_recall_curve predicts positive for values >= threshold; decisions here use values > threshold.
    return float(np.nextafter(np.float32(thresholds[best]), np.float32(-np.inf)))


def _scale(threshold: float, good_values: np.ndarray) -> float:
    """Normalisation scale that maps the median good value to _GOOD_MEDIAN_TARGET (0.1) and the threshold to 0.5."""
    spread = threshold - float(np.median(good_values))
    if spread <= 0:  # degenerate (threshold at or below the median): fall back to the spread of the good values
        spread = float(np.std(good_values)) * _LOGIT_SPAN
    return max(spread / _LOGIT_SPAN, 1e-6)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1 + np.tanh(0.5 * x))
