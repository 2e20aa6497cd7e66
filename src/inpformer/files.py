"""Writing files safely: atomically (a crash, power cut or full disk never leaves a half-written or empty file under
the final name), readable per the umask, and into output folders checked up front; reading PyTorch files safely."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .errors import InpformerError, first_line


def write_atomically(path: str | Path, write: Callable[[str], None]) -> Path:
    """Calls `write(temporary_path)` on a file in `path`'s folder, flushes it to disk, then renames it to `path`
    (atomic on POSIX) and flushes the folder, so `path` is always either the old file or the complete new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; a plain open() would honour the umask
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_text_atomically(path: str | Path, text: str) -> Path:
    """`write_atomically` for a text file (UTF-8)."""
    return write_atomically(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def output_folder(path: str | Path, option: str) -> Path:
    """Creates the folder `path` given by the command-line `option` (with parents), or raises a one-line error
    naming the option when it is a file, lies under a file or cannot be created."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InpformerError(f"{option} {path}: is a file, not a folder; give a folder path")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InpformerError(f"{option} {path}: cannot create this folder ({error.strerror}); give a writable "
                             "folder path") from None
    return path


def output_file(path: str | Path, option: str, suffix: str) -> Path:
    """Checks a file path given by `option` before any work: not a folder, ends in `suffix`, and its folder exists
    or can be created."""
    path = Path(path)
    if path.is_dir():
        raise InpformerError(f"{option} {path}: is a folder; give a file name, e.g. {path / ('model' + suffix)}")
    if path.suffix != suffix:
        raise InpformerError(f"{option} {path}: the file name must end in {suffix}")
    output_folder(path.parent, option)
    return path


def read_torch_file(path: Path, what: str, fix: str) -> Any:
    """`torch.load` of `path` with weights_only=True (tensors and plain values: a file never runs code); a missing
    or unreadable file raises a one-line error naming `what` the file should be and the `fix`."""
    if not path.is_file():
        raise InpformerError(f"{path}: {what} not found; {fix}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # any unreadable file gets the same one-line message
        raise InpformerError(f"{path}: not a readable {what} ({first_line(error)}); {fix}") from None


def _umask() -> int:
    try:  # Linux reports it; os.umask can only read it by setting it, a race with threads creating files
        status = Path("/proc/self/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("Umask:")), 8)
    except (OSError, StopIteration):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def _fsync(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
