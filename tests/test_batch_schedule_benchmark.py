"""Smoke test of benchmarks/batch_schedule.py: four real 2-rank runs of a few steps."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_batch_schedule_quick(tmp_path):
    from pretrain_bert.data import InstanceConfig, prepare_pretraining_data

    data = tmp_path / "data"
    prepare_pretraining_data([ROOT / "data" / "corpus" / "wikitext-2-valid.txt"],
                             ROOT / "data" / "vocab" / "bert-base-uncased-vocab.txt", data,
                             InstanceConfig(dupe_factor=1, max_documents=10, heldout_fraction=0.2))
    cmd = [sys.executable, "-m", "benchmarks.batch_schedule", "--quick", "--data", str(data),
           "--out", str(tmp_path / "out"), "--work-dir", str(tmp_path / "runs")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((tmp_path / "out" / "batch_schedule.json").read_text())
    assert set(res["table"]) == {"fixed 8", "fixed 16", "linear warm-up", "gns"}
    runs = res["runs"]
    assert runs["fixed 8 0"]["steps"] == 8 and runs["fixed 16 0"]["steps"] == 4  # 64 samples each
    assert all(r["samples"] == 64 for r in runs.values())
    assert max(b for _, b in runs["linear warm-up 0"]["batch"]) == 16
    assert runs["fixed 8 0"]["b_simple_ema"], "every run records the noise scale"
    assert (tmp_path / "out" / "batch_schedule.png").is_file()
    assert (tmp_path / "out" / "batch_schedule_layers.png").is_file()
