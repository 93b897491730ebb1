"""A pretraining run's folder: which checkpoint is complete, retention, metrics, one writer.

    OUT/.run.lock              held (flock) by rank 0 while a run writes OUT
    OUT/metrics.jsonl          one JSON record per line, appended
    OUT/checkpoints/step<N>/   DeepSpeed's files for step N; a tag is written once, never rewritten
    OUT/checkpoints/complete.json   {"tag", "step", "kept": [{"tag", "step"}, ... oldest first]}

DeepSpeed writes a checkpoint as several files per rank; a run killed in between leaves a
half-written tag folder. Each rank fsyncs the files and the folder after ``save_checkpoint``,
then all meet at a barrier, and only then rank 0 writes ``complete.json`` (temporary file,
fsync, ``os.replace``, fsync of the folder), so it always names checkpoints whose files are
all on disk. ``--resume`` trusts only that file. Tag folders it does not list are debris of
killed saves or checkpoints retention dropped: they are deleted (:func:`remove_unlisted`)
before anything is saved under their names again, so no tag is ever rewritten in place.
Retention keeps the newest ``keep`` complete checkpoints; the newest is never deleted, and
the record is written before anything it no longer lists is removed.
:func:`carry_optimizer_state` loads another run's final optimizer state (phase 1 -> phase 2).
The durable-write helpers (fsync, atomic write) are :mod:`pretrain_bert.runtime`'s.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import socket
import time
from pathlib import Path

from pretrain_bert.runtime import atomic_write, fsync_dir

COMPLETE = "complete.json"
RUN_LOCK = ".run.lock"
RUN_OUTPUTS = ("metrics.jsonl", "run.json", "checkpoints", "hf")  # what a run writes into OUT
TAG = re.compile(r"step(\d+)")


def tag_for(step: int) -> str:
    return f"step{step}"


def read_complete(ckpt_dir: str | Path) -> dict | None:
    """complete.json as {"tag", "step", "kept"} (older records without "kept" keep just their tag)."""
    path = Path(ckpt_dir) / COMPLETE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        record.setdefault("kept", [{"tag": record["tag"], "step": record["step"]}])
    except (json.JSONDecodeError, KeyError, AttributeError, TypeError) as err:
        raise ValueError(f"{path} is not a completion record ({err}); it is written atomically, so "
                         "something else wrote it") from None
    return record


def latest_complete(ckpt_dir: str | Path) -> dict | None:
    """The completion record of the newest complete checkpoint, or None."""
    found = read_complete(ckpt_dir)
    if found is not None and not (Path(ckpt_dir) / found["tag"]).is_dir():
        raise FileNotFoundError(f"{Path(ckpt_dir) / COMPLETE} names checkpoint {found['tag']!r}, which is missing")
    return found


def mark_complete(ckpt_dir: str | Path, tag: str, step: int, keep: int = 0, fault=None) -> list[Path]:
    """Record ``tag`` (all ranks saved and synced it) as the newest complete checkpoint, keeping
    the newest ``keep`` (0: all); then delete what the record no longer lists. Rank 0 only."""
    ckpt_dir = Path(ckpt_dir)
    fsync_dir(ckpt_dir)  # the new tag folder's entry
    previous = read_complete(ckpt_dir)
    kept = [k for k in (previous["kept"] if previous else []) if k["tag"] != tag] + [{"tag": tag, "step": step}]
    if keep:
        kept = kept[-keep:]
    atomic_write(ckpt_dir / COMPLETE, json.dumps({"tag": tag, "step": step, "kept": kept}))
    return remove_unlisted(ckpt_dir, fault=fault)


def remove_unlisted(ckpt_dir: str | Path, fault=None) -> list[Path]:
    """Delete the ``step<N>`` folders complete.json does not list: debris of killed saves and
    checkpoints retention dropped. Other names are left alone. Rank 0, while no rank saves."""
    ckpt_dir = Path(ckpt_dir)
    record = read_complete(ckpt_dir)
    listed = {k["tag"] for k in record["kept"]} if record else set()
    removed = []
    for folder in sorted(ckpt_dir.iterdir()) if ckpt_dir.is_dir() else []:
        if folder.is_dir() and TAG.fullmatch(folder.name) and folder.name not in listed:
            for root, _dirs, files in os.walk(folder):
                for name in files:
                    os.unlink(os.path.join(root, name))
                    if fault:
                        fault("prune")
            shutil.rmtree(folder)
            removed.append(folder)
    if removed:
        fsync_dir(ckpt_dir)
    return removed


def check_output_dir(out: Path, resume: bool) -> dict | None:
    """Refuse a fresh run into a folder that holds a run's outputs, and ``--resume`` of a folder
    that holds none (a wrong path), before anything is written. Other files (a config put
    there) are allowed. Returns the completion record to resume from, or None to start at
    step 0 (also a resume of a run killed before its first complete checkpoint)."""
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--output-dir {str(out)!r} exists and is not a folder")
    used = sorted(p.name for p in out.iterdir() if p.name in RUN_OUTPUTS) if out.is_dir() else []
    if not resume:
        if used:
            raise FileExistsError(
                f"--output-dir {str(out)!r} already holds a run ({', '.join(used[:4])}); pass --resume to "
                "continue it from its newest complete checkpoint, or choose another --output-dir "
                "(nothing was changed)")
        return None
    found = latest_complete(out / "checkpoints")
    if found is None and not used:
        raise FileNotFoundError(f"--resume: no complete checkpoint in {out / 'checkpoints'} and no run in "
                                f"{str(out)!r}; check --output-dir")
    return found


def lock_output_dir(out: Path):
    """Create ``out`` and hold an exclusive flock on OUT/.run.lock for this process's life (the
    kernel drops it when the process dies, SIGKILL included). Returns the open file."""
    out.mkdir(parents=True, exist_ok=True)
    handle = open(out / RUN_LOCK, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown process"
        handle.close()
        raise RuntimeError(f"--output-dir {str(out)!r} is in use by another run ({holder}); wait for it "
                           "to end or stop it first") from None
    handle.truncate(0)
    handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    handle.flush()
    return handle


def truncate_metrics(path: str | Path, step: int) -> str | None:
    """Drop the records after ``step`` (a resumed run writes them again) and a torn last line
    (an append killed mid-write). Returns a note about a dropped torn line, else None."""
    path = Path(path)
    if not path.is_file():
        return None
    lines = path.read_text(errors="replace").splitlines(keepends=True)
    kept, note = [], None
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
            record_step = record["step"]
        except (json.JSONDecodeError, KeyError, TypeError):
            if number == len(lines) and not line.endswith("\n"):
                note = f"dropped a torn last line of {path} ({len(line)} characters, an append killed mid-write)"
                continue
            raise ValueError(f"{path} line {number} is not a metrics record ({line[:80]!r}); only a torn last "
                             "line is dropped on --resume, so this file was changed by something else") from None
        if record_step <= step:
            kept.append(line if line.endswith("\n") else line + "\n")
    atomic_write(path, "".join(kept))
    return note


CARRIED = ".carried_optimizer.pt"  # in the run folder while --carry-optimizer-state loads it


def carry_optimizer_state(engine, init_checkpoint: str | Path, work_dir: str | Path) -> None:
    """Phase 1's final optimizer state (any world size) into this engine; fresh LR schedule.

    ``init_checkpoint`` is phase 1's ``hf/`` folder; its newest complete checkpoint is read from
    the ``checkpoints/`` folder beside it (``--carry-optimizer-state``). Rank 0 consolidates it
    into ``work_dir/.carried_optimizer.pt``; every rank then loads that file memory-mapped,
    reading only the pieces its partitions hold (not a whole consolidation each), and the file
    is removed once all ranks have loaded. Every rank raises if any rank failed."""
    import torch.distributed as dist

    from vrgd_ds.deepspeed.checkpoint import load_consolidated, save_consolidated

    ckpt_dir = Path(init_checkpoint).parent / "checkpoints"
    path = Path(work_dir) / CARRIED
    error = None
    if dist.get_rank() == 0:
        try:
            found = latest_complete(ckpt_dir)
            if found is None:
                raise FileNotFoundError(f"--carry-optimizer-state: no complete checkpoint in {ckpt_dir}")
            save_consolidated(ckpt_dir / found["tag"], path)
        except Exception as e:  # noqa: BLE001 - every rank raises it below
            error = f"rank 0: {type(e).__name__}: {e}"
    box = [error]
    dist.broadcast_object_list(box, src=0)
    if box[0] is None:
        try:
            load_consolidated(engine, path, engine_state=False, hyperparameters=False)
        except Exception as e:  # noqa: BLE001
            error = f"rank {dist.get_rank()}: {type(e).__name__}: {e}"
    errors: list = [None] * dist.get_world_size()
    dist.all_gather_object(errors, box[0] or error)
    if dist.get_rank() == 0:
        path.unlink(missing_ok=True)
    failed = [e for e in errors if e is not None]
    if failed:
        raise RuntimeError(f"--carry-optimizer-state failed on {failed[0]}")
