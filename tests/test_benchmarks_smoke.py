"""Smoke runs of the benchmarks (linreg's output check is in test_linreg_benchmark.py)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_module(*args):
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_linreg_rejects_bad_k(tmp_path):
    proc = run_module("benchmarks.linreg", "--k", "3", "--out", str(tmp_path))
    assert proc.returncode != 0 and "--k must be >= 2 and divide --batch (2048), got 3" in proc.stderr


def test_optim_step_small(tmp_path):
    proc = run_module("benchmarks.optim_step", "--scale", "0.02", "--steps", "2", "--warmup", "1",
                      "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    res = json.loads((tmp_path / "optim_step.json").read_text())
    assert {"VRLAMB", "LAMB", "VRAdamW", "VRLAMB partition", "AdamW fused"} <= set(res["median_s"])
    assert all(v > 0 for v in res["median_s"].values())
    assert (tmp_path / "optim_step.png").stat().st_size > 1000
