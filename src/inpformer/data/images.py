"""Image and mask reading, MVTec-style dataset discovery, preprocessing and a torch Dataset.

Layout read by ``load_mvtec`` (MVTec AD)::

    <root>/<category>/train/good/*.png
    <root>/<category>/test/good/*.png
    <root>/<category>/test/<defect_type>/*.png
    <root>/<category>/ground_truth/<defect_type>/<stem>_mask.png

``root`` may also be a single ``<category>`` folder.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps

from ..errors import InpformerError
from .geometry import Geometry, Size, parse_size

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "TIFF")  # the Pillow decoders of IMAGE_EXTENSIONS
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MAX_PIXELS = 178_956_970  # Pillow's decompression-bomb error threshold (2 * Image.MAX_IMAGE_PIXELS)

LAYOUT_HINT = (
    "expected <root>/<category>/train/good/*.png, <root>/<category>/test/<type>/*.png and "
    "<root>/<category>/ground_truth/<type>/<stem>_mask.png (MVTec AD layout)"
)

# Pillow modes that hold more than 8 bits per pixel; converting them with Image.convert would clip.
_WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


# ----------------------------------------------------------------------------------------------------
# reading files


def is_image_file(path: Path) -> bool:
    """True for a visible file with one of IMAGE_EXTENSIONS (any case)."""
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS


@contextmanager
def _reading(path: Path | BinaryIO, what: str, name: str) -> Iterator[None]:
    """Turns every failure to read `path` into a one-line InpformerError naming `name`."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the callers check the size themselves
            yield
    except InpformerError:
        raise
    except FileNotFoundError:
        raise InpformerError(f"{name}: cannot read {what} (file not found); check the path") from None
    except Exception as error:  # any decoder failure means a broken or unsupported file
        reason = " ".join(str(error).replace(repr(str(path)), "").replace(repr(path), "").split()).rstrip(" :")
        raise InpformerError(
            f"{name}: cannot read {what} ({reason[:200] or type(error).__name__}); replace or remove this file "
            f"(supported: {', '.join(IMAGE_EXTENSIONS)})"
        ) from None


def _check_size(size: tuple[int, int], what: str, max_pixels: int, name: str) -> None:
    width, height = size  # never 0: Pillow refuses empty images
    if width * height > max_pixels:
        raise InpformerError(
            f"{name}: cannot read {what} (too large: {width}x{height} pixels, limit {max_pixels}); downscale the image"
        )


def _open(path: Path | BinaryIO, what: str, max_pixels: int = MAX_PIXELS, name: str | None = None,
          formats: Sequence[str] | None = None) -> Image.Image:
    """Open, fully decode and EXIF-orient an image, turning every failure into an InpformerError; images of more
    than `max_pixels` pixels are refused before decoding (decompression bombs). Errors call it `name` (or `path`).
    `formats` limits the Pillow decoders tried (default: all)."""
    name = name or str(path)
    with _reading(path, what, name), Image.open(path, formats=formats) as image:
        _check_size(image.size, what, max_pixels, name)
        image.load()
        _check_size(image.size, what, max_pixels, name)  # a few formats (e.g. ICO) pick their size while loading
        return ImageOps.exif_transpose(image)


def image_pixels(path: str | Path | bytes | BinaryIO, max_pixels: int = MAX_PIXELS, name: str | None = None,
                 formats: Sequence[str] | None = None) -> int:
    """Width x height of an image from its header alone (nothing is decoded), checked as `read_image` checks it."""
    source = _source(path)
    name = name or str(source)
    with _reading(source, "image", name), Image.open(source, formats=formats) as image:
        _check_size(image.size, "image", max_pixels, name)
        return image.size[0] * image.size[1]


def _source(path: str | Path | bytes | BinaryIO) -> Path | BinaryIO:
    return io.BytesIO(path) if isinstance(path, bytes) else path if hasattr(path, "read") else Path(path)


def _wide_to_uint8(array: np.ndarray) -> np.ndarray:
    """Scale a 16-bit, 32-bit integer or float grey image to uint8 by its range, without clipping."""
    kind = array.dtype.kind
    if kind == "u" and array.dtype.itemsize == 2:
        scaled = array / 65535.0
    elif kind in "iu":
        lo, hi = int(array.min()), int(array.max())
        # Pillow opens some 16-bit files as 32-bit mode "I"; other integer ranges are stretched.
        scaled = array / 65535.0 if lo >= 0 and hi <= 65535 else (array - lo) / max(hi - lo, 1)
    else:
        array = np.nan_to_num(array.astype(np.float64))
        lo, hi = float(array.min()), float(array.max())
        if lo >= 0 and hi <= 1:
            scaled = array
        elif lo >= 0 and hi <= 255:
            scaled = array / 255.0
        else:
            scaled = (array - lo) / max(hi - lo, 1e-12)
    return np.round(np.clip(scaled, 0, 1) * 255).astype(np.uint8)


def read_image(path: str | Path | bytes | BinaryIO, max_pixels: int = MAX_PIXELS, name: str | None = None,
               formats: Sequence[str] | None = None) -> np.ndarray:
    """Read any Pillow-readable image (or one of `formats`) as an (H, W, 3) uint8 RGB array (alpha dropped, EXIF
    applied). `path` may also be the encoded bytes or a binary file object, called `name` in error messages."""
    image = _open(_source(path), "image", max_pixels, name, formats)
    if image.mode in _WIDE_MODES:
        grey = _wide_to_uint8(np.asarray(image))
        return np.repeat(grey[:, :, None], 3, axis=2)
    return np.array(image.convert("RGB"), dtype=np.uint8)


def read_mask(path: str | Path, nonzero: bool = False) -> np.ndarray:
    """Read a defect mask as an (H, W) bool array: True where the value exceeds half of its range.

    Colour masks use the maximum over channels; 1-bit masks are taken as is. Integer masks whose only
    values are 0 and 1 are read as label masks (1 = defect), since thresholding them would lose the defect.
    With ``nonzero`` every value above 0 is a defect (VisA and Real-IAD masks hold small class values).
    """
    image = _open(Path(path), "mask")
    if image.mode == "1":
        return np.array(image, dtype=bool)
    if image.mode == "L" or image.mode in _WIDE_MODES:
        values = np.asarray(image)
    else:
        values = np.asarray(image.convert("RGB")).max(axis=2)
    if nonzero:
        return values > 0
    kind, itemsize, top = values.dtype.kind, values.dtype.itemsize, values.max(initial=0)
    if kind in "iu" and top == 1:
        return values == 1
    if kind == "f":
        half = 0.5 if top <= 1 else 127.5
    elif itemsize == 1 or (kind == "i" and top <= 255):
        half = 127.5
    else:
        half = 32767.5
    return values > half


# ----------------------------------------------------------------------------------------------------
# dataset discovery


@dataclass(frozen=True)
class Sample:
    """One image of a dataset; ``label`` is 0 for good and 1 for defective.

    ``mask_nonzero``: any non-zero mask value marks a defect (see ``read_mask``).
    """

    path: Path
    category: str
    label: int
    defect_type: str
    mask_path: Path | None
    dataset: str = "mvtec"
    mask_nonzero: bool = False


def _is_category_dir(path: Path) -> bool:
    return (path / "train").is_dir() or (path / "test").is_dir()


def _category_dirs(root: Path) -> dict[str, Path]:
    if not root.is_dir():
        raise InpformerError(f"{root}: dataset folder not found; {LAYOUT_HINT}")
    if _is_category_dir(root):
        return {root.name: root}
    dirs = {
        d.name: d
        for d in sorted(root.iterdir())
        if d.is_dir() and ((d / "train" / "good").is_dir() or (d / "test").is_dir())
    }
    if not dirs:
        raise InpformerError(f"{root}: no category folders found; {LAYOUT_HINT}")
    return dirs


def find_categories(root: str | Path) -> list[str]:
    """Sorted category names under ``root``, or ``[root.name]`` when ``root`` is a category folder."""
    return list(_category_dirs(Path(root)))


def _list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if is_image_file(p)) if folder.is_dir() else []


def _load_train(category: str, folder: Path) -> list[Sample]:
    good_dir = folder / "train" / "good"
    images = _list_images(good_dir)
    if not images:
        raise InpformerError(
            f"{good_dir}: no images found in {category} (expected train/good/*.png or another of "
            f"{', '.join(IMAGE_EXTENSIONS)}); put the defect-free training images there"
        )
    return [Sample(p, category, 0, "good", None) for p in images]


def _load_test(category: str, folder: Path) -> list[Sample]:
    test_dir = folder / "test"
    subdirs = sorted(test_dir.iterdir()) if test_dir.is_dir() else []
    types = [d.name for d in subdirs if d.is_dir() and not d.name.startswith(".")]
    samples = []
    for defect_type in types:
        images = _list_images(test_dir / defect_type)
        if defect_type == "good":
            samples += [Sample(p, category, 0, "good", None) for p in images]
            continue
        gt_dir = folder / "ground_truth" / defect_type
        masks = {p.stem: p for p in _list_images(gt_dir)}
        for image in images:
            mask = masks.get(f"{image.stem}_mask") or masks.get(image.stem)
            if mask is None:
                raise InpformerError(
                    f"{image}: no ground-truth mask found; expected {gt_dir / (image.stem + '_mask.png')} "
                    "(add it: white = defect, black = good)"
                )
            samples.append(Sample(image, category, 1, defect_type, mask))
    if not samples:
        raise InpformerError(
            f"{test_dir}: no images found in {test_dir} "
            f"(expected test/good/*.png and test/<type>/*.png); {LAYOUT_HINT}"
        )
    return samples


def load_mvtec(
    root: str | Path, split: str, categories: Sequence[str] | None = None, mask_nonzero: bool = False
) -> list[Sample]:
    """List the samples of ``split`` ("train": train/good only, or "test") in a deterministic order.

    ``mask_nonzero`` reads any non-zero mask value as defect (e.g. VisA converted to this layout).
    """
    if split not in ("train", "test"):
        raise InpformerError(f"{root}: unknown split {split!r}; use 'train' or 'test'")
    dirs = _category_dirs(Path(root))
    names = select_categories(root, list(dirs), categories)
    load = _load_train if split == "train" else _load_test
    samples = [sample for name in names for sample in load(name, dirs[name])]
    return [replace(s, mask_nonzero=True) for s in samples] if mask_nonzero else samples


def select_categories(root: str | Path, available: Sequence[str], categories: Sequence[str] | str | None) -> list[str]:
    """The requested categories (all by default), each checked against ``available``."""
    if isinstance(categories, str):
        categories = [categories]
    names = list(available) if categories is None else list(categories)
    unknown = [name for name in names if name not in available]
    if unknown:
        raise InpformerError(f"{root}: unknown category {', '.join(unknown)}; available: {', '.join(available)}")
    return names


# ----------------------------------------------------------------------------------------------------
# preprocessing


class Preprocess:
    """The `Geometry` (resize, pad, centre crop), then scaling to [0, 1] and normalising.

    In "stretch" mode this matches torchvision ``Resize`` + ``CenterCrop`` + ``ToTensor`` + ``Normalize`` on PIL
    images; masks follow the same geometry with nearest-neighbour resizing.
    """

    def __init__(
        self,
        image_size: int | Size,
        crop_size: int | Size,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        resize_mode: str = "stretch",
    ):
        self.geometry = Geometry(parse_size(image_size), parse_size(crop_size), resize_mode)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    @property
    def crop_size(self) -> Size:
        return self.geometry.crop_size

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        """(H, W, 3) uint8 RGB (or (H, W) gray) -> (3, crop_h, crop_w) float32 normalised tensor."""
        return self.normalize(self.view(image))

    def normalize(self, view: np.ndarray) -> torch.Tensor:
        """(crop_h, crop_w, 3) uint8 -> (3, crop_h, crop_w) float32, scaled to [0, 1] and normalised."""
        tensor = torch.from_numpy(np.array(view)).permute(2, 0, 1).float().div_(255.0)
        return (tensor - self.mean) / self.std

    def view(self, image: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 (or (H, W) gray) -> (crop_h, crop_w, 3) uint8: the pixels the model sees."""
        image = np.asarray(image, dtype=np.uint8)
        if image.ndim == 2:
            image = np.repeat(image[:, :, None], 3, axis=2)
        return self.geometry.view(image)

    def mask(self, mask: np.ndarray) -> np.ndarray:
        """(H, W) bool -> (crop_h, crop_w) bool, aligned with ``__call__``'s output."""
        return self.geometry.mask(mask)

    def valid_box(self, shape: Sequence[int]) -> torch.Tensor:
        """The image's own pixels in the crop (y0, x0, y1, x1, fractions): float32 [4]."""
        return torch.tensor(self.geometry.valid_box(shape), dtype=torch.float32)


class ImageDataset(torch.utils.data.Dataset):
    """Preprocessed images (and optionally masks) of a list of samples."""

    def __init__(self, samples: Sequence[Sample], preprocess: Preprocess, with_masks: bool = False):
        self.samples = list(samples)
        self.preprocess = preprocess
        self.with_masks = with_masks

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        sample = self.samples[index]
        image = read_image(sample.path)
        item = {"image": self.preprocess(image), "valid": self.preprocess.valid_box(image.shape),
                "label": int(sample.label), "index": int(index)}
        if self.with_masks:
            item["mask"] = torch.from_numpy(self._mask(sample, image.shape[:2]).astype(np.uint8))
        return item

    def valid_boxes(self) -> torch.Tensor:
        """Every image's valid box (see `Preprocess.valid_box`), [N, 4], from the image files' headers alone."""
        return torch.stack([self.preprocess.valid_box(image_shape(s.path)) for s in self.samples])

    def _mask(self, sample: Sample, shape: tuple[int, int]) -> np.ndarray:
        mask = sample_mask(sample, shape)
        return np.zeros(self.preprocess.crop_size, dtype=bool) if mask is None else self.preprocess.mask(mask)


def sample_mask(sample: Sample, shape: tuple[int, int]) -> np.ndarray | None:
    """The ground-truth mask of a sample whose image has `shape` (H, W), checked to match it; None without one."""
    if sample.mask_path is None:
        return None
    mask = read_mask(sample.mask_path, nonzero=sample.mask_nonzero)
    if mask.shape != shape:
        raise InpformerError(
            f"{sample.mask_path}: mask is {mask.shape[1]}x{mask.shape[0]} but image {sample.path} is "
            f"{shape[1]}x{shape[0]}; save the mask at the image's size"
        )
    return mask


def image_shape(path: str | Path) -> tuple[int, int]:
    """(height, width) of an image as `read_image` returns it (EXIF orientation applied), from its header alone."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            if image.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # orientations that turn the image by 90 degrees
                width, height = height, width
    except Exception:  # the full read reports the precise reason
        read_image(path)
        raise
    return height, width
