"""Optimizers selected by name in a DeepSpeed config, exact on 2 CPU ranks (gloo).

NVLAMB / LARS under ZeRO 0/1/2; the VR optimizers under ZeRO-2. The model's first weight
(30 elements) spans both ranks' partitions (53 parameters, 28 per rank), so trust ratios
and GSNR layer means are only right if they are reduced across ranks; reduce_bucket_size
20 makes several gradient buckets per micro-step.
"""

import pytest
import torch

from ds_helpers import run_deepspeed
from reference import Reference, group_grads, max_rel_err

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "ds_scripts"))
from tiny_problem import batch, make_model  # noqa: E402

STEPS, WORLD = 3, 2
HP = {"NVLAMB": ("lamb", {"lr": 0.02, "betas": [0.9, 0.999], "eps": 1e-6, "weight_decay": 0.01}),
      "LARS": ("lars", {"lr": 2.0, "momentum": 0.9, "eta": 0.001, "weight_decay": 0.001}),
      "VRLAMB": ("lamb", {"lr": 0.02, "betas": [0.9, 0.999], "eps": 1e-6, "weight_decay": 0.01,
                          "gamma": 0.1, "beta3": 0.9}),
      "VRSGD": ("sgd", {"lr": 0.2, "weight_decay": 0.01, "gamma": 0.1})}


def config(opt, stage, gas, clip=0.0):
    return {
        "train_micro_batch_size_per_gpu": 48 // (WORLD * gas),
        "gradient_accumulation_steps": gas,
        "gradient_clipping": clip,
        "optimizer": {"type": opt, "params": HP[opt][1]},
        "zero_optimization": {"stage": stage, "reduce_bucket_size": 20, "allgather_bucket_size": 20},
    }


def reference(opt, gas, clip=0.0):
    """Float64 reference over the k = ranks x micro-steps explicit group gradients."""
    base, hp = HP[opt]
    hp = {k: tuple(v) if isinstance(v, list) else v for k, v in hp.items()}
    gamma, beta3 = hp.pop("gamma", None), hp.pop("beta3", 0.0)
    model = make_model()
    ref = Reference(list(model.parameters()), base, gamma=gamma, beta3=beta3, **hp)
    for step in range(STEPS):
        with torch.no_grad():
            for p, t in zip(model.parameters(), ref.theta):
                p.copy_(t.float())
        x, y = batch(step)
        groups = group_grads(model, torch.nn.functional.mse_loss, x, y, WORLD * gas)
        if clip > 0.0:  # DeepSpeed clips the mean gradient; the GSNR is scale-invariant
            norm = torch.sqrt(sum((g.mean(0) ** 2).sum() for g in groups)).item()
            coef = 1.0 / max(1.0, (norm + 1e-6) / clip)
            groups = [g * coef for g in groups]
        ref.step(groups)
    return ref.theta


@pytest.mark.parametrize("opt,stage,gas,clip", [
    ("NVLAMB", 0, 1, 0.0), ("NVLAMB", 1, 2, 0.0), ("NVLAMB", 2, 1, 0.0), ("NVLAMB", 2, 2, 0.0),
    ("LARS", 2, 2, 0.0),
    ("VRLAMB", 2, 1, 0.0), ("VRLAMB", 2, 2, 0.0), ("VRSGD", 2, 2, 0.0), ("VRSGD", 2, 2, 0.05),
    ("VRLAMB", 0, 2, 0.0), ("VRSGD", 0, 2, 0.05),
])
def test_zero_matches_single_process(tmp_path, opt, stage, gas, clip):
    out = tmp_path / "params.pt"
    proc = run_deepspeed("train_tiny.py", config(opt, stage, gas, clip), tmp_path, "--steps", STEPS,
                         "--out", out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert max_rel_err(torch.load(out), reference(opt, gas, clip)) < 2e-5


def test_bf16_vrlamb_stays_close_to_fp32_reference(tmp_path):
    cfg = config("VRLAMB", 2, 2)
    cfg["bf16"] = {"enabled": True}
    out = tmp_path / "params.pt"
    proc = run_deepspeed("train_tiny.py", cfg, tmp_path, "--steps", STEPS, "--out", out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    start = [p.detach() for p in make_model().parameters()]
    ref = reference("VRLAMB", 2)
    moved, err = max_rel_err(start, ref), max_rel_err(torch.load(out), ref)
    assert err < 0.25 * moved, (err, moved)


@pytest.mark.parametrize("opt", ["VRLAMB", "VRSGD"])
def test_checkpoint_resume_is_bitwise(tmp_path, opt):
    cfg = config(opt, 2, 2)
    straight, resumed, ckpt = tmp_path / "straight.pt", tmp_path / "resumed.pt", tmp_path / "ckpt"
    for args in (["--steps", 4, "--out", straight],
                 ["--steps", 2, "--save", ckpt, "--out", tmp_path / "half.pt"],
                 ["--steps", 2, "--start", 2, "--load", ckpt, "--out", resumed]):
        proc = run_deepspeed("train_tiny.py", cfg, tmp_path, *args)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for a, b in zip(torch.load(straight), torch.load(resumed)):
        assert torch.equal(a, b)


def test_vr_optimizer_outside_zero2_is_refused_at_initialize(tmp_path):
    cfg = config("NVLAMB", 1, 1)
    cfg["optimizer"] = {"type": "VRLAMB", "params": {"lr": 0.01}}
    proc = run_deepspeed("train_tiny.py", cfg, tmp_path, "--out", tmp_path / "x.pt")
    assert proc.returncode != 0
    assert "optimizer type 'VRLAMB' with zero_optimization.stage 1" in proc.stderr + proc.stdout


def test_version_check():
    from vrgd_ds.deepspeed import check_deepspeed_version

    check_deepspeed_version("0.19.8")
    with pytest.raises(RuntimeError, match="found 0.18.9"):
        check_deepspeed_version("0.18.9")
    with pytest.raises(RuntimeError, match="found 0.20.0"):
        check_deepspeed_version("0.20.0")


def test_hf_trainer_with_deepspeed_config_uses_our_lamb(tmp_path):
    """The reference client that never calls deepspeed.initialize itself: HF Trainer."""
    import json
    import math

    cfg = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
           "train_batch_size": "auto", "gradient_clipping": "auto",
           "optimizer": {"type": "NVLAMB", "params": {"lr": "auto", "weight_decay": "auto",
                                                      "betas": "auto", "eps": "auto"}},
           "zero_optimization": {"stage": 2, "reduce_bucket_size": 2000}}
    out = tmp_path / "hf"
    proc = run_deepspeed("hf_trainer_tiny.py", cfg, tmp_path, "--out", out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((out / "result.json").read_text())
    assert res["optimizer"] == "LAMB" and res["layout"] == "ZeroLayout"
    assert len(res["losses"]) == 3 and all(math.isfinite(v) for v in res["losses"])


def test_unknown_optimizer_param_names_the_key_and_the_allowed_ones(tmp_path):
    cfg = config("VRLAMB", 2, 1)
    cfg["optimizer"]["params"]["gama"] = 0.2
    proc = run_deepspeed("train_tiny.py", cfg, tmp_path, "--out", tmp_path / "x.pt")
    assert proc.returncode != 0
    assert "optimizer 'VRLAMB': unknown params key 'gama'; allowed: lr, betas" in proc.stderr + proc.stdout


def test_allowed_params_lists_the_hyperparameters():
    from vrgd_ds.deepspeed import allowed_params
    from vrgd_ds import VRLAMB

    assert {"lr", "betas", "eps", "weight_decay", "gamma", "beta3"} <= set(allowed_params(VRLAMB))


@pytest.mark.parametrize("zero,word", [
    ({"stage": 3}, "zero_optimization.stage 3"),
    ({"stage": 2, "offload_optimizer": {"device": "cpu"}}, "offload"),
])
def test_unsupported_zero_settings_are_refused(tmp_path, zero, word):
    cfg = config("NVLAMB", 2, 1)
    cfg["zero_optimization"] = zero
    proc = run_deepspeed("train_tiny.py", cfg, tmp_path, "--out", tmp_path / "x.pt")
    assert proc.returncode != 0
    assert "optimizer type 'NVLAMB'" in proc.stderr + proc.stdout and word in proc.stderr + proc.stdout
