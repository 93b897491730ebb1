"""Smoke runs of the benchmarks (linreg's output check is in test_linreg_benchmark.py)."""

import json

from ds_helpers import run_module


def test_linreg_rejects_bad_k(tmp_path):
    proc = run_module("benchmarks.linreg", "--k", "3", "--out", tmp_path, timeout=300, check=False)
    assert proc.returncode != 0 and "--k must be >= 2 and divide --batch (2048), got 3" in proc.stderr


def test_optim_step_small(tmp_path):
    run_module("benchmarks.optim_step", "--scale", "0.02", "--steps", "2", "--warmup", "1", "--out", tmp_path,
               timeout=300)
    res = json.loads((tmp_path / "optim_step.json").read_text())
    assert {"VRLAMB", "LAMB", "VRAdamW", "VRLAMB partition", "AdamW fused", "VRLAMB gathered",
            "backward placed", "backward gathered"} <= set(res["median_s"])
    assert all(v > 0 for v in res["median_s"].values())
    assert (tmp_path / "optim_step.png").stat().st_size > 1000
