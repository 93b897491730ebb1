"""Smoke test of benchmarks/lb_sweep.py: four real 2-rank pretraining launches, a few steps."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_lb_sweep_quick(tmp_path):
    from pretrain_bert.data import InstanceConfig, prepare_pretraining_data

    data = tmp_path / "data"
    prepare_pretraining_data([ROOT / "data" / "corpus" / "wikitext-2-valid.txt"],
                             ROOT / "data" / "vocab" / "bert-base-uncased-vocab.txt", data,
                             InstanceConfig(dupe_factor=1, max_documents=10, heldout_fraction=0.2))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.lb_sweep", "--quick", "--data", str(data),
                           "--out", str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((tmp_path / "out" / "lb_sweep.json").read_text())
    assert set(res["table"]) == {"16", "32"}
    for b in ("16", "32"):
        row = res["table"][b]
        assert row["LAMB"]["steps"] == 4 and row["VR-LAMB"]["steps"] == 4
        assert row["LAMB"]["final_eval_mlm_loss"] > 0 and "gap" in row["VR-LAMB"]
    cfg = json.loads((tmp_path / "out" / "runs" / "b32-vrlamb-s0" / "config.json").read_text())
    assert cfg["train_batch_size"] == 32 and cfg["gradient_accumulation_steps"] * 2 >= 8  # k >= 8
    assert cfg["optimizer"]["params"]["lr"] == 4e-3 * 2 ** 0.5  # square-root scaling from batch 16
    for png in ("lb_sweep_curves.png", "lb_sweep_final.png"):
        assert (tmp_path / "out" / png).stat().st_size > 1000
