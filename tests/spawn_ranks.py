"""Start W gloo ranks with torch.multiprocessing and collect what each saved (tests only)."""

from __future__ import annotations

import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def started(out_dir, rank: int) -> None:
    """A worker calls this after init_process_group and a first barrier: from then on a
    failure is a failure, not a start-up abort to retry."""
    dist.barrier()
    (Path(out_dir) / f"rank{rank}.started").touch()


def save_results(out_dir, rank: int, compute: Callable[[], dict]) -> None:
    """Save ``compute()`` as ``rank{rank}.pt``; if it raises, save the traceback as
    ``{"error": ...}`` (which :func:`spawn_ranks` fails with) and re-raise."""
    path = Path(out_dir) / f"rank{rank}.pt"
    try:
        results = compute()
    except Exception:
        torch.save({"error": traceback.format_exc()}, path)
        raise
    torch.save(results, path)


def startup_abort(err, out_dir) -> bool:
    """The one failure worth a retry: a rank killed by SIGABRT (gloo, now and then, on this CPU
    machine) before it finished start-up (init_process_group and a first barrier)."""
    return (isinstance(err, mp.ProcessExitedException) and err.signal_name == "SIGABRT"
            and not (Path(out_dir) / f"rank{err.error_index}.started").exists())


DEADLINE_S = 900.0  # the longest spawn of the suite takes under a minute on 2 cores


def _join(context, worker, deadline_s: float) -> None:
    """Wait for every rank, at most ``deadline_s``: then kill those still running (a
    collective that never completes) and fail, naming them."""
    deadline = time.monotonic() + deadline_s
    while not context.join(timeout=5.0):
        if time.monotonic() > deadline:
            alive = [r for r, p in enumerate(context.processes) if p.is_alive()]
            for p in context.processes:
                if p.is_alive():
                    p.kill()
            raise TimeoutError(f"spawn_ranks: {getattr(worker, '__name__', worker)}: ranks {alive} still running "
                               f"after {deadline_s:.0f} s (waiting in a collective?); killed")


def spawn_ranks(worker, world: int, out_dir: Path, attempts: int = 4, deadline_s: float = DEADLINE_S) -> list[dict]:
    """``mp.spawn(worker, (init_file, out_dir), world)``; each rank saves ``rank{r}.pt``.

    Only a start-up abort (see :func:`startup_abort`) is retried, and each retry is logged;
    anything else (an exception, a crash after start-up, a saved ``"error"``, ranks still
    running after ``deadline_s``) fails at once."""
    for attempt in range(attempts):
        for f in [*out_dir.glob("rank*.pt"), *out_dir.glob("rank*.started")]:
            f.unlink()
        try:
            _join(mp.spawn(worker, args=(str(out_dir / f"init{attempt}"), str(out_dir)), nprocs=world, join=False),
                  worker, deadline_s)
            break
        except mp.ProcessExitedException as err:
            if not startup_abort(err, out_dir) or attempt == attempts - 1:
                raise
            message = (f"rank {err.error_index} aborted (SIGABRT) during gloo start-up; "
                       f"retry {attempt + 2}/{attempts}")
            print(f"[spawn_ranks] {message}", file=sys.stderr)
            warnings.warn(message)
    out = [torch.load(out_dir / f"rank{r}.pt") for r in range(world)]
    errors = [r["error"] for r in out if isinstance(r, dict) and "error" in r]
    assert not errors, errors[0]
    return out
