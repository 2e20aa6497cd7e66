"""The two INP-Former losses: Soft Mining Loss (reconstruction) and INP Coherence Loss."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


class _ScaleGradient(torch.autograd.Function):
    """Identity forward; multiplies the incoming gradient by `factor` (broadcast) on the way back.

    A custom Function rather than `register_hook`, so the scaling is part of the graph (no in-place edit of a
    gradient buffer, and it composes with torch.compile and DDP).
    """

    @staticmethod
    def forward(ctx, x: Tensor, factor: Tensor) -> Tensor:
        ctx.save_for_backward(factor)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        (factor,) = ctx.saved_tensors
        return grad * factor, None


def soft_mining_loss(encoder_groups: Tensor, decoder_groups: Tensor, exponent: float = 3.0,
                     mean: Callable[[Tensor], Tensor] = torch.mean) -> Tensor:
    """Per group, 1 - cosine between each image's flattened encoder and decoder maps, averaged over groups.

    The gradient reaching each decoder token is scaled by (d / mean d) ** exponent, d = 1 - cos at that token
    (mean over the whole batch): well-reconstructed points are down-weighted, hard points mined.
    Inputs are [B, groups, tokens, channels]; the encoder side is a target and receives no gradient.
    `mean` takes that batch mean; data-parallel training passes a mean over every process's share of the batch.
    """
    losses = []
    for group in range(encoder_groups.shape[1]):
        target = encoder_groups[:, group].detach()
        decoded = decoder_groups[:, group]
        with torch.no_grad():
            distance = 1 - F.cosine_similarity(target, decoded, dim=-1)
            factor = (distance / mean(distance)) ** exponent
        decoded = _ScaleGradient.apply(decoded, factor.unsqueeze(-1))
        losses.append((1 - F.cosine_similarity(target.flatten(1), decoded.flatten(1), dim=1)).mean())
    return torch.stack(losses).mean()


def token_to_inp_distance(tokens: Tensor, inps: Tensor) -> Tensor:
    """1 - max cosine similarity of each token to its image's INPs: [B, tokens]."""
    similarity = F.normalize(tokens, dim=-1) @ F.normalize(inps, dim=-1).transpose(-2, -1)
    return 1 - similarity.amax(dim=-1)


def inp_coherence_loss(tokens: Tensor, inps: Tensor) -> Tensor:
    """Mean over tokens of the distance to the nearest INP: INPs must cover the image's normal features."""
    return token_to_inp_distance(tokens, inps).mean()
