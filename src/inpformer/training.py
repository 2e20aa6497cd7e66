"""The training loop: optimiser, schedule, frozen-feature cache, device, data-parallel processes, seeds, progress,
and the training state it saves and resumes from (when stopped by a signal, or crashed). Nothing else imports it
except the public API."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import shutil
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

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
from .errors import InpformerError, TrainingStopped, first_line
from .files import read_torch_file, write_atomically
from .losses import inp_coherence_loss, soft_mining_loss
from .model import INPFormerNet, ModelOutput
from .scoring import valid_pixels
from .tracking import Tracker

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
    resumed_at: list[int] = field(default_factory=list)  # steps at which an interrupted training went on


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


STATE_FORMAT = "inpformer-training-state"
# how training runs, not what it computes: a resumed training may change these
RUNTIME_SETTINGS = ("device", "compile", "feature_cache", "feature_cache_storage")


@dataclass(frozen=True)
class Checkpoints:
    """Where training keeps the state it resumes from: written atomically to `path` every `every` optimizer steps
    (0: never) and when a SIGINT or SIGTERM stops it. With `resume`, training goes on from that state to the result
    of an uninterrupted training (bit for bit on the CPU); it must be the same training: the config's settings
    (but `RUNTIME_SETTINGS`) and `identity` (e.g. the training images) must be those saved."""

    path: Path
    every: int = 100
    resume: bool = False
    identity: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 0:
            raise InpformerError(f"--checkpoint-every must be a number of steps of at least 0, got {self.every!r}")


def train(net: INPFormerNet, dataset: Dataset, config: Config, progress: bool = True,
          on_step: Callable[[int, INPFormerNet], None] | None = None, features: Tensor | None = None,
          checkpoints: Checkpoints | None = None, tracker: Tracker | None = None) -> TrainingLog:
    """Trains `net`'s INP Extractor, bottleneck and decoder on the good images of `dataset`, on `config.device`;
    `net` is back on the CPU afterwards.

    Launched as several processes (torchrun, `inpformer train --devices N`), training is data-parallel: every
    process draws the same batches of `config.batch_size` images (the global batch) and takes its share of each,
    and the gradients are averaged, so the result is that of one process with the same batch size.
    `on_step(steps_done, net)` is called after every optimizer step (e.g. to evaluate learning curves);
    `features`, `encode_dataset`'s output for `dataset` computed earlier, replaces the feature cache.
    With `checkpoints`, the training state is saved (see `Checkpoints`), and a SIGINT or SIGTERM stops training after
    its current step: the state is saved and `TrainingStopped` raised (a second signal acts as usual).
    `tracker` receives the loss and learning rate of every step.
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
    parameters = net.trainable_parameters()
    optimizer = StableAdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
    batches = _BatchOrder(len(dataset), config.batch_size, config.seed)
    subsets = _TokenSubsets(config, batch_size, rank, world)
    # a padded image's subsets are drawn from its own tokens: padding would take up to most of them
    padded = subsets.count and config.resize_mode == "pad" and isinstance(dataset, ImageDataset)
    boxes = dataset.valid_boxes() if padded else None
    training_log, state = TrainingLog(), None
    if checkpoints is not None:
        identity = {**_settings(config), **checkpoints.identity}
        if checkpoints.resume:
            state = _read_state(checkpoints.path, identity)
            training_log = _restore(state, checkpoints.path, net, optimizer, batches, subsets)
    with stop_signals if checkpoints is not None else contextlib.nullcontext():
        start = time.perf_counter()
        if config.feature_cache or features is not None:
            cache = features if features is not None else encode_dataset(net, dataset, device,
                                                                         config.feature_cache_storage, progress)
            training_log.cache_seconds += time.perf_counter() - start

            def inputs(indices: list[int]) -> Tensor:
                return cache[indices].to(device, non_blocking=True)
        else:  # the loader draws its batches ahead of training (prefetching), so it follows a copy of the order
            loader = DataLoader(dataset, batch_sampler=(_share(batch, rank, world) for batch in batches.copy()),
                                **_loader_options(dataset, device))
            images = iter(loader)

            def inputs(indices: list[int]) -> Tensor:
                return net.encode(next(images)["image"].to(device, non_blocking=True))
        decode: nn.Module = _Decode(net, compile=config.compile and device.type == "cuda")
        if torch.distributed.is_initialized():  # any process group, even of one process (torchrun --nproc-per-node 1)
            decode = DistributedDataParallel(decode, device_ids=[device.index] if device.type == "cuda" else None,
                                             broadcast_buffers=False)
        schedule = warm_cosine_schedule(config.lr, config.final_lr, iterations, config.warmup_iterations)
        if state is not None:  # now that the cache and the loader drew from them, as they did the first time
            _set_rng_states(state["rng"])
        net.train()
        first = state["step"] if state is not None else 0
        seconds_before, train_start = training_log.train_seconds, time.perf_counter()

        def save(step: int) -> None:
            training_log.train_seconds = seconds_before + time.perf_counter() - train_start
            if rank == 0:
                saved = {"format": STATE_FORMAT, "identity": identity, "step": step,
                         "weights": net.trainable_state_dict(), "optimizer": optimizer.state_dict(),
                         "batches": batches.state_dict(), "tokens": subsets.generator.get_state(),
                         "rng": _rng_states(), "log": asdict(training_log)}
                write_atomically(checkpoints.path, lambda tmp: torch.save(saved, tmp))

        def stop_if_asked(step: int) -> None:
            received = distributed.largest(stop_signals.received or 0) if checkpoints is not None else 0
            if received:  # every process stops at the same step
                save(step)
                raise TrainingStopped(f"training stopped by {signal.Signals(received).name} at step {step} of "
                                      f"{iterations}; its state is saved in {checkpoints.path}", received)

        bar = tqdm(range(first, iterations), initial=first, total=iterations, desc="training", unit="it",
                   disable=not progress)
        for step in bar:
            stop_if_asked(step)
            batch = next(batches)
            encoded = inputs(_share(batch, rank, world))
            token_subset = subsets(encoded.shape[2], None if boxes is None else _valid_tokens(boxes[batch], config,
                                                                                             encoded.shape[2]))
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
            if tracker is not None and rank == 0:
                tracker.log_metrics({"train/loss": value, "train/lr": float(schedule[step])}, step + 1)
            if on_step is not None:
                on_step(step + 1, net)
            due = checkpoints is not None and checkpoints.every and (step + 1) % checkpoints.every == 0
            if due and step + 1 < iterations:  # the finished model follows at once
                save(step + 1)
        stop_if_asked(iterations)
    net.eval()
    net.to("cpu")
    training_log.iterations = iterations
    training_log.train_seconds = seconds_before + time.perf_counter() - train_start
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
                log.warning("torch.compile failed (%s); training without it", first_line(error))
                self.compiled = None
        return self.net.decode(encoded, token_subset)


class _TokenSubsets:
    """Per step, this process's share of a random subset of `config.train_tokens` token indices per image of the
    global batch (all processes draw the same ones, like the batches), or None to decode every token."""

    def __init__(self, config: Config, batch_size: int, rank: int, world: int):
        self.generator = torch.Generator().manual_seed(config.seed + 1)
        self.count, self.batch_size, self.rank, self.world = config.train_tokens, batch_size, rank, world

    def __call__(self, num_tokens: int, valid: Tensor | None = None) -> Tensor | None:
        """`valid` ([batch, num_tokens] bool) puts an image's valid tokens first: its subset holds padding only
        when it has fewer valid tokens than the count. All valid, the subsets are those drawn without it."""
        if self.count is None or self.count >= num_tokens:
            return None
        scores = torch.rand(self.batch_size, num_tokens, generator=self.generator)
        if valid is not None:
            scores -= (~valid).float()  # padding drawn last; valid tokens keep their draws
        subset = scores.topk(self.count, dim=1).indices
        return torch.tensor_split(subset, self.world)[self.rank]


def _valid_tokens(boxes: Tensor, config: Config, num_tokens: int) -> Tensor:
    """Whether each token's centre is inside its image's valid box: [B, num_tokens] bool."""
    height, width = config.geometry().crop_size
    rows = round(math.sqrt(num_tokens * height / width))
    return valid_pixels(boxes, (rows, num_tokens // rows)).flatten(1)


class _BatchOrder:
    """Endless shuffled global batches of image indices, epoch by epoch; the incomplete last batch of an epoch is
    dropped (as in the reference) unless the dataset is smaller than one batch. Its state (the generator, the
    epoch's order and the place in it) is part of the training state."""

    def __init__(self, num_images: int, batch_size: int, seed: int):
        self.num_images, self.batch_size = num_images, min(batch_size, num_images)
        self.generator = torch.Generator().manual_seed(seed)
        self.order, self.position = torch.empty(0, dtype=torch.long), 0

    def __iter__(self) -> _BatchOrder:
        return self

    def __next__(self) -> Tensor:
        if self.position + self.batch_size > len(self.order):
            self.order, self.position = torch.randperm(self.num_images, generator=self.generator), 0
        self.position += self.batch_size
        return self.order[self.position - self.batch_size : self.position]

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "order": self.order, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.order, self.position = state["order"], int(state["position"])

    def copy(self) -> _BatchOrder:
        twin = _BatchOrder(self.num_images, self.batch_size, 0)
        twin.load_state_dict(self.state_dict())
        return twin


def _share(batch: Tensor, rank: int, world: int) -> list[int]:
    """This process's share of a global batch."""
    return torch.tensor_split(batch, world)[rank].tolist()


class StopSignals:
    """While active (re-entrant), the first SIGINT or SIGTERM is only recorded in `received`, for training to stop
    after its current step and save its state; a second one acts as before (Ctrl-C twice stops at once). A signal
    recorded but not acted on (no `TrainingStopped` raised) is delivered again on leaving, so none is lost.
    Only the main thread can catch signals; elsewhere they act as before."""

    def __init__(self):
        self.received: int | None = None
        self._depth, self._previous, self._pid = 0, {}, 0

    def __enter__(self) -> StopSignals:
        if self._depth == 0:
            self.received, self._pid = None, os.getpid()
            if threading.current_thread() is threading.main_thread():
                self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        self._depth += 1
        return self

    def __exit__(self, kind: type | None, *_) -> None:
        self._depth -= 1
        if self._depth == 0:
            self._restore()
            if self.received and kind is not TrainingStopped:
                signal.raise_signal(self.received)

    def _handle(self, signum: int, frame: Any) -> None:
        if os.getpid() != self._pid:  # a forked data-loading worker: the main process decides
            return
        self.received = signum
        self._restore()
        os.write(2, b"\ninpformer: stopping after the current step to save the training state "
                    b"(signal again to stop at once)\n")

    def _restore(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, signal.SIG_DFL if handler is None else handler)
        self._previous = {}


stop_signals = StopSignals()


def _settings(config: Config) -> dict[str, Any]:
    """The settings a resumed training must share with the interrupted one, by option name."""
    return {"--" + k.replace("_", "-"): v for k, v in config.to_dict().items() if k not in RUNTIME_SETTINGS}


def _read_state(path: Path, identity: dict[str, Any]) -> dict[str, Any]:
    """A saved training state, checked to be one of this training (`identity`)."""
    state = read_torch_file(path, "training state", "train anew without resuming")
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT or not isinstance(state.get("identity"),
                                                                                             dict):
        raise InpformerError(f"{path}: not an inpformer training state; train anew without resuming")
    for name, value in identity.items():
        if state["identity"].get(name) != value:
            raise InpformerError(f"{path}: {name} differs: {value!r} here, {state['identity'].get(name)!r} in the "
                                 "interrupted training; resume with the same settings, or train anew")
    return state


def _restore(state: dict[str, Any], path: Path, net: INPFormerNet, optimizer: torch.optim.Optimizer,
             batches: _BatchOrder, subsets: _TokenSubsets) -> TrainingLog:
    """Puts the saved weights, optimiser state and data order back; returns the saved log."""
    try:
        missing, unexpected = net.load_state_dict(state["weights"], strict=False)
        if unexpected or any(not key.startswith("encoder.") for key in missing):
            raise ValueError(f"the weights do not fit the network (missing {missing[:3]}, unexpected {unexpected[:3]})")
        optimizer.load_state_dict(state["optimizer"])
        batches.load_state_dict(state["batches"])
        subsets.generator.set_state(state["tokens"])
        training_log = TrainingLog(**state["log"])
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        raise InpformerError(f"{path}: malformed training state ({first_line(error)}); train anew "
                             "without resuming") from None
    training_log.resumed_at.append(int(state["step"]))
    log.info("resuming training at step %d from %s", state["step"], path)
    return training_log


def _rng_states() -> dict[str, Any]:
    """The global generators' states, as tensors and plain values (what `torch.load(weights_only=True)` reads)."""
    numpy = np.random.get_state(legacy=False)
    key = torch.from_numpy(numpy["state"]["key"].astype(np.int64))
    return {"python": random.getstate(), "numpy": {**numpy, "state": {**numpy["state"], "key": key}},
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []}


def _set_rng_states(states: dict[str, Any]) -> None:
    """Sets the global generators to `_rng_states`' output."""
    random.setstate(states["python"])
    numpy = states["numpy"]
    np.random.set_state({**numpy, "state": {**numpy["state"], "key": numpy["state"]["key"].numpy().astype(np.uint32)}})
    torch.set_rng_state(states["torch"])
    if states["cuda"] and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])
