"""Generators of tiny MVTec-style datasets for tests: smooth textures, defects are solid discs."""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType

import numpy as np
from PIL import Image

DEFAULT_DEFECTS: Mapping[str, int] = MappingProxyType({"scratch": 3})


def textured_image(
    rng: np.random.Generator, size: int, base: Sequence[float] = (128, 128, 128)
) -> np.ndarray:
    """A smooth random (size, size, 3) uint8 texture around ``base`` (mid-grey by default)."""
    coarse = rng.normal(0.0, 25.0, size=(6, 6, 3)) + np.asarray(base, dtype=np.float64)
    coarse = np.clip(coarse, 0, 255).astype(np.uint8)
    smooth = Image.fromarray(coarse, "RGB").resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(smooth).copy()


def disc_mask(rng: np.random.Generator, size: int) -> np.ndarray:
    """A (size, size) bool disc covering 5-15% of the image, fully inside it, at a random place."""
    radius = size * np.sqrt(rng.uniform(0.05, 0.15) / np.pi)
    cy, cx = rng.uniform(radius, size - radius, size=2)
    yy, xx = np.mgrid[:size, :size] + 0.5
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2


def add_defect(rng: np.random.Generator, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Draw a solid bright or dark disc on a copy of ``image``; returns (image, bool mask)."""
    mask = disc_mask(rng, image.shape[0])
    colour = (250, 250, 245) if rng.random() < 0.5 else (10, 5, 15)
    defective = image.copy()
    defective[mask] = colour
    return defective, mask


def save_image(path: Path, image: np.ndarray) -> Path:
    """Save a uint8 array (JPEG at high quality), creating parent folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    options = {"quality": 95} if path.suffix.lower() in (".jpg", ".jpeg") else {}
    Image.fromarray(image).save(path, **options)
    return path


def make_mvtec(
    root: Path,
    categories: Sequence[str] = ("widget",),
    n_train: int = 6,
    n_good_test: int = 3,
    defect_types: Mapping[str, int] = DEFAULT_DEFECTS,
    size: int = 64,
    seed: int = 0,
    ext: str = ".png",
) -> Path:
    """Write a miniature MVTec AD tree under ``root`` and return ``root``.

    Per category: ``train/good``, ``test/good``, ``test/<type>`` and ``ground_truth/<type>/<stem>_mask.png``
    (0/255 PNG). Images are deterministic in ``seed`` and the category name.
    """
    root = Path(root)
    for category in categories:
        rng = np.random.default_rng([seed, zlib.crc32(category.encode())])
        base = rng.uniform(90, 170, size=3)
        folder = root / category
        for i in range(n_train):
            save_image(folder / "train" / "good" / f"{i:03d}{ext}", textured_image(rng, size, base))
        for i in range(n_good_test):
            save_image(folder / "test" / "good" / f"{i:03d}{ext}", textured_image(rng, size, base))
        for defect_type, count in defect_types.items():
            for i in range(count):
                image, mask = add_defect(rng, textured_image(rng, size, base))
                save_image(folder / "test" / defect_type / f"{i:03d}{ext}", image)
                save_image(
                    folder / "ground_truth" / defect_type / f"{i:03d}_mask.png", mask.astype(np.uint8) * 255
                )
    return root
