"""Every setting of a run in one dataclass, and named presets (data, not code paths)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .data.geometry import PATCH, Geometry, Size, format_size, parse_size
from .data.tiling import Tiling, parse_tiling
from .errors import InpformerError


@dataclass
class Config:
    """Model, training and scoring settings. Defaults are the paper's, except the preset-specific ones."""

    backbone: str = "dinov2_vits14"
    backbone_weights: str | None = None
    image_size: int | Size = 224  # resize to this (an int: square; else (height, width)), then centre-crop
    crop_size: int | Size = 224
    resize_mode: str = "stretch"  # "stretch" (the paper) or "pad": keep the aspect ratio, pad by reflection
    tile_scale: float | None = None  # large images: resize by this, then cut into overlapping tiles of crop_size
    tile_overlap: float = 0.25  # fraction of a tile shared with its neighbour
    num_inps: int = 6
    decoder_depth: int = 8
    coherence_weight: float = 0.2
    mining_exponent: float = 3.0
    epochs: int | None = None  # used when `iterations` is None
    iterations: int | None = 500  # optimizer steps
    batch_size: int = 8
    lr: float = 1e-3
    final_lr: float = 1e-4
    warmup_iterations: int = 100
    weight_decay: float = 1e-4
    grad_clip: float = 0.1
    seed: int = 1
    train_tokens: int | None = None  # decoder tokens per image per training step (a random subset); None: all
    # (pass "all" to make_config / --train-tokens to override a preset's subset)
    feature_cache: bool = True  # compute the frozen encoder once and train from its output
    map_size: int = 256
    blur_kernel: int = 5
    blur_sigma: float = 4.0
    top_ratio: float = 0.01
    val_fraction: float = 0.1  # good training images held out (never fitted) to calibrate the thresholds
    max_false_reject: float = 0.01  # calibrated thresholds reject at most this fraction of good images
    feature_cache_storage: str = "auto"  # "memory", "disk" (memory-mapped file) or "auto": memory when it fits
    device: str = "auto"  # training device: "auto" (CUDA when available), "cpu" or "cuda"
    compile: bool = True  # torch.compile the decoder when training on CUDA (never on the CPU)
    precision: str = "fp32"  # training arithmetic: "fp32" (the paper) or "bf16" (autocast; faster on recent GPUs)

    def __post_init__(self):
        if self.train_tokens == "all":  # spelled out, since None means "not given" to make_config
            self.train_tokens = None
        # canonical form: an int for a square size (as older versions stored it), else (height, width)
        for name in ("image_size", "crop_size"):
            size = parse_size(getattr(self, name), "--" + name.replace("_", "-"))
            setattr(self, name, size[0] if size[0] == size[1] else size)
        _validate(self)

    def geometry(self) -> Geometry:
        """Training and evaluation (the paper's protocol): resize, then centre-crop."""
        return Geometry(parse_size(self.image_size), parse_size(self.crop_size), self.resize_mode)

    def tiling(self) -> Tiling | None:
        """The tiles of large images (None: the whole image is resized to the input)."""
        if self.tile_scale is None:
            return None
        return parse_tiling(self.crop_size, self.tile_scale, self.tile_overlap)

    def deployment_geometry(self) -> Geometry:
        """Calibration, predict, serve and export: the whole resized image, never a crop, so that no margin goes
        uninspected; sides rounded to multiples of the patch size (14)."""
        size = tuple(max(PATCH, round(side / PATCH) * PATCH) for side in parse_size(self.image_size))
        return Geometry(size, size, self.resize_mode)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


PRESETS: dict[str, dict[str, Any]] = {
    # The paper: ViT-B/14 with registers, 448 -> 392, batch 16, 200 epochs, all good images fitted.
    "paper": {
        "backbone": "dinov2reg_vitb14",
        "image_size": 448,
        "crop_size": 392,
        "batch_size": 16,
        "epochs": 200,
        "iterations": None,
        "val_fraction": 0.0,  # trains on every good image, as the paper (thresholds: see Calibration.source)
    },
    # Fully offline, one category in at most 15 minutes on 2 CPU cores (docs/accuracy.md): 448 px, because small
    # defects need tokens finer than 16 px; aspect ratio kept (no squashed parts, no pixels lost); and a random
    # eighth of the tokens decoded per step, which makes a step ~4x cheaper than decoding all 1024.
    "cpu": {
        "backbone": "dinov2_vits14",
        "image_size": 448,
        "crop_size": 448,
        "resize_mode": "pad",
        "train_tokens": 128,
        "batch_size": 8,
        "iterations": 400,
        "epochs": None,
    },
}


def make_config(preset: str = "cpu", **overrides: Any) -> Config:
    """A preset's config with `overrides` applied (None values are ignored, so CLI defaults pass through)."""
    if preset not in PRESETS:
        raise InpformerError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(Config)}
    unknown = set(overrides) - fields
    if unknown:
        raise InpformerError(f"unknown setting(s) {', '.join(sorted(unknown))}; valid: {', '.join(sorted(fields))}")
    values = {**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}}
    if overrides.get("image_size") is not None and overrides.get("crop_size") is None:
        values["crop_size"] = values["image_size"]  # a new input size alone means: no crop
    if "iterations" in overrides and overrides["iterations"] is not None:
        values["epochs"] = None
    if "epochs" in overrides and overrides["epochs"] is not None:
        values["iterations"] = None
    return Config(**values)


def config_from_dict(values: dict[str, Any]) -> Config:
    """Rebuild a Config saved with `to_dict` (unknown keys from other versions are ignored)."""
    fields = {f.name for f in dataclasses.fields(Config)}
    return Config(**{k: v for k, v in values.items() if k in fields})


def _positive(v: float) -> bool:
    return v > 0


def _non_negative(v: float) -> bool:
    return v >= 0


def _at_least_one(v: int) -> bool:
    return v >= 1


def _fraction(v: float) -> bool:
    return 0 < v < 1


# field: (type, the values training can use, how to say so)
_NUMBERS: dict[str, tuple[type, Callable[[Any], bool], str]] = {
    "iterations": (int, _at_least_one, "at least 1"),
    "epochs": (int, _at_least_one, "at least 1"),
    "batch_size": (int, _at_least_one, "at least 1"),
    "warmup_iterations": (int, _non_negative, "at least 0"),
    "num_inps": (int, _at_least_one, "at least 1"),
    "decoder_depth": (int, _at_least_one, "at least 1"),
    "seed": (int, _non_negative, "at least 0"),
    "train_tokens": (int, _at_least_one, "a count of at least 1, or 'all'"),
    "map_size": (int, _at_least_one, "at least 1"),
    "blur_kernel": (int, lambda v: v >= 1 and v % 2 == 1, "an odd number"),
    "lr": (float, _positive, "a number > 0"),
    "final_lr": (float, _non_negative, "a number >= 0"),
    "weight_decay": (float, _non_negative, "a number >= 0"),
    "grad_clip": (float, _positive, "a number > 0"),
    "coherence_weight": (float, _non_negative, "a number >= 0"),
    "mining_exponent": (float, _non_negative, "a number >= 0"),
    "blur_sigma": (float, _positive, "a number > 0"),
    "top_ratio": (float, lambda v: 0 < v <= 1, "in (0, 1]"),
    "val_fraction": (float, lambda v: 0 <= v < 1, "in [0, 1)"),
    "max_false_reject": (float, _fraction, "in (0, 1)"),
}
_OPTIONAL = {"iterations", "epochs", "train_tokens"}  # None: not set
_CHOICES = {"feature_cache_storage": ("auto", "memory", "disk"), "device": ("auto", "cpu", "cuda"),
            "precision": ("fp32", "bf16")}


def _validate(config: Config) -> None:
    """Every setting in range before any work, each error naming its command-line option."""
    for name, (kind, allowed, description) in _NUMBERS.items():
        value = getattr(config, name)
        if value is None and name in _OPTIONAL:
            continue
        number = isinstance(value, int if kind is int else (int, float)) and not isinstance(value, bool)
        if not number or not math.isfinite(value) or not allowed(value):
            raise InpformerError(f"{_option(name)} must be {description}, got {value!r}")
    for name, choices in _CHOICES.items():
        if getattr(config, name) not in choices:
            raise InpformerError(f"{_option(name)} must be one of {', '.join(choices)}, got {getattr(config, name)!r}")
    geometry = config.geometry()  # checks the resize mode and that the crop fits
    tiling = config.tiling()  # checks --tile-scale and --tile-overlap
    if tiling is not None and geometry.image_size != geometry.crop_size:
        raise InpformerError("--tile-scale cuts tiles of the input size from the image: drop --crop-size (the tile "
                             "is --image-size; --resize-mode does not apply)")
    if any(side % PATCH for side in geometry.crop_size):
        raise InpformerError(f"--crop-size {format_size(geometry.crop_size)} is not a multiple of the patch size 14 "
                             "(e.g. 224, 392 or 448x336)")
    if config.iterations is None and config.epochs is None:
        raise InpformerError("set either --iterations or --epochs")


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")
