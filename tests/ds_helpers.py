"""Launch real DeepSpeed processes (2 CPU ranks, gloo) from tests."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_deepspeed(script, config, tmp_path, *args, ranks=2, timeout=600):
    cfg = tmp_path / "ds_config.json"
    cfg.write_text(json.dumps(config))
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    launcher = Path(sys.executable).parent / "deepspeed"
    cmd = [str(launcher), "--num_gpus", str(ranks), "--master_port", str(free_port()),
           str(ROOT / "tests" / "ds_scripts" / script), "--config", str(cfg), *map(str, args)]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
