"""A run's files without a launch: completion record, retention, refusal, the folder lock, torn
metrics, /dev/shm clean-up among other jobs' files, and the shm op's build lock.

Real files, real processes (a holder of a lock is a live process with the file open, as torch's
FileBaton holds it); the launches themselves are in test_fault_injection.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ds_helpers import ROOT, free_port
from pretrain_bert import checkpointing
from vrgd_ds.deepspeed import launching


def fake_tag(ckpt_dir: Path, step: int) -> Path:
    folder = ckpt_dir / checkpointing.tag_for(step)
    folder.mkdir(parents=True)
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        (folder / name).write_bytes(os.urandom(64))
    return folder


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else None)
            for p in sorted(folder.rglob("*"))}


def test_retention_keeps_the_newest_n_and_removes_debris(tmp_path):
    ckpt = tmp_path / "checkpoints"
    (ckpt / "notes").mkdir(parents=True)  # not a tag folder: never touched
    for step in (2, 4, 6):
        fake_tag(ckpt, step)
        checkpointing.mark_complete(ckpt, f"step{step}", step, keep=2)
    record = checkpointing.read_complete(ckpt)
    assert record == {"tag": "step6", "step": 6, "kept": [{"tag": "step4", "step": 4}, {"tag": "step6", "step": 6}]}
    assert sorted(p.name for p in ckpt.iterdir()) == ["complete.json", "notes", "step4", "step6"]
    fake_tag(ckpt, 7)  # a save killed before it was marked
    fake_tag(ckpt, 8)
    removed = checkpointing.mark_complete(ckpt, "step8", 8, keep=1)  # keep 1: only the newest
    assert sorted(p.name for p in removed) == ["step4", "step6", "step7"]
    assert checkpointing.latest_complete(ckpt)["kept"] == [{"tag": "step8", "step": 8}]
    assert sorted(p.name for p in ckpt.iterdir()) == ["complete.json", "notes", "step8"]
    fake_tag(ckpt, 10)
    checkpointing.mark_complete(ckpt, "step10", 10, keep=0)  # 0 keeps all
    assert [k["tag"] for k in checkpointing.read_complete(ckpt)["kept"]] == ["step8", "step10"]


def test_completion_record_written_before_old_checkpoints_go(tmp_path):
    """A kill while retention deletes leaves a record that names only intact checkpoints."""
    ckpt = tmp_path / "checkpoints"
    for step in (1, 2):
        fake_tag(ckpt, step)
        checkpointing.mark_complete(ckpt, f"step{step}", step, keep=2)
    fake_tag(ckpt, 3)
    code = ("import sys; from pretrain_bert import checkpointing, faults; "
            f"checkpointing.mark_complete({str(ckpt)!r}, 'step3', 3, keep=2, fault=faults.fault)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=dict(os.environ, PRETRAIN_BERT_FAULT="prune:1"))
    assert proc.returncode == -9
    record = checkpointing.read_complete(ckpt)
    assert [k["tag"] for k in record["kept"]] == ["step2", "step3"]
    assert len(list((ckpt / "step1").iterdir())) == 1  # half deleted, and listed nowhere
    assert [p.name for p in checkpointing.remove_unlisted(ckpt)] == ["step1"]
    assert sorted(p.name for p in ckpt.iterdir()) == ["complete.json", "step2", "step3"]


def test_torn_last_metrics_line_dropped_other_damage_refused(tmp_path):
    path = tmp_path / "metrics.jsonl"
    records = [{"step": s, "loss": 10.0 - s} for s in (1, 2, 3)] + [{"step": 2, "eval_loss": 7.5}]
    whole = "".join(json.dumps(r) + "\n" for r in records)
    path.write_text(whole + '{"step": 4, "lo')
    note = checkpointing.truncate_metrics(path, 2)
    assert "dropped a torn last line" in note and str(path) in note
    assert [json.loads(line) for line in path.read_text().splitlines()] == [records[0], records[1], records[3]]
    assert checkpointing.truncate_metrics(path, 2) is None  # nothing torn now
    bad = whole.replace('"loss": 8.0', '"loss": 8.0,,')
    path.write_text(bad)
    with pytest.raises(ValueError, match=r"metrics.jsonl line 2 is not a metrics record"):
        checkpointing.truncate_metrics(path, 3)
    assert path.read_text() == bad  # left as it was


def test_fresh_run_into_a_used_folder_is_refused_untouched(tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints" / "step2").mkdir(parents=True)
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n')
    before = snapshot(out)
    with pytest.raises(FileExistsError, match=r"already holds a run \(checkpoints, metrics.jsonl\); pass --resume"):
        checkpointing.check_output_dir(out, resume=False)
    assert checkpointing.check_output_dir(out, resume=True) is None  # killed before its first checkpoint: step 0
    with pytest.raises(FileNotFoundError, match="no complete checkpoint in .* and no run in .*; check --output-dir"):
        checkpointing.check_output_dir(tmp_path / "typo", resume=True)
    assert snapshot(out) == before and not (tmp_path / "typo").exists()
    checkpointing.mark_complete(out / "checkpoints", "step2", 2)
    assert checkpointing.check_output_dir(out, resume=True)["tag"] == "step2"
    other = tmp_path / "with-config"
    other.mkdir()
    (other / "config.json").write_text("{}")  # a config put there first (benchmarks.lb_sweep) is no run
    assert checkpointing.check_output_dir(other, resume=False) is None
    with pytest.raises(NotADirectoryError):
        checkpointing.check_output_dir(other / "config.json", resume=False)


def test_one_run_per_output_folder_until_its_process_dies(tmp_path):
    code = "import sys, time; from pathlib import Path; from pretrain_bert import checkpointing; " \
           "h = checkpointing.lock_output_dir(Path(sys.argv[1])); print('locked', flush=True); time.sleep(60)"
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RuntimeError, match=rf"in use by another run \(pid {holder.pid} on "):
            checkpointing.lock_output_dir(tmp_path)
    finally:
        holder.kill()
        holder.wait()
    handle = checkpointing.lock_output_dir(tmp_path)  # SIGKILL released it
    handle.close()


# ------------------------------------------------------------------ /dev/shm buffers


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="no /dev/shm")
def test_clean_shm_removes_only_this_jobs_buffers(tmp_path):
    shm, uid, port = Path("/dev/shm"), os.getuid(), free_port()
    name = launching.shm_buffer_name
    ours = [shm / name(r, port, "127.0.0.1") for r in (0, 1)]
    foreign = [shm / name(0, port, "10.0.0.7"),                # another job: other master address
               shm / name(0, port + 1, "127.0.0.1"),           # other port
               shm / name(0, port, "127.0.0.1", uid + 1),      # another user's name
               shm / f"{name(0, port, '127.0.0.1')}x"]         # not a rank number
    live = shm / name(2, port, "127.0.0.1")                   # same fields, but a live process maps it
    chowned = shm / name(3, port, "127.0.0.1")                # our name, another user's file
    sleeper = None
    try:
        for path in ours + foreign + [live, chowned]:
            path.write_bytes(b"\0" * 4096)
        if uid == 0:
            os.chown(chowned, 65534, 65534)
        code = ("import mmap, sys, time; f = open(sys.argv[1], 'r+b'); m = mmap.mmap(f.fileno(), 4096); "
                "print('mapped', flush=True); time.sleep(60)")
        sleeper = subprocess.Popen([sys.executable, "-c", code, str(live)], stdout=subprocess.PIPE, text=True)
        assert sleeper.stdout.readline().strip() == "mapped"
        proc = subprocess.run([sys.executable, "-m", "vrgd_ds.deepspeed.launching", "clean-shm", str(port),
                               "--addr", "127.0.0.1"], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert not any(p.exists() for p in ours)
        assert all(p.exists() for p in foreign) and live.exists()
        assert f"left {live}: a live process still maps it" in proc.stderr
        if uid == 0:
            assert chowned.exists() and f"left {chowned}: owned by uid 65534" in proc.stderr
        sleeper.kill()
        sleeper.wait()
        assert launching.remove_shm_buffers(port, "127.0.0.1", ranks=3) == [live]  # exact ranks 0..2
    finally:
        if sleeper is not None:
            sleeper.kill()
            sleeper.wait()
        for path in ours + foreign + [live, chowned]:
            path.unlink(missing_ok=True)


# ------------------------------------------------------------------ the shm op's build lock


def hold_lock(lock: Path):
    """A live process holding ``lock`` exactly as torch's FileBaton does (O_EXCL, fd kept open)."""
    code = ("import os, sys, time; fd = os.open(sys.argv[1], os.O_CREAT | os.O_EXCL); "
            "print('held', flush=True); time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(lock)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_stale_lock_is_removed_a_held_one_times_out_naming_it(tmp_path):
    lock = tmp_path / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir()
    holder = hold_lock(lock)
    try:
        assert launching.lock_holders(lock) == ([holder.pid], True)
        start = time.monotonic()
        with pytest.raises(launching.LockTimeout, match=rf"{lock}: held by pid {holder.pid} .* for more than 2 s"):
            launching.wait_for_lock(lock, timeout_s=2, stale_after_s=1, poll_s=0.1)
        assert time.monotonic() - start < 10 and lock.exists()
    finally:
        holder.kill()
        holder.wait()
    assert launching.lock_holders(lock) == ([], True) and lock.exists()  # killed holder: stale lock left
    messages = []
    start = time.monotonic()
    launching.wait_for_lock(lock, timeout_s=30, stale_after_s=1, poll_s=0.1, log=messages.append)
    assert not lock.exists() and time.monotonic() - start < 10
    assert messages and f"removed stale lock {lock}" in messages[0]
    launching.wait_for_lock(lock, timeout_s=1, stale_after_s=1)  # no lock: returns at once


def test_other_ops_stale_locks_are_cleared_held_ones_left(tmp_path):
    """A launch killed while DeepSpeed built fused_adam (its CPU AdamW) left that op's lock:
    the next launch's set-up removes it; a lock a live build holds, and the shm op's own
    (prepare_shm_op's wait handles it), are left alone."""
    stale, held, shm = (tmp_path / name / "lock" for name in ("fused_adam", "cpu_adam", "deepspeed_shm_comm"))
    for lock in (stale, held, shm):
        lock.parent.mkdir()
    stale.touch()
    shm.touch()
    holder = hold_lock(held)
    messages = []
    try:
        removed = launching.clear_stale_op_locks(tmp_path, stale_after_s=1, log=messages.append)
        assert removed == [stale] and not stale.exists()
        assert held.exists() and shm.exists()
        assert len(messages) == 1 and f"removed stale lock {stale}" in messages[0] and "fused_adam" in messages[0]
    finally:
        holder.kill()
        holder.wait()


def test_filesystem_type_and_build_dir():
    assert launching.filesystem_type(Path("/proc/self")) == "proc"
    assert launching.shm_op_build_dir({"TORCH_EXTENSIONS_DIR": "/x"}) == Path("/x/deepspeed_shm_comm")
    assert launching.shm_op_build_dir({}).name == "deepspeed_shm_comm"
