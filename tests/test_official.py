"""Importing the authors' released checkpoints: a state dict with the reference's names and shapes (random values)
must give the scores the reference's equations define, written out here independently of the package."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from synthetic import make_folder, make_mvtec
from test_backbone import dinov2_formula
from torchvision import transforms

from inpformer import INPFormer, backbone
from inpformer.cli import main
from inpformer.data.images import Sample
from inpformer.errors import InpformerError

DIM, HEADS, DEPTH, REGISTERS = 32, 2, 12, 4  # a tiny DINOv2 with registers; the reference keeps all 12 blocks
LAYERS = tuple(range(2, 10))


@pytest.fixture(autouse=True)
def tiny_reg(monkeypatch):
    """A backbone of the reference's structure (ViT with 4 registers, layers 2..9) but tiny."""
    spec = backbone.BackboneSpec("vit_small_patch14_reg4_dinov2", LAYERS, None,
                                 dict(embed_dim=DIM, depth=DEPTH, num_heads=HEADS, mlp_ratio=2))
    monkeypatch.setitem(backbone.BACKBONES, "tiny_reg", spec)


def official_state(seed: int = 0, num_inps: int = 6) -> dict[str, torch.Tensor]:
    """Random weights under the names of the reference's `INP_Former.state_dict()`."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.1, offset=0.0):
        return torch.randn(*shape, generator=g) * scale + offset

    state = {"encoder.cls_token": rand(1, 1, DIM, scale=1), "encoder.pos_embed": rand(1, 1 + 37 * 37, DIM, scale=1),
             "encoder.register_tokens": rand(1, REGISTERS, DIM, scale=1), "encoder.mask_token": rand(1, DIM),
             "encoder.patch_embed.proj.weight": rand(DIM, 3, 14, 14, scale=0.05),
             "encoder.patch_embed.proj.bias": rand(DIM), "encoder.norm.weight": rand(DIM, offset=1),
             "encoder.norm.bias": rand(DIM)}
    for i in range(DEPTH):
        b = f"encoder.blocks.{i}."
        state |= {b + "norm1.weight": rand(DIM, offset=1), b + "norm1.bias": rand(DIM),
                  b + "attn.qkv.weight": rand(3 * DIM, DIM, scale=0.2), b + "attn.qkv.bias": rand(3 * DIM),
                  b + "attn.proj.weight": rand(DIM, DIM, scale=0.2), b + "attn.proj.bias": rand(DIM),
                  b + "ls1.gamma": rand(DIM, scale=0.3), b + "norm2.weight": rand(DIM, offset=1),
                  b + "norm2.bias": rand(DIM), b + "mlp.fc1.weight": rand(2 * DIM, DIM, scale=0.2),
                  b + "mlp.fc1.bias": rand(2 * DIM), b + "mlp.fc2.weight": rand(DIM, 2 * DIM, scale=0.2),
                  b + "mlp.fc2.bias": rand(DIM), b + "ls2.gamma": rand(DIM, scale=0.3)}

    def block(prefix, scale_name=None):
        weights = {"norm1.weight": rand(DIM, offset=1), "norm1.bias": rand(DIM),
                   "attn.q.weight": rand(DIM, DIM, scale=0.2), "attn.q.bias": rand(DIM),
                   "attn.kv.weight": rand(2 * DIM, DIM, scale=0.2), "attn.kv.bias": rand(2 * DIM),
                   "attn.proj.weight": rand(DIM, DIM, scale=0.2), "attn.proj.bias": rand(DIM),
                   "norm2.weight": rand(DIM, offset=1), "norm2.bias": rand(DIM),
                   "mlp.fc1.weight": rand(4 * DIM, DIM, scale=0.2), "mlp.fc1.bias": rand(4 * DIM),
                   "mlp.fc2.weight": rand(DIM, 4 * DIM, scale=0.2), "mlp.fc2.bias": rand(DIM)}
        if scale_name:
            weights[scale_name] = rand(HEADS, 1, 1, scale=0.5, offset=2)
        return {prefix + k: v for k, v in weights.items()}

    state["prototype_token"] = rand(num_inps, DIM, scale=1)
    state |= block("aggregation.0.")
    state |= {"bottleneck.0.fc1.weight": rand(4 * DIM, DIM, scale=0.2), "bottleneck.0.fc1.bias": rand(4 * DIM),
              "bottleneck.0.fc2.weight": rand(DIM, 4 * DIM, scale=0.2), "bottleneck.0.fc2.bias": rand(DIM)}
    for i in range(8):
        state |= block(f"decoder.{i}.", "attn.learn_scale")
    return state


# ---- the reference's forward pass and evaluation, from its equations ----

def _mlp(x, w, prefix):
    return F.linear(F.gelu(F.linear(x, w[prefix + "fc1.weight"], w[prefix + "fc1.bias"])),
                    w[prefix + "fc2.weight"], w[prefix + "fc2.bias"])


def _heads(x):
    return x.reshape(x.shape[0], x.shape[1], HEADS, -1).transpose(1, 2)


def _merge(x):
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], -1)


def _norm(x, w, name, eps):
    return F.layer_norm(x, (DIM,), w[name + ".weight"], w[name + ".bias"], eps)


def reference_maps(w: dict[str, torch.Tensor], images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Anomaly maps [B, 256, 256] and image scores [B] of the reference (square inputs, remove_class_token=True)."""
    batch, _, height, width = images.shape
    e = {k[len("encoder."):]: v for k, v in w.items() if k.startswith("encoder.")}
    patches = F.conv2d(images, e["patch_embed.proj.weight"], e["patch_embed.proj.bias"], stride=14)
    x = torch.cat([e["cls_token"].expand(batch, -1, -1), patches.flatten(2).transpose(1, 2)], dim=1)
    x = x + dinov2_formula(e["pos_embed"], height, width, prefix=1)
    x = torch.cat([x[:, :1], e["register_tokens"].expand(batch, -1, -1), x[:, 1:]], dim=1)
    layers = []
    for i in range(max(LAYERS) + 1):
        b = f"blocks.{i}."
        qkv = F.linear(_norm(x, e, b + "norm1", 1e-6), e[b + "attn.qkv.weight"], e[b + "attn.qkv.bias"])
        q, k, v = qkv.chunk(3, -1)
        attn = ((_heads(q) @ _heads(k).transpose(-2, -1)) * (DIM // HEADS) ** -0.5).softmax(-1)
        x = x + e[b + "ls1.gamma"] * F.linear(_merge(attn @ _heads(v)), e[b + "attn.proj.weight"],
                                              e[b + "attn.proj.bias"])
        x = x + e[b + "ls2.gamma"] * _mlp(_norm(x, e, b + "norm2", 1e-6), e, b + "mlp.")
        if i in LAYERS:
            layers.append(x[:, 1 + REGISTERS:])
    fused = torch.stack(layers).mean(0)

    a = "aggregation.0."
    inps = w["prototype_token"].expand(batch, -1, -1)
    q = _heads(F.linear(_norm(inps, w, a + "norm1", 1e-8), w[a + "attn.q.weight"], w[a + "attn.q.bias"]))
    k, v = F.linear(_norm(fused, w, a + "norm1", 1e-8), w[a + "attn.kv.weight"], w[a + "attn.kv.bias"]).chunk(2, -1)
    attn = (q @ _heads(k).transpose(-2, -1) * (DIM // HEADS) ** -0.5).softmax(-1)
    inps = inps + F.linear(_merge(attn @ _heads(v)), w[a + "attn.proj.weight"], w[a + "attn.proj.bias"])
    inps = inps + _mlp(_norm(inps, w, a + "norm2", 1e-8), w, a + "mlp.")

    x = _mlp(fused, w, "bottleneck.0.")
    decoded = []
    for i in range(8):
        d = f"decoder.{i}."
        q = F.normalize(_heads(F.linear(_norm(x, w, d + "norm1", 1e-8), w[d + "attn.q.weight"],
                                        w[d + "attn.q.bias"])), dim=-1)
        k, v = F.linear(_norm(inps, w, d + "norm1", 1e-8), w[d + "attn.kv.weight"], w[d + "attn.kv.bias"]).chunk(2, -1)
        attn = F.relu(q @ F.normalize(_heads(k), dim=-1).transpose(-2, -1) * w[d + "attn.learn_scale"])
        x = F.linear(_merge(attn @ _heads(v)), w[d + "attn.proj.weight"], w[d + "attn.proj.bias"])
        x = x + _mlp(_norm(x, w, d + "norm2", 1e-8), w, d + "mlp.")
        decoded.append(x)
    decoded = decoded[::-1]

    side = height // 14
    group_maps = []
    for group in ((0, 1, 2, 3), (4, 5, 6, 7)):
        en = torch.stack([layers[i] for i in group]).mean(0)
        de = torch.stack([decoded[i] for i in group]).mean(0)
        distance = 1 - F.cosine_similarity(en.transpose(1, 2).reshape(batch, DIM, side, side),
                                           de.transpose(1, 2).reshape(batch, DIM, side, side))
        group_maps.append(F.interpolate(distance[:, None], size=width, mode="bilinear", align_corners=True))
    anomaly = torch.cat(group_maps, dim=1).mean(dim=1, keepdim=True)
    anomaly = F.interpolate(anomaly, size=256, mode="bilinear", align_corners=False)
    coords = torch.arange(5.0)
    grid = torch.stack([coords.repeat(5).view(5, 5), coords.repeat(5).view(5, 5).t()], dim=-1)
    kernel = torch.exp(-((grid - 2) ** 2).sum(-1) / (2 * 4.0**2))
    anomaly = F.conv2d(anomaly, (kernel / kernel.sum()).view(1, 1, 5, 5), padding=2)
    flat = anomaly.flatten(1)
    scores = flat.sort(dim=1, descending=True).values[:, : int(flat.shape[1] * 0.01)].mean(1)
    return anomaly[:, 0], scores


def our_maps(detector: INPFormer, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    graph = detector.inference_graph(deployment=False)
    with torch.no_grad():
        maps, scores, _, _ = graph(images, torch.tensor([[0.0, 0.0, 1.0, 1.0]]).expand(len(images), -1))
    return maps, scores


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("official") / "model.pth"
    torch.save(official_state(), path)
    return path


@pytest.mark.parametrize("image_size, crop_size", [(224, 224), (448, 392)])
def test_imported_model_computes_the_reference_forward_pass(checkpoint, image_size, crop_size):
    detector = INPFormer.from_official(checkpoint, "tiny_reg", image_size, crop_size)
    assert (detector.config.image_size, detector.config.crop_size, detector.config.num_inps) == (
        image_size, crop_size, 6)
    assert detector.backbone_source == f"imported from {checkpoint}" and detector.calibration is None
    images = torch.randn(2, 3, crop_size, crop_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected_maps, expected_scores = reference_maps(official_state(), images)
    maps, scores = our_maps(detector, images)
    assert expected_scores.min() > 0.01  # non-trivial maps
    torch.testing.assert_close(maps, expected_maps, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(scores, expected_scores, rtol=1e-5, atol=0)


def test_image_scores_match_the_reference_pipeline_on_image_files(checkpoint, tmp_path):
    """Preprocessing included: the reference's torchvision Resize(448) + ToTensor + CenterCrop(392) + Normalize."""
    rng = np.random.default_rng(0)
    paths = []
    for i, (h, w) in enumerate([(500, 620), (448, 448)]):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(paths[-1])
    transform = transforms.Compose([transforms.Resize((448, 448)), transforms.ToTensor(), transforms.CenterCrop(392),
                                    transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])])
    images = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])
    with torch.no_grad():
        _, expected = reference_maps(official_state(), images)
    detector = INPFormer.from_official(checkpoint, "tiny_reg")
    scored = detector.score([Sample(p, "x", 0, "good", None) for p in paths])
    np.testing.assert_allclose(scored.scores, expected.numpy(), rtol=1e-5)


def test_saved_import_carries_its_encoder(checkpoint, tmp_path):
    detector = INPFormer.from_official(checkpoint, "tiny_reg", 224)
    saved = torch.load(detector.save(tmp_path / "m.pt"), weights_only=True)
    assert saved["backbone"] == {"name": "tiny_reg", "source": f"imported from {checkpoint}"}
    blocks = {int(k.split(".")[1]) for k in saved["encoder_state_dict"] if k.startswith("blocks.")}
    assert blocks == set(range(10)) and "norm.weight" not in saved["encoder_state_dict"]  # only what is used
    assert saved["encoder_state_dict"]["pos_embed"].shape == (1, 37 * 37, DIM)  # the pretrained one
    loaded = INPFormer.load(tmp_path / "m.pt")
    assert loaded.backbone_source == f"imported from {checkpoint}"
    # tiny_reg has no weight source: the encoder can only come from the checkpoint
    assert torch.equal(loaded.net.encoder.vit.blocks[9].mlp.fc2.weight,
                       official_state()["encoder.blocks.9.mlp.fc2.weight"])
    images = torch.randn(1, 3, 224, 224)
    torch.testing.assert_close(our_maps(loaded, images), our_maps(detector, images), rtol=0, atol=0)


def _write(tmp_path, state, name="bad.pth"):
    torch.save(state, tmp_path / name)
    return tmp_path / name


def test_refuses_files_that_do_not_fit(tmp_path):
    state = official_state()
    cases = {
        "unknown keys aggregation.1.norm1.weight": state | {"aggregation.1.norm1.weight": torch.ones(DIM)},
        "missing keys decoder.7.mlp.fc2.bias": {k: v for k, v in state.items() if k != "decoder.7.mlp.fc2.bias"},
        r"wrong shapes: decoder.0.attn.learn_scale \[3, 1, 1\] instead of \[2, 1, 1\]":
            state | {"decoder.0.attn.learn_scale": torch.ones(3, 1, 1)},
        r"weights do not fit vit_small_patch14_dinov2 .*; choose the --backbone": state,  # a ViT without registers
        r"weights do not fit .*wrong shapes \(e.g. blocks.0.attn.qkv.weight\)":
            state | {"encoder.blocks.0.attn.qkv.weight": torch.ones(DIM, DIM)},
        "not an INP-Former model": {k: v for k, v in state.items() if not k.startswith("encoder.")},
        "not a state dict of tensors": [1, 2],
        r"prototype_token has shape \[6\]": state | {"prototype_token": torch.ones(6)},
    }
    for message, content in cases.items():
        path = _write(tmp_path, content)
        chosen = "tiny_random" if "vit_small_patch14_dinov2 " in message else "tiny_reg"
        with pytest.raises(InpformerError, match=message) as info:
            INPFormer.from_official(path, chosen, 56)
        assert str(path) in str(info.value) and "\n" not in str(info.value)
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(InpformerError, match=r"junk\.pth: not a readable PyTorch state dict"):
        INPFormer.from_official(tmp_path / "junk.pth", "tiny_reg")
    with pytest.raises(InpformerError, match=r"nope\.pth: PyTorch state dict not found"):
        INPFormer.from_official(tmp_path / "nope.pth", "tiny_reg")


def test_import_calibrate_test_predict_export_from_the_command_line(checkpoint, tmp_path, capsys):
    model = tmp_path / "imported.pt"
    assert main(["import", str(checkpoint), "--backbone", "tiny_reg", "--image-size", "64", "--crop-size", "56",
                 "--out", str(model)]) == 0
    assert f"inpformer calibrate {model} --data" in capsys.readouterr().out
    images = make_folder(tmp_path / "part", n_good=4, n_test_good=2, n_defect=2)
    assert main(["predict", str(model), str(images["good"]), "--out", str(tmp_path / "p"), "--quiet"]) == 2
    assert "no calibrated thresholds (an imported model" in capsys.readouterr().err
    assert main(["calibrate", str(model), "--quiet"]) == 2
    assert "give the images to calibrate it on with --data" in capsys.readouterr().err

    assert main(["calibrate", str(model), "--data-good", str(images["good"]), "--quiet"]) == 0
    assert "(false-reject, 4 good / 0 defective images)" in capsys.readouterr().out
    assert INPFormer.load(model).calibration.source.startswith("4 good images of")
    assert (tmp_path / "imported.calibrate.log").is_file()

    data = make_mvtec(tmp_path / "mvtec", categories=("bolt",), n_train=2, n_good_test=3, defect_types={"hole": 2})
    assert main(["test", str(model), "--data", str(data), "--quiet"]) == 0
    assert "bolt" in capsys.readouterr().out and (tmp_path / "imported-test" / "metrics.json").is_file()
    assert main(["predict", str(model), str(images["test_defective"]), "--out", str(tmp_path / "p"), "--quiet"]) == 0
    assert main(["export", str(model), "--onnx", str(tmp_path / "m.onnx")]) == 0

