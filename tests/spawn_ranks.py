"""Start W gloo ranks with torch.multiprocessing and collect what each saved (tests only)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.multiprocessing as mp


def spawn_ranks(worker, world: int, out_dir: Path, attempts: int = 4) -> list[dict]:
    """``mp.spawn(worker, (init_file, out_dir), world)``; each rank saves ``rank{r}.pt``.

    gloo on this CPU machine now and then aborts a rank at start-up (SIGABRT), so a failed
    start is retried; a real error in the worker (a saved ``"error"``) fails at once."""
    for attempt in range(attempts):
        for f in out_dir.glob("rank*.pt"):
            f.unlink()
        try:
            mp.spawn(worker, args=(str(out_dir / f"init{attempt}"), str(out_dir)), nprocs=world)
            break
        except (mp.ProcessExitedException, mp.ProcessRaisedException):
            errors = [r["error"] for r in _saved(out_dir) if "error" in r]
            assert not errors, errors[0]
            if attempt == attempts - 1:
                raise
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(world)]


def _saved(out_dir: Path) -> list[dict]:
    return [torch.load(f) for f in sorted(out_dir.glob("rank*.pt"))]
