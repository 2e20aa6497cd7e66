"""Large images as overlapping tiles, and the tiles' anomaly maps stitched back without seams.

The image is first resized by `scale`, then cut into tiles of the model's input size that overlap by `overlap`
of a tile. Each tile's map is placed back at its box with sub-pixel precision and weighted by a window that fades
to ~0 towards the tile's inner edges, so neighbouring tiles cross-fade over their overlap instead of meeting at a
hard seam. Sizes are (height, width); boxes are (y0, x0, y1, x1) in pixels of the scaled image.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from scipy.ndimage import map_coordinates

from ..errors import InpformerError
from .geometry import PATCH, Size, format_size, map_shape, parse_size
from .images import Preprocess, Sample, image_shape, read_image

EPSILON = 1e-3  # the smallest blending weight, so every stitched pixel has a positive total weight
Box = tuple[int, int, int, int]


def _starts(side: int, tile: int, overlap: float) -> list[int]:
    """Tile starts along one axis: from 0 to side - tile, evenly spread, the stride at most tile * (1 - overlap)."""
    if side <= tile:
        return [0]
    stride = max(1.0, tile * (1 - overlap))
    count = math.ceil((side - tile) / stride) + 1
    return [int(s) for s in np.linspace(0, side - tile, count).round()]


def _ramp(position: np.ndarray, length: float, width: float, start: bool, end: bool) -> np.ndarray:
    """1-D weights at `position` (0..length) in a tile: linear from ~0 to 1 over `width` at the faded ends."""
    weight = np.ones_like(position)
    if width > 0:
        if start:
            weight = np.minimum(weight, position / width)
        if end:
            weight = np.minimum(weight, (length - position) / width)
    return np.clip(weight, EPSILON, 1.0)


@dataclass(frozen=True)
class Tiling:
    tile_size: Size
    scale: float = 1.0
    overlap: float = 0.25

    def scaled_shape(self, shape: Sequence[int]) -> Size:
        """The image's (h, w) after the resize by `scale`."""
        return max(1, round(shape[0] * self.scale)), max(1, round(shape[1] * self.scale))

    def boxes(self, shape: Sequence[int]) -> list[Box]:
        """Tile boxes covering the whole scaled image, row-major; a small image gets one tile reaching past it."""
        (height, width), (tile_h, tile_w) = self.scaled_shape(shape), self.tile_size
        return [(y, x, y + tile_h, x + tile_w) for y in _starts(height, tile_h, self.overlap)
                for x in _starts(width, tile_w, self.overlap)]

    def views(self, image: np.ndarray) -> np.ndarray:
        """(H, W, 3) or (H, W) uint8 -> (N, tile_h, tile_w[, 3]) uint8; padding beyond the image is reflected."""
        image = np.asarray(image, dtype=np.uint8)
        boxes, (height, width) = self.boxes(image.shape), self.scaled_shape(image.shape)
        if self.scale != 1:
            image = np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BILINEAR))
        pad = [(0, max(0, self.tile_size[0] - height)), (0, max(0, self.tile_size[1] - width))]
        image = np.pad(image, pad + [(0, 0)] * (image.ndim - 2), mode="reflect")
        return np.stack([image[y0:y1, x0:x1] for y0, x0, y1, x1 in boxes])

    def valid_boxes(self, shape: Sequence[int]) -> np.ndarray:
        """float32 [N, 4]: the real-image part of each tile as (y0, x0, y1, x1) fractions of the tile."""
        (height, width), (tile_h, tile_w) = self.scaled_shape(shape), self.tile_size
        return np.array([(0, 0, (min(y1, height) - y0) / tile_h, (min(x1, width) - x0) / tile_w)
                         for y0, x0, y1, x1 in self.boxes(shape)], dtype=np.float32).reshape(-1, 4)

    def map_shape(self, shape: Sequence[int], map_size: int) -> Size:
        """The stitched map's (h, w) when one tile's map has `map_size` on the tile's shorter side."""
        return self._stitched_shape(shape, map_shape(self.tile_size, map_size))

    def _stitched_shape(self, shape: Sequence[int], tile_map: Size) -> Size:
        height, width = self.scaled_shape(shape)
        return (max(1, round(height * tile_map[0] / self.tile_size[0])),
                max(1, round(width * tile_map[1] / self.tile_size[1])))

    def stitch(self, tile_maps: np.ndarray, shape: Sequence[int]) -> np.ndarray:
        """(N, mh, mw) maps, one per tile of `boxes(shape)` -> the float32 map of the scaled image at mh / tile_h
        map pixels per scaled pixel: tiles blended by smooth windows, their padding dropped."""
        tile_maps = np.asarray(tile_maps, dtype=np.float32)
        boxes = self.boxes(shape)
        if tile_maps.ndim != 3 or len(tile_maps) != len(boxes):
            raise ValueError(f"stitch: expected {len(boxes)} tile maps (N, h, w), got shape {tile_maps.shape}")
        height, width = self.scaled_shape(shape)
        map_h, map_w = tile_maps.shape[1:]
        factor_y, factor_x = map_h / self.tile_size[0], map_w / self.tile_size[1]
        out_h, out_w = self._stitched_shape(shape, (map_h, map_w))
        total = np.zeros((out_h, out_w), np.float64)
        weights = np.zeros((out_h, out_w), np.float64)
        for tile_map, (y0, x0, y1, x1) in zip(tile_maps, boxes, strict=True):
            # the stitched pixels whose centres fall in the tile (all the way to the map's edge for border tiles)
            top, left = y0 * factor_y, x0 * factor_x
            rows = np.arange(0 if y0 == 0 else math.ceil(top - 0.5), out_h if y1 >= height else
                             min(out_h, math.ceil(y1 * factor_y - 0.5)))
            cols = np.arange(0 if x0 == 0 else math.ceil(left - 0.5), out_w if x1 >= width else
                             min(out_w, math.ceil(x1 * factor_x - 0.5)))
            if not len(rows) or not len(cols):
                continue
            # their centres in the tile map's pixel coordinates: a pure shift, bilinear, edges clamped
            ys, xs = rows + 0.5 - top, cols + 0.5 - left
            grid = np.meshgrid(ys - 0.5, xs - 0.5, indexing="ij")
            values = map_coordinates(tile_map, grid, order=1, mode="nearest")
            window = np.outer(_ramp(ys, map_h, self.overlap * map_h, y0 > 0, y1 < height),
                              _ramp(xs, map_w, self.overlap * map_w, x0 > 0, x1 < width))
            total[np.ix_(rows, cols)] += window * values
            weights[np.ix_(rows, cols)] += window
        return (total / np.maximum(weights, EPSILON)).astype(np.float32)

    def to_original(self, stitched: np.ndarray, shape: Sequence[int]) -> np.ndarray:
        """The stitched map resized (bilinear) to the original image's (H, W)."""
        image = Image.fromarray(np.asarray(stitched, dtype=np.float32), "F")
        return np.asarray(image.resize((shape[1], shape[0]), Image.Resampling.BILINEAR))


def parse_tiling(tile_size: int | str | Sequence[int], scale: float | str = 1.0,
                 overlap: float | str = 0.25) -> Tiling:
    """Validated options -> a `Tiling`; errors name the option and the fix."""
    size = parse_size(tile_size, "--image-size")  # the tile is the model's input
    if size[0] % PATCH or size[1] % PATCH:
        raise InpformerError(f"--image-size {format_size(size)} (the tile): use multiples of {PATCH} (the ViT patch), "
                             f"e.g. {format_size(tuple(max(PATCH, round(s / PATCH) * PATCH) for s in size))}")
    scale = _number(scale, "--tile-scale", lambda v: 0 < v <= 4, "a resize factor in (0, 4], e.g. 0.5")
    overlap = _number(overlap, "--tile-overlap", lambda v: 0 <= v < 0.9, "a fraction of a tile in [0, 0.9), e.g. 0.25")
    return Tiling(size, scale, overlap)


def _number(value: object, option: str, valid: Callable[[float], bool], expected: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not valid(number):
        raise InpformerError(f"{option} {value!r}: use {expected}")
    return number


def resize_mask(mask: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """A bool mask resized (nearest neighbour) to `shape` (h, w), e.g. onto a stitched map."""
    image = Image.fromarray(np.asarray(mask, dtype=np.uint8) * 255, "L")
    return np.asarray(image.resize((shape[1], shape[0]), Image.Resampling.NEAREST)) > 127


class TileDataset(torch.utils.data.Dataset):
    """Every tile of every sample, normalised (training on large images): item i is one tile. An image is decoded
    once for its consecutive tiles, as the feature cache reads them in order."""

    def __init__(self, samples: Sequence[Sample], tiling: Tiling, preprocess: Preprocess):
        self.samples, self.tiling, self.preprocess = list(samples), tiling, preprocess
        self.tiles = [(i, t) for i, sample in enumerate(self.samples)
                      for t in range(len(tiling.boxes(image_shape(sample.path))))]
        self._decoded: tuple[int, np.ndarray, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.tiles)

    def __getitem__(self, index: int) -> dict:
        sample_index, tile = self.tiles[index]
        if self._decoded is None or self._decoded[0] != sample_index:
            image = read_image(self.samples[sample_index].path)
            self._decoded = (sample_index, self.tiling.views(image), self.tiling.valid_boxes(image.shape))
        _, views, boxes = self._decoded
        return {"image": self.preprocess.normalize(views[tile]), "valid": torch.from_numpy(boxes[tile]),
                "label": 0, "index": index}
