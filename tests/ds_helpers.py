"""Launch real DeepSpeed processes (2 CPU ranks, gloo) from tests."""

import json
import os
import subprocess
import sys
from pathlib import Path

from vrgd_ds.deepspeed.launching import free_port, remove_shm_buffers  # noqa: F401 (re-exported)

ROOT = Path(__file__).resolve().parents[1]


def run_deepspeed(script, config, tmp_path, *args, ranks=2, timeout=600):
    cfg_args = []
    if config is not None:
        cfg = tmp_path / "ds_config.json"
        cfg.write_text(json.dumps(config))
        cfg_args = ["--config", str(cfg)]
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    launcher = Path(sys.executable).parent / "deepspeed"
    port = free_port()
    cmd = [str(launcher), "--num_gpus", str(ranks), "--master_port", str(port),
           str(ROOT / "tests" / "ds_scripts" / script), *cfg_args, *map(str, args)]
    try:
        return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
    finally:
        remove_shm_buffers(port)

