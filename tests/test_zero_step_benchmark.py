"""Smoke test of benchmarks/zero_step.py: a real 2-rank ZeRO-2 launch with seven engines."""

import json

from ds_helpers import run_module


def test_zero_step_quick(tmp_path):
    run_module("benchmarks.zero_step", "--quick", "--out", tmp_path, timeout=600)
    res = json.loads((tmp_path / "zero_step.json").read_text())
    labels = {"LAMB", "VRLAMB", "VRLAMB interval 4", "DeepSpeed AdamW", "LAMB + noise scale",
              "LAMB + noise scale interval 4", "LAMB again"}
    assert set(res["median_step_s"]) == labels and all(v > 0 for v in res["median_step_s"].values())
    # VR traffic is extra: the squares roughly add a second gradient-sized reduction
    b = res["bytes_per_step_rank0"]
    assert b["VRLAMB"] > b["LAMB"] * 1.3
    # measure-only under ZeRO-2 sends per-layer sums only: a few hundred bytes per step
    assert b["LAMB"] < b["LAMB + noise scale"] < b["LAMB"] * 1.001
    assert b["LAMB"] <= b["LAMB + noise scale interval 4"] <= b["LAMB + noise scale"]
    # the two ranks keep partition-sized VR state: 2 fp32 buffers of their partition
    assert res["vr_kept_bytes_per_rank"] == [2 * 4 * n for n in res["partition_numel_per_rank"]]
    # the identical second LAMB sends the same bytes; every ratio comes as medians and per round
    assert b["LAMB again"] == b["LAMB"]
    assert set(res["ratios"]) == set(res["ratios_per_round"]) and "LAMB again / LAMB" in res["ratios"]
    assert all(v > 0 for v in res["ratios_per_round"].values())
    # each phase has a time; the adapter's squares are timed on the routes that make them
    for label, ph in res["median_phase_s"].items():
        part = res["mean_part_s"][label]
        assert set(ph) == {"forward", "backward", "step"} and all(v > 0 for v in ph.values()), (label, ph)
        assert set(part) == {"squares", "optimizer"} and 0 < part["optimizer"] < max(res["step_times_s"][label])
        assert (part["squares"] > 0) == (label not in ("LAMB", "LAMB again", "DeepSpeed AdamW")), (label, part)
    added = res["parts_added_over_lamb"]
    assert set(added) == labels - {"LAMB", "DeepSpeed AdamW"} and added["VRLAMB"] > 0
    assert (tmp_path / "zero_step.png").stat().st_size > 1000
