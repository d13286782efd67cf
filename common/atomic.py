"""Atomic file writes: a reader (or a resumed run) never sees a half-written file, and a failed write leaves
nothing behind and says which file and why (torch's own message for a full disk is "unexpected pos 896 vs 790")."""
from __future__ import annotations

import errno
import shutil
import os
from pathlib import Path
from typing import Callable

from .errors import OutputWriteError

LOW_SPACE = 1 << 20  # bytes; below this a failed write is blamed on the full disk


def temp_path(path: Path) -> Path:
    """The temporary file `atomic_write` fills for `path` in this process."""
    return path.with_name(f"{path.name}.{os.getpid()}.tmp")


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Call `write(tmp)` on a temporary file beside `path` (named per process, so two processes filling the same
    cache entry never share one), then rename it over `path`. On any failure the temporary file is removed and
    an `OutputWriteError` names `path` and the cause."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        tmp.replace(path)
    except Exception as err:
        tmp.unlink(missing_ok=True)
        raise OutputWriteError(f"cannot write {path}: {_cause(err, path.parent)}; nothing was left half-written. "
                               f"Free some space (or point VLMT_RUNS / VLMT_CACHE at another disk) and rerun") from err
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def torch_save_atomic(obj, path: str | Path) -> Path:
    """`torch.save(obj, path)` atomically and byte for byte reproducible: torch names the records of its zip
    archive after the file it writes, so saving into the per-process temporary file gave equal weights different
    bytes (and DVC hashes) in every run. Serialised in memory first, the archive is named "archive" always."""
    import io

    import torch
    buf = io.BytesIO()
    torch.save(obj, buf)
    return atomic_write(path, lambda tmp: tmp.write_bytes(buf.getvalue()))


def _cause(err: Exception, folder: Path) -> str:
    code = getattr(err, "errno", None)
    try:
        free = shutil.disk_usage(_existing(folder)).free
    except OSError:
        free = None
    if code == errno.ENOSPC or (free is not None and free < LOW_SPACE):
        return f"no space left on the device ({free if free is not None else '?'} bytes free)"
    if code == errno.EFBIG or "unexpected pos" in str(err):
        return "the write was cut short (the disk is full or a file-size limit was hit)"
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    return f"{type(err).__name__}: {err}"


def _existing(folder: Path) -> Path:
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder
