"""Devices and data-parallel processes: one process per GPU (or CPU worker), launched by `torchrun` or by
`inpformer train --devices N`, joined with PyTorch's own `torch.distributed` (NCCL on CUDA, gloo on CPU).

Every process runs the same program; only rank 0 logs, shows progress and writes files. The launch
environment is torchrun's: RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT.
"""

from __future__ import annotations

import atexit
import logging
import os
import socket
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .errors import InpformerError

log = logging.getLogger("inpformer")
DEVICES = ("auto", "cpu", "cuda")


def launched() -> bool:
    """True in a process started by torchrun or `spawn` with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main_process() -> bool:
    return rank() == 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def local_world_size() -> int:
    """Processes on this machine (they share its memory, CPU cores and disk)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def setup(device: str = "auto") -> torch.device:
    """This process's device ("auto": CUDA when available, else CPU); joins the process group on the first call
    when launched by torchrun or `spawn`. Later calls only return the device."""
    if device not in DEVICES:
        raise InpformerError(f"unknown device {device!r}; choose one of: {', '.join(DEVICES)}")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise InpformerError("--device cuda: no CUDA GPU is visible to PyTorch; use --device cpu (or auto)")
    resolved = torch.device("cpu")
    if use_cuda:
        count = torch.cuda.device_count()
        if local_rank() >= count:
            raise InpformerError(f"process {local_rank()} on this machine needs GPU {local_rank()} but only {count} "
                                 "are visible; use at most that many --devices (or torchrun --nproc-per-node)")
        resolved = torch.device("cuda", local_rank())
        torch.cuda.set_device(resolved)
    if launched() and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=resolved if use_cuda else None)
        atexit.register(dist.destroy_process_group)
        if not use_cuda:  # the processes of a machine share its cores
            torch.set_num_threads(max(1, _cpus() // local_world_size()))
        if not is_main_process():
            log.addFilter(lambda record: record.levelno >= logging.WARNING)
    return resolved


def loader_workers() -> int:
    """DataLoader worker processes for image decoding: up to 4, leaving this process a core of its share."""
    return max(0, min(4, _cpus() // local_world_size() - 1))


def global_mean(x: Tensor) -> Tensor:
    """Mean of `x` over the elements of all processes (a plain mean in a single process)."""
    if world_size() == 1:
        return x.mean()
    total = torch.stack([x.sum(), torch.tensor(x.numel(), dtype=x.dtype, device=x.device)])
    dist.all_reduce(total)
    return total[0] / total[1]


def average(value: Tensor) -> Tensor:
    """Mean of a per-process tensor over the processes."""
    if world_size() == 1:
        return value
    value = value.clone()
    dist.all_reduce(value)
    return value / world_size()


def gather_rows(rows: Tensor, index: Tensor, capacity: int) -> tuple[Tensor, Tensor]:
    """Every process's `rows` (at most `capacity`, possibly none) and their `index`, concatenated in rank order."""
    if world_size() == 1:
        return rows, index
    padded = rows.new_zeros((capacity, *rows.shape[1:]))
    padded[: len(rows)] = rows
    padded_index = torch.full((capacity,), -1, dtype=torch.long, device=rows.device)
    padded_index[: len(index)] = index
    all_rows = [torch.empty_like(padded) for _ in range(world_size())]
    all_index = [torch.empty_like(padded_index) for _ in range(world_size())]
    dist.all_gather(all_rows, padded)
    dist.all_gather(all_index, padded_index)
    all_rows, all_index = torch.cat(all_rows), torch.cat(all_index)
    keep = all_index >= 0
    return all_rows[keep], all_index[keep]


def gather_objects(value: Any) -> list[Any]:
    """Every process's `value` (picklable), in rank order."""
    if world_size() == 1:
        return [value]
    values = [None] * world_size()
    dist.all_gather_object(values, value)
    return values


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def spawn(fn: Callable[..., int | None], nprocs: int, *args: Any) -> int:
    """Runs `fn(*args)` in `nprocs` new local processes joined like torchrun's (ranks 0..nprocs-1, a free port);
    returns 0, or the exit code of the first process that failed (the others are then stopped)."""
    port = _free_port()
    try:
        torch.multiprocessing.spawn(_run_rank, args=(nprocs, port, fn, args), nprocs=nprocs)
    except torch.multiprocessing.ProcessExitedException as error:
        return error.exit_code if error.exit_code > 0 else 1
    return 0


def _run_rank(index: int, nprocs: int, port: int, fn: Callable[..., int | None], args: tuple) -> None:
    os.environ.update(RANK=str(index), LOCAL_RANK=str(index), WORLD_SIZE=str(nprocs), LOCAL_WORLD_SIZE=str(nprocs),
                      GROUP_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    code = fn(*args)
    if code:
        sys.exit(code)


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def largest(value: int) -> int:
    """The largest of the processes' `value`s (e.g. for all of them to act on a flag that any one raised)."""
    if world_size() == 1:
        return value
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    tensor = torch.tensor([value], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())
