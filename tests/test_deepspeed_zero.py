"""Optimizers selected by name in a DeepSpeed config, exact on 2 CPU ranks (gloo).

NVLAMB / LARS under ZeRO 0/1/2; the VR optimizers under ZeRO-2. The model's first weight
(30 elements) spans both ranks' partitions (53 parameters, 28 per rank), so trust ratios
and GSNR layer means are only right if they are reduced across ranks; reduce_bucket_size
20 makes several gradient buckets per micro-step.
"""

import json

import pytest
import torch

from ds_helpers import run_deepspeed
from reference import Reference, group_grads, max_rel_err

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "ds_scripts"))
from tiny_problem import batch, make_model  # noqa: E402

STEPS, WORLD = 3, 2
# name: (reference base, DeepSpeed params, extra reference hyperparameters)
HP = {"NVLAMB": ("lamb", {"lr": 0.02, "betas": [0.9, 0.999], "eps": 1e-6, "weight_decay": 0.01}, {}),
      "LARS": ("lars", {"lr": 2.0, "momentum": 0.9, "eta": 0.001, "weight_decay": 0.001}, {}),
      "VRLAMB": ("lamb", {"lr": 0.02, "betas": [0.9, 0.999], "eps": 1e-6, "weight_decay": 0.01,
                          "gamma": 0.1, "beta3": 0.9}, {}),
      "VRSGD": ("sgd", {"lr": 0.2, "weight_decay": 0.01, "gamma": 0.1}, {}),
      "VRLARS": ("lars", {"lr": 2.0, "momentum": 0.9, "eta": 0.001, "weight_decay": 0.001, "gamma": 0.1}, {}),
      "VRAdamW": ("adam", {"lr": 0.01, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.1,
                           "gamma": 0.1, "beta3": 0.9}, {"decoupled": True})}
VR_KEYS = ("gsnr_interval", "sq_comm_dtype", "telemetry_interval")


def config(opt, stage, gas, clip=0.0, **zero):
    return {
        "train_micro_batch_size_per_gpu": 48 // (WORLD * gas),
        "gradient_accumulation_steps": gas,
        "gradient_clipping": clip,
        "optimizer": {"type": opt, "params": dict(HP[opt][1])},
        "zero_optimization": {"stage": stage, "reduce_bucket_size": 20, "allgather_bucket_size": 20, **zero},
    }


def reference(opt, gas, clip=0.0, steps=STEPS, interval=1, history=None):
    """Float64 reference over the k = ranks x micro-steps explicit group gradients.

    ``history``: if a list, gets (parameters before the step, group gradients) per step."""
    base, hp, extra = HP[opt]
    hp = {k: tuple(v) if isinstance(v, list) else v for k, v in hp.items()}
    gamma, beta3 = hp.pop("gamma", None), hp.pop("beta3", 0.0)
    model = make_model()
    ref = Reference(list(model.parameters()), base, gamma=gamma, beta3=beta3, interval=interval, **hp, **extra)
    for step in range(steps):
        with torch.no_grad():
            for p, t in zip(model.parameters(), ref.theta):
                p.copy_(t.float())
        x, y = batch(step)
        groups = group_grads(model, torch.nn.functional.mse_loss, x, y, WORLD * gas)
        if history is not None:
            history.append(groups)
        if clip > 0.0:  # DeepSpeed clips the mean gradient; the GSNR is scale-invariant
            norm = torch.sqrt(sum((g.mean(0) ** 2).sum() for g in groups)).item()
            coef = 1.0 / max(1.0, (norm + 1e-6) / clip)
            groups = [g * coef for g in groups]
        ref.step(groups)
    return ref.theta


# Every configuration below runs in ONE launch (a fresh model and engine each); the tests
# then check their parts of the results. id: (optimizer, stage, accumulation, clip, zero
# options, VR options, extra config)
PARITY = {
    "NVLAMB-s0-a1": ("NVLAMB", 0, 1, 0.0, {}, {}, {}),
    "NVLAMB-s1-a2": ("NVLAMB", 1, 2, 0.0, {}, {}, {}),
    "NVLAMB-s2-a1": ("NVLAMB", 2, 1, 0.0, {}, {}, {}),
    "NVLAMB-s2-a2": ("NVLAMB", 2, 2, 0.0, {}, {}, {}),
    "LARS-s2-a2": ("LARS", 2, 2, 0.0, {}, {}, {}),
    "VRLAMB-s0-a2": ("VRLAMB", 0, 2, 0.0, {}, {}, {}),
    "VRSGD-s0-a2-clip": ("VRSGD", 0, 2, 0.05, {}, {}, {}),
    "VRLAMB-s1-a1": ("VRLAMB", 1, 1, 0.0, {}, {}, {}),
    "VRLAMB-s1-a2": ("VRLAMB", 1, 2, 0.0, {}, {}, {}),
    "VRSGD-s1-a3": ("VRSGD", 1, 3, 0.0, {}, {}, {}),
    "VRSGD-s1-a2-clip": ("VRSGD", 1, 2, 0.05, {}, {}, {}),
    "VRLAMB-s2-a1": ("VRLAMB", 2, 1, 0.0, {}, {}, {}),
    "VRLAMB-s2-a2": ("VRLAMB", 2, 2, 0.0, {}, {}, {}),
    "VRSGD-s2-a2": ("VRSGD", 2, 2, 0.0, {}, {}, {}),
    "VRSGD-s2-a2-clip": ("VRSGD", 2, 2, 0.05, {}, {}, {}),
    "VRLARS-s2-a2": ("VRLARS", 2, 2, 0.0, {}, {}, {}),
    "VRAdamW-s2-a2": ("VRAdamW", 2, 2, 0.0, {}, {}, {}),
    **{f"VRLAMB-s2-a2-ov{o:d}-cg{c:d}-rs{r:d}": (
        "VRLAMB", 2, 2, 0.0, {"overlap_comm": o, "contiguous_gradients": c, "reduce_scatter": r}, {}, {})
       for o in (False, True) for c in (False, True) for r in (False, True)},
    "VRLAMB-s2-a2-interval2": ("VRLAMB", 2, 2, 0.0, {}, {"gsnr_interval": 2}, {}),
    "VRSGD-s1-a2-interval2": ("VRSGD", 1, 2, 0.0, {}, {"gsnr_interval": 2}, {}),
    "VRLAMB-s0-a2-interval2": ("VRLAMB", 0, 2, 0.0, {}, {"gsnr_interval": 2}, {}),
}
OTHER = {  # not exact by design: checked against the reference with their own tolerance
    "VRLAMB-s2-a2-sqbf16": ("VRLAMB", 2, 2, 0.0, {}, {"sq_comm_dtype": "bf16"}, {}),
    "VRLAMB-s2-a2-bf16": ("VRLAMB", 2, 2, 0.0, {}, {}, {"bf16": {"enabled": True}}),
    "VRLAMB-s1-a2-bf16": ("VRLAMB", 1, 2, 0.0, {}, {}, {"bf16": {"enabled": True}}),
    "VRLAMB-s2-a2-fp16": ("VRLAMB", 2, 2, 0.0, {}, {}, {"fp16": {"enabled": True, "initial_scale_power": 8}}),
    "VRLAMB-s1-a2-telemetry": ("VRLAMB", 1, 2, 0.0, {}, {"telemetry_interval": 1}, {}),
    "VRLAMB-s2-a2-telemetry": ("VRLAMB", 2, 2, 0.0, {}, {"telemetry_interval": 2}, {}),
}
INTERVAL_STEPS = 4
# fp16: step 1 of this case overflows (inputs x 1e5) and must be skipped without a trace
FP16_OVERFLOW = [[0, 1.0], [1, 1e5], [1, 1.0], [2, 1.0]]


def case_config(spec, tmp_path, name):
    opt, stage, gas, clip, zero, vr, extra = spec
    cfg = config(opt, stage, gas, clip, **zero)
    cfg["optimizer"]["params"].update(vr)
    cfg.update(extra)
    if "telemetry_interval" in vr:
        cfg["csv_monitor"] = {"enabled": True, "output_path": str(tmp_path / "csv"), "job_name": name}
    return cfg


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("matrix")
    cases = []
    for name, spec in {**PARITY, **OTHER}.items():
        steps = INTERVAL_STEPS if "interval" in name else STEPS
        cases.append({"name": name, "config": case_config(spec, tmp_path, name), "steps": steps})
    fp16 = case_config(OTHER["VRLAMB-s2-a2-fp16"], tmp_path, "fp16-overflow")
    cases.append({"name": "VRLAMB-s2-a2-fp16-overflow", "config": fp16, "steps": FP16_OVERFLOW})
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    out = tmp_path / "results.pt"
    proc = run_deepspeed("train_tiny.py", None, tmp_path, "--cases", tmp_path / "cases.json", "--out", out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return torch.load(out), tmp_path


@pytest.mark.parametrize("name", list(PARITY))
def test_zero_matches_single_process(matrix, name):
    opt, stage, gas, clip, zero, vr, extra = PARITY[name]
    steps = INTERVAL_STEPS if "interval" in name else STEPS
    expected = reference(opt, gas, clip, steps=steps, interval=vr.get("gsnr_interval", 1))
    assert max_rel_err(matrix[0][name]["params"], expected) < 2e-5


def test_gsnr_interval_changes_the_trajectory(matrix):
    """The interval cases above are not trivially equal to the every-step reference."""
    assert max_rel_err(matrix[0]["VRLAMB-s2-a2-interval2"]["params"],
                       reference("VRLAMB", 2, steps=INTERVAL_STEPS)) > 1e-4


@pytest.mark.parametrize("name,bound", [("VRLAMB-s2-a2-sqbf16", 0.02), ("VRLAMB-s2-a2-bf16", 0.25),
                                        ("VRLAMB-s1-a2-bf16", 0.25), ("VRLAMB-s2-a2-fp16", 0.1)])
def test_low_precision_stays_close_to_fp32_reference(matrix, name, bound):
    start = [p.detach() for p in make_model().parameters()]
    ref = reference("VRLAMB", 2)
    moved, err = max_rel_err(start, ref), max_rel_err(matrix[0][name]["params"], ref)
    assert err < bound * moved, (err, moved)


def test_fp16_overflow_step_is_skipped_and_leaves_no_trace(matrix):
    res = matrix[0]
    assert res["VRLAMB-s2-a2-fp16-overflow"]["skipped_steps"] == 1
    assert res["VRLAMB-s2-a2-fp16"]["skipped_steps"] == 0
    for a, b in zip(res["VRLAMB-s2-a2-fp16-overflow"]["params"], res["VRLAMB-s2-a2-fp16"]["params"]):
        assert torch.equal(a, b)


def adapter_sent(res, name):
    return [r["squares"] for r in res[name]["bytes"]]


def test_squares_go_to_their_owner_once(matrix):
    """ZeRO-2: each rank sends each squared element once per micro-step (a reduce to its
    owner), 4 bytes in fp32, 2 in bf16; gsnr_interval 2 sends on every other step."""
    res = matrix[0]
    numel = sum(p.numel() for p in make_model().parameters())
    assert adapter_sent(res, "VRLAMB-s2-a2") == [numel * 4 * 2 * STEPS] * WORLD
    assert adapter_sent(res, "VRLAMB-s2-a2-sqbf16") == [numel * 2 * 2 * STEPS] * WORLD
    assert adapter_sent(res, "VRLAMB-s2-a2-interval2") == [numel * 4 * 2 * INTERVAL_STEPS // 2] * WORLD
    # ZeRO-1 reduces once per step, after accumulation: micro-step squares come from hooks
    assert adapter_sent(res, "VRLAMB-s1-a2") == [numel * 4 * STEPS] * WORLD


def test_extra_state_is_partition_sized_under_zero2(matrix):
    """Kept between steps: the squared-gradient partition and the GSNR momentum (fp32)."""
    res = matrix[0]
    numel = sum(p.numel() for p in make_model().parameters())
    align = 2 * WORLD  # DeepSpeed pads the flat group to a multiple of nccl_start_alignment_factor x ranks
    partition = -(-numel // align) * align // WORLD
    assert [r["kept"] for r in res["VRLAMB-s2-a2"]["bytes"]] == [2 * partition * 4] * WORLD
    # ZeRO-1 with accumulation also keeps full-size micro-step squares (as it keeps full grads)
    assert [r["kept"] for r in res["VRLAMB-s1-a2"]["bytes"]] == [2 * partition * 4 + numel * 4] * WORLD


@pytest.mark.parametrize("name,interval", [("VRLAMB-s1-a2-telemetry", 1), ("VRLAMB-s2-a2-telemetry", 2)])
def test_telemetry_is_exact_and_reaches_the_monitor(matrix, name, interval):
    res, tmp_path = matrix
    history = []
    reference("VRLAMB", 2, history=history)
    rec = res[name]["telemetry"]
    last = (STEPS - 1) // interval * interval  # the last step that recorded (0-based)
    assert rec["step"] == last + 1 and rec["k"] == WORLD * 2
    names = [n for n, _ in make_model().named_parameters()]
    assert list(rec["layers"]) == names
    tiny = torch.finfo(torch.float32).tiny
    for n, gg in zip(names, history[last]):
        gbar, sq = gg.mean(0), (gg ** 2).mean(0)
        r_raw = gbar ** 2 / ((sq - gbar ** 2).clamp_min(0) + tiny)
        assert rec["layers"][n]["gsnr_mean"] == pytest.approx(r_raw.mean().item(), rel=1e-3)
        assert rec["layers"][n]["clamped_fraction"] == pytest.approx(
            (r_raw < 0.1 * r_raw.mean()).double().mean().item(), abs=1.01 / gg[0].numel())
    csv = tmp_path / "csv" / name
    rows = (csv / "VRGD_clamped_fraction.csv").read_text().split()
    assert rows[0] == "step,clamped_fraction" and len(rows) == 1 + len(range(0, STEPS, interval))
    assert float(rows[-1].split(",")[1]) == pytest.approx(rec["clamped_fraction"])
    assert (csv / "VRGD_gsnr_mean_0.weight.csv").exists()


@pytest.mark.parametrize("opt,stage,vr", [("VRLAMB", 2, {}), ("VRSGD", 1, {"gsnr_interval": 3})])
def test_checkpoint_resume_is_bitwise(tmp_path, opt, stage, vr):
    cfg = config(opt, stage, 2)
    cfg["optimizer"]["params"].update(vr)
    straight, resumed, ckpt = tmp_path / "straight.pt", tmp_path / "resumed.pt", tmp_path / "ckpt"
    for args in (["--steps", 4, "--out", straight],
                 ["--steps", 2, "--save", ckpt, "--out", tmp_path / "half.pt"],
                 ["--steps", 2, "--start", 2, "--load", ckpt, "--out", resumed]):
        proc = run_deepspeed("train_tiny.py", cfg, tmp_path, *args)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for a, b in zip(torch.load(straight), torch.load(resumed)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("stage", [2, 0])
def test_two_rank_checkpoint_continues_on_one_rank(tmp_path, stage):
    """Save at step 2 with 2 ranks (ZeRO-2, a = 2), consolidate, go on with 1 rank (a = 4:
    the same k = 4 groups of 12 samples): the same trajectory as 4 steps on 2 ranks."""
    from vrgd_ds.deepspeed.checkpoint import consolidate, save_consolidated

    two, ckpt = config("VRLAMB", 2, 2), tmp_path / "ckpt"
    proc = run_deepspeed("train_tiny.py", two, tmp_path, "--steps", 2, "--save", ckpt, "--out", tmp_path / "half.pt")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    merged = save_consolidated(ckpt / "last", tmp_path / "merged.pt")
    assert merged["saved_world_size"] == 2
    names = [n for n, _ in make_model().named_parameters()]
    for name, p in zip(names, torch.load(tmp_path / "half.pt")):
        assert torch.equal(merged["weights"][name], p)
        assert set(merged["state"][name]) >= {"exp_avg", "exp_avg_sq", "gsnr_momentum", "gsnr_step", "step"}
    one = config("VRLAMB", stage, 4)
    one["train_micro_batch_size_per_gpu"] = 12
    proc = run_deepspeed("train_tiny.py", one, tmp_path, "--steps", 2, "--start", 2, "--load-consolidated",
                         tmp_path / "merged.pt", "--out", tmp_path / "one.pt", ranks=1)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert max_rel_err(torch.load(tmp_path / "one.pt"), reference("VRLAMB", 2, steps=4)) < 2e-5
    with pytest.raises(FileNotFoundError, match="not a DeepSpeed ZeRO-1/2 checkpoint folder"):
        consolidate(tmp_path)


@pytest.mark.parametrize("change,expected", [
    ({"bf16": {"enabled": True}, "zero_optimization": {"stage": 0}},
     "optimizer type 'VRLAMB' with bf16 and zero_optimization.stage 0"),
    ({"optimizer": {"type": "VRLAMB", "params": {"lr": 0.01, "gsnr_interval": 0}}},
     "gsnr_interval must be an integer >= 1, got 0"),
    ({"optimizer": {"type": "VRLAMB", "params": {"lr": 0.01, "sq_comm_dtype": "fp16"}}},
     "sq_comm_dtype must be one of ('fp32', 'bf16'), got 'fp16'"),
    ({"optimizer": {"type": "VRLAMB", "params": {"lr": 0.01, "gamma": 1.5}}},
     "gamma must be in (0, 1], got 1.5"),
])
def test_bad_vr_configs_fail_at_initialize(tmp_path, change, expected):
    cfg = config("VRLAMB", 2, 1)
    cfg.update(change)
    proc = run_deepspeed("train_tiny.py", cfg, tmp_path, "--out", tmp_path / "x.pt")
    assert proc.returncode != 0
    assert expected in proc.stderr + proc.stdout


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
