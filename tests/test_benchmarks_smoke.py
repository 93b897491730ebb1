"""Smoke runs of the benchmarks (linreg's output check is in test_linreg_benchmark.py)."""

import json

import pytest
import torch

from ds_helpers import run_module


def test_linreg_rejects_bad_k(tmp_path):
    proc = run_module("benchmarks.linreg", "--k", "3", "--out", tmp_path, timeout=300, check=False)
    assert proc.returncode != 0 and "--k must be >= 2 and divide --batch (2048), got 3" in proc.stderr


def test_optim_step_small(tmp_path):
    run_module("benchmarks.optim_step", "--scale", "0.02", "--steps", "2", "--warmup", "1", "--out", tmp_path,
               timeout=300)
    res = json.loads((tmp_path / "optim_step.json").read_text())
    assert {"VRLAMB", "LAMB", "VRAdamW", "VRLAMB partition", "AdamW fused", "VRLAMB gathered",
            "backward placed", "backward gathered", "LAMB backward", "LAMB backward gathered",
            "backward LAMB placed", "backward LAMB gathered"} <= set(res["median_s"])
    # issue 14's targets are on the LAMB a training process gets: its gradient handed over
    assert set(res["targets"]) == {"VRLAMB/AdamW fused", "VRAdamW/AdamW fused", "VRLAMB/LAMB backward",
                                   "torch-optimizer Lamb/LAMB backward"}
    assert "torch-optimizer Lamb/LAMB backward incl. backward cost" in res["ratios"]
    assert all(v > 0 for v in res["median_s"].values())
    assert (tmp_path / "optim_step.png").stat().st_size > 1000
    assert res["passes_synchronised"] is False  # the CPU's timed steps themselves are taken apart
    # where each step's time goes: every flat pass over every element, the arrays it touches
    passes, n = res["passes"], res["params"]
    # a telemetry record adds its noise sums to the r_raw pass and one pass for the clamped
    # counts (gbar and the squares again)
    arrays = {"AdamW fused": 4, "LAMB partition": 7, "LAMB": 8, "VRLAMB partition": 10, "VRLAMB": 10,
              "VRLAMB gathered": 12, "VRAdamW": 8, "VRLAMB partition telemetry": 12,
              "LAMB backward": 7, "LAMB backward gathered": 8}  # handed over: no gather, u recomputed
    assert {k: passes[k]["arrays"] for k in arrays} == arrays
    assert "torch-optimizer Lamb" not in passes and "AdamW foreach" not in passes  # not ours: no passes
    for name in set(arrays) - {"AdamW fused"}:
        rows = passes[name]["passes"]
        for fn in {r["fn"] for r in rows if r["kind"] != "gather"}:
            # block and edge kernels: every element (the block's straddling rows twice)
            assert n <= sum(r["elements"] for r in rows if r["fn"] == fn) <= n + 2048 * res["tensors"]
        assert 0 < passes[name]["passes_ms"] + passes[name]["gathers_ms"] < res["median_s"][name] * 1e3
        # each bulk pass's ms per array against fused AdamW's, and the slowest of them
        bulk = [r for r in rows if r["kind"] != "edge" and r["elements"] * 2 > n]
        assert bulk and all("per_array_vs_fused_adamw" not in r for r in rows if r not in bulk)
        fused = passes["AdamW fused"]["ms_per_array"]
        for r in bulk:
            assert r["per_array_vs_fused_adamw"] == pytest.approx(r["ms_per_array"] / fused)
        assert passes[name]["worst_per_array_vs_fused_adamw"] == max(r["per_array_vs_fused_adamw"] for r in bulk) > 0
    assert res["cpu"]["logical_cpus"] >= 1


def test_optim_step_keep_freed_memory(tmp_path):
    run_module("benchmarks.optim_step", "--scale", "0.02", "--steps", "2", "--warmup", "1", "--no-backward",
               "--no-partition", "--keep-freed-memory", "--out", tmp_path, timeout=300)
    res = json.loads((tmp_path / "optim_step_keep_freed.json").read_text())
    assert res["allocator"]["keep_freed_memory"] is True
    assert {"LAMB", "AdamW fused", "torch-optimizer Lamb"} <= set(res["median_s"])
    assert set(res["targets"]) == {"torch-optimizer Lamb/LAMB"}  # no backward passes: LAMB gathers p.grad
    assert not (tmp_path / "optim_step.json").exists()  # never over the default run's file


def test_first_step_cold_and_warm_cache(tmp_path):
    """Two fresh processes on one new Inductor cache, each timing its steps (compiled kernels)."""
    run_module("benchmarks.first_step", "--scale", "0.02", "--steps", "3", "--k", "2", "--compile", "always",
               "--out", tmp_path, timeout=600)
    res = json.loads((tmp_path / "first_step.json").read_text())
    assert set(res["runs"]) == {"cold", "warm"} and res["compile"] == "always" and res["optimizer"] == "VRLAMB"
    for run in res["runs"].values():
        assert len(run["steps_s"]) == 3 and all(t > 0 for t in run["steps_s"]) and run["process_s"] > 0
    assert (tmp_path / "first_step.png").stat().st_size > 1000
    proc = run_module("benchmarks.first_step", "--k", "1", "--out", tmp_path, timeout=120, check=False)
    assert proc.returncode != 0 and "--k >= 2, got --steps 3 --k 1" in proc.stderr
    proc = run_module("benchmarks.first_step", "--scale", "0.02", "--timeout", "0.5", "--out", tmp_path,
                      timeout=120, check=False)  # a process that runs too long is stopped, with a message
    assert proc.returncode != 0 and "the cold run took more than --timeout 0.5 s and was stopped" in proc.stderr
    if not torch.cuda.is_available():
        proc = run_module("benchmarks.first_step", "--device", "cuda", "--out", tmp_path, timeout=120, check=False)
        assert proc.returncode != 0 and "--device must be cpu, or cuda where" in proc.stderr


def test_optim_step_host_overhead(tmp_path):
    run_module("benchmarks.optim_step", "--host", "--steps", "2", "--warmup", "1", "--no-backward", "--out", tmp_path,
               timeout=600)
    res = json.loads((tmp_path / "optim_step_host.json").read_text())
    assert res["host_overhead"] and res["tensors"] == 199 and res["params"] < 100_000
    assert {"VRLAMB partition", "LAMB", "AdamW fused"} <= set(res["median_s"]) and res["targets"] == {}
    assert (tmp_path / "optim_step_host.png").stat().st_size > 1000


def test_grad_handover_small(tmp_path):
    run_module("benchmarks.grad_handover", "--tiny", "--rounds", "1", "--micro", "4", "--out", tmp_path, timeout=300)
    res = json.loads((tmp_path / "grad_handover.json").read_text())
    assert set(res["median_s"]) == {"placed", "gathered"}
    assert all(len(res["samples_s"][m]["step"]) == 1 for m in ("placed", "gathered"))
    assert (tmp_path / "grad_handover.png").stat().st_size > 1000
    run_module("benchmarks.grad_handover", "--tiny", "--rounds", "1", "--micro", "4", "--optimizer", "LAMB",
               "--out", tmp_path, timeout=300)
    res = json.loads((tmp_path / "grad_handover_lamb.json").read_text())
    assert res["optimizer"] == "LAMB" and set(res["median_s"]) == {"placed", "gathered"}


def test_grad_handover_rejects_bad_counts(tmp_path):
    proc = run_module("benchmarks.grad_handover", "--tiny", "--micro", "0", "--out", tmp_path, timeout=300,
                      check=False)
    assert proc.returncode != 0 and "--micro must be >= 1, got 0" in proc.stderr


def test_bert_throughput_tiny_on_cpu(tmp_path):
    proc = run_module("benchmarks.bert_throughput", "--size", "tiny", "--micro-batch", "2", "--accum", "2",
                      "--steps", "2", "--warmup", "1", "--out", tmp_path, timeout=300)
    res = json.loads((tmp_path / "bert_throughput_tiny.json").read_text())
    assert set(res["median_step_s"]) == {"LAMB", "VRLAMB"}
    assert all(len(v) == 2 for v in res["step_times_s"].values())
    assert res["sequences_per_s"]["LAMB"] == 4 / res["median_step_s"]["LAMB"]
    assert "step 0 (warm-up) VRLAMB" in proc.stdout  # progress per step, so a stalled run shows where


def test_gpu_check_runs_only_the_named_parts(tmp_path):
    import subprocess
    import sys

    from ds_helpers import ROOT

    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(tmp_path)], cwd=ROOT,
                          env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable, "PARTS": "none"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no CUDA device" in proc.stdout and "optim_matrix_cpu: not in PARTS, skipped" in proc.stdout
    assert not (tmp_path / "optim_matrix_cpu.log").exists()


def test_gpu_check_noise_cases_on_the_cpu(tmp_path):
    """gpu_check.py's noise-scale cases (its CPU trial, 1 rank): each record against section 7
    on the float64 groups. The full set of its cases runs on CUDA in gpu_check.sh."""
    run_module("benchmarks.gpu_check", "--device", "cpu", "--only", "NVLAMB-s2-a4-noise", "--out", tmp_path,
               timeout=600)
    res = json.loads((tmp_path / "deepspeed_gpu.json").read_text())["cases"]
    assert list(res) == ["NVLAMB-s2-a4-noise"]
    r = res["NVLAMB-s2-a4-noise"]
    assert r["ok"] and r["noise_rel_err"] < r["bound"] and r["b_simple"] > 0
    proc = run_module("benchmarks.gpu_check", "--device", "cpu", "--only", "nothing", "--out", tmp_path,
                      timeout=120, check=False)
    assert proc.returncode != 0 and "--only 'nothing' matches no case" in proc.stderr


def test_noise_rel_err_sees_a_wrong_record():
    """The check can fail: a record off by a factor, or with a value where section 7 has none."""
    import sys

    from ds_helpers import ROOT

    sys.path.insert(0, str(ROOT))
    from benchmarks.gpu_check import noise_rel_err
    from test_deepspeed_zero import exact_noise

    gen = torch.Generator().manual_seed(0)
    groups = [torch.randn(4, 3, 5, generator=gen, dtype=torch.float64) + 1.0,
              torch.randn(4, 7, generator=gen, dtype=torch.float64)]
    model, layers = exact_noise(groups, b=12)
    rec = {**model, "layers": {"a": dict(layers[0]), "b": dict(layers[1])}}
    assert noise_rel_err(rec, groups, 12, ["a", "b"]) == 0.0
    rec["layers"]["b"]["trace_cov"] *= 1.001
    assert noise_rel_err(rec, groups, 12, ["a", "b"]) == pytest.approx(1e-3)
    assert noise_rel_err(rec, groups, 13, ["a", "b"]) > 0.07  # the wrong b
    rec["layers"]["b"]["b_simple"] = None if layers[1]["b_simple"] is not None else 1.0
    assert noise_rel_err(rec, groups, 12, ["a", "b"]) == float("inf")


def test_pretrain_route_then_squad_on_two_cpu_ranks(tmp_path):
    """The user's whole route through the launch scripts, as gpu_check.sh runs it on CUDA: bf16
    ZeRO-2 phase 1 and phase 2 with the optimizer state carried, then SQuAD on phase 2's export."""
    proc = run_module("benchmarks.pretrain_route", "--precision", "bf16", "--squad", "--out", tmp_path, timeout=900)
    res = json.loads((tmp_path / "pretrain_route_bf16.json").read_text())
    assert res["ok"] and res["ranks"] == 2 and res["device"] == "cpu"
    for phase, steps in (("phase1", 4), ("phase2", 2)):
        assert res[phase]["steps"] == steps and res[phase]["hf_is_the_fp32_masters"], res[phase]
    squad = res["squad"]
    assert squad["ok"] and squad["returncode"] == 0 and squad["world_size"] == 2
    # 64 questions, 64 windows, global batch 32 (configs/squad_tiny.json on 2 ranks), one epoch
    assert (squad["train_examples"], squad["eval_examples"], squad["eval_missing"], squad["steps"]) == (64, 40, 0, 2)
    assert 0.0 <= squad["exact_match"] <= squad["f1"] <= 100.0
    assert "squad: exit 0, 2 steps on 2 ranks" in proc.stdout
    assert "SQuAD v1.1, 40 questions" in (tmp_path / "squad_route_bf16.log").read_text()


def test_pretrain_route_reports_a_failed_launch_and_skips_squad(tmp_path):
    proc = run_module("benchmarks.pretrain_route", "--precision", "bf16", "--squad", "--phase1-steps", "0",
                      "--out", tmp_path, timeout=600, check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    res = json.loads((tmp_path / "pretrain_route_bf16.json").read_text())
    assert not res["ok"] and res["returncode"] != 0 and "squad" not in res
    assert "squad: not run: the pretraining route failed" in proc.stdout
    assert "pretraining.max_steps must be an integer >= 1, got 0" in proc.stderr  # the launch's own message


def test_pretrain_route_stops_a_launch_that_runs_over_its_timeout(tmp_path):
    import subprocess
    import time

    proc = run_module("benchmarks.pretrain_route", "--precision", "bf16", "--timeout", "5", "--out", tmp_path,
                      timeout=300, check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "launch/pretrain_bert.sh took more than --timeout 5 s and was stopped with its ranks" in proc.stderr
    assert (tmp_path / "pretrain_route_bf16.log").exists()
    time.sleep(1)
    left = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True).stdout.split()
    assert not left, f"processes of the stopped launch are still running: {left}"


def test_optim_step_passes_flag_is_for_cuda(tmp_path):
    proc = run_module("benchmarks.optim_step", "--passes", "--out", tmp_path, timeout=120, check=False)
    assert proc.returncode != 0 and "--passes is for --device cuda (got --device cpu)" in proc.stderr
    assert not any(tmp_path.iterdir())


def test_reuse_step_small(tmp_path):
    """A gsnr_interval reuse step makes its own |gbar| check except where DeepSpeed checked."""
    run_module("benchmarks.reuse_step", "--scale", "0.02", "--steps", "2", "--warmup", "1", "--out", tmp_path,
               timeout=300)
    res = json.loads((tmp_path / "reuse_step.json").read_text())
    fns = {name: {e["fn"] for e in log} for name, log in res["passes_last_step"].items()}
    assert "raw_gsnr_terms" in fns["VRLAMB GSNR step"] and "abs_grad_terms" not in fns["VRLAMB GSNR step"]
    assert "abs_grad_terms" in fns["VRLAMB reuse step, own check"]
    assert fns["VRLAMB reuse step, DeepSpeed checked"] == fns["LAMB"] == {"lamb_moments", "lamb_apply"}
    assert all(v > 0 for v in res["median_s"].values()) and len(res["ratios"]) == 4
    assert (tmp_path / "reuse_step.png").stat().st_size > 1000
    proc = run_module("benchmarks.reuse_step", "--steps", "0", "--out", tmp_path, timeout=120, check=False)
    assert proc.returncode != 0 and "--steps must be >= 1, got 0" in proc.stderr
    if not torch.cuda.is_available():
        proc = run_module("benchmarks.reuse_step", "--device", "cuda", "--out", tmp_path, timeout=120, check=False)
        assert proc.returncode != 0 and "--device must be cpu, or cuda where a CUDA device is present" in proc.stderr


def test_megatron_checkpoint_small(tmp_path):
    pytest.importorskip("megatron.core")
    from benchmarks.megatron_checkpoint import main

    result = main(["--hidden", "256", "--repeats", "2", "--out", str(tmp_path)])
    assert result["params"] == 41 * 256 + 8 and result["state_keys"] == ["exp_avg", "exp_avg_sq", "fp32",
                                                                          "gsnr_momentum"]
    assert len(result["medians"]) == 2 * 3 * 2 and all(m["seconds"] > 0 for m in result["medians"].values())
    assert all(len(samples) == 2 * 3 * 2 for samples in result["samples"])  # repeats x formats x save/load
    assert (tmp_path / "megatron_checkpoint.json").exists() and (tmp_path / "megatron_checkpoint.png").exists()
    with pytest.raises(SystemExit):
        main(["--repeats", "0", "--out", str(tmp_path)])
