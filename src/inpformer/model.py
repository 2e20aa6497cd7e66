"""INP-Former (Luo et al., CVPR 2025) as one readable torch module; no files, no metrics, no CLI.

Image -> frozen encoder (patch tokens of 8 middle layers) -> two group means ("encoded") ->
INP Extractor (6 learnable queries attend to the image's tokens: its Intrinsic Normal Prototypes) ->
MLP bottleneck -> INP-Guided Decoder (8 blocks, tokens attend to the INPs only) -> two group means.
The anomaly map is where encoder and decoder groups disagree (see scoring.py).

`encode` and `decode` are separate so that training can cache the frozen encoder's output once and
run only `decode` at every step (training.py).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import Mlp, trunc_normal_
from torch import Tensor, nn

# Encoder layers (positions in the 8 selected layers) and decoder blocks fused into each group; the decoder
# list is reversed first, so the last decoder block pairs with the first encoder layer.
GROUPS = ((0, 1, 2, 3), (4, 5, 6, 7))
LayerNorm = partial(nn.LayerNorm, eps=1e-8)


class ExtractorAttention(nn.Module):
    """Softmax cross-attention: the INP queries attend to the image tokens."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, queries: Tensor, tokens: Tensor) -> Tensor:
        q = _split_heads(self.q(queries), self.num_heads)
        k, v = (_split_heads(t, self.num_heads) for t in self.kv(tokens).chunk(2, dim=-1))
        attn = (q @ k.transpose(-2, -1) * self.scale).softmax(dim=-1)
        return self.proj(_merge_heads(attn @ v))


class PrototypeAttention(nn.Module):
    """Tokens attend to the INPs: cosine similarity times a learnable per-head scale, ReLU instead of softmax."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.scale = nn.Parameter(torch.ones(num_heads, 1, 1))
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, tokens: Tensor, inps: Tensor) -> Tensor:
        q = F.normalize(_split_heads(self.q(tokens), self.num_heads), dim=-1)
        k, v = (_split_heads(t, self.num_heads) for t in self.kv(inps).chunk(2, dim=-1))
        attn = F.relu(q @ F.normalize(k, dim=-1).transpose(-2, -1) * self.scale)
        return self.proj(_merge_heads(attn @ v))


class ExtractorBlock(nn.Module):
    """INP Extractor block: residual cross-attention then MLP; one LayerNorm shared by queries and tokens."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.norm1, self.norm2 = LayerNorm(dim), LayerNorm(dim)
        self.attn = ExtractorAttention(dim, num_heads)
        self.mlp = Mlp(dim, 4 * dim)

    def forward(self, queries: Tensor, tokens: Tensor) -> Tensor:
        x = queries + self.attn(self.norm1(queries), self.norm1(tokens))
        return x + self.mlp(self.norm2(x))


class DecoderBlock(nn.Module):
    """INP-Guided Decoder block: no residual around the attention, so every token must be rebuilt from INPs."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.norm1, self.norm2 = LayerNorm(dim), LayerNorm(dim)
        self.attn = PrototypeAttention(dim, num_heads)
        self.mlp = Mlp(dim, 4 * dim)

    def forward(self, tokens: Tensor, inps: Tensor) -> Tensor:
        x = self.attn(self.norm1(tokens), self.norm1(inps))
        return x + self.mlp(self.norm2(x))


@dataclass
class ModelOutput:
    """Everything downstream needs; group tensors are [B, groups, tokens, channels]."""

    encoder_groups: Tensor
    decoder_groups: Tensor
    tokens: Tensor  # the decoder input: mean of the 8 encoder layers, [B, tokens, channels]
    inps: Tensor  # [B, num_inps, channels]


class INPFormerNet(nn.Module):
    """Frozen encoder plus the trainable INP Extractor, bottleneck and INP-Guided Decoder."""

    def __init__(self, encoder: nn.Module, embed_dim: int, num_heads: int, num_inps: int = 6, decoder_depth: int = 8):
        super().__init__()
        self.encoder = encoder
        self.inp_queries = nn.Parameter(torch.randn(num_inps, embed_dim))
        self.extractor = ExtractorBlock(embed_dim, num_heads)
        self.bottleneck = Mlp(embed_dim, 4 * embed_dim)
        self.decoder = nn.ModuleList(DecoderBlock(embed_dim, num_heads) for _ in range(decoder_depth))
        self.trainable_modules().apply(_init_weights)

    def with_encoder(self, encoder: nn.Module) -> INPFormerNet:
        """This network with another encoder (e.g. the same one at another input size), sharing every trainable
        parameter: a shallow copy whose module table alone is new."""
        net = copy.copy(self)
        net._modules = {**self._modules, "encoder": encoder}
        return net

    def trainable_modules(self) -> nn.ModuleList:
        return nn.ModuleList([self.extractor, self.bottleneck, self.decoder])

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [self.inp_queries, *self.trainable_modules().parameters()]

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """The trained weights: everything but the frozen encoder's, which is rebuilt from its source."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("encoder.")}

    def encode(self, images: Tensor) -> Tensor:
        """Frozen encoder features fused into the two groups: [B, 2, tokens, channels]."""
        with torch.no_grad():
            layers = self.encoder(images)
        return torch.stack([torch.stack([layers[i] for i in group]).mean(0) for group in GROUPS], dim=1)

    def decode(self, encoded: Tensor, token_subset: Tensor | None = None) -> ModelOutput:
        """Everything after the encoder, from `encode`'s output (possibly cached).

        `token_subset` ([B, k] token indices, training only) decodes just those tokens of each image: the INPs
        still come from all tokens, but every decoder block acts per token given the INPs, so a token's
        reconstruction does not depend on the other tokens and a subset is an unbiased sample of the full pass.
        The output's encoder and decoder groups then hold the subset; `tokens` stays complete.
        """
        # The groups are equal-sized halves of the 8 layers, so their mean is the mean of all 8 layers.
        tokens = encoded.mean(dim=1)
        queries = self.inp_queries.expand(tokens.shape[0], -1, -1)
        inps = self.extractor(queries, tokens)
        if token_subset is not None:
            encoded = encoded.gather(2, token_subset[:, None, :, None].expand(-1, encoded.shape[1], -1,
                                                                             encoded.shape[-1]))
        x = self.bottleneck(encoded.mean(dim=1))
        outputs = []
        for block in self.decoder:
            x = block(x, inps)
            outputs.append(x)
        outputs.reverse()
        decoded = torch.stack([torch.stack([outputs[i] for i in group]).mean(0) for group in GROUPS], dim=1)
        return ModelOutput(encoder_groups=encoded, decoder_groups=decoded, tokens=tokens, inps=inps)

    def forward(self, images: Tensor) -> ModelOutput:
        return self.decode(self.encode(images))


def _split_heads(x: Tensor, num_heads: int) -> Tensor:
    batch, length, dim = x.shape
    return x.reshape(batch, length, num_heads, dim // num_heads).transpose(1, 2)


def _merge_heads(x: Tensor) -> Tensor:
    batch, heads, length, head_dim = x.shape
    return x.transpose(1, 2).reshape(batch, length, heads * head_dim)


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.01, a=-0.03, b=0.03)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
