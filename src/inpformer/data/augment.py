"""Few-shot expansion: each of the K images per category becomes 22 images, as in the paper (the original,
8 rotations, 8 translations, a horizontal flip, grayscale and the 90/180/270 degree rotations).

The expansions are fixed (not random), so the expanded set is a plain dataset whose encoder features can be
cached like any other. They apply to the resized and cropped uint8 image, before normalisation, so padding is
black in pixel space.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from torch.utils.data import Dataset

from .images import Preprocess, Sample, read_image

Expansion = Callable[[torch.Tensor], torch.Tensor]  # (3, H, W) uint8 -> (3, H, W) uint8


def _rotate(radians: float) -> Expansion:
    return lambda image: TF.rotate(image, math.degrees(radians), fill=0)


def _translate(dx: float, dy: float) -> Expansion:
    def translate(image: torch.Tensor) -> torch.Tensor:
        height, width = image.shape[-2:]
        return TF.affine(image, angle=0.0, translate=[round(dx * width), round(dy * height)], scale=1.0,
                         shear=[0.0, 0.0], fill=0)

    return translate


def _quarter_turns(k: int) -> Expansion:
    return lambda image: torch.rot90(image, k, dims=(-2, -1))


_SIGNS = ((1, 1), (1, -1), (-1, 1), (-1, -1))
FEW_SHOT_EXPANSIONS: tuple[Expansion, ...] = (
    lambda image: image,
    *(_rotate(sign * math.pi * k / 16) for k in (1, 2, 3, 4) for sign in (1, -1)),
    *(_translate(sx * step, sy * step) for step in (0.1, 0.2) for sx, sy in _SIGNS),
    TF.horizontal_flip,
    lambda image: TF.rgb_to_grayscale(image, num_output_channels=3),
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
        view = self.preprocess.view(read_image(self.samples[sample_index].path))
        expanded = self.expansions[expansion_index](torch.from_numpy(view.copy()).permute(2, 0, 1))
        if expanded.shape[1:] != view.shape[:2]:  # a quarter turn of a non-square view: back to its shape
            expanded = TF.resize(expanded, list(view.shape[:2]), antialias=True)
        image = self.preprocess.normalize(expanded.permute(1, 2, 0).numpy())
        return {"image": image, "label": 0, "index": index}


def draw_shots(samples: Sequence[Sample], shots: int, seed: int) -> list[Sample]:
    """`shots` training images per category, drawn without replacement with `seed`."""
    rng = np.random.default_rng(seed)
    drawn = []
    for category in sorted({s.category for s in samples}):
        pool = [s for s in samples if s.category == category]
        chosen = rng.choice(len(pool), size=min(shots, len(pool)), replace=False)
        drawn += [pool[i] for i in sorted(chosen)]
    return drawn
