import itertools
import math

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from inpformer import metrics
from inpformer.errors import InpformerError
from inpformer.metrics import METRIC_NAMES, MetricAccumulator, aupro, compute_metrics, image_metrics, pixel_metrics


def sklearn_metrics(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float, float]:
    labels, scores = labels.ravel(), scores.ravel().astype(np.float64)
    precision, recall, _ = precision_recall_curve(labels, scores)
    denominator = precision + recall
    f1 = np.divide(2 * precision * recall, denominator, out=np.zeros_like(denominator), where=denominator > 0)
    return roc_auc_score(labels, scores), average_precision_score(labels, scores), f1.max()


def brute_force_aupro(masks: np.ndarray, maps: np.ndarray, max_fpr: float) -> float:
    """Loop over every distinct threshold; PRO and FPR computed directly from the pixels."""
    regions = []
    for image, mask in enumerate(masks):
        labelled, n = ndimage.label(mask, structure=np.ones((3, 3)))
        regions += [(image, labelled == r) for r in range(1, n + 1)]
    normal = maps[~masks.astype(bool)]
    points = [(0.0, 0.0)]
    for t in sorted(set(maps.ravel().tolist()), reverse=True):
        pro = np.mean([np.mean(maps[image][region] >= t) for image, region in regions])
        points.append((np.mean(normal >= t), pro))
    area = 0.0
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        if x0 >= max_fpr:
            break
        if x1 > max_fpr:
            x1, y1 = max_fpr, y0 + (y1 - y0) * (max_fpr - x0) / (x1 - x0)
        area += (x1 - x0) * (y0 + y1) / 2
    return area / max_fpr


def random_masks(rng: np.random.Generator, n: int, size: int, density: float = 0.15) -> np.ndarray:
    masks = rng.random((n, size, size)) < density
    masks[0] = False  # one image without defects
    return masks


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_image_metrics_match_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    labels = rng.random(200) < 0.4
    scores = np.round(rng.random(200) + 0.3 * labels, 1)  # few distinct values: many ties
    ours = image_metrics(labels, scores)
    np.testing.assert_allclose(
        [ours["I-AUROC"], ours["I-AP"], ours["I-F1max"]], sklearn_metrics(labels, scores), rtol=0, atol=1e-9
    )


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_pixel_metrics_match_sklearn_with_ties_and_negatives(dtype):
    rng = np.random.default_rng(3)
    masks = random_masks(rng, 6, 24)
    maps = np.round(rng.normal(size=masks.shape) + masks, 1).astype(dtype)
    maps[0, 0, :4] = [0.0, -0.0, 0.0, -0.0]  # -0.0 and 0.0 must tie
    ours = pixel_metrics(masks, maps)
    np.testing.assert_allclose(
        [ours["P-AUROC"], ours["P-AP"], ours["P-F1max"]], sklearn_metrics(masks, maps), rtol=0, atol=1e-9
    )


def test_float32_and_float64_maps_agree():
    rng = np.random.default_rng(4)
    masks = random_masks(rng, 4, 16)
    maps = np.round(rng.random(masks.shape) + 0.5 * masks, 2).astype(np.float32)
    single, double = pixel_metrics(masks, maps), pixel_metrics(masks, maps.astype(np.float64))
    np.testing.assert_allclose(list(single.values()), list(double.values()), rtol=0, atol=1e-12)


@pytest.mark.parametrize("max_fpr", [0.3, 0.05, 1.0])
@pytest.mark.parametrize("seed", [5, 6])
def test_aupro_matches_brute_force(seed, max_fpr):
    rng = np.random.default_rng(seed)
    masks = random_masks(rng, 4, 10, density=0.25)  # several regions per image, some diagonal
    maps = np.round(rng.random(masks.shape) + 0.4 * masks, 1).astype(np.float32)
    assert aupro(masks, maps, max_fpr) == pytest.approx(brute_force_aupro(masks, maps, max_fpr), abs=1e-9)


def test_aupro_matches_brute_force_with_distinct_scores():
    rng = np.random.default_rng(7)
    masks = random_masks(rng, 3, 12, density=0.2)
    maps = rng.random(masks.shape) + 0.3 * masks
    assert aupro(masks, maps) == pytest.approx(brute_force_aupro(masks, maps, 0.3), abs=1e-9)


def test_aupro_with_fpr_landing_exactly_on_max_fpr():
    masks = np.zeros((1, 4, 5), dtype=bool)
    masks[0, :2] = True  # 10 normal pixels: FPR moves in steps of exactly 0.1
    rng = np.random.default_rng(11)
    for _ in range(5):
        maps = np.round(rng.random(masks.shape), 1)
        assert aupro(masks, maps) == pytest.approx(brute_force_aupro(masks, maps, 0.3), abs=1e-9)


def test_aupro_diagonal_pixels_form_one_region():
    # Region A = {(0, 0), (1, 1)} (diagonal, one region), region B = {(3, 3)}.
    masks = np.zeros((2, 4, 4), dtype=bool)
    masks[0, 0, 0] = masks[0, 1, 1] = masks[0, 3, 3] = True
    maps = np.zeros(masks.shape, dtype=np.float32)
    maps[0, 0, 0] = 1.0
    # t=1: FPR 0, PRO = mean(1/2, 0) = 0.25; t=0: FPR 1, PRO 1. At FPR 0.3: PRO = 0.25 + 0.75 * 0.3 = 0.475.
    assert aupro(masks, maps, max_fpr=0.3) == pytest.approx((0.25 + 0.475) / 2, abs=1e-12)
    assert aupro(masks, maps, max_fpr=1.0) == pytest.approx((0.25 + 1.0) / 2, abs=1e-12)  # 2/3 if 4-connected
    assert aupro(masks, maps) == pytest.approx(brute_force_aupro(masks, maps, 0.3), abs=1e-12)


def test_perfect_map_scores_one():
    rng = np.random.default_rng(8)
    masks = random_masks(rng, 3, 16).astype(np.uint8)
    result = pixel_metrics(masks, masks * rng.uniform(1, 2, masks.shape))
    assert result == pytest.approx(dict.fromkeys(METRIC_NAMES[3:], 1.0), abs=1e-12)


def test_float16_maps_accepted():
    rng = np.random.default_rng(9)
    masks = random_masks(rng, 3, 16)
    maps = (rng.random(masks.shape) + 0.5 * masks).astype(np.float16)
    ours = pixel_metrics(masks, maps)
    np.testing.assert_allclose(
        [ours["P-AUROC"], ours["P-AP"], ours["P-F1max"]], sklearn_metrics(masks, maps), rtol=0, atol=1e-9
    )
    assert ours["AUPRO"] == pytest.approx(brute_force_aupro(masks, maps.astype(np.float64), 0.3), abs=1e-9)


def test_single_class_and_missing_masks_give_nan():
    result = compute_metrics(np.ones(5), np.arange(5.0))
    assert list(result) == list(METRIC_NAMES)
    assert all(math.isnan(value) for value in result.values())
    no_defects = pixel_metrics(np.zeros((2, 4, 4)), np.random.default_rng(0).random((2, 4, 4)))
    assert all(math.isnan(value) for value in no_defects.values())
    assert all(math.isnan(value) for value in image_metrics([], []).values())


def test_compute_metrics_returns_all_seven():
    rng = np.random.default_rng(10)
    masks = random_masks(rng, 4, 8)
    maps = rng.random(masks.shape) + masks
    labels = masks.any(axis=(1, 2))
    result = compute_metrics(labels, maps.max(axis=(1, 2)), masks, maps)
    assert list(result) == list(METRIC_NAMES)
    assert all(0.0 <= value <= 1.0 for value in result.values())


def test_invalid_inputs_raise_clear_errors():
    with pytest.raises(InpformerError, match="NaN"):
        image_metrics([0, 1], [0.5, np.nan])
    with pytest.raises(InpformerError, match="shape"):
        pixel_metrics(np.zeros((2, 4, 4)), np.zeros((2, 4, 5)))
    with pytest.raises(InpformerError, match="max_fpr"):
        pixel_metrics(np.ones((1, 2, 2)), np.zeros((1, 2, 2)), max_fpr=0.0)


def blob_batch(rng: np.random.Generator, n: int, size: int = 32):
    """Labels, scores, masks with a few blobs per defective image, float32 maps with ties (more as float16)."""
    masks = ndimage.binary_dilation(rng.random((n, size, size)) < 0.004, np.ones((1, 5, 5)))
    masks[0] = False
    maps = np.round(rng.random(masks.shape) + 0.5 * masks, 4).astype(np.float32)
    return masks.any(axis=(1, 2)), maps.max(axis=(1, 2)), masks, maps


def test_accumulator_equals_compute_metrics_on_float16_maps():
    rng = np.random.default_rng(12)
    labels, scores, masks, maps = blob_batch(rng, 12)
    accumulator = MetricAccumulator()
    accumulator.add(labels, scores, masks, maps)
    expected = compute_metrics(labels, scores, masks, maps.astype(np.float16))
    assert accumulator.compute() == pytest.approx(expected, rel=0, abs=1e-12)
    assert expected != pytest.approx(compute_metrics(labels, scores, masks, maps), rel=0, abs=1e-9)  # float16 ties


def test_accumulator_batches_equal_one_add(monkeypatch):
    rng = np.random.default_rng(13)
    batch = blob_batch(rng, 10)
    whole = MetricAccumulator()
    whole.add(*batch)
    monkeypatch.setattr(metrics, "_CHUNK_PIXELS", 1)  # one image per labelling chunk
    pieces = MetricAccumulator()
    for part in np.split(np.arange(10), [1, 4, 5]):
        pieces.add(*(array[part] for array in batch))
    assert pieces.compute() == pytest.approx(whole.compute(), rel=0, abs=1e-12)
    masks, maps = batch[2], batch[3].astype(np.float64)
    assert aupro(masks, maps) == pytest.approx(brute_force_aupro(masks, maps, 0.3), abs=1e-9)


def test_accumulator_without_maps_and_invalid_batches():
    rng = np.random.default_rng(14)
    labels, scores, masks, maps = blob_batch(rng, 4)
    accumulator = MetricAccumulator()
    accumulator.add(labels, scores)
    result = accumulator.compute()
    assert result == pytest.approx({**image_metrics(labels, scores), **dict.fromkeys(METRIC_NAMES[3:], np.nan)},
                                   nan_ok=True)
    accumulator.add(labels, scores, masks, maps)
    with pytest.raises(InpformerError, match="for 4 of 8 images"):
        accumulator.compute()
    with pytest.raises(InpformerError, match="4 labels but 3 anomaly maps"):
        accumulator.add(labels, scores, masks[:3], maps[:3])
    maps[1, 0, 0] = np.nan
    with pytest.raises(InpformerError, match="NaN"):
        MetricAccumulator().add(labels, scores, masks, maps)
    assert MetricAccumulator().compute() == pytest.approx(dict.fromkeys(METRIC_NAMES, np.nan), nan_ok=True)
