"""Smoke runs of the benchmarks (the real runs are too long for the test suite)."""

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_module(*args):
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_linreg_quick(tmp_path):
    proc = run_module("benchmarks.linreg", "--quick", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    res = json.loads((tmp_path / "linreg.json").read_text())
    assert math.isfinite(res["sgd_final_test_loss"]) and math.isfinite(res["vrsgd_final_test_loss"])
    assert "vrsgd_steps_to_sgd_final" in res and len(res["curves"]["sgd"]) == res["setup"]["steps"] + 1
    sens = json.loads((tmp_path / "linreg_sensitivity.json").read_text())
    assert set(sens["test_loss_by_gamma"]) == {"0.1", "1.0"}
    for png in ("linreg_test_loss", "linreg_weights", "linreg_gsnr", "linreg_sensitivity"):
        assert (tmp_path / f"{png}.png").stat().st_size > 1000


def test_linreg_rejects_bad_k(tmp_path):
    proc = run_module("benchmarks.linreg", "--k", "3", "--out", str(tmp_path))
    assert proc.returncode != 0 and "--k must be >= 2 and divide --batch (2048), got 3" in proc.stderr


def test_optim_step_small(tmp_path):
    proc = run_module("benchmarks.optim_step", "--scale", "0.02", "--steps", "2", "--warmup", "1",
                      "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    res = json.loads((tmp_path / "optim_step.json").read_text())
    assert {"VRLAMB", "LAMB", "VRLAMB compiled", "AdamW fused"} <= set(res["median_s"])
    assert all(v > 0 for v in res["median_s"].values())
