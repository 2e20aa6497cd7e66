"""Geometry: non-square sizes, aspect-preserving padding, valid boxes and the way back to the original image."""

import numpy as np
import pytest

from inpformer.data.geometry import Geometry, map_shape, parse_size
from inpformer.errors import InpformerError


def test_parse_size():
    assert parse_size(448) == (448, 448)
    assert parse_size("448") == (448, 448)
    assert parse_size("448x336") == (448, 336)
    assert parse_size([448, 336]) == (448, 336)
    for bad in ("448x", "big", "0x14", "-14"):
        with pytest.raises(InpformerError, match="--image-size"):
            parse_size(bad)


def test_map_shape_keeps_the_aspect_ratio_with_map_size_on_the_short_side():
    assert map_shape((224, 224), 256) == (256, 256)
    assert map_shape((448, 336), 256) == (341, 256)
    assert map_shape((224, 448), 256) == (256, 512)


def test_stretch_fills_the_input():
    geometry = Geometry((56, 28), (56, 28))
    image = np.zeros((300, 500, 3), np.uint8)
    assert geometry.view(image).shape == (56, 28, 3)
    assert geometry.valid_box(image.shape) == (0, 0, 1, 1)


def test_pad_keeps_the_aspect_ratio_and_reflects():
    geometry = Geometry((56, 56), (56, 56), "pad")
    image = np.zeros((100, 25, 3), np.uint8)  # tall: 56 x 14 after the resize, centred
    image[:, :5] = 255  # a bright left edge
    view = geometry.view(image)
    assert view.shape == (56, 56, 3)
    y0, x0, y1, x1 = geometry.valid_box(image.shape)
    assert (y0, y1) == (0, 1) and x0 == pytest.approx(21 / 56) and x1 == pytest.approx(35 / 56)
    assert view[:, 21:23].min() > 200  # the image's bright edge...
    assert view[:, 20].min() > 200 and view[:, 10].max() == 0  # ...mirrored into the padding, no black border
    mask = np.zeros((100, 25), bool)
    mask[40:60, 10:15] = True
    placed = geometry.mask(mask)
    assert placed[:, :21].sum() == 0 and placed[:, 35:].sum() == 0 and placed.sum() > 0


def test_to_original_inverts_the_geometry():
    for geometry in (Geometry((56, 56), (56, 56), "pad"), Geometry((64, 48), (56, 42), "stretch"),
                     Geometry((56, 84), (56, 84), "pad")):
        image = np.zeros((90, 40, 3), np.uint8)
        mask = np.zeros((90, 40), bool)
        mask[30:50, 10:25] = True
        crop_map = geometry.mask(mask).astype(np.float32) / 255  # coverage
        back = geometry.to_original(crop_map, image.shape)
        assert back.shape == (90, 40)
        inside = (back > 0.5) & mask
        assert inside.sum() / mask.sum() > 0.8 and ((back > 0.5) & ~mask).sum() / mask.sum() < 0.3


def test_to_original_from_a_map_at_another_resolution():
    geometry = Geometry((56, 56), (56, 56), "pad")
    anomaly_map = np.ones((256, 256), np.float32)  # the map covers the crop, padding included
    back = geometry.to_original(anomaly_map, (100, 25))
    assert back.shape == (100, 25) and back.min() == pytest.approx(1.0)


def test_crop_must_fit():
    with pytest.raises(InpformerError, match="does not fit"):
        Geometry((56, 56), (70, 56))
    with pytest.raises(InpformerError, match="--resize-mode"):
        Geometry((56, 56), (56, 56), "zoom")
