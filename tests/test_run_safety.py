"""Around a launch, without one: /dev/shm clean-up among other jobs' files, and the shm op's build lock.

Real files, real processes (a holder of a lock is a live process with the file open, as torch's
FileBaton holds it); the launches themselves are in test_fault_injection.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ds_helpers import ROOT, free_port
from vrgd_ds.deepspeed import launching


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


def test_filesystem_type_and_build_dir():
    assert launching.filesystem_type(Path("/proc/self")) == "proc"
    assert launching.shm_op_build_dir({"TORCH_EXTENSIONS_DIR": "/x"}) == Path("/x/deepspeed_shm_comm")
    assert launching.shm_op_build_dir({}).name == "deepspeed_shm_comm"
