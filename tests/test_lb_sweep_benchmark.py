"""Smoke test of benchmarks/lb_sweep.py: six real 2-rank pretraining launches, a few steps,
then the same sweep again, which must reuse every finished run instead of launching."""

import json

import pytest

from ds_helpers import ROOT, run_module


def test_lb_sweep_quick(tmp_path, small_pretraining_data):
    data = small_pretraining_data
    args = ["benchmarks.lb_sweep", "--quick", "--data", data, "--out", tmp_path / "out"]
    proc = run_module(*args)
    assert proc.stdout.count("4 steps") == 6 and "reusing" not in proc.stdout
    res = json.loads((tmp_path / "out" / "lb_sweep.json").read_text())
    assert set(res["table"]) == {"16", "32"}
    assert res["table"]["16"]["seeds"] == 1 and res["table"]["32"]["seeds"] == 2  # two seeds at the key point
    for b in ("16", "32"):
        row = res["table"][b]
        assert row["LAMB"]["steps"] == 4 and row["VR-LAMB"]["steps"] == 4
        assert row["LAMB"]["final_eval_mlm_loss"] > 0 and "gap" in row["VR-LAMB"]
        assert len(row["vrlamb_steps_to_lamb_final"]) == len(row["step_ratio"]) == row["seeds"]
    run = res["runs"]["LAMB 16 0"]  # 4 steps, evaluated after each: half-way is step 2
    assert run["eval_steps"] == [1, 2, 3, 4]
    assert res["table"]["16"]["LAMB"]["halfway_eval_mlm_loss"] == run["eval_mlm_loss"][1]
    seeds = [res["runs"][f"LAMB 32 {s}"]["final_eval_mlm_loss"] for s in (0, 1)]
    assert seeds[0] != seeds[1]
    row = res["table"]["32"]
    diffs = [res["runs"][f"VR-LAMB 32 {s}"]["final_eval_mlm_loss"] - res["runs"][f"LAMB 32 {s}"]["final_eval_mlm_loss"]
             for s in (0, 1)]
    assert row["vrlamb_minus_lamb"]["mean"] == pytest.approx(sum(diffs) / 2)
    assert row["LAMB"]["final_eval_mlm_loss"] == pytest.approx(sum(seeds) / 2)
    # the same sweep again: every finished run is reused, the result is the same
    again = run_module(*args, timeout=300)
    assert again.stdout.count("reusing") == 6 and "4 steps" not in again.stdout
    assert json.loads((tmp_path / "out" / "lb_sweep.json").read_text())["table"] == res["table"]
    cfg = json.loads((tmp_path / "out" / "runs" / "b32-vrlamb-s0" / "config.json").read_text())
    assert cfg["train_batch_size"] == 32 and cfg["gradient_accumulation_steps"] * 2 >= 8  # k >= 8
    assert cfg["optimizer"]["params"]["lr"] == 4e-3 * 2 ** 0.5  # square-root scaling from batch 16
    for png in ("lb_sweep_curves.png", "lb_sweep_final.png"):
        assert (tmp_path / "out" / png).stat().st_size > 1000


def test_lb_sweep_rejects_seed_batches_outside_the_sweep():
    proc = run_module("benchmarks.lb_sweep", "--batches", "64", "256", "--seed-batches", "512", timeout=120,
                      check=False)
    assert proc.returncode == 2 and "--seed-batches [512] are not in --batches [64, 256]" in proc.stderr


def test_lb_sweep_plans_a_bert_large_sweep_without_launching(tmp_path, small_pretraining_data):
    data = small_pretraining_data
    proc = run_module("benchmarks.lb_sweep", "--config-prefix", ROOT / "configs" / "bert_large_64k-32k",
                      "--ranks", "64", "--micro", "64", "--batches", "8192", "65536", "--seeds", "2",
                      "--seed-batches", "65536", "--lr-ref", "2e-3", "--data", data, "--work-dir", tmp_path / "runs",
                      "--out", tmp_path / "out", "--dry-run", timeout=120)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("[lb_sweep]")]
    assert len(lines) == 2 + 4  # one seed at 8192, two at 65536, both optimizers
    assert "batch 65536 VR-LAMB seed 1: 8 steps, micro 64 x accumulation 16 x 64 ranks, lr 0.00565685, model large" \
        in proc.stdout  # LR sqrt-scaled 8x from 8192; k = 1024 groups
    assert not (tmp_path / "runs").exists() and not (tmp_path / "out" / "lb_sweep.json").exists()
    bad = run_module("benchmarks.lb_sweep", "--config-prefix", "configs/nothing", timeout=120, check=False)
    assert bad.returncode == 2 and "--config-prefix 'configs/nothing': no configs/nothing_phase1_lamb.json" in bad.stderr
