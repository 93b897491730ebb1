"""Launch real processes from tests: DeepSpeed ranks (2 CPU ranks, gloo), ``python -m`` modules."""

import json
import subprocess
import sys
from pathlib import Path

from vrgd_ds.deepspeed.launching import free_port, launch_env, local_launch, remove_shm_buffers, run_local  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]


def ds_env(**extra) -> dict:
    """The tests' launch environment: CPU ranks with gloo, one thread each, this checkout first
    on PYTHONPATH, then ``extra``."""
    return launch_env(dict(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", **extra), pythonpath=ROOT)


def run_deepspeed(script, config, tmp_path, *args, ranks=2, timeout=600):
    """tests/ds_scripts/SCRIPT on RANKS local CPU ranks, with CONFIG (a dict) as --config."""
    cfg_args = []
    if config is not None:
        cfg = tmp_path / "ds_config.json"
        cfg.write_text(json.dumps(config))
        cfg_args = ["--config", str(cfg)]
    return run_local(ROOT / "tests" / "ds_scripts" / script, [*cfg_args, *args], ranks, ds_env(),
                     cwd=tmp_path, capture_output=True, text=True, timeout=timeout)


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
