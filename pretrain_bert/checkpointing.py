"""Which checkpoint is complete, and keeping metrics.jsonl consistent with it.

DeepSpeed writes a checkpoint as several files per rank and then its own ``latest``
file; a run killed in between leaves a half-written tag folder. After every rank has
returned from ``save_checkpoint`` (a barrier), rank 0 writes ``complete.json`` through a
temporary file and ``os.replace``, so it always names a checkpoint whose files are all
there. ``--resume`` trusts only that file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

COMPLETE = "complete.json"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def mark_complete(ckpt_dir: str | Path, tag: str, step: int) -> None:
    _atomic_write(Path(ckpt_dir) / COMPLETE, json.dumps({"tag": tag, "step": step}))


def latest_complete(ckpt_dir: str | Path) -> dict | None:
    """{"tag", "step"} of the newest complete checkpoint, or None."""
    path = Path(ckpt_dir) / COMPLETE
    if not path.is_file():
        return None
    found = json.loads(path.read_text())
    if not (Path(ckpt_dir) / found["tag"]).is_dir():
        raise FileNotFoundError(f"{path} names checkpoint {found['tag']!r}, which is missing")
    return found


def truncate_metrics(path: str | Path, step: int) -> None:
    """Drop records after ``step`` (a resumed run writes them again)."""
    path = Path(path)
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    _atomic_write(path, "".join(line + "\n" for line in kept))
