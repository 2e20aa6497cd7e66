"""From model output to anomaly maps and image scores: written once, used by evaluation, prediction and export.

Paper protocol: per group 1 - cos(encoder, decoder) on the token grid, bilinearly upsampled to the input size
(align_corners=True), averaged over groups, resized to `map_size` (256), Gaussian blur (k=5, sigma=4);
the image score is the mean of the top 1% map pixels. Pure torch, so it traces into ONNX unchanged.
A non-square input gives a map of the same aspect ratio, `map_size` on its shorter side. Pixels outside an
image's valid box (padding, see geometry.py) are set to 0 and never count: the score is the mean of the top 1% of
the image's own pixels (a part padded to a sixth of the input is scored like an unpadded one), and the metrics
leave them out.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data.geometry import Size, map_shape, parse_size
from .losses import token_to_inp_distance
from .model import ModelOutput


class AnomalyScorer(nn.Module):
    """Turns `ModelOutput` into maps [B, map_h, map_w] and image scores [B]."""

    def __init__(
        self,
        input_size: int | Size,
        map_size: int = 256,
        blur_kernel: int = 5,
        blur_sigma: float = 4.0,
        top_ratio: float = 0.01,
    ):
        super().__init__()
        self.input_size = parse_size(input_size)
        self.map_shape = map_shape(self.input_size, map_size)
        self.top_ratio = top_ratio
        self.register_buffer("blur_weight", gaussian_kernel(blur_kernel, blur_sigma), persistent=False)

    def token_maps(self, output: ModelOutput) -> Tensor:
        """1 - cos per group on the token grid: [B, groups, rows, columns]."""
        distance = 1 - F.cosine_similarity(output.encoder_groups, output.decoder_groups, dim=-1)
        return self.to_grid(distance)

    def zero_shot_token_maps(self, output: ModelOutput) -> Tensor:
        """Zero-shot map: each token's distance to its nearest INP, [B, 1, rows, columns]."""
        return self.to_grid(token_to_inp_distance(output.tokens, output.inps).unsqueeze(1))

    def to_grid(self, distance: Tensor) -> Tensor:
        """[B, groups, tokens] -> [B, groups, rows, columns], the token grid having the input's aspect ratio."""
        rows = round(math.sqrt(distance.shape[-1] * self.input_size[0] / self.input_size[1]))
        return distance.reshape(*distance.shape[:-1], rows, distance.shape[-1] // rows)

    def maps(self, token_maps: Tensor, valid: Tensor | None = None) -> Tensor:
        """Token-grid maps [B, groups, rows, columns] -> blurred anomaly maps [B, map_h, map_w]; with `valid`
        boxes [B, 4] (see `valid_pixels`), 0 outside them."""
        full = F.interpolate(token_maps, size=self.input_size, mode="bilinear", align_corners=True).mean(1, True)
        resized = F.interpolate(full, size=self.map_shape, mode="bilinear", align_corners=False)
        pad = self.blur_weight.shape[-1] // 2
        maps = F.conv2d(resized, self.blur_weight, padding=pad).squeeze(1)
        return maps if valid is None else maps * valid_pixels(valid, self.map_shape).to(maps.dtype)

    def scores(self, maps: Tensor, valid: Tensor | None = None) -> Tensor:
        """Image score: mean of the top `top_ratio` of each map's pixels (of those inside the `valid` boxes)."""
        return top_mean(maps, self.top_ratio, None if valid is None else valid_pixels(valid, self.map_shape))

    def forward(self, output: ModelOutput, zero_shot: bool = False,
                valid: Tensor | None = None) -> tuple[Tensor, Tensor]:
        token_maps = self.zero_shot_token_maps(output) if zero_shot else self.token_maps(output)
        maps = self.maps(token_maps, valid)
        return maps, self.scores(maps, valid)


def top_mean(maps: Tensor, ratio: float, valid: Tensor | None = None) -> Tensor:
    """[B, H, W] -> [B]: the mean of each map's highest `ratio` of pixels (at least one); with `valid` (bool
    [B, H, W]), of each image's valid pixels, which differ in number from image to image."""
    flat = maps.flatten(1)
    if valid is None:
        return flat.topk(max(1, int(flat.shape[1] * ratio)), dim=1).values.mean(1)
    counts = (valid.flatten(1).sum(1).to(maps.dtype) * ratio).floor().clamp(min=1)
    ranked = flat.sort(dim=1, descending=True).values
    kept = torch.arange(flat.shape[1], device=maps.device)[None] < counts[:, None]
    return (ranked * kept).sum(1) / counts


def valid_pixels(boxes: Tensor, shape: Size) -> Tensor:
    """Boxes [B, 4] (y0, x0, y1, x1 as fractions of the map) -> bool [B, H, W]: pixels whose centres are inside."""
    rows = (torch.arange(shape[0], dtype=boxes.dtype, device=boxes.device) + 0.5) / shape[0]
    columns = (torch.arange(shape[1], dtype=boxes.dtype, device=boxes.device) + 0.5) / shape[1]
    inside_rows = (rows >= boxes[:, 0:1]) & (rows < boxes[:, 2:3])
    inside_columns = (columns >= boxes[:, 1:2]) & (columns < boxes[:, 3:4])
    return inside_rows[:, :, None] & inside_columns[:, None, :]


def gaussian_kernel(size: int, sigma: float) -> Tensor:
    """Normalised 2-D Gaussian as a conv2d weight [1, 1, size, size].

    Built here rather than with torchvision's gaussian_blur because the reference pads with zeros (a plain conv),
    whereas torchvision reflects at the border; the maps near the border would differ.
    """
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    kernel_1d = torch.exp(-(coords**2) / (2 * sigma**2))
    kernel = torch.outer(kernel_1d, kernel_1d)
    return (kernel / kernel.sum()).float().reshape(1, 1, size, size)
