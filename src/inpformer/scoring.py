"""From model output to anomaly maps and image scores: written once, used by evaluation, prediction and export.

Paper protocol: per group 1 - cos(encoder, decoder) on the token grid, bilinearly upsampled to the input size
(align_corners=True), averaged over groups, resized to `map_size` (256), Gaussian blur (k=5, sigma=4);
the image score is the mean of the top 1% map pixels. Pure torch, so it traces into ONNX unchanged.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .losses import token_to_inp_distance
from .model import ModelOutput


class AnomalyScorer(nn.Module):
    """Turns `ModelOutput` into maps [B, map_size, map_size] and image scores [B]."""

    def __init__(
        self,
        input_size: int,
        map_size: int = 256,
        blur_kernel: int = 5,
        blur_sigma: float = 4.0,
        top_ratio: float = 0.01,
    ):
        super().__init__()
        self.input_size = input_size
        self.map_size = map_size
        self.top_k = max(1, int(map_size * map_size * top_ratio))
        self.register_buffer("blur_weight", gaussian_kernel(blur_kernel, blur_sigma), persistent=False)

    def token_maps(self, output: ModelOutput) -> Tensor:
        """1 - cos per group on the token grid: [B, groups, side, side]."""
        distance = 1 - F.cosine_similarity(output.encoder_groups, output.decoder_groups, dim=-1)
        return _to_grid(distance)

    def zero_shot_token_maps(self, output: ModelOutput) -> Tensor:
        """Zero-shot map: each token's distance to its nearest INP, [B, 1, side, side]."""
        return _to_grid(token_to_inp_distance(output.tokens, output.inps).unsqueeze(1))

    def maps(self, token_maps: Tensor) -> Tensor:
        """Token-grid maps [B, groups, side, side] -> blurred anomaly maps [B, map_size, map_size]."""
        full = F.interpolate(token_maps, size=self.input_size, mode="bilinear", align_corners=True).mean(1, True)
        resized = F.interpolate(full, size=self.map_size, mode="bilinear", align_corners=False)
        pad = self.blur_weight.shape[-1] // 2
        return F.conv2d(resized, self.blur_weight, padding=pad).squeeze(1)

    def scores(self, maps: Tensor) -> Tensor:
        """Image score: mean of the top `top_ratio` of each map's pixels."""
        return maps.flatten(1).topk(self.top_k, dim=1).values.mean(1)

    def forward(self, output: ModelOutput, zero_shot: bool = False) -> tuple[Tensor, Tensor]:
        token_maps = self.zero_shot_token_maps(output) if zero_shot else self.token_maps(output)
        maps = self.maps(token_maps)
        return maps, self.scores(maps)


def gaussian_kernel(size: int, sigma: float) -> Tensor:
    """Normalised 2-D Gaussian as a conv2d weight [1, 1, size, size].

    Built here rather than with torchvision's gaussian_blur because the reference pads with zeros (a plain conv),
    whereas torchvision reflects at the border; the maps near the border would differ.
    """
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    kernel_1d = torch.exp(-(coords**2) / (2 * sigma**2))
    kernel = torch.outer(kernel_1d, kernel_1d)
    return (kernel / kernel.sum()).float().reshape(1, 1, size, size)


def _to_grid(distance: Tensor) -> Tensor:
    """[B, groups, tokens] -> [B, groups, side, side] for the square token grid."""
    side = math.isqrt(distance.shape[-1])
    return distance.reshape(*distance.shape[:-1], side, side)
