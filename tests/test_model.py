"""Model, losses, optimiser, schedule and scoring on a tiny stand-in encoder."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from inpformer.config import make_config
from inpformer.losses import inp_coherence_loss, soft_mining_loss
from inpformer.model import GROUPS, DecoderBlock, INPFormerNet
from inpformer.scoring import AnomalyScorer, gaussian_kernel
from inpformer.training import StableAdamW, _TokenSubsets, train, warm_cosine_schedule

DIM, HEADS = 16, 2


class PatchEncoder(nn.Module):
    """Stand-in for the frozen ViT: 8 'layers' of 14x14 patch features."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, DIM, 14, 14)
        self.layers = nn.ModuleList(nn.Linear(DIM, DIM) for _ in range(8))

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        outputs = []
        for layer in self.layers:
            x = x + torch.tanh(layer(x))
            outputs.append(x)
        return outputs


def make_net(seed=0):
    torch.manual_seed(seed)
    return INPFormerNet(PatchEncoder().requires_grad_(False), DIM, HEADS)


def test_shapes_and_group_fusion():
    net = make_net()
    images = torch.randn(2, 3, 56, 56)
    out = net(images)
    assert out.encoder_groups.shape == (2, 2, 16, DIM)
    assert out.decoder_groups.shape == (2, 2, 16, DIM)
    assert out.inps.shape == (2, 6, DIM)
    layers = net.encoder(images)
    torch.testing.assert_close(out.encoder_groups[:, 0], torch.stack(layers[:4]).mean(0))
    torch.testing.assert_close(out.tokens, torch.stack(layers).mean(0))


def test_last_decoder_block_pairs_with_first_encoder_group():
    net = make_net()
    outputs = []
    hooks = [b.register_forward_hook(lambda m, i, o: outputs.append(o)) for b in net.decoder]
    out = net(torch.randn(1, 3, 28, 28))
    for h in hooks:
        h.remove()
    reversed_outputs = outputs[::-1]
    for g, group in enumerate(GROUPS):
        expected = torch.stack([reversed_outputs[i] for i in group]).mean(0)
        torch.testing.assert_close(out.decoder_groups[:, g], expected)
    torch.testing.assert_close(out.decoder_groups[:, 0], torch.stack(outputs[4:]).mean(0))


def test_decoder_has_no_residual_around_attention():
    block = DecoderBlock(DIM, HEADS)
    nn.init.zeros_(block.attn.proj.weight)
    nn.init.zeros_(block.attn.proj.bias)
    a = block(torch.randn(1, 5, DIM), torch.randn(1, 6, DIM))
    b = block(torch.randn(1, 5, DIM), torch.randn(1, 6, DIM))
    torch.testing.assert_close(a, b)  # attention silenced -> output independent of the input tokens


def test_prototype_attention_is_relu_of_scaled_cosine():
    block = DecoderBlock(DIM, HEADS)
    assert torch.equal(block.attn.scale, torch.ones(HEADS, 1, 1))
    tokens, inps = torch.randn(1, 4, DIM), torch.randn(1, 6, DIM)
    attn = block.attn
    q = F.normalize(attn.q(tokens).reshape(1, 4, HEADS, -1).transpose(1, 2), dim=-1)
    k, v = attn.kv(inps).chunk(2, dim=-1)
    k = F.normalize(k.reshape(1, 6, HEADS, -1).transpose(1, 2), dim=-1)
    v = v.reshape(1, 6, HEADS, -1).transpose(1, 2)
    expected = attn.proj((torch.relu(q @ k.transpose(-2, -1)) @ v).transpose(1, 2).reshape(1, 4, DIM))
    torch.testing.assert_close(attn(tokens, inps), expected)


def test_trainable_linears_use_truncated_normal_init():
    net = make_net()
    for module in net.trainable_modules().modules():
        if isinstance(module, nn.Linear):
            assert module.weight.abs().max() <= 0.03
            assert 0.005 < module.weight.std() < 0.015
            assert torch.all(module.bias == 0)
    assert not any(p.requires_grad for p in net.encoder.parameters())
    assert all(p.requires_grad for p in net.trainable_parameters())


def test_soft_mining_loss_value_and_gradient_scaling():
    torch.manual_seed(0)
    enc = torch.randn(2, 2, 9, 4)
    dec = torch.randn(2, 2, 9, 4, requires_grad=True)
    loss = soft_mining_loss(enc, dec, exponent=3)
    expected = np.mean([(1 - F.cosine_similarity(enc[:, g].flatten(1), dec[:, g].flatten(1))).mean().item()
                        for g in range(2)])
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    for g in range(2):
        plain = dec.detach()[:, g].clone().requires_grad_(True)
        (1 - F.cosine_similarity(enc[:, g].flatten(1), plain.flatten(1))).mean().div(2).backward()
        d = 1 - F.cosine_similarity(enc[:, g], dec.detach()[:, g], dim=-1)
        factor = (d / d.mean()) ** 3
        torch.testing.assert_close(dec.grad[:, g], plain.grad * factor.unsqueeze(-1))


def test_coherence_loss_is_mean_distance_to_nearest_inp():
    tokens, inps = torch.randn(2, 5, 4), torch.randn(2, 3, 4)
    brute = np.mean([[1 - max(F.cosine_similarity(tokens[b, t], inps[b, k], dim=0).item() for k in range(3))
                      for t in range(5)] for b in range(2)])
    assert inp_coherence_loss(tokens, inps).item() == pytest.approx(brute, rel=1e-5)
    assert inp_coherence_loss(inps, inps).item() == pytest.approx(0, abs=1e-6)


def test_stable_adamw_equals_adamw_when_no_update_is_clipped():
    torch.manual_seed(0)
    a = torch.randn(10, requires_grad=True)
    b = a.detach().clone().requires_grad_(True)
    ours = StableAdamW([a], lr=1e-2, weight_decay=1e-2, clip_threshold=1e9)
    reference = torch.optim.AdamW([b], lr=1e-2, weight_decay=1e-2, eps=1e-10, amsgrad=True)
    for step in range(5):
        grad = torch.randn(10) * (step + 1)
        a.grad, b.grad = grad.clone(), grad.clone()
        ours.step()
        reference.step()
    torch.testing.assert_close(a, b)


def test_stable_adamw_clips_large_updates():
    p = torch.zeros(4, requires_grad=True)
    p.grad = torch.tensor([1.0, 1.0, 1.0, 1.0])
    StableAdamW([p], lr=0.1, weight_decay=0.0).step()
    # first step: grad / denom = 1 / (1 + eps) per element, RMS ~1 -> unclipped step of lr
    torch.testing.assert_close(p.detach(), torch.full((4,), -0.1), atol=1e-6, rtol=0)
    q = torch.zeros(2, requires_grad=True)
    optimizer = StableAdamW([q], lr=0.1, weight_decay=0.0)
    q.grad = torch.tensor([1e-3, 1e-3])
    optimizer.step()
    before = q.detach().clone()
    q.grad = torch.tensor([10.0, 10.0])  # sudden spike: RMS of grad/denom >> 1, the step is shrunk
    optimizer.step()
    assert (before - q.detach()).abs().max() < 0.1


def test_warm_cosine_schedule():
    schedule = warm_cosine_schedule(1e-3, 1e-4, 1000, 100)
    assert len(schedule) == 1000
    assert schedule[0] == 0.0 and schedule[99] == pytest.approx(1e-3)
    assert schedule[100] == pytest.approx(1e-3)
    assert schedule[-1] == pytest.approx(1e-4, rel=1e-3)
    assert np.all(np.diff(schedule[100:]) <= 0)
    assert len(warm_cosine_schedule(1e-3, 1e-4, 10, 100)) == 10


def test_gaussian_kernel_and_scorer():
    kernel = gaussian_kernel(5, 4.0)
    assert kernel.shape == (1, 1, 5, 5) and kernel.sum().item() == pytest.approx(1.0)
    assert kernel[0, 0, 2, 2] == kernel.max()
    scorer = AnomalyScorer(input_size=56)
    token_maps = torch.zeros(2, 2, 4, 4)
    token_maps[1, :, 1, 2] = 1.0
    maps = scorer.maps(token_maps)
    assert maps.shape == (2, 256, 256)
    assert maps[0].abs().max() == 0
    scores = scorer.scores(maps)
    top = maps[1].flatten().sort(descending=True).values[: int(256 * 256 * 0.01)].mean()
    assert scores[1].item() == pytest.approx(top.item())
    assert scores[1] > scores[0]


class TinyDataset(torch.utils.data.Dataset):
    def __init__(self, n=6):
        generator = torch.Generator().manual_seed(1)
        self.images = torch.randn(n, 3, 28, 28, generator=generator)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i], "label": 0, "index": i}


def test_training_is_reproducible_and_cache_does_not_change_it():
    config = make_config("cpu", iterations=6, batch_size=4, warmup_iterations=2, device="cpu")
    runs = []
    for cached in (True, True, False):
        config.feature_cache = cached
        net = make_net(seed=3)
        runs.append(train(net, TinyDataset(), config, progress=False).losses)
    assert runs[0] == runs[1]
    np.testing.assert_allclose(runs[0], runs[2], rtol=1e-5)
    assert runs[0][-1] < runs[0][1]


def test_token_subset_decodes_exactly_those_tokens_of_the_full_pass():
    """Decoder tokens depend only on themselves and the INPs, which still see every token."""
    net = make_net().eval()
    encoded = net.encode(torch.randn(2, 3, 56, 56))
    full = net.decode(encoded)
    subset = torch.tensor([[0, 5, 9], [15, 2, 3]])
    part = net.decode(encoded, subset)
    assert part.decoder_groups.shape == (2, 2, 3, DIM) and part.tokens.shape == full.tokens.shape
    for image in range(2):
        torch.testing.assert_close(part.decoder_groups[image], full.decoder_groups[image][:, subset[image]])
        torch.testing.assert_close(part.encoder_groups[image], full.encoder_groups[image][:, subset[image]])
    torch.testing.assert_close(part.inps, full.inps)


def test_training_on_token_subsets_is_reproducible_and_learns():
    config = make_config("cpu", iterations=8, batch_size=4, warmup_iterations=2, device="cpu", train_tokens=2)
    first = train(make_net(seed=3), TinyDataset(), config, progress=False).losses
    again = train(make_net(seed=3), TinyDataset(), config, progress=False).losses
    everything = train(make_net(seed=3), TinyDataset(), make_config("cpu", iterations=8, batch_size=4,
                                                                   warmup_iterations=2, device="cpu"),
                       progress=False).losses
    assert first == again and first != everything
    assert first[-1] < first[0]


def test_on_step_and_precomputed_features():
    config = make_config("cpu", iterations=4, batch_size=2, warmup_iterations=1, device="cpu")
    seen = []
    net = make_net(seed=3)
    features = torch.cat([net.encode(TinyDataset()[i]["image"][None]) for i in range(6)])
    with_features = train(net, TinyDataset(), config, progress=False, features=features,
                          on_step=lambda step, model: seen.append((step, model is net))).losses
    assert seen == [(1, True), (2, True), (3, True), (4, True)]
    np.testing.assert_allclose(with_features, train(make_net(seed=3), TinyDataset(), config, progress=False).losses,
                               rtol=1e-6)


def test_scorer_on_a_non_square_input_and_valid_boxes():
    scorer = AnomalyScorer(input_size=(56, 28))  # 4 x 2 tokens
    assert scorer.map_shape == (512, 256)
    distance = torch.zeros(1, 2, 8)
    distance[0, :, 6] = 1.0  # token (row 3, column 0)
    token_maps = scorer.to_grid(distance)
    assert token_maps.shape == (1, 2, 4, 2) and token_maps[0, 0, 3, 0] == 1
    maps = scorer.maps(token_maps)
    assert maps.shape == (1, 512, 256) and maps[0, 450, 20] > maps[0, 50, 200]
    hidden = scorer.maps(token_maps, valid=torch.tensor([[0.0, 0.0, 0.5, 1.0]]))  # top half only
    assert hidden[0, 256:].abs().max() == 0 and torch.equal(hidden[0, :256], maps[0, :256])
    assert scorer.scores(hidden) < scorer.scores(maps)


def test_the_score_is_the_top_share_of_the_image_pixels_not_of_the_padded_input():
    """A part padded to a quarter of the input is scored on the top 1 % of its own pixels, like the same map
    unpadded, so the score does not depend on the padding (the padded pixels are 0 and never count)."""
    scorer = AnomalyScorer(input_size=56)
    image = torch.rand(1, 64, 256) + 1.0  # the part's own map: 16384 pixels
    padded = torch.zeros(1, 256, 256)
    padded[:, 96:160] = image
    box = torch.tensor([[96 / 256, 0.0, 160 / 256, 1.0]])
    own_top = image.flatten().sort(descending=True).values[: int(64 * 256 * 0.01)].mean()
    assert scorer.scores(padded, box).item() == pytest.approx(own_top.item(), rel=1e-6)
    assert scorer.scores(padded).item() < own_top.item()  # 1 % of the whole input averages far more pixels
    full = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    maps = torch.rand(3, 256, 256)
    torch.testing.assert_close(scorer.scores(maps, full.expand(3, 4)), scorer.scores(maps))


def test_token_subsets_of_padded_images_are_drawn_from_their_own_tokens():
    config = make_config("cpu", train_tokens=4)
    valid = torch.zeros(3, 16, dtype=torch.bool)
    valid[0, 2:8] = True  # 6 valid tokens: the subset is 4 of them
    valid[1, [3, 11]] = True  # 2 valid tokens: both, and 2 of the padding
    valid[2] = True  # no padding: the subset drawn without a mask
    subset = _TokenSubsets(config, 3, rank=0, world=1)(16, valid)
    assert set(subset[0].tolist()) <= set(range(2, 8)) and len(set(subset[0].tolist())) == 4
    assert {3, 11} <= set(subset[1].tolist())
    unmasked = _TokenSubsets(config, 3, rank=0, world=1)(16)
    assert torch.equal(subset[2], unmasked[2])
