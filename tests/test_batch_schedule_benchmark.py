"""Smoke test of benchmarks/batch_schedule.py: four real 2-rank runs of a few steps."""

import json

from ds_helpers import run_module


def test_batch_schedule_quick(tmp_path, small_pretraining_data):
    run_module("benchmarks.batch_schedule", "--quick", "--data", small_pretraining_data,
               "--out", tmp_path / "out", "--work-dir", tmp_path / "runs")
    res = json.loads((tmp_path / "out" / "batch_schedule.json").read_text())
    assert set(res["table"]) == {"fixed 8", "fixed 16", "linear warm-up", "gns"}
    runs = res["runs"]
    assert runs["fixed 8 0"]["steps"] == 8 and runs["fixed 16 0"]["steps"] == 4  # 64 samples each
    assert all(r["samples"] == 64 for r in runs.values())
    assert max(b for _, b in runs["linear warm-up 0"]["batch"]) == 16
    assert runs["fixed 8 0"]["b_simple_ema"], "every run records the noise scale"
    assert (tmp_path / "out" / "batch_schedule.png").is_file()
    assert (tmp_path / "out" / "batch_schedule_layers.png").is_file()
