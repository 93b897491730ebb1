"""Set-up and clean-up around DeepSpeed launches (demo, launch scripts, tests, run_pretraining).

:func:`run_local` / :func:`local_launch` are the one way this repository starts a local
``deepspeed --num_gpus`` launch from Python (demo, benchmarks, tests).

DeepSpeed 0.19's CPU shared-memory all-reduce (op ``deepspeed_shm_comm``) leaves two things
behind when a launch ends or is killed; this module names them exactly and handles both.

**The build lock.** Every rank loads the op through ``torch.utils.cpp_extension.load``, which
takes a ``FileBaton``: ``<torch extensions dir>/deepspeed_shm_comm/lock``, created with
``O_EXCL`` and kept open until the build step ends. A rank that finds the file waits, without a
limit or a word, until it disappears; a launch killed while one of its ranks held it leaves
it forever. The holder keeps the file open from creation to removal, so a lock that no live
process on this host has open (``/proc/*/fd``) is stale. :func:`prepare_shm_op` (launch side,
before any rank starts) removes a stale lock, its own and those of DeepSpeed's other JIT ops
(``fused_adam``, ``cpu_adam``: the same wait, when an optimizer builds one), and builds/loads
the op once in a child process with a timeout; :func:`guard_shm_op_lock` (rank side, around ``deepspeed.init_distributed``)
removes a lock that stays unheld for ``stale_after_s`` and otherwise fails, naming the lock,
after ``VRGD_SHM_LOCK_TIMEOUT`` seconds. On a file system that may be shared between hosts
(NFS, Lustre, ...) a holder elsewhere is invisible, so there the lock is never removed: the
wait ends with an error that names it and the fix.

**The buffers.** One 69 MB file per rank in /dev/shm (tmpfs, i.e. memory), never removed:
``deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>`` (``shm.cpp``), made
only when all ranks are on one host. :func:`remove_shm_buffers` deletes one launch's files by
exact name, never another user's or a file a live process still maps, and never raises.
"""

from __future__ import annotations

import contextlib
import glob
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

SHM_OP = "deepspeed_shm_comm"
SHM_DIR = Path("/dev/shm")
SHM_PREFIX = "deepspeed_allreduce_buffer"
LOCK_TIMEOUT_ENV = "VRGD_SHM_LOCK_TIMEOUT"      # seconds a rank or the set-up waits on a held lock
LOCK_STALE_ENV = "VRGD_SHM_LOCK_STALE_AFTER"    # seconds a lock must stay unheld to count as stale
DEFAULT_TIMEOUT_S, DEFAULT_STALE_AFTER_S = 900.0, 3.0
LOCK_EXIT_CODE = 75                             # a rank that gives up on the lock exits with this
BUILD_SHM_OP = "from deepspeed.comm.torch import build_shm_op; build_shm_op()"  # what each rank runs
# file systems whose every opener is on this host; anything else may hide a remote holder
LOCAL_FILESYSTEMS = frozenset({"ext2", "ext3", "ext4", "xfs", "btrfs", "tmpfs", "overlay", "zfs", "f2fs",
                               "jfs", "reiserfs", "vfat", "exfat", "ramfs"})


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now (for --master_port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------ /dev/shm buffers


def shm_buffer_name(rank: int, port: int | str, addr: str = "127.0.0.1", uid: int | None = None) -> str:
    """DeepSpeed's name for one rank's buffer (``shm.cpp``: prefix_uid_addr_port_rank)."""
    return f"{SHM_PREFIX}_{os.getuid() if uid is None else uid}_{addr}_{port}_{rank}"


def _mapped_shm_names(shm_dir: Path = SHM_DIR) -> set[str]:
    """Names of buffer files in ``shm_dir`` that some live process maps (what /proc lets us read)."""
    names, prefix = set(), f"{os.path.realpath(shm_dir)}/{SHM_PREFIX}"
    for maps in glob.glob("/proc/[0-9]*/maps"):
        with contextlib.suppress(OSError):
            with open(maps, errors="replace") as f:
                for line in f:
                    if prefix in line:
                        names.add(line.rsplit("/", 1)[1].split()[0])
    return names


def remove_shm_buffers(port: int | str | None = None, addr: str | None = None, ranks: int | None = None,
                       *, shm_dir: Path = SHM_DIR, log=None) -> list[Path]:
    """Delete one launch's buffers: this uid, ``addr`` (default $MASTER_ADDR or 127.0.0.1),
    ``port`` (default $MASTER_PORT) and ranks ``0..ranks-1`` (default: any rank number).

    Skipped, with a line to ``log`` (stderr): files owned by another user and files still
    mapped by a live process (another job that reuses the address and port). Never raises;
    returns the removed paths."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    port = port if port is not None else os.environ.get("MASTER_PORT")
    if not port:
        return []
    addr = addr or os.environ.get("MASTER_ADDR") or "127.0.0.1"
    uid = os.getuid()
    if ranks is None:
        prefix = shm_buffer_name("", port, addr, uid)
        paths = [p for p in Path(shm_dir).glob(glob.escape(prefix) + "*") if p.name[len(prefix):].isdigit()]
    else:
        paths = [Path(shm_dir) / shm_buffer_name(r, port, addr, uid) for r in range(ranks)]
    mapped, removed = None, []
    for path in paths:
        try:
            st = path.lstat()
        except OSError:
            continue
        if st.st_uid != uid:
            log(f"[clean-shm] left {path}: owned by uid {st.st_uid}, not {uid}")
            continue
        mapped = _mapped_shm_names(shm_dir) if mapped is None else mapped
        if path.name in mapped:
            log(f"[clean-shm] left {path}: a live process still maps it (another job on port {port}?)")
            continue
        try:
            path.unlink()
            removed.append(path)
        except FileNotFoundError:
            pass
        except OSError as err:
            log(f"[clean-shm] could not remove {path}: {err}")
    return removed


def remove_own_shm_buffer() -> None:
    """In a rank, at the end: delete this rank's own buffer (its mapping stays valid)."""
    env = os.environ
    if "RANK" in env and "MASTER_PORT" in env:
        path = SHM_DIR / shm_buffer_name(env["RANK"], env["MASTER_PORT"], env.get("MASTER_ADDR", ""))
        with contextlib.suppress(OSError):
            if path.lstat().st_uid == os.getuid():
                path.unlink()


# ------------------------------------------------------------------ the op's build lock


class LockTimeout(TimeoutError):
    """The shm op's build lock was held (or could not be judged) for longer than allowed."""


def _env_seconds(name: str, default: float) -> float:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        seconds = float(value)
    except ValueError:
        raise ValueError(f"{name} must be a number of seconds, got {value!r}") from None
    if not seconds > 0:
        raise ValueError(f"{name} must be > 0 seconds, got {value!r}")
    return seconds


def shm_op_build_dir(env: dict | None = None) -> Path:
    """Where torch builds DeepSpeed's shm op (torch's ``_get_build_directory`` rule, torch 2.4-2.13)."""
    env = os.environ if env is None else env
    root = env.get("TORCH_EXTENSIONS_DIR")
    if root is None:
        import torch
        from torch.utils.cpp_extension import get_default_build_root

        accel = (f"rocm{torch.version.hip.replace('.', '')}" if torch.version.hip else
                 f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else "cpu")
        py = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
        root = os.path.join(get_default_build_root(), f"{py}_{accel}")
    return Path(root) / SHM_OP


def filesystem_type(path: Path) -> str:
    """The type of the mount that holds ``path`` (/proc/self/mountinfo), or "unknown"."""
    real, best, fstype = os.path.realpath(path), "", "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            fields = line.split(" - ")
            mount = fields[0].split()[4].replace("\\040", " ")
            inside = real == mount or real.startswith(mount.rstrip("/") + "/")
            if inside and len(mount) >= len(best) and len(fields) > 1:
                best, fstype = mount, fields[1].split()[0]
    return fstype


def lock_holders(lock: Path) -> tuple[list[int], bool]:
    """(pids on this host that have ``lock`` open, whether that list can be trusted).

    Not trusted when the file system may be shared with other hosts, or when the lock belongs
    to another user whose processes we cannot inspect."""
    try:
        st = os.stat(lock)
    except FileNotFoundError:
        return [], True
    trusted = (os.geteuid() in (0, st.st_uid)) and filesystem_type(lock) in LOCAL_FILESYSTEMS
    pids = []
    for fd_dir in glob.glob("/proc/[0-9]*/fd"):
        with contextlib.suppress(OSError):
            for fd in os.listdir(fd_dir):
                link = f"{fd_dir}/{fd}"
                with contextlib.suppress(OSError):
                    if os.readlink(link).split(" (deleted)")[0].endswith("/lock"):
                        held = os.stat(link)
                        if (held.st_dev, held.st_ino) == (st.st_dev, st.st_ino):
                            pids.append(int(fd_dir.split("/")[2]))
                            break
    return pids, trusted


def _describe(pids: list[int]) -> str:
    out = []
    for pid in pids[:3]:
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            cmd = "?"
        out.append(f"pid {pid} ({cmd.strip()[:80]})")
    return ", ".join(out)


def _timeout_message(lock: Path, pids: list[int], trusted: bool, waited: float) -> str:
    if pids:
        return (f"{lock}: held by {_describe(pids)} for more than {waited:.0f} s while building DeepSpeed's "
                f"{SHM_OP} op; if that process is stuck, stop it (the next launch then removes its lock), "
                f"or allow longer with {LOCK_TIMEOUT_ENV}=SECONDS")
    return (f"{lock}: waited {waited:.0f} s and cannot tell whether a build still holds it (file system "
            f"{filesystem_type(lock)!r}, maybe shared with other hosts, or owned by another user); if no "
            f"DeepSpeed launch is building the {SHM_OP} op, remove it: rm {lock}")


def wait_for_lock(lock: Path, timeout_s: float | None = None, stale_after_s: float | None = None, *,
                  poll_s: float = 0.5, stop: threading.Event | None = None, log=None) -> None:
    """Return once ``lock`` is gone, removing it when it stays unheld for ``stale_after_s``;
    raise LockTimeout, naming it and its holders, after ``timeout_s``."""
    timeout_s = _env_seconds(LOCK_TIMEOUT_ENV, DEFAULT_TIMEOUT_S) if timeout_s is None else timeout_s
    stale_after_s = _env_seconds(LOCK_STALE_ENV, DEFAULT_STALE_AFTER_S) if stale_after_s is None else stale_after_s
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    start, free_since, seen = time.monotonic(), None, None
    while stop is None or not stop.is_set():
        try:
            st = os.stat(lock)
        except FileNotFoundError:
            return
        pids, trusted = lock_holders(lock)
        now, key = time.monotonic(), (st.st_dev, st.st_ino)
        if pids or not trusted or key != seen:
            free_since = None if pids or not trusted else now
            seen = key
        if free_since is not None and now - free_since >= stale_after_s:
            # a holder keeps the file open from O_EXCL creation to removal: nobody will remove this one
            with contextlib.suppress(FileNotFoundError):
                again = os.stat(lock)
                if (again.st_dev, again.st_ino) == key:
                    os.unlink(lock)
                    log(f"[vrgd-ds] removed stale lock {lock}: no process had it open for "
                        f"{stale_after_s:.0f} s (left by a launch killed while building or loading "
                        f"{lock.parent.name})")
            return
        if now - start >= timeout_s:
            raise LockTimeout(_timeout_message(lock, pids, trusted, now - start))
        time.sleep(poll_s)


def uses_cpu_accelerator(env: dict | None = None) -> bool:
    """Whether DeepSpeed will run on its CPU accelerator (the only one that builds the shm op)."""
    env = os.environ if env is None else env
    if env.get("DS_ACCELERATOR"):
        return env["DS_ACCELERATOR"] == "cpu"
    import torch

    return not torch.cuda.is_available()


def launcher_python() -> str:
    """The interpreter the `deepspeed` script next to ours starts ranks with (its shebang), or ours.
    The build must use the ranks' interpreter: torch rebuilds the op for another torch path."""
    with contextlib.suppress(OSError, IndexError):
        with open(Path(sys.executable).parent / "deepspeed", "rb") as script:
            first = script.readline(4096).decode(errors="replace")
        python = first[2:].split()[0] if first.startswith("#!") else ""
        if python and os.access(python, os.X_OK) and "python" in Path(python).name:
            return python
    return sys.executable


def prepare_shm_op(timeout_s: float | None = None, env: dict | None = None, log=None) -> Path | None:
    """Launch side, before any rank starts: clear a stale lock, then build/load the op once in a
    child process within ``timeout_s``. Returns the build folder (None when not on CPU).

    Raises LockTimeout (naming the lock, its holders and the fix) or RuntimeError (the build's
    output) instead of letting the ranks wait."""
    env = dict(os.environ if env is None else env)
    if not uses_cpu_accelerator(env):
        return None
    timeout_s = _env_seconds(LOCK_TIMEOUT_ENV, DEFAULT_TIMEOUT_S) if timeout_s is None else timeout_s
    lock = shm_op_build_dir(env) / "lock"
    start = time.monotonic()
    clear_stale_op_locks(lock.parent.parent, log=log)
    wait_for_lock(lock, timeout_s, log=log)
    env.setdefault("DS_ACCELERATOR", "cpu")
    proc = subprocess.Popen([launcher_python(), "-c", BUILD_SHM_OP], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=max(1.0, timeout_s - (time.monotonic() - start)))
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        with contextlib.suppress(LockTimeout):
            wait_for_lock(lock, 10.0, log=log)  # the killed build's lock, if it had taken it
        raise LockTimeout(f"building DeepSpeed's {SHM_OP} op in {lock.parent} took more than {timeout_s:.0f} s "
                          f"and was stopped; allow longer with {LOCK_TIMEOUT_ENV}=SECONDS") from None
    if proc.returncode != 0:
        raise RuntimeError(f"building DeepSpeed's {SHM_OP} op in {lock.parent} failed (exit {proc.returncode}):\n"
                           f"{output[-3000:]}")
    return lock.parent


def clear_stale_op_locks(root: Path, stale_after_s: float | None = None, log=None) -> list[Path]:
    """Remove the stale build locks of DeepSpeed's other JIT ops in torch's extensions folder
    ``root`` (``fused_adam``, which DeepSpeed's own Adam/AdamW builds on CPU, ``cpu_adam``, ...):
    a launch killed while a rank built one leaves its lock, and the next launch would wait
    forever when it builds that op. Only locks no process on this host has open, on a local
    file system, for ``stale_after_s`` are removed; a lock held by a live build is left to it.
    Returns the removed paths."""
    stale_after_s = _env_seconds(LOCK_STALE_ENV, DEFAULT_STALE_AFTER_S) if stale_after_s is None else stale_after_s
    removed = []
    for lock in sorted(Path(root).glob("*/lock")):
        if lock.parent.name == SHM_OP:
            continue  # prepare_shm_op's own wait handles it
        pids, trusted = lock_holders(lock)
        if pids or not trusted:
            continue
        with contextlib.suppress(LockTimeout):
            wait_for_lock(lock, stale_after_s + 5.0, stale_after_s, log=log)
        if not lock.exists():
            removed.append(lock)
    return removed


@contextlib.contextmanager
def guard_shm_op_lock(timeout_s: float | None = None, stale_after_s: float | None = None):
    """Rank side, around ``deepspeed.init_distributed``: while DeepSpeed loads the op, watch its
    lock; remove it when stale, or print why and exit with LOCK_EXIT_CODE after ``timeout_s``
    (the launcher then stops the other ranks) instead of waiting forever."""
    if not uses_cpu_accelerator():
        yield
        return
    lock, done = shm_op_build_dir() / "lock", threading.Event()
    timeout_s = _env_seconds(LOCK_TIMEOUT_ENV, DEFAULT_TIMEOUT_S) if timeout_s is None else timeout_s
    stale_after_s = _env_seconds(LOCK_STALE_ENV, DEFAULT_STALE_AFTER_S) if stale_after_s is None else stale_after_s

    def watch():
        while not done.wait(0.5):
            try:
                wait_for_lock(lock, timeout_s, stale_after_s, stop=done)
            except LockTimeout as err:
                print(f"[vrgd-ds] rank {os.environ.get('RANK', '?')}: giving up: {err}", file=sys.stderr, flush=True)
                os._exit(LOCK_EXIT_CODE)  # the main thread is inside torch's FileBaton.wait, which has no limit

    watcher = threading.Thread(target=watch, name="shm-op-lock-watch", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()
        watcher.join()


# ------------------------------------------------------------------ local launches


_PREPARED: set = set()


def launch_env(extra: dict | None = None, base: dict | None = None, pythonpath: str | Path | None = None) -> dict:
    """The environment of a local launch: ``base`` (default os.environ) with ``pythonpath``
    first on PYTHONPATH, DS_ACCELERATOR defaulting to ``cpu``, OMP_NUM_THREADS=1 for CPU ranks
    unless set (2 ranks on a small machine would otherwise oversubscribe), then ``extra``."""
    env = dict(os.environ if base is None else base)
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(pythonpath), env.get("PYTHONPATH", "")) if p)
    env.setdefault("DS_ACCELERATOR", "cpu")
    if env["DS_ACCELERATOR"] == "cpu":
        env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra or {})
    return env


@contextlib.contextmanager
def local_launch(script: str | Path, args=(), ranks: int = 2, env: dict | None = None, prepare: bool = True,
                 launcher_args=()):
    """``deepspeed --num_gpus RANKS --master_port PORT SCRIPT ARGS`` on this host, set up and
    cleaned up: yields ``(cmd, env)`` to run however the caller likes (``subprocess.run``,
    ``Popen`` to kill it, ...). Before: DeepSpeed's CPU shm op is prepared once per process and
    extensions folder (:func:`prepare_shm_op`: a stale lock or a hung build fails here, named,
    not silently in the ranks; ``prepare=False`` leaves the lock to the ranks' own guard); a free
    port. After, also on errors and kills: that launch's /dev/shm buffers are removed by exact
    name. ``launcher_args`` go to the ``deepspeed`` launcher (``--log_level error``, ...)."""
    env = launch_env() if env is None else env
    key = (env.get("TORCH_EXTENSIONS_DIR"), env.get("DS_ACCELERATOR"))
    if prepare and key not in _PREPARED:
        prepare_shm_op(env=env)
        _PREPARED.add(key)
    port = free_port()
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(ranks), "--master_port", str(port),
           *map(str, launcher_args), str(script), *map(str, args)]
    try:
        yield cmd, env
    finally:
        remove_shm_buffers(port, "127.0.0.1", ranks)


def run_local(script: str | Path, args=(), ranks: int = 2, env: dict | None = None, **run_kwargs):
    """:func:`local_launch` run to the end with ``subprocess.run(cmd, env=env, **run_kwargs)``."""
    with local_launch(script, args, ranks, env) as (cmd, env):
        return subprocess.run(cmd, env=env, **run_kwargs)


# ------------------------------------------------------------------ command line


def main(argv=None) -> None:
    """Shell scripts' access: ``free-port`` prints a free port; ``prepare-shm-op`` clears a stale
    lock and builds DeepSpeed's CPU shm op before a launch; ``clean-shm PORT`` removes that
    launch's /dev/shm buffers (launch/*.sh call it on exit)."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m vrgd_ds.deepspeed.launching", description=main.__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("free-port")
    prep = sub.add_parser("prepare-shm-op")
    prep.add_argument("--timeout", type=float, default=None, help=f"seconds (default ${LOCK_TIMEOUT_ENV} or "
                                                                  f"{DEFAULT_TIMEOUT_S:.0f})")
    clean = sub.add_parser("clean-shm")
    clean.add_argument("port", type=int)
    clean.add_argument("--addr", default=None, help="MASTER_ADDR of the launch (default $MASTER_ADDR or 127.0.0.1)")
    clean.add_argument("--ranks", type=int, default=None, help="world size (default: any rank number)")
    args = ap.parse_args(argv)
    if args.cmd == "free-port":
        print(free_port())
    elif args.cmd == "prepare-shm-op":
        try:
            folder = prepare_shm_op(args.timeout)
        except (LockTimeout, RuntimeError) as err:
            sys.exit(f"prepare-shm-op: {err}")
        print(f"DeepSpeed's {SHM_OP} op is ready in {folder}" if folder else "not on CPU: no shm op to build")
    else:
        remove_shm_buffers(args.port, args.addr, args.ranks)


if __name__ == "__main__":
    main()
