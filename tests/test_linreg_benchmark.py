"""Smoke test of the linear-regression benchmark (`python -m benchmarks.linreg --quick`)."""

import json
import math

from ds_helpers import run_module


def finite(v):
    return isinstance(v, (int, float)) and math.isfinite(v)


def test_linreg_quick_outputs(tmp_path):
    out = tmp_path / "linreg"
    run_module("benchmarks.linreg", "--quick", "--out", out, timeout=120)

    res = json.loads((out / "linreg.json").read_text())
    for key in ("sgd_final_test_loss", "vrsgd_final_test_loss", "vrsgd_steps_to_sgd_final",
                "vrsgd_steps_to_sgd_final_per_seed", "sgd_final_test_loss_per_seed",
                "vrsgd_final_test_loss_per_seed", "setup", "curves", "seed0", "lr_sweep"):
        assert key in res, key
    setup = res["setup"]
    for key in ("steps", "batch", "k", "gamma", "lr", "inputs", "seeds", "true_w"):
        assert key in setup, key
    assert setup["true_w"] == [float(i) for i in range(1, 11)]
    assert finite(res["sgd_final_test_loss"]) and finite(res["vrsgd_final_test_loss"])
    assert all(finite(v) for v in res["sgd_final_test_loss_per_seed"] + res["vrsgd_final_test_loss_per_seed"])
    assert len(res["vrsgd_steps_to_sgd_final_per_seed"]) == len(setup["seeds"])
    steps_to = res["vrsgd_steps_to_sgd_final"]
    assert steps_to is None or (isinstance(steps_to, int) and 0 <= steps_to <= setup["steps"])
    for name in ("sgd", "vrsgd"):
        curve = res["curves"][name]
        assert len(curve) == setup["steps"] + 1 and all(finite(v) for v in curve)
    assert res["curves"]["sgd"][-1] == res["sgd_final_test_loss"]
    # both start from w = 0 on the same test set
    assert res["curves"]["sgd"][0] == res["curves"]["vrsgd"][0]
    gsnr_r = res["seed0"]["vrsgd_gsnr_r"]
    assert len(gsnr_r) == setup["steps"] and all(len(row) == 10 for row in gsnr_r)
    assert all(setup["gamma"] - 1e-6 <= v <= 1.0 + 1e-6 for row in gsnr_r for v in row)
    assert all(finite(v) and v >= 0 for row in res["seed0"]["vrsgd_gsnr_raw"] for v in row)

    sens = json.loads((out / "linreg_sensitivity.json").read_text())
    assert sens["batch"] == 2048
    assert sens["test_loss_by_gamma"] and sens["test_loss_by_k"]
    assert all(finite(v) for v in list(sens["test_loss_by_gamma"].values()) + list(sens["test_loss_by_k"].values()))
    assert float(sens["best_gamma"]) in {float(g) for g in sens["test_loss_by_gamma"]}
    assert str(sens["best_k"]) in sens["test_loss_by_k"]

    for png in ("linreg_test_loss", "linreg_weights", "linreg_gsnr", "linreg_sensitivity"):
        path = out / f"{png}.png"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000, png
