"""Few-shot expansion: each of the K images per category becomes 22 images, as in the paper and its code (the
original, 8 rotations by ±π/16..±π/4, 8 translations, a horizontal flip, grayscale and the 90/180/270 degree
rotations).

As in the reference, the expansions act on the normalised image tensor, after resizing and cropping: rotations
and translations resample bilinearly in normalised coordinates (-1..1 across the image, so a shift of 0.2 moves
the image by 10 % of its size), reflecting at the borders; grayscale weighs the normalised channels. They are
fixed (not random), so the expanded set is a plain dataset whose encoder features can be cached like any other.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .images import Preprocess, Sample, read_image

Expansion = Callable[[torch.Tensor], torch.Tensor]  # (3, H, W) float -> (3, H, W) float
_GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R BT.601 luma, as the reference's grayscale


def _warp(image: torch.Tensor, matrix: list[list[float]]) -> torch.Tensor:
    """Samples `image` at `matrix` @ (x, y, 1) for every output position (x, y) in normalised coordinates."""
    theta = torch.tensor([matrix], dtype=image.dtype)
    grid = F.affine_grid(theta, [1, *image.shape], align_corners=False)
    return F.grid_sample(image[None], grid, mode="bilinear", padding_mode="reflection", align_corners=False)[0]


def _rotate(radians: float) -> Expansion:
    cos, sin = math.cos(radians), math.sin(radians)
    return lambda image: _warp(image, [[cos, -sin, 0.0], [sin, cos, 0.0]])


def _translate(dx: float, dy: float) -> Expansion:
    return lambda image: _warp(image, [[1.0, 0.0, dx], [0.0, 1.0, dy]])


def _grayscale(image: torch.Tensor) -> torch.Tensor:
    gray = sum(weight * channel for weight, channel in zip(_GRAY_WEIGHTS, image, strict=True))
    return gray.expand_as(image).clone()


def _quarter_turns(k: int) -> Expansion:
    return lambda image: torch.rot90(image, k, dims=(-2, -1))


_SIGNS = ((1, 1), (-1, 1), (-1, -1), (1, -1))
FEW_SHOT_EXPANSIONS: tuple[Expansion, ...] = (
    lambda image: image,
    *(_rotate(math.pi * k / 16) for k in (-4, -3, -2, -1, 1, 2, 3, 4)),
    *(_translate(sx * step, sy * step) for step in (0.2, 0.1) for sx, sy in _SIGNS),
    lambda image: image.flip(-1),
    _grayscale,
    *(_quarter_turns(k) for k in (1, 2, 3)),
)
assert len(FEW_SHOT_EXPANSIONS) == 22


class ExpandedDataset(Dataset):
    """Every sample under every expansion: item i is sample i // 22 under expansion i % 22."""

    def __init__(self, samples: Sequence[Sample], preprocess: Preprocess,
                 expansions: Sequence[Expansion] = FEW_SHOT_EXPANSIONS):
        self.samples = list(samples)
        self.preprocess = preprocess
        self.expansions = list(expansions)

    def __len__(self) -> int:
        return len(self.samples) * len(self.expansions)

    def __getitem__(self, index: int) -> dict:
        sample_index, expansion_index = divmod(index, len(self.expansions))
        image = self.preprocess(read_image(self.samples[sample_index].path))
        expanded = self.expansions[expansion_index](image)
        if expanded.shape != image.shape:  # a quarter turn of a non-square input: stretched back to its shape,
            # which is what a quarter turn in normalised coordinates (as the small rotations) does
            expanded = F.interpolate(expanded[None], size=image.shape[1:], mode="bilinear", align_corners=False)[0]
        return {"image": expanded, "label": 0, "index": index}


def draw_shots(samples: Sequence[Sample], shots: int, seed: int) -> list[Sample]:
    """`shots` training images per category, drawn without replacement with `seed`."""
    rng = np.random.default_rng(seed)
    drawn = []
    for category in sorted({s.category for s in samples}):
        pool = [s for s in samples if s.category == category]
        chosen = rng.choice(len(pool), size=min(shots, len(pool)), replace=False)
        drawn += [pool[i] for i in sorted(chosen)]
    return drawn
