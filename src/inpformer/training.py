"""The training loop: optimiser, schedule, frozen-feature cache, device, data-parallel processes, seeds and
progress. Nothing else imports it except the public API."""

from __future__ import annotations

import logging
import math
import os
import random
import shutil
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from . import distributed
from .backbone import cache_dir
from .config import Config
from .data.augment import ExpandedDataset
from .data.images import ImageDataset
from .errors import InpformerError
from .losses import inp_coherence_loss, soft_mining_loss
from .model import INPFormerNet, ModelOutput

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


CACHE_STORAGES = ("auto", "memory", "disk")
MEMORY_SHARE = 0.25  # "auto" keeps the feature cache in memory if it takes less than this share of free RAM


def encode_dataset(net: INPFormerNet, dataset: Dataset, device: torch.device | str = "cpu", storage: str = "auto",
                   progress: bool = True) -> Tensor:
    """Runs the frozen encoder once over `dataset`: [N, groups, tokens, channels] float32 on the CPU.

    `storage` "memory" keeps it in RAM, "disk" in a memory-mapped file under the cache folder ($INPFORMER_CACHE),
    removed as soon as it is mapped (so nothing is left behind, even after a crash); "auto" picks memory when it
    takes under a quarter of the free RAM. With several processes, each encodes a share of the images and all
    receive every feature, so that any process can draw any image (the batches are exactly a single process's);
    the processes of one machine share one file on disk.
    """
    if storage not in CACHE_STORAGES:
        raise InpformerError(f"unknown feature cache storage {storage!r}; choose one of: {', '.join(CACHE_STORAGES)}")
    device = torch.device(device)
    rank, world = distributed.rank(), distributed.world_size()
    with torch.inference_mode():
        probe = net.encode(dataset[0]["image"][None].to(device))
    shape = (len(dataset), *probe.shape[1:])
    nbytes = math.prod(shape) * 4
    available = available_memory()
    if storage == "auto":  # on disk if it does not fit one of the machines (all processes must agree)
        fits = available is None or nbytes * distributed.local_world_size() < MEMORY_SHARE * available
        storage = "memory" if all(distributed.gather_objects(fits)) else "disk"
    where = "in memory" + (f" ({available / 2**30:.1f} GB free)" if available else "")
    if storage == "disk":
        token = distributed.gather_objects(uuid.uuid4().hex)[0]
        path = cache_dir() / "features" / f"{token}-{os.environ.get('GROUP_RANK', '0')}.f32"
        where = f"memory-mapped in {path.parent}"
    log.info("feature cache: %d images x %s float32 = %.1f MB, %s", len(dataset), tuple(shape[1:]), nbytes / 2**20,
             where)
    writer = storage == "memory" or distributed.local_rank() == 0
    features = torch.empty(shape) if storage == "memory" else _mapped_file(path, shape, writer)
    batch_size = 64 if device.type == "cuda" else 16
    loader = DataLoader(Subset(dataset, range(rank, len(dataset), world)), batch_size=batch_size,
                        **_loader_options(dataset, device))
    batches = iter(loader)
    steps = math.ceil(math.ceil(len(dataset) / world) / batch_size)
    with torch.inference_mode():
        for _ in tqdm(range(steps), desc="encoding (feature cache)", unit="batch", disable=not progress):
            batch = next(batches, None)
            if batch is None:  # this process's share ran out before the others'
                rows, index = probe[:0], torch.empty(0, dtype=torch.long, device=device)
            else:
                rows, index = net.encode(batch["image"].to(device, non_blocking=True)), batch["index"].to(device)
            rows, index = distributed.gather_rows(rows, index, batch_size)
            if writer:
                features[index.cpu()] = rows.float().cpu()
    distributed.barrier()  # every process sees the whole file
    return features


def _loader_options(dataset: Dataset, device: torch.device) -> dict:
    """Worker processes when the items are decoded from image files (in-memory items gain nothing from them);
    pinned memory for copies to a GPU."""
    decodes = isinstance(dataset, (ImageDataset, ExpandedDataset))
    return {"num_workers": distributed.loader_workers() if decodes else 0, "pin_memory": device.type == "cuda"}


def available_memory() -> int | None:
    """Free RAM in bytes (psutil's "available" when installed, else the OS's free pages), None if unknown."""
    try:
        import psutil

        return psutil.virtual_memory().available
    except ImportError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _mapped_file(path: Path, shape: tuple[int, ...], writer: bool) -> Tensor:
    """A float32 tensor backed by `path`, shared by the processes of this machine; `writer` creates the file."""
    nbytes = math.prod(shape) * 4
    if writer:
        path.parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(path.parent).free
        if free < nbytes:
            raise InpformerError(f"{path.parent}: the feature cache needs {nbytes / 2**30:.1f} GB but only "
                                 f"{free / 2**30:.1f} GB are free; point INPFORMER_CACHE at a larger disk, "
                                 "or use --feature-cache-storage memory or --no-feature-cache")
    try:
        if writer:
            features = torch.from_file(str(path), shared=True, size=math.prod(shape)).view(shape)
        distributed.barrier()
        if not writer:
            features = torch.from_file(str(path), shared=True, size=math.prod(shape)).view(shape)
        distributed.barrier()
    finally:
        if writer:  # the mappings outlive the name
            path.unlink(missing_ok=True)
    return features


def train(net: INPFormerNet, dataset: Dataset, config: Config, progress: bool = True,
          on_step: Callable[[int, INPFormerNet], None] | None = None, features: Tensor | None = None) -> TrainingLog:
    """Trains `net`'s INP Extractor, bottleneck and decoder on the good images of `dataset`, on `config.device`;
    `net` is back on the CPU afterwards.

    Launched as several processes (torchrun, `inpformer train --devices N`), training is data-parallel: every
    process draws the same batches of `config.batch_size` images (the global batch) and takes its share of each,
    and the gradients are averaged, so the result is that of one process with the same batch size.
    `on_step(steps_done, net)` is called after every optimizer step (e.g. to evaluate learning curves);
    `features`, `encode_dataset`'s output for `dataset` computed earlier, replaces the feature cache.
    """
    device = distributed.setup(config.device)
    rank, world = distributed.rank(), distributed.world_size()
    progress = progress and rank == 0
    iterations = total_iterations(config, len(dataset))
    batch_size = min(config.batch_size, len(dataset))
    if batch_size < world:
        raise InpformerError(f"a batch of {batch_size} images cannot be shared by {world} processes; use a "
                             f"--batch-size (and a training set) of at least {world} images")
    net.to(device)
    training_log = TrainingLog()
    start = time.perf_counter()
    batches = _local_batches(len(dataset), config.batch_size, config.seed, rank, world)
    if config.feature_cache or features is not None:
        cache = features if features is not None else encode_dataset(net, dataset, device,
                                                                     config.feature_cache_storage, progress)
        training_log.cache_seconds = time.perf_counter() - start
        inputs = (cache[indices].to(device, non_blocking=True) for indices in batches)
    else:
        loader = DataLoader(dataset, batch_sampler=batches, **_loader_options(dataset, device))
        inputs = (net.encode(batch["image"].to(device, non_blocking=True)) for batch in loader)
    decode: nn.Module = _Decode(net, compile=config.compile and device.type == "cuda")
    if torch.distributed.is_initialized():  # any process group, even of one process (torchrun --nproc-per-node 1)
        decode = DistributedDataParallel(decode, device_ids=[device.index] if device.type == "cuda" else None,
                                         broadcast_buffers=False)
    parameters = net.trainable_parameters()
    optimizer = StableAdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
    schedule = warm_cosine_schedule(config.lr, config.final_lr, iterations, config.warmup_iterations)
    net.train()
    train_start = time.perf_counter()
    subsets = _token_subsets(config, batch_size, rank, world)
    bar = tqdm(range(iterations), desc="training", unit="it", disable=not progress)
    for step in bar:
        encoded = next(inputs)
        token_subset = subsets(encoded.shape[2])
        for group in optimizer.param_groups:
            group["lr"] = float(schedule[step])
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.precision == "bf16"):
            output = decode(encoded, None if token_subset is None else token_subset.to(device))
        # this process's share of the batch mean: DDP averages the processes' gradients
        loss = training_loss(output, config) * (len(encoded) * world / batch_size)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, config.grad_clip)
        optimizer.step()
        value = distributed.average(loss.detach()).item()
        if not math.isfinite(value):
            raise InpformerError(f"training diverged at step {step + 1} of {iterations}: the loss is {value}; "
                                 f"try a lower --lr (now {config.lr:g}) or --grad-clip (now {config.grad_clip:g})")
        training_log.losses.append(value)
        bar.set_postfix(loss=f"{value:.4f}", lr=f"{schedule[step]:.1e}")
        if step % 50 == 0 or step == iterations - 1:
            log.debug("step %d/%d loss %.5f lr %.2e", step + 1, iterations, value, schedule[step])
        if on_step is not None:
            on_step(step + 1, net)
    net.eval()
    net.to("cpu")
    training_log.iterations = iterations
    training_log.train_seconds = time.perf_counter() - train_start
    return training_log


def training_loss(output: ModelOutput, config: Config) -> Tensor:
    """Soft mining loss plus weighted INP coherence loss, in float32, with the batch statistics of the soft
    mining loss taken over all processes. Both are means of per-image losses (every image has the same number of
    tokens), which is what makes a share of the batch per process equivalent to the whole batch in one."""
    loss = soft_mining_loss(output.encoder_groups.float(), output.decoder_groups.float(), config.mining_exponent,
                            mean=distributed.global_mean)
    return loss + config.coherence_weight * inp_coherence_loss(output.tokens.float(), output.inps.float())


class _Decode(nn.Module):
    """`net.decode` as the module that DDP wraps; compiled with torch.compile when asked, falling back to eager
    mode with a warning when compiling fails (e.g. no C compiler for Triton)."""

    def __init__(self, net: INPFormerNet, compile: bool):
        super().__init__()
        self.net = net
        self.compiled = torch.compile(net.decode) if compile else None

    def forward(self, encoded: Tensor, token_subset: Tensor | None = None) -> ModelOutput:
        if self.compiled is not None:
            try:
                return self.compiled(encoded, token_subset)
            except Exception as error:
                log.warning("torch.compile failed (%s); training without it", str(error).splitlines()[0][:200])
                self.compiled = None
        return self.net.decode(encoded, token_subset)


def _token_subsets(config: Config, batch_size: int, rank: int, world: int) -> Callable[[int], Tensor | None]:
    """Per step, this process's share of a random subset of `config.train_tokens` token indices per image of the
    global batch (all processes draw the same ones, like the batches), or None to decode every token."""
    generator = torch.Generator().manual_seed(config.seed + 1)

    def draw(num_tokens: int) -> Tensor | None:
        if config.train_tokens is None or config.train_tokens >= num_tokens:
            return None
        scores = torch.rand(batch_size, num_tokens, generator=generator)
        subset = scores.topk(config.train_tokens, dim=1).indices
        return torch.tensor_split(subset, world)[rank]

    return draw


def _local_batches(num_images: int, batch_size: int, seed: int, rank: int, world: int) -> Iterator[list[int]]:
    """This process's share of every global batch of `_batch_indices` (all processes draw the same ones)."""
    for batch in _batch_indices(num_images, batch_size, torch.Generator().manual_seed(seed)):
        yield torch.tensor_split(batch, world)[rank].tolist()


def _batch_indices(num_images: int, batch_size: int, generator: torch.Generator):
    """Endless shuffled batches, epoch by epoch; the incomplete last batch of an epoch is dropped
    (as in the reference) unless the dataset is smaller than one batch."""
    batch_size = min(batch_size, num_images)
    while True:
        order = torch.randperm(num_images, generator=generator)
        for start in range(0, num_images - batch_size + 1, batch_size):
            yield order[start : start + batch_size]
