"""Exact anomaly-detection metrics: image and pixel AUROC, AP, F1max, and AUPRO.

Every distinct score is a threshold and tied scores are grouped, as scikit-learn does. Between two consecutive
distinct positive scores only negatives are added, so the curves' corners are fixed by the distinct positive
scores and the counts of negatives at or above each; the four pixel metrics share one such curve.

- float32/float64 maps: one value sort of the negatives (SIMD, ~10x faster than an argsort) plus an argsort of
  the far fewer positives.
- float16 maps, and `MetricAccumulator`, which streams batches of one category: pixels are counted per float16
  value (65,536 bins), so nothing is sorted and memory does not grow with the number of images. The metrics are
  exact for the float16 values themselves. Rounding float32 maps to float16 (11 significant bits; beyond
  +-65504 to +-inf) can merge nearby scores into ties: on benchmarks/metrics_scale.py's maps P-AP moves by
  3e-4, the other pixel metrics by < 1e-5.
Tests check the results against scikit-learn and a brute-force AUPRO.
"""

from typing import NamedTuple

import numpy as np
from scipy import ndimage

from inpformer.errors import InpformerError

METRIC_NAMES = ("I-AUROC", "I-AP", "I-F1max", "P-AUROC", "P-AP", "P-F1max", "AUPRO")

# 8-connectivity inside each image of an (N, H, W) stack, no connection between images.
_REGION_STRUCTURE = np.zeros((3, 3, 3), dtype=bool)
_REGION_STRUCTURE[1] = True
_CHUNK_PIXELS = 2**20  # images are labelled and counted in chunks of about this many pixels to bound temporaries

# Every float16 bit pattern; the rank of its value among the distinct non-NaN float16 values (-0.0 ties 0.0).
_FLOAT16 = np.arange(2**16, dtype=np.uint16).view(np.float16)
_FLOAT16_NAN = np.isnan(_FLOAT16)
_FLOAT16_RANK = np.unique(_FLOAT16[~_FLOAT16_NAN], return_inverse=True)[1]


class _Curve(NamedTuple):
    """Counts at each distinct positive score d_1 > d_2 > ... (the thresholds between only add negatives)."""

    n_pos: int
    n_neg: int
    tps: np.ndarray  # positives scoring >= d_j
    fps: np.ndarray  # negatives scoring >= d_j
    fps_above: np.ndarray  # negatives scoring > d_j
    pro: np.ndarray | None  # summed weights of the positives scoring >= d_j


def _as_scores(values: np.ndarray, name: str) -> np.ndarray:
    """Scores as flat float32 (from float16/float32) or float64; NaN is an error."""
    values = np.asarray(values)
    dtype = np.float32 if values.dtype in (np.float16, np.float32) else np.float64
    values = values.astype(dtype, copy=False).ravel()
    if np.isnan(values).any():
        raise InpformerError(f"metrics: {name} contain NaN; check the model output for NaN before evaluating")
    return values


def _image_inputs(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels).astype(bool).ravel()
    scores = _as_scores(scores, "image scores")
    if labels.shape != scores.shape:
        raise InpformerError(
            f"metrics: {labels.size} labels but {scores.size} image scores; pass one score per labelled image"
        )
    return labels, scores


def _pixel_inputs(masks: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    masks = np.asarray(masks).astype(bool, copy=False)
    maps = np.asarray(maps)
    if masks.ndim != 3 or masks.shape != maps.shape:
        raise InpformerError(
            f"metrics: masks of shape {masks.shape} and anomaly maps of shape {maps.shape} differ or are not "
            "(N, H, W); resize the maps to the mask size and stack them"
        )
    return masks, maps


def _check_max_fpr(max_fpr: float) -> None:
    if not 0 < max_fpr <= 1:
        raise InpformerError(f"metrics: max_fpr={max_fpr} is outside (0, 1]; pass e.g. max_fpr=0.3")


def _chunks(masks: np.ndarray, *arrays: np.ndarray):
    """Slices of whole images of about _CHUNK_PIXELS pixels."""
    step = max(1, _CHUNK_PIXELS // max(1, masks[0].size)) if len(masks) else 1
    for start in range(0, len(masks), step):
        yield masks[start:start + step], *(a[start:start + step] for a in arrays)


def _region_weights(masks: np.ndarray) -> tuple[np.ndarray, int]:
    """For each defect pixel (flat order): 1 / the size of its 8-connected region; and the number of regions."""
    masks = masks[masks.any(axis=(1, 2))]  # labelling a defect-free image costs as much as any other
    regions, n_regions = ndimage.label(masks, structure=_REGION_STRUCTURE)
    defect = regions[masks]
    return 1.0 / np.bincount(defect)[defect], n_regions


def _curve(neg: np.ndarray, pos: np.ndarray, pos_weights: np.ndarray | None = None) -> _Curve:
    """Cumulative counts at the distinct positive scores; both classes must be present. Sorts `neg` in place."""
    neg.sort()
    order = np.argsort(pos)[::-1]
    pos = pos[order]
    last = np.append(np.flatnonzero(pos[1:] != pos[:-1]), pos.size - 1)  # end of each tie group
    thresholds = pos[last][::-1]  # ascending: searchsorted is fastest with sorted keys
    fps = (neg.size - np.searchsorted(neg, thresholds, side="left"))[::-1]
    fps_above = (neg.size - np.searchsorted(neg, thresholds, side="right"))[::-1]
    pro = None if pos_weights is None else np.cumsum(pos_weights[order], dtype=np.float64)[last]
    return _Curve(pos.size, neg.size, last + 1, fps, fps_above, pro)


def _counted_curve(neg: np.ndarray, pos: np.ndarray, pos_weights: np.ndarray) -> _Curve:
    """The same curve from counts (and summed weights) of negatives and positives per distinct value, descending."""
    at = pos > 0
    tps, fps = np.cumsum(pos)[at], np.cumsum(neg)[at]
    return _Curve(int(tps[-1]), int(neg.sum()), tps, fps, fps - neg[at], np.cumsum(pos_weights)[at])


def _corners(x_above: np.ndarray, x_at: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Points of the piecewise-linear curve (0, 0), (x_above_j, y_j-1), (x_at_j, y_j), ..., (1, y_last)."""
    x = np.r_[0.0, np.column_stack([x_above, x_at]).ravel(), 1.0]
    y = np.r_[0.0, np.column_stack([np.r_[0.0, y[:-1]], y]).ravel(), y[-1]]
    return x, y


def _trapezoid(y: np.ndarray, x: np.ndarray) -> float:
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1])) / 2)


def _roc_pr(curve: _Curve) -> tuple[float, float, float]:
    """AUROC, AP (step-wise, no interpolation) and F1max."""
    recall = curve.tps / curve.n_pos
    auroc = _trapezoid(*_corners(curve.fps_above / curve.n_neg, curve.fps / curve.n_neg, recall)[::-1])
    precision = curve.tps / (curve.tps + curve.fps)
    ap = float(np.sum(np.diff(recall, prepend=0.0) * precision))
    f1max = float(np.max(2 * precision * recall / (precision + recall)))  # tps >= 1: never 0 / 0
    return auroc, ap, f1max


def _aupro(curve: _Curve, max_fpr: float) -> float:
    """Area under PRO over FPR from 0 to max_fpr (interpolated there), divided by max_fpr."""
    fpr, pro = _corners(curve.fps_above / curve.n_neg, curve.fps / curve.n_neg, curve.pro)
    k = int(np.searchsorted(fpr, max_fpr, side="right"))  # fpr[:k] <= max_fpr < fpr[k:]
    if k < fpr.size:
        pro_at_max = pro[k - 1] + (pro[k] - pro[k - 1]) * (max_fpr - fpr[k - 1]) / (fpr[k] - fpr[k - 1])
        fpr, pro = np.r_[fpr[:k], max_fpr], np.r_[pro[:k], pro_at_max]
    return _trapezoid(pro, fpr) / max_fpr


def _pixel_results(curve: _Curve | None, max_fpr: float) -> dict[str, float]:
    if curve is None:
        return dict.fromkeys(METRIC_NAMES[3:], float("nan"))
    result = dict(zip(METRIC_NAMES[3:6], _roc_pr(curve), strict=True))
    result["AUPRO"] = _aupro(curve, max_fpr)
    return result


def _sorted_curve(masks: np.ndarray, maps: np.ndarray) -> _Curve | None:
    scores = _as_scores(maps, "anomaly maps")
    if masks.all() or not masks.any():
        return None
    parts = [_region_weights(chunk) for (chunk,) in _chunks(masks)]
    weights = np.concatenate([w for w, _ in parts]) / sum(n for _, n in parts)
    flat_masks = masks.ravel()
    return _curve(scores[~flat_masks], scores[flat_masks], weights)


class _PixelCounts:
    """Normal and defect pixels per float16 value, and the defect pixels' AUPRO weights: a fixed-size summary."""

    def __init__(self):
        self.counts = np.zeros((2, 2**16), dtype=np.int64)  # [normal, defect] pixels per float16 bit pattern
        self.weights = np.zeros(2**16)  # sum over defect pixels of 1 / (size of their region), per bit pattern
        self.regions = 0

    def add(self, masks: np.ndarray, maps: np.ndarray, valid: np.ndarray) -> None:
        for masks_chunk, maps_chunk, valid_chunk in _chunks(masks, maps, valid):
            bits_chunk = maps_chunk.astype(np.float16, copy=False).view(np.uint16)
            keys = bits_chunk.astype(np.intp)
            keys[masks_chunk] += 2**16
            keys[~valid_chunk] = 2**17  # one extra bin, dropped: pixels that are not part of the image
            counts = np.bincount(keys.ravel(), minlength=2**17 + 1)[: 2**17].reshape(2, 2**16)
            if counts[:, _FLOAT16_NAN].any():
                raise InpformerError("metrics: anomaly maps contain NaN; check the model output for NaN before "
                                     "evaluating")
            masks_chunk = masks_chunk & valid_chunk
            weights, regions = _region_weights(masks_chunk)
            self.counts += counts
            self.weights += np.bincount(bits_chunk[masks_chunk], weights=weights, minlength=2**16)
            self.regions += regions

    def curve(self) -> _Curve | None:
        if not self.counts.sum(axis=1).all():  # no normal or no defect pixels
            return None
        neg, pos, weights = (np.bincount(_FLOAT16_RANK, weights=c[~_FLOAT16_NAN])[::-1]
                             for c in (*self.counts, self.weights / max(self.regions, 1)))
        return _counted_curve(neg, pos, weights)


def image_metrics(labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """I-AUROC, I-AP and I-F1max of image scores (higher = more anomalous) against 0/1 labels."""
    labels, scores = _image_inputs(labels, scores)
    if labels.all() or not labels.any():
        return dict.fromkeys(METRIC_NAMES[:3], float("nan"))
    return dict(zip(METRIC_NAMES[:3], _roc_pr(_curve(scores[~labels], scores[labels])), strict=True))


def pixel_metrics(masks: np.ndarray, maps: np.ndarray, max_fpr: float = 0.3) -> dict[str, float]:
    """P-AUROC, P-AP, P-F1max and AUPRO of (N, H, W) anomaly maps against (N, H, W) 0/1 masks.

    AUPRO: regions are the 8-connected components of each image's mask; at each threshold, PRO is the
    mean over all regions of the fraction of the region's pixels scoring >= threshold and FPR the fraction
    of normal pixels (all images) scoring >= threshold. The PRO-over-FPR curve is integrated (trapezoid,
    linearly interpolated at max_fpr) from 0 to max_fpr and divided by max_fpr.
    """
    masks, maps = _pixel_inputs(masks, maps)
    _check_max_fpr(max_fpr)
    if maps.dtype != np.float16:
        return _pixel_results(_sorted_curve(masks, maps), max_fpr)
    counts = _PixelCounts()
    counts.add(masks, maps, np.ones(masks.shape, dtype=bool))
    return _pixel_results(counts.curve(), max_fpr)


def aupro(masks: np.ndarray, maps: np.ndarray, max_fpr: float = 0.3) -> float:
    """Normalised area under the per-region-overlap curve up to max_fpr (see pixel_metrics)."""
    return pixel_metrics(masks, maps, max_fpr)["AUPRO"]


def compute_metrics(
    labels: np.ndarray,
    scores: np.ndarray,
    masks: np.ndarray | None = None,
    maps: np.ndarray | None = None,
) -> dict[str, float]:
    """All of METRIC_NAMES; metrics that cannot be computed (one class only, no masks) are NaN."""
    result = dict.fromkeys(METRIC_NAMES, float("nan"))
    result.update(image_metrics(labels, scores))
    if masks is not None and maps is not None:
        result.update(pixel_metrics(masks, maps))
    return result


class MetricAccumulator:
    """compute_metrics over batches added one at a time, e.g. one category's test images:

    >>> accumulator = MetricAccumulator()
    >>> for labels, scores, masks, maps in batches:
    ...     accumulator.add(labels, scores, masks, maps)
    >>> accumulator.compute()  # {"I-AUROC": ..., "AUPRO": ...}

    Image scores are kept as given. Maps are rounded to float16 and only counted per value, with each defect
    pixel's AUPRO weight, so memory stays at a few 65,536-bin arrays whatever the number of images; the pixel
    metrics equal compute_metrics on the float16-rounded maps (see the module docstring).
    """

    def __init__(self, max_fpr: float = 0.3):
        _check_max_fpr(max_fpr)
        self.max_fpr = max_fpr
        self._labels: list[np.ndarray] = []
        self._scores: list[np.ndarray] = []
        self._pixels = _PixelCounts()
        self._images_with_maps = 0

    def add(self, labels: np.ndarray, scores: np.ndarray, masks: np.ndarray | None = None,
            maps: np.ndarray | None = None, valid: np.ndarray | None = None) -> None:
        """One batch: 0/1 labels (B,), image scores (B,) and, for pixel metrics, masks and maps (B, H, W);
        `valid` (B, H, W) bool leaves the pixels where it is False (padding) out of the pixel metrics."""
        labels, scores = _image_inputs(labels, scores)
        if masks is not None and maps is not None:
            masks, maps = _pixel_inputs(masks, maps)
            if len(masks) != labels.size:
                raise InpformerError(f"metrics: {labels.size} labels but {len(masks)} anomaly maps in a batch; "
                                     "pass one map and mask per labelled image")
            valid = np.ones(masks.shape, dtype=bool) if valid is None else np.asarray(valid, dtype=bool)
            if valid.shape != masks.shape:
                raise InpformerError(f"metrics: valid pixels of shape {valid.shape} do not match the masks "
                                     f"{masks.shape}; pass one (H, W) bool array per image")
            self._pixels.add(masks, maps, valid)
            self._images_with_maps += labels.size
        self._labels.append(labels)
        self._scores.append(scores)

    @property
    def nbytes(self) -> int:
        """Memory held: the per-value counts and the image labels and scores."""
        arrays = [self._pixels.counts, self._pixels.weights, *self._labels, *self._scores]
        return sum(a.nbytes for a in arrays)

    def compute(self) -> dict[str, float]:
        """All of METRIC_NAMES over the batches added; pixel metrics are NaN when no maps were added."""
        labels = np.concatenate(self._labels) if self._labels else np.zeros(0, dtype=bool)
        scores = np.concatenate(self._scores) if self._scores else np.zeros(0)
        result = dict.fromkeys(METRIC_NAMES, float("nan"))
        result.update(image_metrics(labels, scores))
        if self._images_with_maps:
            if self._images_with_maps != labels.size:
                raise InpformerError(f"metrics: anomaly maps and masks were added for {self._images_with_maps} of "
                                     f"{labels.size} images; pass them with every batch or with none")
            result.update(_pixel_results(self._pixels.curve(), self.max_fpr))
        return result
