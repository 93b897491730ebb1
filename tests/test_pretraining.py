"""BERT pretraining end to end through the real DeepSpeed launcher (2 CPU ranks)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ds_helpers import ROOT, ds_env, free_port, run_local, tail

VOCAB = ROOT / "data" / "vocab" / "bert-base-uncased-vocab.txt"
CORPUS = ROOT / "data" / "corpus" / "wikitext-2-valid.txt"


def phase_config(phase, optimizer="VRLAMB", steps=4, **run):
    seq, pred = (128, 20) if phase == 1 else (512, 80)
    params = {"lr": 4e-3, "weight_decay": 0.01}
    if optimizer == "VRLAMB":
        params["gamma"] = 0.1
    return {"train_batch_size": 16 if phase == 1 else 8, "train_micro_batch_size_per_gpu": 4 if phase == 1 else 2,
            "gradient_clipping": 1.0, "optimizer": {"type": optimizer, "params": params},
            "zero_optimization": {"stage": 2}, "steps_per_print": 10**9,
            "pretraining": {"phase": phase, "model": "tiny", "seq_len": seq, "max_predictions": pred,
                            "max_steps": steps, "warmup_proportion": 0.25, "eval_every": 2, "eval_batches": 2,
                            "checkpoint_every": 2, **run}}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from pretrain_bert.data import InstanceConfig, prepare_pretraining_data

    root = tmp_path_factory.mktemp("data")
    out = {}
    for seq, pred in ((128, 20), (512, 80)):
        cfg = InstanceConfig(seq_len=seq, max_predictions=pred, dupe_factor=2, max_documents=12, heldout_fraction=0.2)
        prepare_pretraining_data([CORPUS], VOCAB, root / str(seq), cfg)
        out[seq] = root / str(seq)
    return out


def launch(tmp_path, config, *args, env_extra=None, ranks=2):
    cfg = tmp_path / f"cfg-{free_port()}.json"
    cfg.write_text(json.dumps(config))
    return run_local(ROOT / "pretrain_bert" / "run_pretraining.py", ["--config", cfg, "--no-progress", *args], ranks,
                     ds_env(**(env_extra or {})), cwd=tmp_path, capture_output=True, text=True, timeout=600)


def records(run_dir, kind="loss"):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
            if kind in json.loads(line)]


def test_phase1_then_phase2_produces_a_loadable_bert(tmp_path, data):
    from transformers import BertForPreTraining

    p1, p2 = tmp_path / "p1", tmp_path / "p2"
    cfg = phase_config(1)
    cfg["csv_monitor"] = {"enabled": True, "output_path": str(tmp_path / "csv"), "job_name": "p1"}
    cfg["optimizer"]["params"]["telemetry_interval"] = 2
    proc = launch(tmp_path, cfg, "--data", data[128], "--output-dir", p1)
    assert proc.returncode == 0, tail(proc)
    train, evals = records(p1), records(p1, "eval_loss")
    assert [r["step"] for r in train] == [1, 2, 3, 4] and [e["step"] for e in evals] == [2, 4]
    assert all(0 <= e["eval_mlm_acc"] <= 1 and "generalization_gap" in e for e in evals)
    assert json.loads((p1 / "checkpoints" / "complete.json").read_text()) == {
        "tag": "step4", "step": 4, "kept": [{"tag": "step2", "step": 2}, {"tag": "step4", "step": 4}]}
    model = BertForPreTraining.from_pretrained(p1 / "hf")
    assert model.config.num_hidden_layers == 2
    # the consolidated file holds tensors and plain containers only: it loads with weights_only=True
    from vrgd_ds.deepspeed.checkpoint import save_consolidated

    saved = save_consolidated(p1 / "checkpoints" / "step4", tmp_path / "c.pt")
    loaded = torch.load(tmp_path / "c.pt", weights_only=True)
    assert loaded["format"] == saved["format"] and torch.equal(loaded["weights"][next(iter(saved["weights"]))],
                                                                next(iter(saved["weights"].values())))
    monitor = tmp_path / "csv" / "p1"
    for name in ("Train_loss", "Eval_eval_mlm_loss", "Eval_generalization_gap", "VRGD_clamped_fraction"):
        rows = (monitor / f"{name}.csv").read_text().split()
        assert len(rows) == 1 + (4 if name == "Train_loss" else 2), name
    # phase 2: other batch, seq 512, fresh schedule, optimizer state carried from phase 1
    proc = launch(tmp_path, phase_config(2, steps=2), "--data", data[512], "--output-dir", p2,
                  "--init-checkpoint", p1 / "hf", "--carry-optimizer-state")
    assert proc.returncode == 0, tail(proc)
    p2_train = records(p2)
    assert [r["step"] for r in p2_train] == [1, 2] and p2_train[0]["samples"] == 8
    assert not (p2 / ".carried_optimizer.pt").exists()  # the consolidated state, removed once loaded
    # a fresh schedule (warm-up 0.25 x 2 steps < 1 step), not phase 1's decayed LR
    assert [r["lr"] for r in p2_train] == pytest.approx([4e-3, 4e-3 * 0.5 ** 0.5])
    start = BertForPreTraining.from_pretrained(p1 / "hf").state_dict()
    end = BertForPreTraining.from_pretrained(p2 / "hf").state_dict()
    moved = [k for k in start if not torch.equal(start[k], end[k])]
    assert moved, "phase 2 did not change the weights"
    # the loaded model computes the same held-out loss as training reported (masked-only head)
    from pretrain_bert.modeling import BertForPreTrainingMasked
    from pretrain_bert.pretraining_dataset import collate, load_pretraining_data

    m = BertForPreTrainingMasked.from_pretrained(p2 / "hf").eval()
    batch = collate([load_pretraining_data(data[512], "heldout")[i] for i in range(2)])
    with torch.no_grad():
        assert torch.isfinite(m(**batch).loss)
    # an exported model without the checkpoints beside it: every rank stops, naming the folder
    shutil.copytree(p1 / "hf", tmp_path / "alone" / "hf")
    proc = launch(tmp_path, phase_config(2, steps=2), "--data", data[512], "--output-dir", tmp_path / "p2b",
                  "--init-checkpoint", tmp_path / "alone" / "hf", "--carry-optimizer-state")
    assert proc.returncode != 0
    assert (f"--carry-optimizer-state failed on rank 0: FileNotFoundError: --carry-optimizer-state: no complete "
            f"checkpoint in {tmp_path / 'alone' / 'checkpoints'}") in proc.stdout + proc.stderr


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_bf16_run_exports_its_fp32_master_weights(tmp_path, data, stage):
    """bf16 at ZeRO-1/2 (the BERT-large configs' setting) and ZeRO-3: the run ends with its HF
    folder (the export used to fail on DeepSpeed's bf16_zero_pp_rank_* shard names, after
    training), holding the fp32 master weights, not the bf16 copies the model computes with
    (ZeRO-3: joined from the checkpoint's partitions as DeepSpeed's zero_to_fp32 joins them)."""
    from transformers import BertForPreTraining

    from vrgd_ds.deepspeed.checkpoint import consolidate

    cfg = phase_config(1, steps=2)
    cfg["bf16"] = {"enabled": True}
    cfg["zero_optimization"]["stage"] = stage
    proc = launch(tmp_path, cfg, "--data", data[128], "--output-dir", tmp_path / "run")
    assert proc.returncode == 0, tail(proc)
    folder = tmp_path / "run" / "checkpoints" / "step2"
    masters = consolidate(folder)["weights"]
    if stage == 3:  # our reading of the ZeRO-3 partitions, against DeepSpeed's own zero_to_fp32
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        theirs = get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), folder.name)
        assert sum(w.numel() for w in masters.values()) > 10**6
        assert all(torch.equal(theirs[n], w) for n, w in masters.items())
    exported = BertForPreTraining.from_pretrained(tmp_path / "run" / "hf").state_dict()
    assert all(torch.equal(exported[n], w) for n, w in masters.items())
    assert any(not torch.equal(w, w.bfloat16().float()) for w in masters.values())
    if stage == 3:  # phase 2 at ZeRO-3 carries phase 1's optimizer state into its partitions
        cfg2 = phase_config(2, steps=1)
        cfg2["bf16"] = {"enabled": True}
        cfg2["zero_optimization"]["stage"] = 3
        proc = launch(tmp_path, cfg2, "--data", data[512], "--output-dir", tmp_path / "p2",
                      "--init-checkpoint", tmp_path / "run" / "hf", "--carry-optimizer-state")
        assert proc.returncode == 0, tail(proc)
        assert [r["step"] for r in records(tmp_path / "p2")] == [1]
        assert not (tmp_path / "p2" / ".carried_optimizer.pt").exists()  # loaded by every rank, then removed


def test_bf16_run_killed_mid_step_resumes_to_the_same_curve(tmp_path, data):
    """bf16 ZeRO-2 (DeepSpeed's bf16_* shard names): SIGKILL in step 4, after the step-2
    checkpoint; --resume ends with the uninterrupted run's losses and hf/ weights, bit for bit."""
    from transformers import BertForPreTraining

    cfg = phase_config(1, steps=4)
    cfg["bf16"] = {"enabled": True}
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert launch(tmp_path, cfg, "--data", data[128], "--output-dir", straight).returncode == 0
    # 2 micro-steps per rank and step: the 7th is in step 4
    proc = launch(tmp_path, cfg, "--data", data[128], "--output-dir", killed,
                  env_extra={"PRETRAIN_BERT_FAULT": "micro:7"})
    assert proc.returncode != 0 and not (killed / "hf").exists()
    (killed / ".carried_optimizer.pt").write_bytes(b"left by a killed --carry-optimizer-state")
    proc = launch(tmp_path, cfg, "--data", data[128], "--output-dir", killed, "--resume")
    assert proc.returncode == 0, tail(proc)
    assert not (killed / ".carried_optimizer.pt").exists()
    same = [[{k: v for k, v in r.items() if k != "samples_per_s"} for r in records(d)] for d in (straight, killed)]
    assert [r["step"] for r in same[0]] == [1, 2, 3, 4] and same[0] == same[1]
    a, b = (BertForPreTraining.from_pretrained(d / "hf").state_dict() for d in (straight, killed))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_without_checkpoint_and_bad_configs_fail_clearly(tmp_path, data):
    proc = launch(tmp_path, phase_config(1), "--data", data[128], "--output-dir", tmp_path / "none", "--resume")
    assert proc.returncode != 0 and "no complete checkpoint in" in proc.stderr + proc.stdout
    proc = launch(tmp_path, phase_config(2), "--data", data[128], "--output-dir", tmp_path / "x")
    assert proc.returncode != 0
    assert "was prepared with seq_len 128, but the config's pretraining.seq_len is 512" in proc.stderr + proc.stdout


def test_used_folder_and_empty_heldout_refused_before_anything_is_written(tmp_path, data):
    from pretrain_bert import run_pretraining
    from pretrain_bert.data import InstanceConfig, prepare_pretraining_data

    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps(phase_config(1)))
    out = tmp_path / "used"
    (out / "checkpoints" / "step2").mkdir(parents=True)
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n')
    before = sorted((str(p), p.stat().st_mtime_ns) for p in out.rglob("*"))
    with pytest.raises(FileExistsError, match="already holds a run .*; pass --resume"):
        run_pretraining.main(["--config", str(cfg), "--data", str(data[128]), "--output-dir", str(out)])
    assert sorted((str(p), p.stat().st_mtime_ns) for p in out.rglob("*")) == before
    no_heldout = tmp_path / "no-heldout"
    prepare_pretraining_data([CORPUS], VOCAB, no_heldout, InstanceConfig(dupe_factor=1, max_documents=4,
                                                                         heldout_fraction=0.0))
    with pytest.raises(ValueError, match="has no held-out instances, but pretraining.eval_every is 2"):
        run_pretraining.main(["--config", str(cfg), "--data", str(no_heldout), "--output-dir", str(tmp_path / "new")])
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("block,message", [
    ({"max_step": 3}, "unknown pretraining key 'max_step'; allowed: phase, model"),
    ({"max_steps": 0}, "pretraining.max_steps must be an integer >= 1, got 0"),
    ({"max_steps": 3, "phase": 3}, "pretraining.phase must be 1 or 2, got 3"),
    ({"max_steps": "5"}, "pretraining.max_steps must be an integer >= 1, got '5' (str)"),
    ({"max_steps": 3, "warmup_proportion": None},
     "pretraining.warmup_proportion must be a number in [0, 1), got None (NoneType)"),
    ({"max_steps": 3, "eval_every": True}, "pretraining.eval_every must be an integer >= 0, got True (bool)"),
    ({"max_steps": 3, "keep_checkpoints": -1},
     "pretraining.keep_checkpoints must be an integer >= 0 (0 keeps every checkpoint), got -1"),
    ({"max_steps": 3, "model": "huge"},
     "pretraining.model must be one of 'tiny', 'mini', 'small', 'base', 'large', got 'huge' (str)"),
    ({"max_steps": 3, "poly_power": "0.5"}, "pretraining.poly_power must be a number > 0, got '0.5' (str)"),
    ({"max_steps": 3, "seq_len": 1024},
     "pretraining.seq_len 1024 exceeds pretraining.max_position_embeddings 512"),
])
def test_run_config_errors_name_the_key(tmp_path, block, message):
    from pretrain_bert import run_config

    path = tmp_path / "c.json"
    path.write_text(json.dumps({"train_batch_size": 8, "pretraining": block}))
    with pytest.raises(ValueError, match=re.escape(message)):
        run_config.load(path, SimpleNamespace())
    path.write_text(json.dumps({"train_batch_size": 8}))
    with pytest.raises(ValueError, match="has no \"pretraining\" block"):
        run_config.load(path, SimpleNamespace())


def test_poly_warmup_schedule_and_sqrt_scaling():
    from pretrain_bert.schedule import poly_warmup, sqrt_scaled_lr

    total, warm = 100, 0.1
    values = [poly_warmup(s, total, warm, 0.5) for s in range(total + 1)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert values[10] == pytest.approx((1 - 10 / 100) ** 0.5) and values[99] == pytest.approx(0.01 ** 0.5)
    assert values[100] == 0.0 and all(a >= b for a, b in zip(values[9:], values[10:]))
    assert sqrt_scaled_lr(1e-3, 64, 256) == pytest.approx(2e-3)
    with pytest.raises(ValueError, match="warmup_proportion must be in"):
        from pretrain_bert.schedule import check_schedule

        check_schedule(10, 1.5, 0.5)


def test_plot_draws_several_runs(tmp_path):
    from pretrain_bert.plot import plot

    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text("".join(
            json.dumps({"step": s, "samples": 8 * s, "loss": 10 - s}) + "\n" for s in range(1, 5))
            + json.dumps({"step": 4, "eval_loss": 7.0}) + "\n")
    drawn = plot([tmp_path / "a", tmp_path / "b"], tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000
    assert drawn["a"] == drawn["b"] == ([1, 2, 3, 4], [4])  # separate runs: each from step 1
    # phases of one training: phase 2 goes on where phase 1 ended, in steps or in samples
    assert plot([tmp_path / "a", tmp_path / "b"], tmp_path / "p.png", phases=True)["b"] == ([5, 6, 7, 8], [8])
    assert plot([tmp_path / "a", tmp_path / "b"], tmp_path / "p.png", x="samples",
                phases=True)["b"] == ([40, 48, 56, 64], [64])
    with pytest.raises(FileNotFoundError, match="has no metrics.jsonl"):
        plot([tmp_path], tmp_path / "q.png")
