"""Files that are only ever replaced by complete ones (checkpoints, consolidated state).

:func:`save_atomic` writes through a temporary name in the same folder, flushes it to disk
(fsync), renames it over the target and fsyncs the folder: a reader, or a run killed at
any moment, sees the old file or the new one, never a part. The temporary name carries
the host and the process id (``.NAME.tmp.HOST.PID``), so that a later save removes what a
killed save of this host left and never touches a live writer's file.

(``pretrain_bert.runtime.atomic_write`` does the same for text; it lives there so that the
data tools and the SQuAD metric do not import torch.)
"""

from __future__ import annotations

import glob
import os
import socket
from pathlib import Path
from typing import Callable, IO


def fsync_dir(folder: str | os.PathLike) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def tmp_prefix(path: Path) -> str:
    return f".{path.name}.tmp.{socket.gethostname()}."


def remove_stale_tmp(path: Path) -> None:
    """Temporary files of ``path`` that a killed writer on this host left (its process is gone)."""
    prefix = tmp_prefix(path)
    for old in path.parent.glob(f"{glob.escape(prefix)}*"):
        pid = old.name[len(prefix):]
        if pid.isdigit() and not _alive(int(pid)):
            old.unlink(missing_ok=True)


def save_atomic(write: Callable[[IO[bytes]], None], path: str | os.PathLike) -> None:
    """``write(f)`` into a temporary file, then ``path`` replaced by it (see the module
    docstring). A failure leaves ``path`` as it was and no temporary file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(path)
    tmp = path.with_name(f"{tmp_prefix(path)}{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def torch_save_atomic(obj, path: str | os.PathLike) -> None:
    """``torch.save(obj)`` by :func:`save_atomic`."""
    import torch

    save_atomic(lambda f: torch.save(obj, f), path)
