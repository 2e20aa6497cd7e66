"""Tiling: overlapping tiles of a large image, and their maps stitched back smoothly (no seams)."""

import json
from itertools import pairwise

import numpy as np
import pytest
from PIL import Image

from inpformer import load_mvtec
from inpformer.data.tiling import Tiling, parse_tiling
from inpformer.errors import InpformerError


def _coverage(tiling: Tiling, shape) -> np.ndarray:
    count = np.zeros(tiling.scaled_shape(shape), int)
    for y0, x0, y1, x1 in tiling.boxes(shape):
        count[y0:y1, x0:x1] += 1
    return count


def test_boxes_cover_the_image_with_the_overlap():
    tiling = Tiling((28, 42), overlap=0.25)
    boxes = tiling.boxes((100, 130))
    assert _coverage(tiling, (100, 130)).min() >= 1
    assert all(y1 - y0 == 28 and x1 - x0 == 42 for y0, x0, y1, x1 in boxes)
    assert boxes[0][:2] == (0, 0) and boxes[-1][2:] == (100, 130)  # the last tile ends exactly at the edge
    ys, xs = sorted({b[0] for b in boxes}), sorted({b[1] for b in boxes})
    assert len(boxes) == len(ys) * len(xs) and boxes[1] == (0, xs[1], 28, xs[1] + 42)  # row-major
    for starts, tile in ((ys, 28), (xs, 42)):
        overlaps = [tile - (b - a) for a, b in pairwise(starts)]
        assert all(0.25 * tile - 1 <= o <= 0.5 * tile for o in overlaps)


def test_a_small_image_is_one_tile_and_scale_changes_the_count():
    assert Tiling((28, 42)).boxes((20, 30, 3)) == [(0, 0, 28, 42)]
    assert len(Tiling((28, 42), scale=0.5).boxes((100, 130))) < len(Tiling((28, 42)).boxes((100, 130)))
    assert Tiling((28, 42), scale=0.5).scaled_shape((101, 130)) == (50, 65)
    assert len(Tiling((28, 28), overlap=0).boxes((56, 84))) == 6  # no overlap: tiles just meet


def test_views_cut_the_scaled_image():
    image = np.random.default_rng(0).integers(0, 256, (60, 90, 3), dtype=np.uint8)
    for scale in (1.0, 0.5):
        tiling = Tiling((28, 42), scale=scale)
        views = tiling.views(image)
        boxes = tiling.boxes(image.shape)
        assert views.shape == (len(boxes), 28, 42, 3) and views.dtype == np.uint8
        height, width = tiling.scaled_shape(image.shape)
        scaled = image if scale == 1 else np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))
        for view, (y0, x0, y1, x1) in zip(views, boxes, strict=True):
            np.testing.assert_array_equal(view, scaled[y0:y1, x0:x1])
        np.testing.assert_array_equal(tiling.valid_boxes(image.shape), np.tile([0, 0, 1, 1], (len(boxes), 1)))
    assert Tiling((28, 42)).views(image[..., 0]).shape[1:] == (28, 42)  # grayscale


def test_small_image_padding_is_reflected():
    image = np.full((20, 30, 3), 50, np.uint8)
    image[-3:] = 250  # a bright bottom edge
    view = Tiling((28, 42)).views(image)[0]
    np.testing.assert_array_equal(view[:20, :30], image)
    np.testing.assert_array_equal(view[20, :30], image[18])  # mirrored, not black
    assert view[20:22].min() == 250 and view.min() == 50
    assert Tiling((28, 42)).views(np.full((5, 3, 3), 7, np.uint8)).min() == 7  # pads larger than the image
    np.testing.assert_allclose(Tiling((28, 42)).valid_boxes(image.shape), [[0, 0, 20 / 28, 30 / 42]])


def test_stitching_constant_maps_gives_the_constant():
    tiling = Tiling((28, 42), scale=0.5)
    shape = (200, 300)
    assert tiling.map_shape(shape, 8) == (29, 43)  # tile maps of 8 x 12: 100 x 150 scaled px / 3.5
    stitched = tiling.stitch(np.ones((len(tiling.boxes(shape)), 8, 12)), shape)
    assert stitched.shape == (29, 43) and stitched.dtype == np.float32
    assert np.all(stitched == 1.0)
    small = Tiling((28, 42)).stitch(np.ones((1, 8, 12)), (20, 30))  # padding dropped
    assert small.shape == (round(20 * 8 / 28), round(30 * 12 / 42)) and np.all(small == 1.0)


# Seams: a 150 x 150 image in 56 x 56 tiles (starts 0, 31, 63, 94: tile 0 ends at 56, inside tile 1), each
# tile's map 28 x 28 (2 scaled px per map px), so tiles start at half map pixels.
TILING, SHAPE, MAP = Tiling((56, 56), overlap=0.25), (150, 150), 28


def _field(y, x, centre):
    """A smooth anomaly field in scaled pixels: a slow background and a bright blob (peak 1)."""
    return 0.1 * np.sin(y / 23) * np.cos(x / 31) + np.exp(-((y - centre[0]) ** 2 + (x - centre[1]) ** 2) / 72)


def _tile_maps(centre, offset=0.0):
    """Each tile's map: the field sampled at the tile's map-pixel centres; the first tile's off by `offset`."""
    step = 56 / MAP
    maps = []
    for index, (y0, x0, _, _) in enumerate(TILING.boxes(SHAPE)):
        y, x = np.meshgrid(y0 + (np.arange(MAP) + 0.5) * step, x0 + (np.arange(MAP) + 0.5) * step, indexing="ij")
        maps.append(_field(y, x, centre) + (offset if index == 0 else 0.0))
    return np.stack(maps)


@pytest.mark.parametrize("centre", [(56, 56), (43.5, 43.5)])  # on tile 0's edge; mid-overlap of tiles 0, 1, 4, 5
def test_a_defect_on_a_tile_boundary_is_stitched_without_a_seam(centre):
    stitched = TILING.stitch(_tile_maps(centre), SHAPE)
    assert stitched.shape == TILING.map_shape(SHAPE, MAP) == (75, 75)
    y, x = np.meshgrid((np.arange(75) + 0.5) * 2, (np.arange(75) + 0.5) * 2, indexing="ij")
    truth = _field(y, x, centre)
    assert np.abs(stitched - truth).max() < 0.05  # the blob's peak is 1
    for axis in (0, 1):  # neighbouring pixels step like the field's own, at tile boundaries too
        jumps, true_jumps = np.diff(stitched, axis=axis), np.diff(truth, axis=axis)
        assert np.abs(jumps).max() <= 1.1 * np.abs(true_jumps).max()
        assert np.abs(jumps - true_jumps).max() < 0.02


def test_disagreeing_tiles_blend_smoothly_across_the_overlap():
    stitched = TILING.stitch(_tile_maps((-100, -100), offset=0.2), SHAPE)  # no blob; tile 0 reads 0.2 higher
    y, x = np.meshgrid((np.arange(75) + 0.5) * 2, (np.arange(75) + 0.5) * 2, indexing="ij")
    excess = stitched - _field(y, x, (-100, -100))
    assert excess[:10, :10] == pytest.approx(0.2, abs=1e-3) and np.abs(excess[40:, :]).max() < 1e-3
    ramp = 0.25 * MAP  # the blending ramp, in map pixels
    for axis in (0, 1):  # a hard seam would jump by 0.2; the blend spreads it over the ramp
        assert np.abs(np.diff(excess, axis=axis)).max() < 2 * 0.2 / ramp


def test_to_original_returns_the_original_shape():
    tiling = Tiling((28, 42), scale=0.5)
    stitched = tiling.stitch(np.ones((len(tiling.boxes((200, 300))), 8, 12)), (200, 300))
    back = tiling.to_original(stitched, (200, 300, 3))
    assert back.shape == (200, 300) and np.allclose(back, 1.0)


def test_parse_tiling():
    assert parse_tiling("448x336", "0.5", "0.25") == Tiling((448, 336), 0.5, 0.25)
    assert parse_tiling(224) == Tiling((224, 224))
    for kwargs, option in [(dict(scale=0), "--tile-scale"), (dict(scale=5), "--tile-scale"),
                           (dict(scale="big"), "--tile-scale"), (dict(overlap=0.9), "--tile-overlap"),
                           (dict(overlap=-0.1), "--tile-overlap"), (dict(tile_size=450), "--image-size 450"),
                           (dict(tile_size="0x14"), "--image-size")]:
        with pytest.raises(InpformerError, match=option):
            parse_tiling(**{"tile_size": 448, **kwargs})


@pytest.mark.slow
def test_tiled_model_trains_tests_predicts_and_exports(tmp_path):
    """Images of 100 x 150 px in tiles of 56 px: training on the tiles, metrics and predictions on stitched maps."""
    from synthetic import add_defect, save_image, textured_image

    from inpformer import INPFormer
    from inpformer.cli import main

    root = tmp_path / "data" / "sheet"
    rng = np.random.default_rng(0)
    for i in range(6):
        save_image(root / "train" / "good" / f"{i:03d}.png", textured_image(rng, 150)[:100])
    for i in range(2):
        save_image(root / "test" / "good" / f"{i:03d}.png", textured_image(rng, 150)[:100])
        image, mask = add_defect(rng, textured_image(rng, 150))
        save_image(root / "test" / "spot" / f"{i:03d}.png", image[:100])
        save_image(root / "ground_truth" / "spot" / f"{i:03d}_mask.png", mask[:100].astype(np.uint8) * 255)
    run = tmp_path / "run"
    assert main(["train", "--data", str(root), "--backbone", "tiny_random", "--image-size", "56", "--tile-scale",
                 "1", "--tile-overlap", "0.25", "--iterations", "10", "--batch-size", "4", "--warmup-iterations", "2",
                 "--quiet", "--out", str(run)]) == 0
    detector = INPFormer.load(run / "models" / "sheet.pt")
    tiling = detector.config.tiling()
    assert len(tiling.boxes((100, 150))) == 3 * 4
    assert detector.training_log.iterations == 10

    assert main(["test", str(run), "--save-maps"]) == 0
    saved = np.load(run / "maps.npz")
    assert saved["maps"].shape == (4, *tiling.map_shape((100, 150), detector.config.map_size))
    metrics = json.loads((run / "metrics.json").read_text())["categories"]["sheet"]
    assert all(value is not None for value in metrics.values())

    image = root / "test" / "spot" / "000.png"
    prediction = detector.predict(image)
    assert prediction.anomaly_map.shape == (100, 150) and prediction.mask.shape == (100, 150)
    scored = detector.score(load_mvtec(root, "test"))
    assert prediction.score == pytest.approx(float(scored.scores[2]), rel=1e-5)  # "spot" sorts after "good"
    onnx_file = tmp_path / "sheet.onnx"
    assert main(["export", str(run), "--onnx", str(onnx_file)]) == 0
    assert main(["predict", str(onnx_file), str(image), "--out", str(tmp_path / "onnx"), "--runtime", "onnx",
                 "--quiet"]) == 0
    row = json.loads((tmp_path / "onnx" / "predictions.json").read_text())["predictions"][0]
    assert row["score"] == pytest.approx(prediction.score, abs=1e-4)
