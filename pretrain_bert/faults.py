"""Test hook: SIGKILL a rank at a named point of a pretraining run (tests/test_fault_injection.py).

``PRETRAIN_BERT_FAULT=POINT:N[:RANK]`` kills the process with SIGKILL (no clean-up, no flush,
as a node failure or ``kill -9`` would) the N-th time it reaches POINT, on global rank RANK
(default: every rank). Without the variable every call is one dictionary look-up.

Points: ``micro`` (after a micro-step, mid-accumulation), ``eval`` (after an eval batch),
``metrics`` (half of a metrics.jsonl line written), ``torch-save`` (half of one of DeepSpeed's
checkpoint files written), ``saved`` (this rank's files written, not yet synced),
``before-mark`` (all ranks synced, complete.json not yet written), ``prune`` (after deleting
one file of a checkpoint retention dropped), ``consolidated`` / ``hf-written`` / ``hf-swap``
(exporting hf/: after consolidation, after writing the new folder, between the two renames).
"""

from __future__ import annotations

import os
import signal

ENV = "PRETRAIN_BERT_FAULT"
POINTS = ("micro", "eval", "metrics", "torch-save", "saved", "before-mark", "prune", "consolidated",
          "hf-written", "hf-swap")
_counts: dict[str, int] = {}


def _target() -> tuple[str, int] | None:
    spec = os.environ.get(ENV)
    if not spec:
        return None
    point, n, *rank = spec.split(":")
    if point not in POINTS or not n.isdigit() or len(rank) > 1:
        raise ValueError(f"{ENV} must be POINT:N[:RANK] with POINT one of {', '.join(POINTS)}, got {spec!r}")
    if rank and rank[0] != os.environ.get("RANK", "0"):
        return None
    return point, int(n)


def _hit(point: str) -> bool:
    """Count a hit of ``point``; True when it is the configured one."""
    target = _target()
    if target is None or target[0] != point:
        return False
    _counts[point] = _counts.get(point, 0) + 1
    return _counts[point] == target[1]


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def fault(point: str) -> None:
    """SIGKILL this process if this is the configured hit of ``point``."""
    if _hit(point):
        _die()


def torn_append(path, text: str) -> None:
    """Append ``text``; at the configured ``metrics`` hit only its first half, then SIGKILL."""
    with open(path, "a") as f:
        if _hit("metrics"):
            f.write(text[:len(text) // 2])
            f.flush()
            _die()
        f.write(text)


def install_torch_save_fault() -> None:
    """For ``torch-save``: wrap torch.save so that the configured call writes half of its bytes
    to the file, then SIGKILLs (a torn DeepSpeed checkpoint file)."""
    target = _target()
    if target is None or target[0] != "torch-save":
        return
    import io

    import torch

    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if _hit("torch-save") and isinstance(f, (str, os.PathLike)):
            buffer = io.BytesIO()
            real_save(obj, buffer, *args, **kwargs)
            with open(f, "wb") as out:
                out.write(buffer.getvalue()[:len(buffer.getvalue()) // 2])
            _die()
        return real_save(obj, f, *args, **kwargs)

    torch.save = save
