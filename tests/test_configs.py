"""The shipped DeepSpeed configs: up to date, valid keys and values, consistent batches."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "configs"))
import generate  # noqa: E402

PHASE_CONFIGS = sorted((ROOT / "configs").glob("bert_*_phase*.json"))


def test_bert_large_configs_are_generated_and_up_to_date():
    files = generate.files()
    assert len(files) == 20
    for name, cfg in files.items():
        assert json.loads((ROOT / "configs" / name).read_text()) == cfg, f"{name}: run python configs/generate.py"


@pytest.mark.parametrize("path", PHASE_CONFIGS, ids=lambda p: p.name)
def test_phase_config_is_valid(path):
    from pretrain_bert import run_config
    from vrgd_ds.deepspeed import DS_NAMES, allowed_params

    ds, run = run_config.load(path, SimpleNamespace())
    opt = ds["optimizer"]
    assert opt["type"] in DS_NAMES
    assert set(opt["params"]) <= set(allowed_params(DS_NAMES[opt["type"]]))
    assert "gradient_clipping" in ds  # DeepSpeed's default would be 1.0 silently
    world = 2 if run.model == "tiny" else 64  # the tiny demo's 2 CPU ranks; 64 GPUs for BERT-large
    assert ds["train_batch_size"] % (ds["train_micro_batch_size_per_gpu"] * world) == 0
    assert (run.seq_len, run.max_predictions) == ((128, 20) if run.phase == 1 else (512, 80))


def test_mixed_batch_setups_match_the_paper():
    steps = {name: (s1, s2) for name, (_, _, s1, s2, _) in generate.SETUPS.items()}
    assert sum(steps["64k-32k"]) == 8599 and sum(steps["128k-64k"]) == 4301  # paper Table 1
    cfg1 = json.loads((ROOT / "configs" / "bert_large_64k-32k_phase1_vrlamb.json").read_text())
    cfg2 = json.loads((ROOT / "configs" / "bert_large_64k-32k_phase2_vrlamb.json").read_text())
    assert (cfg1["train_batch_size"], cfg2["train_batch_size"]) == (65536, 32768)
    assert (cfg1["optimizer"]["params"]["lr"], cfg2["optimizer"]["params"]["lr"]) == (6e-3, 4e-3)
