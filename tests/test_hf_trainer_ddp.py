"""HF Trainer without DeepSpeed (``vrgd_ds.hf.attach_moments``): real Trainer runs, under
``torchrun`` with 2 gloo CPU ranks (Trainer wraps the model in DDP) and in one process,
against the float64 reference of docs/algorithm.md forming every group explicitly from the
batches each rank's forward passes recorded (tests/ds_scripts/hf_trainer_ddp.py).

Trainer's own scaling is part of what runs: it clips p.grad (``max_grad_norm``, active on
every step here) and, for this model, scales each micro-batch's loss by W (its
``num_items_in_batch`` route), not by 1 / a. The reference applies the clipping factor from
the norm Trainer logged, which makes the result independent of that common scale.
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch

from ds_helpers import ROOT, free_port, launch_env, retry_bare_gloo_abort, tail
from reference import Reference, max_rel_err

WORKER = ROOT / "tests" / "ds_scripts" / "hf_trainer_ddp.py"
ACCELERATE = WORKER.with_name("accelerate_ddp.py")
# Its true gradient is 0 (softmax ignores a bias shared by every key); in fp32 it is rounding
# noise, which no reference can follow.
ZERO_GRADIENT = "bert.encoder.layer.0.attention.self.key.bias"


def run_trainer(out, *args, ranks=2, script=WORKER):
    """SCRIPT under torchrun (RANKS gloo CPU ranks; 1: plain python) writing into OUT."""
    def launch():
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        cmd = [sys.executable, str(script)]
        if ranks > 1:
            cmd[1:1] = ["-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
                        "--master_port", str(free_port())]
        return subprocess.run([*cmd, "--out", str(out), *map(str, args)], cwd=out, capture_output=True, text=True,
                              env=launch_env({"PYTHONFAULTHANDLER": "1"}, pythonpath=ROOT), timeout=600)

    return retry_bare_gloo_abort(launch, script.name)


def reference_run(res, accumulation, base, mode="micro"):
    """The float64 reference over the recorded batches: step t's groups are every rank's
    micro-batches t*a .. t*a + a - 1 (mode "rank": their mean, one group per rank), clipped
    as Trainer clipped them."""
    sys.path.insert(0, str(WORKER.parent))
    from hf_trainer_ddp import tiny_bert

    model = tiny_bert().double()
    params = list(model.parameters())
    assert all(torch.equal(p.float(), q) for p, q in zip(params, res["initial"]))
    hp = dict(res["hp"])
    gamma, beta3 = hp.pop("gamma"), hp.pop("beta3")
    if base == "adam":
        hp["decoupled"] = True
    ref = Reference(params, base, gamma=gamma, beta3=beta3, **hp)
    seen = res["seen"]
    assert all(len(rank) == len(res["grad_norms"]) * accumulation for rank in seen)
    for t, logged in enumerate(res["grad_norms"]):
        with torch.no_grad():
            for p, theta in zip(params, ref.theta):
                p.copy_(theta)
        groups = [[] for _ in params]
        for rank in seen:
            micro = [torch.autograd.grad(model(input_ids=ids, labels=labels).loss, params)
                     for ids, labels in rank[t * accumulation:(t + 1) * accumulation]]
            for i, gs in enumerate(zip(*micro)):
                groups[i].extend([sum(gs) / len(gs)] if mode == "rank" else gs)
        groups = [torch.stack(g) for g in groups]
        norm = float(torch.sqrt(sum((g.mean(0) ** 2).sum() for g in groups)))
        # torch's clip_grad_norm_ on Trainer's gradient c * gbar, whose norm Trainer logged
        factor = min(1.0, res["max_grad_norm"] / (logged + 1e-6)) * logged / norm
        assert factor * norm < 0.99 * logged, "clipping must be active on every step"
        ref.step([g * factor for g in groups])
    return ref.theta


def compare(res, expected):
    errs = {n: max_rel_err([a], [e]) for n, a, e in zip(res["names"], res["final"], expected) if n != ZERO_GRADIENT}
    moved = [(a - b).abs().max().item() for n, a, b in zip(res["names"], res["final"], res["initial"])
             if n != ZERO_GRADIENT]
    assert min(moved) > 1e-5  # every layer stepped
    return max(errs.values()), errs


# VRAdamW's bound is wider: Adam divides every element by its own sqrt(v), so the fp32
# model's rounding of a gradient element that is a near-cancelling sum moves that element by
# a fraction of a step. Measured: word-embedding element (53, 9), whose step-2 gradient the
# fp32 BERT computes 2e-4 off the float64 one (the model's backward, before any code of
# ours), ends 4.5e-5 off; with VRLAMB the trust ratio keeps such steps small (< 1e-5).
@pytest.mark.parametrize("optimizer,base,steps,bound", [("VRLAMB", "lamb", 3, 2e-5), ("VRAdamW", "adam", 2, 1.5e-4)])
def test_trainer_ddp_matches_the_reference(tmp_path, optimizer, base, steps, bound):
    """torchrun, 2 ranks x 2 accumulation steps: Trainer wraps the model in DDP, the callback
    attaches DDPMoments to it at train begin (k = 4), Trainer's no_sync, clipping and
    find_unused_parameters run as a user's would."""
    out = tmp_path / "run"
    twice = optimizer == "VRLAMB"  # and a second train() on the same DDP model: 2 x 3 steps
    proc = run_trainer(out, "--optimizer", optimizer, "--accumulation", 2, "--steps", steps,
                       *(["--train-twice"] if twice else []))
    assert proc.returncode == 0, tail(proc)
    res = torch.load(out / "result.pt")
    assert res["source"] == "DDPMoments" and res["wrapped"] == "DistributedDataParallel"
    assert res["k"] == [4] * steps * (2 if twice else 1) and res["samples_per_group"] == 4
    worst, errs = compare(res, reference_run(res, 2, base))
    assert worst < bound, errs


@pytest.mark.parametrize("route", [("--gradient-checkpointing", "reentrant"),
                                   ("--gradient-checkpointing", "non-reentrant"),
                                   ("--torch-compile",)], ids=["ckpt-reentrant", "ckpt-non-reentrant", "compiled"])
def test_trainer_ddp_routes_match_the_reference(tmp_path, route):
    """Trainer's activation checkpointing (HF's layers inside torch's checkpoint: a reentrant
    one runs its own nested backward) and torch_compile (Trainer's DDP model compiled: the
    callback finds DDP inside the OptimizedModule), VR-LAMB, 2 ranks x 2 steps."""
    out = tmp_path / "run"
    proc = run_trainer(out, "--steps", 2, *route)
    assert proc.returncode == 0, tail(proc)
    res = torch.load(out / "result.pt")
    assert res["source"] == "DDPMoments" and res["k"] == [4, 4]
    assert res["checkpointing"] == (route[0] == "--gradient-checkpointing")
    assert res["wrapped"] == ("OptimizedModule" if route[0] == "--torch-compile" else "DistributedDataParallel")
    worst, errs = compare(res, reference_run(res, 2, "lamb"))
    assert worst < 2e-5, errs


def test_accelerate_loop_matches_the_reference(tmp_path):
    """A plain Accelerate loop (accumulate, backward, clip_grad_norm_) with attach_to_model on
    the prepared DDP model: 2 ranks x 2 accumulation steps, 3 steps."""
    out = tmp_path / "run"
    proc = run_trainer(out, script=ACCELERATE)
    assert proc.returncode == 0, tail(proc)
    res = torch.load(out / "result.pt")
    assert res["source"] == "DDPMoments" and res["wrapped"] == "DistributedDataParallel"
    assert res["k"] == [4, 4, 4] and res["samples_per_group"] == 4
    worst, errs = compare(res, reference_run(res, 2, "lamb"))
    assert worst < 2e-5, errs


def test_trainer_one_process_matches_the_reference(tmp_path):
    """One process, 4 accumulation steps: the callback attaches MicroStepMoments (k = 4)."""
    out = tmp_path / "run"
    proc = run_trainer(out, "--accumulation", 4, "--steps", 3, ranks=1)
    assert proc.returncode == 0, tail(proc)
    res = torch.load(out / "result.pt")
    assert res["source"] == "MicroStepMoments" and len(res["seen"]) == 1
    assert res["k"] == [4, 4, 4]
    worst, errs = compare(res, reference_run(res, 4, "lamb"))
    assert worst < 2e-5, errs


def test_trainer_ddp_rank_mode_counts_ranks(tmp_path):
    """mode="rank": a group per rank's accumulated batch (k = 2, too few for an fp32
    comparison: see the README on small k), samples per group = 4 per device x 3 steps."""
    out = tmp_path / "run"
    proc = run_trainer(out, "--mode", "rank", "--accumulation", 3, "--steps", 2)
    assert proc.returncode == 0, tail(proc)
    res = torch.load(out / "result.pt")
    assert res["source"] == "DDPMoments" and res["k"] == [2, 2] and res["samples_per_group"] == 12
    worst, _ = compare(res, reference_run(res, 3, "lamb", mode="rank"))
    assert worst < 5e-3  # k = 2: fp32 cancellation in s - gbar^2 (README), not a different algorithm


def test_trainer_ddp_resumes_from_its_checkpoint_bit_for_bit(tmp_path):
    """4 steps straight (checkpoints at 2 and 4) against 2 steps, then a new torchrun launch
    resuming from Trainer's checkpoint-2 (our optimizer state, GSNR momentum included, in
    Trainer's optimizer.pt) for 2 more: the same weights to the last bit."""
    straight = tmp_path / "straight"
    proc = run_trainer(straight, "--steps", 4, "--save-steps", 2)
    assert proc.returncode == 0, tail(proc)
    saved = torch.load(straight / "checkpoint-2" / "optimizer.pt", weights_only=False)
    assert "gsnr_momentum" in saved["state"][0] and "noise_scale" in saved
    resumed = tmp_path / "resumed"
    proc = run_trainer(resumed, "--steps", 4, "--resume", straight / "checkpoint-2")
    assert proc.returncode == 0, tail(proc)
    a, b = torch.load(straight / "result.pt"), torch.load(resumed / "result.pt")
    assert len(b["seen"][0]) == 2 * 2  # the resumed launch ran steps 3 and 4 only
    assert [torch.equal(x[0], y[0]) for x, y in zip(a["seen"][0][4:], b["seen"][0])] == [True] * 4
    assert all(torch.equal(x, y) for x, y in zip(a["final"], b["final"]))
    assert not all(torch.equal(x, y) for x, y in zip(a["final"], a["initial"]))


def test_trainer_ddp_refuses_an_optimizer_with_its_own_source(tmp_path):
    proc = run_trainer(tmp_path / "run", "--own-moments", "--steps", 1)
    assert proc.returncode != 0
    assert "already has a moment source (MicroStepMoments)" in proc.stderr + proc.stdout
    assert "build the optimizer without moments=" in proc.stderr + proc.stdout


def test_refusals_name_the_wrapper(tmp_path):
    """A real Trainer (one process) whose model Trainer would have put in torch DataParallel
    (several GPUs in one process; set here on the CPU) or that runs under DeepSpeed."""
    from transformers import Trainer, TrainingArguments

    sys.path.insert(0, str(WORKER.parent))
    from hf_trainer_ddp import tiny_bert
    from vrgd_ds import LAMB, VRLAMB
    from vrgd_ds.hf import attach_moments

    model = tiny_bert()
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], save_strategy="no")
    trainer = Trainer(model=model, args=args, optimizers=(VRLAMB(model.parameters()), None))
    callback = attach_moments(trainer)
    assert callback in trainer.callback_handler.callbacks
    trainer.model_wrapped = torch.nn.DataParallel(model)
    with pytest.raises(ValueError, match=r"torch.nn.DataParallel .* \(torchrun --nproc_per_node N"):
        callback.bind()
    trainer.model_wrapped = model
    first = callback.bind()
    assert type(first).__name__ == "MicroStepMoments" and trainer.optimizer.moments is first
    assert callback.bind() is first  # a second train(): nothing new
    trainer.optimizer = LAMB(model.parameters())  # no GSNR: nothing to attach
    assert callback.bind() is None


def test_attach_moments_checks_its_mode():
    from vrgd_ds.hf import MomentsCallback

    with pytest.raises(ValueError, match="mode must be one of \\('micro', 'rank'\\), got 'ranks'"):
        MomentsCallback(trainer=None, mode="ranks")
    with pytest.raises(ValueError, match="count_by must be one of"):
        MomentsCallback(trainer=None, count_by="calls")
