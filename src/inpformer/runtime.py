"""The inference graph (preprocessed images -> map, score, decision, embedding) and the PyTorch runtime.

`InferenceGraph` is the single definition of inference: the PyTorch runtime runs it and the ONNX export traces
it (and the ONNX and OpenVINO runtimes run that export), so all runtimes compute the same thing by construction.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .model import INPFormerNet
from .scoring import AnomalyScorer


@dataclass
class RuntimeOutput:
    """Raw outputs for a batch: maps [B, map_h, map_w], scores [B], embeddings [B, C] (L2-normalised mean
    token of each image, used to recognise the category of an image for multi-class models)."""

    maps: np.ndarray
    scores: np.ndarray
    embeddings: np.ndarray


class InferenceGraph(nn.Module):
    """Network + scorer + the pooled image threshold: images [B, 3, H, W] and their valid boxes [B, 4] (y0, x0,
    y1, x1 as fractions; [0, 0, 1, 1] for an image filling the input) -> (maps, scores, decisions, embeddings)."""

    def __init__(self, net: INPFormerNet, scorer: AnomalyScorer, image_threshold: float = float("inf"),
                 zero_shot: bool = False):
        super().__init__()
        self.net = net
        self.scorer = scorer
        self.zero_shot = zero_shot
        self.register_buffer("image_threshold", torch.tensor(image_threshold, dtype=torch.float32), persistent=False)

    def forward(self, images: Tensor, valid: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        output = self.net(images)
        maps, scores = self.scorer(output, zero_shot=self.zero_shot, valid=valid)
        embeddings = F.normalize(output.tokens.mean(dim=1), dim=-1)
        return maps, scores, scores > self.image_threshold, embeddings


class TorchRuntime:
    """Runs an `InferenceGraph` with PyTorch on the CPU."""

    name = "torch"

    def __init__(self, graph: InferenceGraph):
        self.graph = graph.eval()

    def __call__(self, images: np.ndarray, valid: np.ndarray | None = None) -> RuntimeOutput:
        images, valid = runtime_inputs(images, valid)
        with torch.inference_mode():
            maps, scores, _, embeddings = self.graph(torch.from_numpy(images), torch.from_numpy(valid))
        return RuntimeOutput(maps.numpy(), scores.numpy(), embeddings.numpy())


def runtime_inputs(images: np.ndarray, valid: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """A runtime's inputs as contiguous float32 arrays; no `valid`: boxes for images that fill the input."""
    images = np.ascontiguousarray(images, np.float32)
    return images, full_boxes(images) if valid is None else np.ascontiguousarray(valid, np.float32)


def full_boxes(images: np.ndarray) -> np.ndarray:
    """Valid boxes [B, 4] for images that fill the input (no padding)."""
    return np.tile(np.array([0, 0, 1, 1], dtype=np.float32), (len(images), 1))


def run_in_batches(runtime, images: np.ndarray, valid: np.ndarray, batch_size: int = 8) -> RuntimeOutput:
    """`runtime` over `images` in batches of `batch_size` (bounded memory, e.g. for the tiles of a large image)."""
    outputs = [runtime(images[i : i + batch_size], valid[i : i + batch_size])
               for i in range(0, len(images), batch_size)]
    return RuntimeOutput(*(np.concatenate([getattr(o, name) for o in outputs])
                           for name in ("maps", "scores", "embeddings")))
