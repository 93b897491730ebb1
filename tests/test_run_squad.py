"""pretrain_bert/squad/run.py end to end: real `deepspeed --num_gpus 2` on CPU, tiny random BERT."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain_bert.squad.data import load_examples
from pretrain_bert.squad.metric import evaluate, evaluate_files
from pretrain_bert.tokenization import load_tokenizer
from ds_helpers import ds_env, local_launch, tail

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "pretrain_bert" / "squad" / "run.py"
VOCAB = ROOT / "data" / "vocab" / "bert-base-uncased-vocab.txt"
DEV = ROOT / "data" / "squad" / "dev-v1.1-subset.json"
ENV = ds_env()


def run_squad(tmp_path, *args, launcher=True, timeout=300):
    """pretrain_bert/squad/run.py on 2 ranks through the deepspeed launcher (or as one plain process).

    Returns the process and the /dev/shm buffers the launch left behind (then removed)."""
    if not launcher:
        cmd = [sys.executable, str(SCRIPT), *map(str, args)]
        return subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=timeout), []
    with local_launch(SCRIPT, args, 2, ENV) as (cmd, env):
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
        port = cmd[cmd.index("--master_port") + 1]
        return proc, sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"))


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A random 2-layer BertForPreTraining with the real uncased vocab, as our pretraining saves it."""
    import torch
    from transformers import BertConfig, BertForPreTraining

    path = tmp_path_factory.mktemp("tiny_bert")
    tokenizer = load_tokenizer(VOCAB)
    torch.manual_seed(0)
    BertForPreTraining(BertConfig(
        vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=128, max_position_embeddings=512)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_fine_tune_and_evaluate_on_two_ranks(tiny_bert, tmp_path):
    out = tmp_path / "out"
    proc, leftover = run_squad(
        tmp_path, "--init-checkpoint", tiny_bert, "--output-dir", out, "--max-train-examples", 64,
        "--max-eval-examples", 40, "--epochs", 2, "--lr", 1e-3, "--eval-batch-size", 8)
    assert proc.returncode == 0, tail(proc)
    assert not leftover, f"squad/run.py left its /dev/shm buffers: {leftover}"
    results = json.loads((out / "results.json").read_text())
    predictions = json.loads((out / "predictions.json").read_text())

    dev = load_examples(DEV, training=False).examples[:40]
    assert list(predictions) == [ex.id for ex in dev]
    for ex in dev:
        assert predictions[ex.id] in ex.context and predictions[ex.id].strip(), ex.id

    # 64 questions give 64 windows at seq 384; global batch 8 x 2 accumulation x 2 ranks = 32
    assert (results["train_examples"], results["eval_examples"], results["eval_missing"]) == (64, 40, 0)
    assert (results["global_batch"], results["world_size"], results["steps"]) == (32, 2, 4)
    assert math.isfinite(results["train_loss_last"]) and results["optimizer"] == "AdamW"
    assert "first 40 questions" in results["restricted_to"]
    for key in ("exact_match", "f1"):
        assert isinstance(results[key], float) and 0.0 <= results[key] <= 100.0

    # the scores are the official metric's on the evaluated questions, from the written files
    kept = {ex.id for ex in dev}
    dataset = json.loads(DEV.read_text())
    for article in dataset["data"]:
        for paragraph in article["paragraphs"]:
            paragraph["qas"] = [qa for qa in paragraph["qas"] if qa["id"] in kept]
    official = evaluate(dataset, predictions, quiet=True)
    assert official["total"] == 40
    assert (results["exact_match"], results["f1"]) == (official["exact_match"], official["f1"])
    rescored = evaluate_files(out / "eval_dataset.json", out / "predictions.json", quiet=True)
    assert (rescored["exact_match"], rescored["f1"]) == (results["exact_match"], results["f1"])
    assert f"F1 {results['f1']:.2f}, EM {results['exact_match']:.2f}" in proc.stdout


def test_missing_init_checkpoint_fails_through_the_launcher(tmp_path):
    missing = tmp_path / "no-such-bert"
    proc, _ = run_squad(tmp_path, "--init-checkpoint", missing, "--output-dir", tmp_path / "out")
    assert proc.returncode != 0
    assert f"--init-checkpoint '{missing}': no such directory" in proc.stderr + proc.stdout


def test_bad_inputs_exit_with_a_message(tiny_bert, tmp_path):
    """One plain process (the inputs are checked before any process group exists)."""
    not_bert = tmp_path / "gpt"
    not_bert.mkdir()
    (not_bert / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    proc, _ = run_squad(tmp_path, "--init-checkpoint", not_bert, "--output-dir", tmp_path / "o1",
                        launcher=False)
    assert proc.returncode == 2 and "holds a 'gpt2' model, expected model_type 'bert'" in proc.stderr

    bad = tmp_path / "bad-train.json"
    bad.write_text(json.dumps({"version": "1.1", "data": [{"title": "Broken"}]}))
    proc, _ = run_squad(tmp_path, "--init-checkpoint", tiny_bert, "--output-dir", tmp_path / "o2",
                        "--train-file", bad, launcher=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"{bad}: article 'Broken' has no 'paragraphs' key" in proc.stderr
    assert "Traceback" not in proc.stderr
