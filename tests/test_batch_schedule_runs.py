"""Batch-size schedules in real 2-rank pretraining runs: the batch grows as the schedule
says, the LR follows the square-root rule, the noise scale reaches metrics.jsonl, and a
resumed run takes exactly the batches and losses of the uninterrupted one."""

from __future__ import annotations

import math

import pytest

from ds_helpers import tail
from test_pretraining import data, launch, phase_config, records  # noqa: F401  (data is a fixture)


def gns_config(steps=4, **run):
    cfg = phase_config(1, steps=steps, checkpoint_every=2, eval_every=0, **run)
    cfg["optimizer"]["params"]["telemetry_interval"] = 1
    # factor 0: any positive noise scale grows the batch, so the test does not hang on luck
    cfg["pretraining"]["batch_schedule"] = {"type": "gns", "max": 32, "factor": 0.0, "growth": 2}
    return cfg


def test_gns_schedule_grows_the_batch_and_resumes_exactly(tmp_path, data):  # noqa: F811
    straight, parts = tmp_path / "straight", tmp_path / "parts"
    proc = launch(tmp_path, gns_config(), "--data", data[128], "--output-dir", straight)
    assert proc.returncode == 0, tail(proc)
    train = records(straight)
    assert [r["batch"] for r in train] == [16, 32, 32, 32]
    assert [r["samples"] for r in train] == [16, 48, 80, 112]
    assert all(r["gns_b_simple_ema"] is None or r["gns_b_simple_ema"] > 0 for r in train)
    assert all("gns_trace_cov" in r and r["gns_trace_cov"] > 0 for r in train)
    # LR: poly warm-up over samples (in start-batch units) times sqrt(B / B0)
    from pretrain_bert.schedule import poly_warmup

    base = 4e-3
    for r, before in zip(train, [0, 16, 48, 80]):
        want = base * poly_warmup(before / 16, 4, 0.25, 0.5) * math.sqrt(r["batch"] / 16)
        assert r["lr"] == pytest.approx(want, rel=1e-6)
    # killed (SIGKILL) in the third step, after the step-2 checkpoint: micro-step 8 = 2 + 4 + 2
    proc = launch(tmp_path, gns_config(), "--data", data[128], "--output-dir", parts,
                  env_extra={"PRETRAIN_BERT_FAULT": "micro:8"})
    assert proc.returncode != 0
    proc = launch(tmp_path, gns_config(), "--data", data[128], "--output-dir", parts, "--resume")
    assert proc.returncode == 0, tail(proc)
    resumed = records(parts)
    for key in ("batch", "samples", "loss", "lr"):
        assert [r[key] for r in resumed] == [r[key] for r in train], key


def test_linear_warmup_stops_at_max_samples_with_measure_only_noise_scale(tmp_path, data):  # noqa: F811
    cfg = phase_config(1, optimizer="NVLAMB", steps=100, checkpoint_every=0, eval_every=0,
                       max_samples=96, batch_schedule={"type": "linear_warmup", "max": 32, "warmup_samples": 48})
    cfg["vrgd_noise_scale"] = {"interval": 2}
    out = tmp_path / "run"
    proc = launch(tmp_path, cfg, "--data", data[128], "--output-dir", out)
    assert proc.returncode == 0, tail(proc)
    train = records(out)
    batches = [r["batch"] for r in train]
    assert batches[:-1] == sorted(batches[:-1]) and batches[0] == 16 and max(batches) == 32
    assert train[-1]["samples"] == 96  # the last batch takes only the samples left
    assert all(r["batch"] % 8 == 0 for r in train)
    measured = [r for r in train if "gns_trace_cov" in r]
    assert [r["step"] for r in measured] == [s for s in range(1, len(train) + 1) if (s - 1) % 2 == 0]
    assert (out / "hf" / "config.json").is_file()


def test_gns_schedule_without_a_noise_scale_is_refused(tmp_path, data):  # noqa: F811
    cfg = gns_config()
    del cfg["optimizer"]["params"]["telemetry_interval"]
    proc = launch(tmp_path, cfg, "--data", data[128], "--output-dir", tmp_path / "run")
    assert proc.returncode != 0
    assert "batch_schedule gns needs the noise scale" in proc.stdout + proc.stderr


def test_plot_command_draws_the_noise_scale(tmp_path):
    import json

    from pretrain_bert.plot import main

    run = tmp_path / "gns"
    run.mkdir()
    lines = [{"step": s, "samples": 16 * s, "batch": 16 if s < 3 else 32, "loss": 10 - s,
              "gns_b_simple": 20.0 * s, "gns_b_simple_ema": 15.0 * s if s > 1 else None} for s in range(1, 6)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    main([str(run), "--what", "gns", "--out", str(tmp_path / "gns.png")])
    assert (tmp_path / "gns.png").stat().st_size > 1000
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "metrics.jsonl").write_text(json.dumps({"step": 1, "samples": 8, "loss": 9}) + "\n")
    with pytest.raises(ValueError, match="has no noise-scale records"):
        main([str(tmp_path / "plain"), "--what", "gns", "--out", str(tmp_path / "x.png")])
