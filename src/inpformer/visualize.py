"""Heat-map overlays of anomaly maps on the images the model saw."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib import colormaps
from PIL import Image
from scipy import ndimage

from .data.images import Preprocess, read_image

_BLOCK_PIXELS = 1 << 18  # pixels of an overlay blended at once


def overlay(image: np.ndarray, anomaly_map: np.ndarray, vmin: float, vmax: float, alpha: float = 0.5) -> np.ndarray:
    """Blends a jet-coloured anomaly map (resized to the image) over an (H, W, 3) uint8 image."""
    height, width = image.shape[:2]
    resized = np.asarray(Image.fromarray(anomaly_map.astype(np.float32)).resize((width, height), Image.BILINEAR))
    picture = np.empty((height, width, 3), np.uint8)
    rows = max(1, _BLOCK_PIXELS // max(width, 1))
    for y in range(0, height, rows):  # in blocks of rows: the colour map's float64 arrays take ~90 bytes a pixel
        normalised = np.clip((resized[y : y + rows] - vmin) / max(vmax - vmin, 1e-12), 0, 1)
        heat = colormaps["jet"](normalised)[..., :3] * 255
        picture[y : y + rows] = alpha * heat + (1 - alpha) * image[y : y + rows]
    return picture


def prediction_overlay(image: np.ndarray, anomaly_map: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The image with its normalised anomaly map (0.5 = pixel threshold) as a heat map and the predicted defect
    regions outlined in white; all arrays at the image's resolution."""
    picture = overlay(image, anomaly_map, 0.0, 1.0, alpha=0.45)
    thickness = max(1, round(max(mask.shape) / 256))
    outline = mask & ~ndimage.binary_erosion(mask, iterations=thickness, border_value=0)
    picture[outline] = 255
    return picture


def save_heatmaps(scored, preprocess: Preprocess, out_dir: str | Path) -> list[Path]:
    """One PNG per image (the image as the model saw it | its overlay), named by score rank, on a colour scale
    shared by all images so that they can be compared."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vmin, vmax = float(scored.maps.min()), float(scored.maps.max())
    written = []
    for rank, index in enumerate(np.argsort(-scored.scores)):
        sample = scored.samples[index]
        view = preprocess.view(read_image(sample.path))
        panel = np.hstack([view, overlay(view, scored.maps[index], vmin, vmax)])
        path = out_dir / f"{rank:03d}_{sample.defect_type or 'image'}_{scored.scores[index]:.4f}_{sample.path.stem}.png"
        Image.fromarray(panel).save(path)
        written.append(path)
    return written
