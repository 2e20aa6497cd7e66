"""Generators of tiny datasets for tests (MVTec AD, VisA, Real-IAD, plain folders): smooth textures, defects are
solid discs."""

from __future__ import annotations

import csv
import json
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType

import numpy as np
from PIL import Image

DEFAULT_DEFECTS: Mapping[str, int] = MappingProxyType({"scratch": 3})


def tiny_cli(iterations: int = 30, warmup: int = 5, image_size: int | None = 64,
             crop_size: int | None = 56) -> list[str]:
    """CLI training options for a tiny random-backbone model that trains in seconds."""
    size = [] if image_size is None else ["--image-size", str(image_size)]
    crop = [] if crop_size is None else ["--crop-size", str(crop_size)]
    return ["--backbone", "tiny_random", *size, *crop, "--iterations", str(iterations), "--batch-size", "4",
            "--warmup-iterations", str(warmup), "--quiet"]


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


def _category_rng(seed: int, category: str) -> tuple[np.random.Generator, np.ndarray]:
    """A generator deterministic in ``seed`` and ``category``, and the category's base colour."""
    rng = np.random.default_rng([seed, zlib.crc32(category.encode())])
    return rng, rng.uniform(90, 170, size=3)


def make_visa_raw(
    root: Path,
    categories: Sequence[str] = ("candle",),
    n_normal: int = 8,
    n_anomaly: int = 3,
    size: int = 64,
    seed: int = 0,
    n_test_normal: int = 2,
) -> Path:
    """Write a miniature raw VisA release under ``root`` and return ``root``.

    Per category: ``Data/Images/{Normal,Anomaly}/*.JPG`` and ``Data/Masks/Anomaly/*.png`` whose defect pixels hold
    the small values 1, 2, 3 (as VisA's masks do); ``split_csv/1cls.csv`` puts the last ``n_test_normal`` normal
    images and all anomalies in the test split, the other normal images in the train split.
    """
    root = Path(root)
    rows = []
    for category in categories:
        rng, base = _category_rng(seed, category)
        data = Path(category) / "Data"
        for i in range(n_normal):
            image_path = data / "Images" / "Normal" / f"{i:04d}.JPG"
            save_image(root / image_path, textured_image(rng, size, base))
            split = "test" if i >= n_normal - n_test_normal else "train"
            rows.append([category, split, "normal", image_path.as_posix(), ""])
        for i in range(n_anomaly):
            image, mask = add_defect(rng, textured_image(rng, size, base))
            image_path = data / "Images" / "Anomaly" / f"{i:03d}.JPG"
            mask_path = data / "Masks" / "Anomaly" / f"{i:03d}.png"
            save_image(root / image_path, image)
            save_image(root / mask_path, mask.astype(np.uint8) * (1 + i % 3))
            rows.append([category, "test", "anomaly", image_path.as_posix(), mask_path.as_posix()])
    (root / "split_csv").mkdir(parents=True, exist_ok=True)
    with open(root / "split_csv" / "1cls.csv", "w", newline="") as file:
        csv.writer(file).writerows([["object", "split", "label", "image", "mask"], *rows])
    return root


def make_visa_1cls(
    root: Path,
    categories: Sequence[str] = ("candle",),
    n_train: int = 6,
    n_good_test: int = 3,
    n_defect: int = 3,
    size: int = 64,
    seed: int = 0,
) -> Path:
    """Write VisA converted to the MVTec layout ("1cls"): ``train/good``, ``test/{good,bad}`` and
    ``ground_truth/bad/<stem>.png`` (mask named as its image, defect values 1, 2, 3). Returns ``root``.
    """
    root = Path(root)
    for category in categories:
        rng, base = _category_rng(seed, category)
        folder = root / category
        for i in range(n_train):
            save_image(folder / "train" / "good" / f"{i:03d}.JPG", textured_image(rng, size, base))
        for i in range(n_good_test):
            save_image(folder / "test" / "good" / f"{i:03d}.JPG", textured_image(rng, size, base))
        for i in range(n_defect):
            image, mask = add_defect(rng, textured_image(rng, size, base))
            save_image(folder / "test" / "bad" / f"{i:03d}.JPG", image)
            save_image(folder / "ground_truth" / "bad" / f"{i:03d}.png", mask.astype(np.uint8) * (1 + i % 3))
    return root


REALIAD_DEFECT_CLASSES = ("AK", "HS")  # Real-IAD's codes for pit and scratch


def make_realiad(
    root: Path,
    categories: Sequence[str] = ("audiojack",),
    n_train: int = 6,
    n_good_test: int = 3,
    n_defect: int = 3,
    size: int = 64,
    seed: int = 0,
    json_dir: str = "realiad_jsons",
) -> Path:
    """Write a miniature Real-IAD release under ``root`` and return ``root``.

    Images: ``realiad_1024/<cat>/OK/S<id>/<cat>_<id>_OK_C1_<time>.jpg`` and
    ``realiad_1024/<cat>/NG/<class>/S<id>/<cat>_<id>_NG_C1_<time>.jpg`` with the ``.png`` mask beside (defect
    value 255 or small values); ``<json_dir>/<json_dir>/<cat>.json`` lists them with paths relative to
    ``<cat>``. Defect classes alternate over REALIAD_DEFECT_CLASSES.
    """
    root = Path(root)
    jsons = root / json_dir / json_dir
    jsons.mkdir(parents=True, exist_ok=True)
    for category in categories:
        rng, base = _category_rng(seed, category)
        folder = root / "realiad_1024" / category
        records: dict[str, list[dict]] = {"train": [], "test": []}
        for i in range(n_train + n_good_test):
            name = Path("OK") / f"S{i:04d}" / f"{category}_{i:04d}_OK_C1_20240101000000.jpg"
            save_image(folder / name, textured_image(rng, size, base))
            split = "train" if i < n_train else "test"
            records[split].append({"category": category, "anomaly_class": "OK", "image_path": name.as_posix(),
                                   "mask_path": None})
        for i in range(n_defect):
            sample = n_train + n_good_test + i
            defect = REALIAD_DEFECT_CLASSES[i % len(REALIAD_DEFECT_CLASSES)]
            name = Path("NG") / defect / f"S{sample:04d}" / f"{category}_{sample:04d}_NG_C1_20240101000000.jpg"
            image, mask = add_defect(rng, textured_image(rng, size, base))
            save_image(folder / name, image)
            save_image(folder / name.with_suffix(".png"), mask.astype(np.uint8) * (255 if i % 2 else 1 + i))
            records["test"].append({"category": category, "anomaly_class": defect, "image_path": name.as_posix(),
                                    "mask_path": name.with_suffix(".png").as_posix()})
        meta = {"prefix": "", "normal_class": "OK"}
        (jsons / f"{category}.json").write_text(json.dumps({"meta": meta, **records}, indent=1))
    return root


def make_folder(
    root: Path, n_good: int = 6, n_test_good: int = 3, n_defect: int = 3, with_masks: bool = True,
    size: int = 64, seed: int = 0,
) -> dict[str, Path]:
    """Write plain folders of images: ``good``, ``test_good``, ``test_defect`` and (``with_masks``) ``masks``.

    Returns their paths by the keys "good", "test_good", "test_defective" and "masks". Mask names vary over
    ``<stem>.png``, ``<stem>_mask.png`` and ``<stem>_mask.bmp`` (0/255 values).
    """
    root = Path(root)
    rng, base = _category_rng(seed, root.name)
    folders = {"good": root / "good", "test_good": root / "test_good", "test_defective": root / "test_defect"}
    for i in range(n_good):
        save_image(folders["good"] / f"{i:03d}.png", textured_image(rng, size, base))
    for i in range(n_test_good):
        save_image(folders["test_good"] / f"{i:03d}.png", textured_image(rng, size, base))
    if with_masks:
        folders["masks"] = root / "masks"
    for i in range(n_defect):
        image, mask = add_defect(rng, textured_image(rng, size, base))
        save_image(folders["test_defective"] / f"{i:03d}.png", image)
        if with_masks:
            mask_name = (f"{i:03d}.png", f"{i:03d}_mask.png", f"{i:03d}_mask.bmp")[i % 3]
            save_image(folders["masks"] / mask_name, mask.astype(np.uint8) * 255)
    return folders
