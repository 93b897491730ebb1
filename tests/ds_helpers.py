"""Launch real DeepSpeed processes (2 CPU ranks, gloo) from tests."""

import json
import os
import subprocess
import sys
from pathlib import Path

from vrgd_ds.deepspeed.launching import free_port, prepare_shm_op, remove_shm_buffers  # noqa: F401 (re-exported)

ROOT = Path(__file__).resolve().parents[1]
_prepared: set = set()


def prepare_shm_op_once(env: dict) -> None:
    """Before the first launch of this test process (per extensions folder): clear a stale build
    lock and build DeepSpeed's CPU shm op once, with a timeout, so no rank waits on the lock."""
    key = env.get("TORCH_EXTENSIONS_DIR")
    if key not in _prepared:
        prepare_shm_op(env=env)
        _prepared.add(key)


def run_deepspeed(script, config, tmp_path, *args, ranks=2, timeout=600):
    cfg_args = []
    if config is not None:
        cfg = tmp_path / "ds_config.json"
        cfg.write_text(json.dumps(config))
        cfg_args = ["--config", str(cfg)]
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    prepare_shm_op_once(env)
    launcher = Path(sys.executable).parent / "deepspeed"
    port = free_port()
    cmd = [str(launcher), "--num_gpus", str(ranks), "--master_port", str(port),
           str(ROOT / "tests" / "ds_scripts" / script), *cfg_args, *map(str, args)]
    try:
        return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
    finally:
        remove_shm_buffers(port, "127.0.0.1", ranks)
