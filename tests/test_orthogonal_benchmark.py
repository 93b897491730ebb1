"""Smoke test of benchmarks/orthogonal.py (the paper's Table 5 analogue on sklearn digits)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_orthogonal_quick(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "benchmarks.orthogonal", "--quick", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
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
