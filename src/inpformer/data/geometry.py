"""Where an image lands in the model's input, and how a map of that input goes back onto the image.

One `Geometry` serves training, evaluation, prediction, serving and export alike, so every consumer resizes,
pads, crops and un-does that the same way. Sizes are (height, width).

- "stretch" (the paper): resize to `image_size`, ignoring the aspect ratio, then centre-crop `crop_size`.
- "pad": resize keeping the aspect ratio until the image fits `image_size`, fill the rest by reflection, then
  centre-crop. The padded pixels are outside the image's *valid box*: they never count in a map, a score or a
  metric.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import InpformerError

Size = tuple[int, int]
PATCH = 14  # the DINOv2 patch: the model's input sides are multiples of it
RESIZE_MODES = ("stretch", "pad")


def parse_size(value: int | str | Sequence[int], option: str = "--image-size") -> Size:
    """448 -> (448, 448); "448x336" (height x width) -> (448, 336); [448, 336] -> (448, 336)."""
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+))?\s*", value)
        if not match:
            raise InpformerError(f"{option} {value!r}: expected a size like 448 or HEIGHTxWIDTH like 448x336")
        height = int(match[1])
        size = (height, int(match[2]) if match[2] else height)
    elif isinstance(value, (int, np.integer)):
        size = (int(value), int(value))
    else:
        size = tuple(int(v) for v in value)
    if len(size) != 2 or min(size) < 1:
        raise InpformerError(f"{option} {value!r}: expected positive sizes like 448 or 448x336")
    return size


def format_size(size: Size) -> str:
    return str(size[0]) if size[0] == size[1] else f"{size[0]}x{size[1]}"


def map_shape(crop_size: Size, map_size: int) -> Size:
    """The anomaly map's (height, width): the crop's aspect ratio with `map_size` on the shorter side."""
    short = min(crop_size)
    return round(map_size * crop_size[0] / short), round(map_size * crop_size[1] / short)


@dataclass(frozen=True)
class Placement:
    """The image resized to `resized` (h, w), its top-left corner at `offset` (y, x) in crop pixels (negative
    where the crop cuts it)."""

    resized: Size
    offset: tuple[int, int]


@dataclass(frozen=True)
class Geometry:
    image_size: Size
    crop_size: Size
    resize_mode: str = "stretch"

    def __post_init__(self):
        if self.resize_mode not in RESIZE_MODES:
            raise InpformerError(f"--resize-mode {self.resize_mode!r}: choose one of {', '.join(RESIZE_MODES)}")
        if any(c > i or c < 1 for c, i in zip(self.crop_size, self.image_size, strict=True)):
            raise InpformerError(f"--crop-size {format_size(self.crop_size)} does not fit in --image-size "
                                 f"{format_size(self.image_size)}; use a crop <= the resize, on both sides")

    @property
    def crop_offset(self) -> tuple[int, int]:
        """Top-left of the centre crop in the resized canvas (torchvision's centre_crop rounding)."""
        return tuple(round((i - c) / 2.0) for i, c in zip(self.image_size, self.crop_size, strict=True))

    def placement(self, shape: Sequence[int]) -> Placement:
        height, width = shape[:2]
        if self.resize_mode == "stretch":
            resized, offset = self.image_size, (0, 0)
        else:
            scale = min(self.image_size[0] / height, self.image_size[1] / width)
            resized = (max(1, min(self.image_size[0], round(height * scale))),
                       max(1, min(self.image_size[1], round(width * scale))))
            offset = tuple((i - r) // 2 for i, r in zip(self.image_size, resized, strict=True))
        return Placement(resized, tuple(o - c for o, c in zip(offset, self.crop_offset, strict=True)))

    def valid_box(self, shape: Sequence[int]) -> tuple[float, float, float, float]:
        """(y0, x0, y1, x1) of the image's own pixels in the crop, as fractions of the crop's height and width."""
        place = self.placement(shape)
        (top, left), (height, width) = place.offset, place.resized
        crop_h, crop_w = self.crop_size
        return (max(top, 0) / crop_h, max(left, 0) / crop_w, min(top + height, crop_h) / crop_h,
                min(left + width, crop_w) / crop_w)

    def view(self, image: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 -> (crop_h, crop_w, 3) uint8: the pixels the model sees."""
        return self._apply(Image.fromarray(np.asarray(image, dtype=np.uint8), "RGB"), Image.Resampling.BILINEAR,
                           "reflect")

    def mask(self, mask: np.ndarray) -> np.ndarray:
        """(H, W) bool -> (crop_h, crop_w) uint8 defect coverage 0..255 aligned with `view`; padding is never a
        defect. As the reference's protocol: the 0/255 mask is resized bilinearly with the image and cropped; it
        is binarised only once resized to the map (`mask_on_map`)."""
        image = Image.fromarray(np.asarray(mask, dtype=bool).astype(np.uint8) * 255, "L")
        return self._apply(image, Image.Resampling.BILINEAR, "constant")

    def _apply(self, image: Image.Image, resample: Image.Resampling, pad_mode: str) -> np.ndarray:
        place = self.placement((image.height, image.width))
        resized = np.asarray(image.resize(place.resized[::-1], resample))
        if self.resize_mode == "pad":
            (top, left), (height, width) = place.offset, place.resized
            top, left = top + self.crop_offset[0], left + self.crop_offset[1]  # back to canvas coordinates
            pad = [(top, self.image_size[0] - height - top), (left, self.image_size[1] - width - left)]
            resized = np.pad(resized, pad + [(0, 0)] * (resized.ndim - 2), mode=pad_mode)
        y, x = self.crop_offset
        return resized[y : y + self.crop_size[0], x : x + self.crop_size[1]]

    def to_original(self, anomaly_map: np.ndarray, shape: Sequence[int]) -> np.ndarray:
        """A map of the crop (any resolution) placed back onto the original image (H, W): the inverse of `view`.
        Pixels the crop cut off are 0 (not inspected)."""
        height, width = shape[:2]
        map_h, map_w = anomaly_map.shape
        place = self.placement(shape)
        (top, left), (res_h, res_w) = place.offset, place.resized
        crop_h, crop_w = self.crop_size
        # the part of the resized image inside the crop, in crop pixels, then in original pixels
        y0, x0, y1, x1 = max(top, 0), max(left, 0), min(top + res_h, crop_h), min(left + res_w, crop_w)
        oy0, oy1 = round((y0 - top) * height / res_h), round((y1 - top) * height / res_h)
        ox0, ox1 = round((x0 - left) * width / res_w), round((x1 - left) * width / res_w)
        full = np.zeros((height, width), dtype=np.float32)
        if oy1 <= oy0 or ox1 <= ox0:
            return full
        box = (x0 * map_w / crop_w, y0 * map_h / crop_h, x1 * map_w / crop_w, y1 * map_h / crop_h)
        part = Image.fromarray(np.asarray(anomaly_map, dtype=np.float32), "F").resize(
            (ox1 - ox0, oy1 - oy0), Image.Resampling.BILINEAR, box=box)
        full[oy0:oy1, ox0:ox1] = np.asarray(part)
        return full


def mask_on_map(coverage: torch.Tensor, shape: Size) -> torch.Tensor:
    """[B, h, w] uint8 coverage from `Geometry.mask` -> [B, *shape] uint8 0/1 ground truth on the map: resized
    nearest neighbour, then a defect where the coverage exceeds half (the reference's evaluation protocol)."""
    resized = F.interpolate(coverage[:, None].float(), size=tuple(shape), mode="nearest")[:, 0]
    return (resized > 127.5).to(torch.uint8)
