"""Readers of the paper's benchmarks (MVTec AD, VisA, Real-IAD) and of plain image folders, with autodetection.

Layouts::

    mvtec    <root>/<category>/{train,test,ground_truth}/...  (see inpformer.data; VisA converted to "1cls" too)
    visa     <root>/<category>/Data/Images/{Normal,Anomaly}/*.JPG, <root>/<category>/Data/Masks/Anomaly/*.png
             and <root>/split_csv/1cls.csv (columns object,split,label,image,mask; paths relative to <root>)
    realiad  <root>/realiad_1024/<category>/{OK,NG}/.../*.jpg (mask: the .png beside) and
             <root>/realiad_jsons/realiad_jsons/<category>.json ({"meta": ..., "train": [...], "test": [...]})
    folder   separate folders of good training images, good and defective test images, and masks

VisA and Real-IAD masks mark defects with any non-zero value, so their samples have ``mask_nonzero``.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from ..errors import InpformerError
from .images import (
    IMAGE_EXTENSIONS,
    LAYOUT_HINT,
    Sample,
    find_categories,
    is_image_file,
    load_mvtec,
    select_categories,
)

log = logging.getLogger("inpformer")

DATASET_KINDS = ("mvtec", "visa", "realiad", "folder")
VISA_SPLIT = Path("split_csv") / "1cls.csv"
VISA_COLUMNS = ("object", "split", "label", "image", "mask")
REALIAD_IMAGE_DIRS = ("realiad_1024", "realiad_512", "realiad_256", "realiad_raw")  # in order of preference
REALIAD_JSON_DIR = "realiad_jsons"
VISA_LAYOUT = "<root>/<category>/Data/Images/{Normal,Anomaly}/*.JPG with <root>/split_csv/1cls.csv (VisA)"
REALIAD_LAYOUT = (
    "<root>/realiad_1024/<category>/{OK,NG}/... with <root>/realiad_jsons/realiad_jsons/<category>.json (Real-IAD)"
)


# ----------------------------------------------------------------------------------------------------
# shared helpers


def _check_split(root: Path, split: str) -> None:
    if split not in ("train", "test"):
        raise InpformerError(f"{root}: unknown split {split!r}; use 'train' or 'test'")


def _subdirs(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))


def _listed_file(path: Path, what: str, listing: Path, fix: str) -> Path:
    if not path.is_file():
        raise InpformerError(f"{path}: {what} listed in {listing} not found; {fix}")
    return path


def _by_label_and_path(samples: list[Sample]) -> list[Sample]:
    return sorted(samples, key=lambda s: (s.label, str(s.path)))


# ----------------------------------------------------------------------------------------------------
# VisA


def _is_visa_raw(root: Path) -> bool:
    return (root / VISA_SPLIT).is_file() or any((d / "Data" / "Images").is_dir() for d in [root, *_subdirs(root)])


def _is_mvtec(root: Path) -> bool:
    try:
        find_categories(root)
    except InpformerError:
        return False
    return True


def _is_visa_converted(root: Path) -> bool:
    """VisA converted to the MVTec layout ("1cls"), as read by ``load_mvtec``."""
    return not _is_visa_raw(root) and _is_mvtec(root)


def _read_visa_csv(path: Path) -> list[dict[str, str]]:
    try:
        with open(path, newline="") as file:
            reader = csv.DictReader(file)
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise InpformerError(f"{path}: cannot read the VisA split ({error}); restore split_csv/1cls.csv") from None
    missing = [column for column in VISA_COLUMNS if column not in (reader.fieldnames or [])]
    if missing:
        raise InpformerError(
            f"{path}: missing column(s) {', '.join(missing)}; the header must be {','.join(VISA_COLUMNS)}"
        )
    return [{column: (row[column] or "").strip() for column in VISA_COLUMNS} for row in rows]


def _visa_rows(root: Path) -> tuple[Path, Path, dict[str, list[dict[str, str]]]]:
    """(VisA root, split csv, csv rows by category) for the categories whose folder exists.

    ``root`` may also be one category folder of the release.
    """
    single = (root / "Data" / "Images").is_dir()
    base = root.parent if single else root
    csv_path = base / VISA_SPLIT
    if not csv_path.is_file():
        raise InpformerError(
            f"{csv_path}: VisA split file not found; extract the whole VisA archive (layout: {VISA_LAYOUT})"
        )
    rows: dict[str, list[dict[str, str]]] = {}
    for row in _read_visa_csv(csv_path):
        rows.setdefault(row["object"], []).append(row)
    listed = sorted(rows)
    if single:
        if root.name not in rows:
            raise InpformerError(f"{csv_path}: no rows for category {root.name}; listed: {', '.join(listed)}")
        listed = [root.name]
    available = {name: rows[name] for name in listed if (base / name).is_dir()}
    if not available:
        raise InpformerError(
            f"{base}: no folder for any category of {csv_path} ({', '.join(listed)}); extract the VisA images there"
        )
    return base, csv_path, available


def _visa_sample(base: Path, csv_path: Path, row: dict[str, str]) -> Sample:
    fix = "re-extract the VisA archive or fix the csv row"
    image = _listed_file(base / row["image"], "image", csv_path, fix)
    if row["label"] == "normal":
        return Sample(image, row["object"], 0, "good", None, "visa", mask_nonzero=True)
    if row["label"] != "anomaly":
        raise InpformerError(f"{csv_path}: unknown label {row['label']!r} of {row['image']}; use normal or anomaly")
    if not row["mask"]:
        raise InpformerError(f"{csv_path}: anomaly image {row['image']} has no mask; fill its mask column")
    mask = _listed_file(base / row["mask"], "mask", csv_path, fix)
    return Sample(image, row["object"], 1, "anomaly", mask, "visa", mask_nonzero=True)


def load_visa(root: str | Path, split: str, categories: Sequence[str] | None = None) -> list[Sample]:
    """Samples of ``split`` of the raw VisA release, split by ``split_csv/1cls.csv``.

    Good images have defect type "good", anomalies "anomaly". A root in the converted MVTec-style layout
    ("1cls") is read with ``load_mvtec``; masks of both layouts mark defects with any non-zero value.
    """
    root = Path(root)
    _check_split(root, split)
    if _is_visa_converted(root):
        return [replace(s, dataset="visa") for s in load_mvtec(root, split, categories, mask_nonzero=True)]
    base, csv_path, rows = _visa_rows(root)
    samples = []
    for name in select_categories(root, list(rows), categories):
        found = [_visa_sample(base, csv_path, row) for row in rows[name] if row["split"] == split]
        if not found:
            raise InpformerError(f"{csv_path}: no {split} images of {name}; use the official VisA split file")
        samples += _by_label_and_path(found)
    return samples


# ----------------------------------------------------------------------------------------------------
# Real-IAD


def _is_realiad(root: Path) -> bool:
    if any(d.name.startswith("realiad_") for d in _subdirs(root)):
        return True
    # root may be realiad_1024 itself, with the jsons beside it
    jsons_beside = any(d.name.startswith(REALIAD_JSON_DIR) for d in _subdirs(root.parent))
    return jsons_beside and any((d / "OK").is_dir() or (d / "NG").is_dir() for d in _subdirs(root))


def _realiad_images(root: Path) -> Path:
    return next((root / name for name in REALIAD_IMAGE_DIRS if (root / name).is_dir()), root)


def _realiad_json_folder(root: Path, images: Path, json_dir: str | None) -> Path:
    name = json_dir or REALIAD_JSON_DIR
    bases = [root] if images != root else [root, root.parent]
    layouts = (Path(name, name), Path(name), Path(REALIAD_JSON_DIR, name))
    for folder in (base / layout for base in bases for layout in layouts):
        if folder.is_dir() and any(folder.glob("*.json")):
            return folder
    found = sorted({
        d.name for base in bases for d in [*_subdirs(base), *_subdirs(base / REALIAD_JSON_DIR)]
        if d.name.startswith(REALIAD_JSON_DIR) and d.name != name
    })
    others = f" (found {', '.join(found)}: choose one with json_dir)" if found else ""
    raise InpformerError(
        f"{root}: no Real-IAD json folder {name} with <category>.json files{others}; "
        f"extract realiad_jsons.zip into {root} (layout: {REALIAD_LAYOUT})"
    )


def _realiad_layout(root: Path, json_dir: str | None) -> tuple[Path, Path, list[str], list[str]]:
    """(image folder, json folder, categories with images, categories listed by the jsons)."""
    if not root.is_dir():
        raise InpformerError(f"{root}: dataset folder not found; {REALIAD_LAYOUT}")
    images = _realiad_images(root)
    jsons = _realiad_json_folder(root, images, json_dir)
    listed = sorted(p.stem for p in jsons.glob("*.json"))
    available = [name for name in listed if (images / name).is_dir()]
    if not available:
        raise InpformerError(
            f"{images}: no image folder for any category of {jsons} ({', '.join(listed)}); "
            "extract the Real-IAD images (realiad_1024/<category>.zip) there"
        )
    return images, jsons, available, listed


def _read_realiad_json(path: Path) -> dict:
    try:
        content = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InpformerError(f"{path}: cannot read the Real-IAD json ({error}); re-extract realiad_jsons.zip") from None
    if not isinstance(content, dict) or not all(isinstance(content.get(key), list) for key in ("train", "test")):
        raise InpformerError(
            f'{path}: not a Real-IAD json (expected {{"meta": ..., "train": [...], "test": [...]}}); '
            "re-extract realiad_jsons.zip"
        )
    return content


def _realiad_sample(folder: Path, json_path: Path, record: dict, normal_class: str) -> Sample:
    if not isinstance(record, dict) or not record.get("image_path") or not record.get("anomaly_class"):
        raise InpformerError(f"{json_path}: record without image_path or anomaly_class ({record}); fix or remove it")
    fix = "re-extract the Real-IAD images of this category"
    image = _listed_file(folder / record["image_path"], "image", json_path, fix)
    defect = str(record["anomaly_class"])
    if defect == normal_class:
        return Sample(image, folder.name, 0, "good", None, "realiad", mask_nonzero=True)
    mask = folder / record["mask_path"] if record.get("mask_path") else None
    if mask is None or not mask.is_file():
        raise InpformerError(
            f"{image}: defective ({defect}) image without mask file (mask_path {record.get('mask_path')!r} in "
            f"{json_path}); restore the mask .png beside the image or remove the record"
        )
    return Sample(image, folder.name, 1, defect, mask, "realiad", mask_nonzero=True)


def load_realiad(
    root: str | Path, split: str, categories: Sequence[str] | None = None, json_dir: str | None = None
) -> list[Sample]:
    """Samples of ``split`` of Real-IAD as its jsons list them (``anomaly_class`` "OK" = good, else the defect type).

    ``root`` holds ``realiad_1024`` (or ``realiad_512``, ``realiad_256``, ``realiad_raw``) or is that image folder
    itself. ``json_dir`` picks the protocol: "realiad_jsons" (default, multi-view) or e.g. "realiad_jsons_sv"
    (single view); each is found as ``<json_dir>/<json_dir>``, ``<json_dir>`` or ``realiad_jsons/<json_dir>``.
    """
    root = Path(root)
    _check_split(root, split)
    images, jsons, available, listed = _realiad_layout(root, json_dir)
    wanted = [categories] if isinstance(categories, str) else categories or []
    for name in wanted:
        if name in listed and name not in available:
            raise InpformerError(f"{images / name}: images of category {name} not found; extract them there")
    samples = []
    for name in select_categories(root, available, categories):
        json_path = jsons / f"{name}.json"
        content = _read_realiad_json(json_path)
        meta = content.get("meta")
        normal_class = meta.get("normal_class", "OK") if isinstance(meta, dict) else "OK"
        found = [_realiad_sample(images / name, json_path, record, normal_class) for record in content[split]]
        if not found:
            raise InpformerError(f"{json_path}: no {split} images of {name}; re-extract realiad_jsons.zip")
        samples += _by_label_and_path(found)
    return samples


# ----------------------------------------------------------------------------------------------------
# plain folders


def _folder_images(folder: Path, what: str) -> list[Path]:
    if not folder.is_dir():
        raise InpformerError(f"{folder}: folder of {what} not found; check the path")
    images = sorted(p for p in folder.iterdir() if is_image_file(p))
    if not images:
        raise InpformerError(
            f"{folder}: no {what} found (subfolders are not read; supported: {', '.join(IMAGE_EXTENSIONS)}); "
            "put the images directly in this folder"
        )
    return images


def _defective_samples(folder: Path, masks: Path | None, category: str) -> list[Sample]:
    images = _folder_images(folder, "defective test images")
    by_stem: dict[str, Path] = {}
    if masks is not None:
        if masks.resolve() == folder.resolve():
            raise InpformerError(
                f"{masks}: masks are in the folder of defective images; move them to a folder of their own"
            )
        by_stem = {p.stem: p for p in _folder_images(masks, "masks")}
    samples = [
        Sample(p, category, 1, "defective", by_stem.get(f"{p.stem}_mask") or by_stem.get(p.stem), "folder")
        for p in images
    ]
    unmasked = [s.path.name for s in samples if s.mask_path is None]
    if masks is not None and unmasked:
        log.warning(
            "%s: no mask for %d of %d defective images (e.g. %s; the mask of x.png is x.png or x_mask.png); "
            "pixel metrics need a mask for every defective image", masks, len(unmasked), len(samples), unmasked[0],
        )
    return samples


def load_folder(
    good: str | Path,
    test_good: str | Path | None = None,
    test_defective: str | Path | None = None,
    masks: str | Path | None = None,
    category: str | None = None,
) -> tuple[list[Sample], list[Sample]]:
    """(train, test) samples from plain folders of images (direct children only, sorted by name).

    ``good`` holds the defect-free training images; ``test_good`` and ``test_defective`` the test images. The mask
    of ``x.png`` in ``masks`` is ``x.<ext>`` or ``x_mask.<ext>`` (any image extension); a defective image without a
    mask gets ``mask_path`` None (no pixel metrics then). ``category`` defaults to the name of ``good``, or of its
    parent when ``good`` is a generic name such as ``good`` or ``train``.
    """
    good = Path(good)
    generic = good.resolve().name.lower() in ("good", "ok", "normal", "train", "images")
    category = category or (good.resolve().parent.name if generic else good.resolve().name)
    train = [Sample(p, category, 0, "good", None, "folder") for p in _folder_images(good, "good training images")]
    test = []
    if test_good is not None:
        images = _folder_images(Path(test_good), "good test images")
        test += [Sample(p, category, 0, "good", None, "folder") for p in images]
    if masks is not None and test_defective is None:
        raise InpformerError(
            f"{masks}: masks given without a folder of defective test images; add one (--data-test-defect) "
            "or drop the masks"
        )
    if test_defective is not None:
        test += _defective_samples(Path(test_defective), None if masks is None else Path(masks), category)
    return train, test


# ----------------------------------------------------------------------------------------------------
# detection and dispatch


def _summary(root: Path) -> str:
    """What a folder holds, in a few words, for error messages."""
    entries = [p for p in sorted(root.iterdir()) if not p.name.startswith(".")]
    dirs = [p.name for p in entries if p.is_dir()]
    images = sum(is_image_file(p) for p in entries)
    others = len(entries) - len(dirs) - images
    parts = []
    if dirs:
        parts.append(f"folders {', '.join(dirs[:5])}" + (f" and {len(dirs) - 5} more" if len(dirs) > 5 else ""))
    if images:
        parts.append(f"{images} images")
    if others:
        parts.append(f"{others} other files")
    return ", ".join(parts) or "nothing"


def detect_dataset(root: str | Path) -> str:
    """The layout of ``root``: "mvtec", "visa" (raw release) or "realiad"; an InpformerError when none fits."""
    root = Path(root)
    if not root.is_dir():
        raise InpformerError(f"{root}: dataset folder not found; check the path")
    if _is_visa_raw(root):
        return "visa"
    if _is_realiad(root):
        return "realiad"
    if _is_mvtec(root):
        return "mvtec"
    raise InpformerError(
        f"{root}: unknown dataset layout (found {_summary(root)}); {LAYOUT_HINT}, or {VISA_LAYOUT}, or "
        f"{REALIAD_LAYOUT}; for other images use dataset kind 'folder' (--dataset folder --data-good FOLDER)"
    )


def _categories(root: Path, kind: str, json_dir: str | None) -> list[str]:
    if kind == "visa":
        return find_categories(root) if _is_visa_converted(root) else list(_visa_rows(root)[2])
    if kind == "realiad":
        return _realiad_layout(root, json_dir)[2]
    return find_categories(root)


def _count(names: Sequence[str]) -> str:
    return f"{len(names)} {'category' if len(names) == 1 else 'categories'}"


def _describe(root: Path, kind: str, json_dir: str | None) -> str:
    if kind == "realiad":
        images, jsons, available, _ = _realiad_layout(root, json_dir)
        where = jsons.relative_to(root) if jsons.is_relative_to(root) else jsons
        return f"Real-IAD ({images.name}, {where}, {_count(available)})"
    if kind == "visa":
        return f"VisA (raw release, {_count(_categories(root, kind, json_dir))})"
    return f"MVTec AD layout ({_count(find_categories(root))})"


def _resolve_kind(root: Path, kind: str, json_dir: str | None) -> str:
    if kind == "folder":
        raise InpformerError(
            f"{root}: dataset kind 'folder' reads separate folders; use load_folder "
            "(--data-good, --data-test-good, --data-test-defect, --data-masks)"
        )
    if kind != "auto" and kind not in DATASET_KINDS:
        raise InpformerError(f"unknown dataset kind {kind!r}; choose one of: auto, {', '.join(DATASET_KINDS)}")
    if kind != "auto":
        return kind
    kind = detect_dataset(root)
    log.info("%s: %s", root, _describe(root, kind, json_dir))
    return kind


def load_dataset(
    root: str | Path,
    split: str,
    categories: Sequence[str] | None = None,
    kind: str = "auto",
    json_dir: str | None = None,
) -> list[Sample]:
    """Samples of ``split`` from a dataset of ``kind`` ("auto": detect it); ``json_dir`` is for Real-IAD only."""
    root = Path(root)
    kind = _resolve_kind(root, kind, json_dir)
    if kind == "visa":
        return load_visa(root, split, categories)
    if kind == "realiad":
        return load_realiad(root, split, categories, json_dir)
    return load_mvtec(root, split, categories)


def dataset_categories(root: str | Path, kind: str = "auto", json_dir: str | None = None) -> list[str]:
    """Sorted category names of the dataset at ``root`` (of ``kind``, or detected with "auto")."""
    root = Path(root)
    return _categories(root, _resolve_kind(root, kind, json_dir), json_dir)
