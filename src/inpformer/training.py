"""The training loop: optimiser, schedule, frozen-feature cache, seeds and progress. Nothing else imports it
except the public API."""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .config import Config
from .losses import inp_coherence_loss, soft_mining_loss
from .model import INPFormerNet

log = logging.getLogger("inpformer")


class StableAdamW(torch.optim.Optimizer):
    """AdamW with update clipping (Wortsman et al. 2023, "Stable and low-precision training for large-scale
    vision-language models", arXiv:2304.13013), in the exact form used by the INP-Former and Dinomaly reference
    code: decoupled weight decay with the scheduled lr, optional AMSGrad, and the step size divided by
    max(1, RMS(grad / denom) / clip_threshold). Written here because maintained packages implement other
    variants (e.g. weight decay scaled differently), which would not reproduce the paper.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-10, weight_decay: float = 1e-4, amsgrad: bool = True, clip_threshold: float = 1.0):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        clip_threshold=clip_threshold)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                p.mul_(1 - group["lr"] * group["weight_decay"])
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                    if group["amsgrad"]:
                        state["max_exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.mul_(beta1).add_(p.grad, alpha=1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                second = exp_avg_sq
                if group["amsgrad"]:
                    torch.maximum(state["max_exp_avg_sq"], exp_avg_sq, out=state["max_exp_avg_sq"])
                    second = state["max_exp_avg_sq"]
                denom = (second.sqrt() / math.sqrt(1 - beta2 ** state["step"])).add_(group["eps"])
                rms = (p.grad / denom).pow(2).mean().sqrt().item()
                step_size = group["lr"] / (1 - beta1 ** state["step"]) / max(1.0, rms / group["clip_threshold"])
                p.addcdiv_(exp_avg, denom, value=-step_size)


def warm_cosine_schedule(lr: float, final_lr: float, iterations: int, warmup: int) -> np.ndarray:
    """Learning rate per optimizer step: linear 0 -> lr over `warmup` steps, then cosine lr -> final_lr."""
    warmup = min(warmup, iterations)
    ramp = np.linspace(0.0, lr, warmup)
    steps = np.arange(iterations - warmup)
    cosine = final_lr + 0.5 * (lr - final_lr) * (1 + np.cos(np.pi * steps / max(1, len(steps))))
    return np.concatenate([ramp, cosine])


def seed_everything(seed: int) -> None:
    """Seeds Python, numpy and torch; with the fixed data order below, CPU training is reproducible bit for bit."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class TrainingLog:
    """What happened during training, stored in the checkpoint."""

    iterations: int = 0
    losses: list[float] = field(default_factory=list)
    cache_seconds: float = 0.0
    train_seconds: float = 0.0


def total_iterations(config: Config, num_images: int) -> int:
    if config.iterations is not None:
        return config.iterations
    return config.epochs * max(1, num_images // config.batch_size)


def encode_dataset(net: INPFormerNet, dataset: Dataset, batch_size: int = 16, progress: bool = True) -> Tensor:
    """Runs the frozen encoder once over `dataset`: [N, groups, tokens, channels] float32, kept in memory."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    features = None
    with torch.inference_mode():
        for batch in tqdm(loader, desc="encoding (feature cache)", unit="batch", disable=not progress):
            encoded = net.encode(batch["image"])
            if features is None:
                features = torch.empty((len(dataset), *encoded.shape[1:]), dtype=encoded.dtype)
                log.info("feature cache: %d images x %s float32 = %.1f MB in memory", len(dataset),
                         tuple(encoded.shape[1:]), features.numel() * 4 / 2**20)
            index = batch["index"]
            features[index] = encoded
    return features


def train(net: INPFormerNet, dataset: Dataset, config: Config, progress: bool = True) -> TrainingLog:
    """Trains `net`'s INP Extractor, bottleneck and decoder on the good images of `dataset`."""
    iterations = total_iterations(config, len(dataset))
    training_log = TrainingLog()
    start = time.perf_counter()
    if config.feature_cache:
        cache = encode_dataset(net, dataset, progress=progress)
        training_log.cache_seconds = time.perf_counter() - start

        def encoded_batch(indices: Tensor) -> Tensor:
            return cache[indices]
    else:

        def encoded_batch(indices: Tensor) -> Tensor:
            return net.encode(torch.stack([dataset[int(i)]["image"] for i in indices]))

    parameters = net.trainable_parameters()
    optimizer = StableAdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
    schedule = warm_cosine_schedule(config.lr, config.final_lr, iterations, config.warmup_iterations)
    generator = torch.Generator().manual_seed(config.seed)
    batches = _batch_indices(len(dataset), config.batch_size, generator)
    net.train()
    train_start = time.perf_counter()
    bar = tqdm(range(iterations), desc="training", unit="it", disable=not progress)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = float(schedule[step])
        output = net.decode(encoded_batch(next(batches)))
        loss = soft_mining_loss(output.encoder_groups, output.decoder_groups, config.mining_exponent)
        loss = loss + config.coherence_weight * inp_coherence_loss(output.tokens, output.inps)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, config.grad_clip)
        optimizer.step()
        value = loss.item()
        if not math.isfinite(value):
            raise FloatingPointError(f"training diverged at step {step}: loss is {value}")
        training_log.losses.append(value)
        bar.set_postfix(loss=f"{value:.4f}", lr=f"{schedule[step]:.1e}")
        if step % 50 == 0 or step == iterations - 1:
            log.debug("step %d/%d loss %.5f lr %.2e", step + 1, iterations, value, schedule[step])
    net.eval()
    training_log.iterations = iterations
    training_log.train_seconds = time.perf_counter() - train_start
    return training_log


def _batch_indices(num_images: int, batch_size: int, generator: torch.Generator):
    """Endless shuffled batches, epoch by epoch; the incomplete last batch of an epoch is dropped
    (as in the reference) unless the dataset is smaller than one batch."""
    batch_size = min(batch_size, num_images)
    while True:
        order = torch.randperm(num_images, generator=generator)
        for start in range(0, num_images - batch_size + 1, batch_size):
            yield order[start : start + batch_size]
