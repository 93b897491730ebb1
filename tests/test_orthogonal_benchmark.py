"""Smoke test of benchmarks/orthogonal.py (the paper's Table 5 analogue on sklearn digits)."""

import json

from ds_helpers import run_module


def test_orthogonal_quick(tmp_path):
    run_module("benchmarks.orthogonal", "--quick", "--out", tmp_path, timeout=600)
    res = json.loads((tmp_path / "orthogonal.json").read_text())
    names = {"Momentum", "VR-Momentum", "Adam", "VR-Adam", "LAMB", "VR-LAMB", "LARS", "VR-LARS"}
    assert set(res["summary"]) == names
    for name in names:
        for b in ("256", "1437"):
            cell = res["summary"][name][b]
            assert 0.0 <= cell["mean"] <= 100.0 and len(res["runs"][f"{name} {b}"]) == 2
    # same epochs per batch: the full batch takes one step per epoch
    assert res["summary"]["LAMB"]["1437"]["steps"] == 2 and res["summary"]["LAMB"]["256"]["steps"] == 10
    assert "| VR-LARS |" in (tmp_path / "table.md").read_text()
    assert (tmp_path / "orthogonal.png").stat().st_size > 1000
