"""launch/pipeline_tiny.sh end to end: prepare data -> phase 1 -> phase 2 -> SQuAD -> F1/EM.

Real `deepspeed --num_gpus 2` launches on CPU (four of them), the shipped corpus and SQuAD
subsets, a few steps each. The F1/EM the pipeline reports must be what the official metric
gives for the predictions it wrote, and every answer must be a substring of its context.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain_bert.squad.run import restrict_dataset
from pretrain_bert.squad.metric import evaluate

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "launch" / "pipeline_tiny.sh"
DEV = ROOT / "data" / "squad" / "dev-v1.1-subset.json"
ENV = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")


def pipeline(out, *args, **env):
    return subprocess.run(["bash", str(SCRIPT), str(out), *args], env=dict(ENV, **env), capture_output=True,
                          text=True, timeout=900)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from pretrain_bert.data import InstanceConfig, prepare_pretraining_data

    root = tmp_path_factory.mktemp("pipeline-data")
    for seq, pred in ((128, 20), (512, 80)):
        prepare_pretraining_data([ROOT / "data" / "corpus" / "wikitext-2-valid.txt"],
                                 ROOT / "data" / "vocab" / "bert-base-uncased-vocab.txt", root / f"seq{seq}",
                                 InstanceConfig(seq_len=seq, max_predictions=pred, dupe_factor=1, max_documents=12,
                                                heldout_fraction=0.2))
    return root


def test_pipeline_runs_end_to_end_and_reports_the_official_scores(tmp_path, data):
    out = tmp_path / "run"
    proc = pipeline(out, "lamb", DATA_ROOT=str(data), PHASE1_STEPS="3", PHASE2_STEPS="2",
                    SQUAD_ARGS="--max-steps 3 --max-train-examples 100 --max-eval-examples 24 --lr 1e-4")
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    summary = json.loads((out / "pipeline.json").read_text())
    assert summary["pretraining_optimizer"] == "NVLAMB"  # configs/bert_tiny_phase1_lamb.json
    assert summary["phase1"]["steps"] == 3 and summary["phase2"]["steps"] == 2
    assert "eval_mlm_loss" in summary["phase1"] and "eval_mlm_loss" in summary["phase2"]
    # phase 2 started from phase 1's weights, SQuAD from phase 2's model
    assert json.loads((out / "phase2" / "run.json").read_text())["data"] == str(data / "seq512")
    results = json.loads((out / "squad" / "results.json").read_text())
    assert results["args"]["init_checkpoint"] == str(out / "phase2" / "hf")
    assert results["steps"] == 3 and results["lr"] == 1e-4 and results["world_size"] == 2
    # F1/EM printed and in pipeline.json = the official metric on the predictions written
    predictions = json.loads((out / "squad" / "predictions.json").read_text())
    assert len(predictions) == 24
    dev = json.loads(DEV.read_text())
    contexts = {qa["id"]: p["context"] for a in dev["data"] for p in a["paragraphs"] for qa in p["qas"]}
    for qid, answer in predictions.items():
        assert answer in contexts[qid]
    official = evaluate(restrict_dataset(dev, predictions), predictions, quiet=True)
    assert summary["squad"]["f1"] == pytest.approx(official["f1"], abs=1e-9)
    assert summary["squad"]["exact_match"] == pytest.approx(official["exact_match"], abs=1e-9)
    assert f"F1 {official['f1']:.2f}  EM {official['exact_match']:.2f}" in proc.stdout
    assert (out / "loss.png").stat().st_size > 1000
    from transformers import BertForQuestionAnswering

    BertForQuestionAnswering.from_pretrained(out / "phase2" / "hf")  # the pretrained model loads for QA


def test_pipeline_refuses_bad_input_without_touching_anything(tmp_path, data):
    out = tmp_path / "used"
    out.mkdir()
    (out / "keep.txt").write_text("earlier work")
    proc = pipeline(out)
    assert proc.returncode == 2 and "exists and is not empty" in proc.stderr
    assert (out / "keep.txt").read_text() == "earlier work" and len(list(out.iterdir())) == 1
    proc = pipeline(tmp_path / "new", "adamw")
    assert proc.returncode == 2 and "OPTIMIZER must be vrlamb or lamb, got 'adamw'" in proc.stderr
    proc = pipeline(tmp_path / "new", NGPUS="two")
    assert proc.returncode == 2 and "NGPUS must be a positive integer, got 'two'" in proc.stderr
    proc = pipeline(tmp_path / "new", DATA_ROOT=str(tmp_path / "nowhere"))
    assert proc.returncode == 2 and "nowhere/seq128/meta.json is missing" in proc.stderr
    assert not (tmp_path / "new").exists()


def test_pipeline_summary_names_the_missing_step(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pretrain_bert.pipeline", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "squad/results.json" in proc.stderr and "SQuAD step" in proc.stderr
