"""Launch real processes from tests: DeepSpeed ranks (2 CPU ranks, gloo), ``python -m`` modules."""

import json
import subprocess
import sys
import warnings
from pathlib import Path

from vrgd_ds.deepspeed.launching import free_port, launch_env, local_launch, remove_shm_buffers, run_local  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]


def ds_env(**extra) -> dict:
    """The tests' launch environment: CPU ranks with gloo, one thread each, this checkout first
    on PYTHONPATH, Python's fault handler on (a rank killed by a signal prints every thread's
    stack), then ``extra``."""
    return launch_env(dict(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1", **extra),
                      pythonpath=ROOT)


# A rank of a CPU launch now and then dies with SIGABRT and only this line from libstdc++,
# with no Python error before it (pytorch/gloo#514 is an open report of such aborts in gloo's
# TCP transport); about 1 launch in a few hundred here. The same line also follows a rank
# that exits on a Python exception with gloo's threads running: there the traceback comes
# first, and that is the launch's real result. A collective mismatch, the abort the tests
# look for, reads differently: "terminate called after throwing an instance of
# 'gloo::EnforceNotMet'" and "collective mismatch". Only the bare abort is retried, once,
# with a warning; its output goes to stderr.
GLOO_ABORT = "terminate called without an active exception"
NOT_BARE = ("EnforceNotMet", "collective mismatch", "doesn't match expected size", "Traceback (most recent call last)")


def fault_stack(proc, frames: int = 8) -> str:
    """The innermost frames Python's fault handler printed for the current thread of a rank
    killed by a signal, innermost first, or "not printed"."""
    lines = (proc.stderr or "").splitlines()
    for i, line in enumerate(lines):
        if line.startswith("Fatal Python error"):
            stack, note = [], ""
            for later in lines[i + 1:]:
                if later.strip().startswith("File "):
                    stack.append(later.strip())
                elif stack:
                    break
                elif "<no Python frame>" in later:  # a C++ thread (gloo's): the next thread's stack follows
                    note = "the aborting thread has no Python frame; another thread: "
            if not stack and note:  # no thread runs Python: the interpreter had finished the script
                return "no thread runs Python code: the abort came at interpreter exit, after the script ended"
            return note + (" <- ".join(stack[:frames]) or "not printed")
    return "not printed"


def gloo_transport_abort(proc) -> bool:
    text = (proc.stdout or "") + (proc.stderr or "")
    return proc.returncode != 0 and GLOO_ABORT in text and not any(w in text for w in NOT_BARE)


def run_deepspeed(script, config, tmp_path, *args, ranks=2, timeout=600):
    """tests/ds_scripts/SCRIPT on RANKS local CPU ranks, with CONFIG (a dict) as --config."""
    cfg_args = []
    if config is not None:
        cfg = tmp_path / "ds_config.json"
        cfg.write_text(json.dumps(config))
        cfg_args = ["--config", str(cfg)]
    return retry_bare_gloo_abort(
        lambda: run_local(ROOT / "tests" / "ds_scripts" / script, [*cfg_args, *args], ranks, ds_env(),
                          cwd=tmp_path, capture_output=True, text=True, timeout=timeout), script)


def retry_bare_gloo_abort(launch, name: str):
    """``launch()`` (returns a finished process), run once more after a bare gloo abort (above),
    with a warning; any other result is returned as it is."""
    for attempt in (1, 2):
        proc = launch()
        if attempt == 2 or not gloo_transport_abort(proc):
            return proc
        message = (f"a rank of {name} aborted in gloo's transport ({GLOO_ABORT!r}); launching once more. "
                   f"Where (fault handler): {fault_stack(proc)}")
        print(f"[{name}] {message}\n{tail(proc, 6000)}", file=sys.stderr)
        warnings.warn(message)


def tail(proc, n: int = 3000) -> str:
    """The end of a finished process's stdout and stderr, for assertion messages."""
    return (proc.stdout or "")[-n:] + (proc.stderr or "")[-n:]


def run_module(module: str, *args, timeout: int = 900, check: bool = True) -> subprocess.CompletedProcess:
    """``python -m MODULE ARGS`` from the repo root; with ``check`` a failure fails the test
    with the end of its output."""
    proc = subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, tail(proc)
    return proc
