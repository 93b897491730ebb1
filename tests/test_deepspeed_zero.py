"""Every DeepSpeed route vrgd-ds supports, exact against the float64 reference; every
route it refuses, refused at initialize with its message. Real `deepspeed` launches on
CPU ranks with gloo.

The model's first weight (30 elements) spans both ranks' partitions (53 parameters, 28 per
rank), so trust ratios and GSNR layer means are only right if they are reduced across
ranks; reduce_bucket_size 20 makes several gradient buckets per micro-step. All cases of a
world size run in ONE launch (a fresh model and engine each); the tests then check their
parts of the results.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace

import pytest
import torch

from ds_helpers import run_deepspeed, tail
from reference import Reference, group_grads, max_rel_err
from tiny_problem import GATE, batch, make_model, uses_side

STEPS, WORLD = 3, 2
# name: (reference base, DeepSpeed params, extra reference hyperparameters)
HP = {"NVLAMB": ("lamb", {"lr": 0.02, "betas": [0.9, 0.999], "eps": 1e-6, "weight_decay": 0.01}, {}),
      "LARS": ("lars", {"lr": 2.0, "momentum": 0.9, "eta": 0.001, "weight_decay": 0.001}, {}),
      "VRLAMB": ("lamb", {"lr": 0.02, "betas": [0.9, 0.999], "eps": 1e-6, "weight_decay": 0.01,
                          "gamma": 0.1, "beta3": 0.9}, {}),
      "VRSGD": ("sgd", {"lr": 0.2, "weight_decay": 0.01, "gamma": 0.1}, {}),
      "VRLARS": ("lars", {"lr": 2.0, "momentum": 0.9, "eta": 0.001, "weight_decay": 0.001, "gamma": 0.1}, {}),
      "VRAdamW": ("adam", {"lr": 0.01, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.1,
                           "gamma": 0.1, "beta3": 0.9}, {"decoupled": True}),
      # DeepSpeed's own AdamW (torch's, on CPU), for the measure-only noise scale
      "AdamW": ("adam", {"lr": 0.01, "weight_decay": 0.1, "torch_adam": True}, {"decoupled": True})}
GNS = {"vrgd_noise_scale": {"interval": 1, "ema_decay": 0.9}}
GNS_FIRST = {"vrgd_noise_scale": {"interval": 100}}  # measures the first step only (at the initial weights)
AUTOCAST = {"torch_autocast": {"enabled": True, "dtype": "bfloat16"}}
BF16, FP16 = {"bf16": {"enabled": True}}, {"fp16": {"enabled": True, "initial_scale_power": 8}}


@dataclass(frozen=True)
class Case:
    opt: str
    stage: int
    gas: int = 2
    clip: float = 0.0
    zero: dict = field(default_factory=dict)  # zero_optimization settings
    vr: dict = field(default_factory=dict)  # extra optimizer params
    extra: dict = field(default_factory=dict)  # top-level config settings
    steps: object = STEPS  # a count, or [data step, input scale] pairs
    groups: str | None = None  # see train_tiny.param_groups
    client: str | None = None
    frozen: tuple = ()
    nan: dict | None = None
    coalesce: bool = False
    world: int = WORLD
    gas_changes: dict = field(default_factory=dict)  # data step -> accumulation from then on
    count_reads: bool = False  # count the last step's host reads (tests/ds_scripts/host_reads.py)
    gate: dict = field(default_factory=dict)  # data step -> per micro-step flags of GatedMLP's side layer
    compile: str | None = None  # engine.compile(): "model", or "autograd" (compiled autograd too)

    def gas_at(self, step: int) -> int:
        changed = [s for s in self.gas_changes if s <= step]
        return self.gas_changes[max(changed)] if changed else self.gas

    def config(self, tmp_path=None, name=""):
        cfg = {"train_micro_batch_size_per_gpu": 48 // (self.world * self.gas),
               "gradient_accumulation_steps": self.gas, "gradient_clipping": self.clip,
               "optimizer": {"type": self.opt, "params": {**HP[self.opt][1], **self.vr}},
               "zero_optimization": {"stage": self.stage, "reduce_bucket_size": 20,
                                     "allgather_bucket_size": 20, **self.zero}}
        cfg.update(json.loads(json.dumps(self.extra)))
        if "telemetry_interval" in self.vr and tmp_path is not None:
            cfg["csv_monitor"] = {"enabled": True, "output_path": str(tmp_path / "csv"), "job_name": name}
        return cfg

    def worker_case(self, name, tmp_path):
        out = {"name": name, "config": self.config(tmp_path, name), "steps": self.steps}
        for key in ("groups", "client", "nan", "coalesce", "count_reads", "compile"):
            if getattr(self, key):
                out[key] = getattr(self, key)
        if self.gas_changes:
            out["gas_changes"] = {str(s): g for s, g in self.gas_changes.items()}
        if self.gate:
            out["gate"] = {str(s): list(f) for s, f in self.gate.items()}
        if self.frozen:
            out["frozen"] = list(self.frozen)
        return out

    @property
    def data_steps(self):
        return list(range(self.steps)) if isinstance(self.steps, int) else [s for s, _ in self.steps]


def reference(case: Case, history=None, data_steps=None, model_dtype=torch.float32, device="cpu"):
    """Float64 reference over the k = ranks x micro-steps explicit group gradients.

    ``history``: if a list, gets the group gradients of every step. ``model_dtype``: the
    group gradients come from the model in that dtype (as a bf16 / fp16 engine computes
    them); everything after them is float64, on the CPU. ``device``: where the group
    gradients are computed (the GPU check computes them with the engine's kernels)."""
    base, hp, extra = HP[case.opt]
    hp = {k: tuple(v) if isinstance(v, list) else v for k, v in hp.items()}
    gamma, beta3 = hp.pop("gamma", None), hp.pop("beta3", 0.0)
    hp.pop("torch_adam", None)  # DeepSpeed's AdamW is torch's: the reference's decoupled Adam
    model = make_model(gated=bool(case.gate)).to(device=device, dtype=model_dtype)
    named = [(n, p) for n, p in model.named_parameters() if n not in case.frozen]
    for n, p in model.named_parameters():
        p.requires_grad_(n not in case.frozen)
    params = [p for _, p in named]
    ref = Reference([p.cpu() for p in params], base, gamma=gamma, beta3=beta3,
                    interval=case.vr.get("gsnr_interval", 1), **hp, **extra)
    per_param = [_group_hp(case, base, n) for n, _ in named]
    for step in (case.data_steps if data_steps is None else data_steps):
        k = case.world * case.gas_at(step)
        with torch.no_grad():
            for p, t in zip(params, ref.theta):
                p.copy_(t.to(device))
        x, y = batch(step)
        flags = case.gate.get(step, [True] * case.gas_at(step))  # group i: micro-step i // world, rank i % world
        groups = group_grads(model, lambda out, yb: torch.nn.functional.mse_loss(out.float(), yb),
                             x.to(device=device, dtype=model_dtype), y.to(device), k, params,
                             before_group=lambda i: setattr(model, "use_side", uses_side(flags[i // case.world],
                                                                                          i % case.world)))
        groups = [g.cpu() for g in groups]
        if history is not None:
            history.append(groups)
        if case.clip > 0.0:  # DeepSpeed clips the mean gradient; the GSNR is scale-invariant
            norm = torch.sqrt(sum((g.mean(0) ** 2).sum() for g in groups)).item()
            coef = 1.0 / max(1.0, (norm + 1e-6) / case.clip)
            groups = [g * coef for g in groups]
        ref.step(groups, per_param)
    theta = iter(ref.theta)
    return [p.detach().double() if n in case.frozen else next(theta)
            for n, p in make_model(gated=bool(case.gate)).named_parameters()]


def _group_hp(case: Case, base: str, name: str) -> dict:
    """The reference hyperparameters of a parameter's param group."""
    in_second = (name.endswith("bias") and case.groups in ("decay", "exclude")) or (
        case.groups == "small_last" and name == "2.bias")
    if not in_second:
        return {}
    if case.groups == "exclude" and base in ("lamb", "lars"):
        return {"excluded": True}
    return {"weight_decay": 0.0}


INTERVAL_STEPS = 4
NAN_STEPS = [[0, 1.0], [1, 1.0], [2, 1.0]]
NAN_AT_1 = {"step": 1, "param": "2.bias", "rank": 1}  # the second param group, one rank only

# GATE (tiny_problem): per micro-step, alike on every rank; GATE_RANKS: the ranks listed only
GATE_RANKS = {0: ([1], False), 1: (True, [0]), 2: ([0], [1]), 3: (False, False), 4: (True, True)}
# per step, every rank reaches the side layer on some micro-step (or none does): ZeRO-1 reduces
# once per step, so its buckets agree; ZeRO-2 reduces every micro-step, so its do not
GATE_RANKS_STEPWISE = {0: ([0], [1]), 1: ([1], [0]), 2: (True, [1]), 3: (False, False)}

PARITY = {
    "NVLAMB-s0-a1": Case("NVLAMB", 0, 1),
    "NVLAMB-s1-a2": Case("NVLAMB", 1),
    "NVLAMB-s2-a1": Case("NVLAMB", 2, 1),
    "NVLAMB-s2-a2": Case("NVLAMB", 2),
    "LARS-s2-a2": Case("LARS", 2),
    "VRLAMB-s0-a2": Case("VRLAMB", 0),
    "VRSGD-s0-a2-clip": Case("VRSGD", 0, clip=0.05),
    "VRLAMB-s1-a1": Case("VRLAMB", 1, 1),
    "VRLAMB-s1-a2": Case("VRLAMB", 1),
    "VRSGD-s1-a3": Case("VRSGD", 1, 3),
    "VRSGD-s1-a2-clip": Case("VRSGD", 1, clip=0.05),
    "VRLAMB-s2-a1": Case("VRLAMB", 2, 1),
    "VRLAMB-s2-a2": Case("VRLAMB", 2),
    "VRSGD-s2-a2": Case("VRSGD", 2),
    "VRSGD-s2-a2-clip": Case("VRSGD", 2, clip=0.05),
    "VRLARS-s2-a2": Case("VRLARS", 2),
    "VRAdamW-s2-a2": Case("VRAdamW", 2),
    **{f"VRLAMB-s2-a2-ov{o:d}-cg{c:d}-rs{r:d}": Case(
        "VRLAMB", 2, zero={"overlap_comm": o, "contiguous_gradients": c, "reduce_scatter": r})
       for o in (False, True) for c in (False, True) for r in (False, True)},
    "VRLAMB-s2-a2-interval2": Case("VRLAMB", 2, vr={"gsnr_interval": 2}, steps=INTERVAL_STEPS),
    "VRSGD-s1-a2-interval2": Case("VRSGD", 1, vr={"gsnr_interval": 2}, steps=INTERVAL_STEPS),
    "VRLAMB-s0-a2-interval2": Case("VRLAMB", 0, vr={"gsnr_interval": 2}, steps=INTERVAL_STEPS),
    # several param groups: HF/NVIDIA decay / no-decay, exclude_from_adaptation
    **{f"{o}-s{s}-a2-{g}": Case(o, s, groups=g) for o, s, g in (
        ("NVLAMB", 0, "decay"), ("NVLAMB", 1, "exclude"), ("NVLAMB", 2, "decay"), ("LARS", 2, "exclude"),
        ("VRLAMB", 0, "decay"), ("VRLAMB", 1, "decay"), ("VRLAMB", 2, "decay"), ("VRLAMB", 2, "exclude"),
        ("VRLARS", 1, "exclude"), ("VRAdamW", 2, "decay"))},
    "VRLAMB-s2-a2-decay-interval2": Case("VRLAMB", 2, groups="decay", vr={"gsnr_interval": 2},
                                         steps=INTERVAL_STEPS),
    "VRLAMB-s1-a2-rr": Case("VRLAMB", 1, groups="decay", zero={"round_robin_gradients": True}),
    "VRLAMB-s2-a2-rr": Case("VRLAMB", 2, groups="decay", zero={"round_robin_gradients": True}),
    "NVLAMB-s2-a2-rr": Case("NVLAMB", 2, groups="exclude", zero={"round_robin_gradients": True}),
    # optimizers built in Python and handed to deepspeed.initialize
    **{f"VRLAMB-s{s}-a2-instance": Case("VRLAMB", s, client="instance", groups="decay") for s in (0, 1, 2)},
    "NVLAMB-s2-a1-callable": Case("NVLAMB", 2, 1, client="callable"),
    "VRSGD-s1-a2-callable": Case("VRSGD", 1, client="callable"),
    # frozen parameters (requires_grad=False) are left out of the groups and never move
    **{f"{o}-s{s}-a2-frozen": Case(o, s, frozen=("0.bias",)) for o, s in (
        ("VRLAMB", 0), ("VRLAMB", 2), ("NVLAMB", 1))},
    # the batch grows through accumulation mid-run (DeepSpeed's set_train_batch_size): k follows
    # (at a step where DeepSpeed's micro-step count is a multiple of the new accumulation)
    **{f"VRLAMB-s{s}-a2to4": Case("VRLAMB", s, gas_changes={2: 4}) for s in (0, 1, 2)},
    # squares formed and reduced in chunks of 7 elements (pieces split across chunks)
    **{f"VRLAMB-s{s}-a{a}-chunk7": Case("VRLAMB", s, a, vr={"sq_chunk_numel": 7}) for s, a in (
        (0, 2), (1, 1), (1, 2), (2, 2), (3, 2))},
    # engine.compile(): the module compiled with torch.compile (Dynamo, Inductor)
    **{f"VRLAMB-s{s}-a2-compiled": Case("VRLAMB", s, compile="model") for s in (0, 1, 2, 3)},
    "NVLAMB-s2-a2-compiled": Case("NVLAMB", 2, groups="decay", compile="model"),
    # ZeRO-3: every parameter is split over both ranks, so every layer spans partitions
    "NVLAMB-s3-a2": Case("NVLAMB", 3),
    "NVLAMB-s3-a1-callable": Case("NVLAMB", 3, 1, client="callable"),
    "LARS-s3-a2-exclude": Case("LARS", 3, groups="exclude"),
    "VRLAMB-s3-a1": Case("VRLAMB", 3, 1),
    "VRLAMB-s3-a2": Case("VRLAMB", 3),
    "VRSGD-s3-a2-clip": Case("VRSGD", 3, clip=0.05),
    "VRLARS-s3-a2": Case("VRLARS", 3),
    "VRAdamW-s3-a2-decay": Case("VRAdamW", 3, groups="decay"),
    "VRLAMB-s3-a2-small_last": Case("VRLAMB", 3, groups="small_last"),
    # sub_group_size 10: DeepSpeed steps several sub-groups per param group, one at a time
    "VRLAMB-s3-a2-decay": Case("VRLAMB", 3, groups="decay", vr={"telemetry_interval": 1}),
    "VRLAMB-s3-a2-decay-subgroups": Case("VRLAMB", 3, groups="decay", zero={"sub_group_size": 10},
                                         vr={"telemetry_interval": 1}),
    "VRLAMB-s3-a2-interval2": Case("VRLAMB", 3, vr={"gsnr_interval": 2}, steps=INTERVAL_STEPS),
    "VRLAMB-s3-a2-instance": Case("VRLAMB", 3, client="instance", groups="decay"),
    "VRLAMB-s3-a2-frozen": Case("VRLAMB", 3, frozen=("0.bias",)),
    "VRLAMB-s3-a2to4": Case("VRLAMB", 3, gas_changes={2: 4}),
    **{f"VRLAMB-s3-a2-ov{o:d}-cg{c:d}-rs{r:d}": Case(
        "VRLAMB", 3, zero={"overlap_comm": o, "contiguous_gradients": c, "reduce_scatter": r})
       for o in (False, True) for c in (False, True) for r in (False, True)},
    # a side layer without a gradient on some micro-steps (a branch not taken, an MoE expert no
    # token chose): a zero group gradient there, at every stage
    **{f"{o}-s{s}-a2-gated": Case(o, s, gate=GATE, steps=len(GATE)) for o, s in (
        ("VRLAMB", 0), ("VRLAMB", 1), ("VRLAMB", 2), ("VRLAMB", 3), ("NVLAMB", 3), ("VRAdamW", 3))},
    # DeepSpeed's own AdamW with the measure-only noise scale: the seam's ZeRO-3 mend applies
    "AdamW-s3-a2-gated-gns": Case("AdamW", 3, gate=GATE, steps=len(GATE), extra=GNS),
    "VRLAMB-s3-a2-gated-subgroups": Case("VRLAMB", 3, gate=GATE, steps=len(GATE), zero={"sub_group_size": 10}),
    "VRLAMB-s2-a2-gated-ov1-cg1": Case("VRLAMB", 2, gate=GATE, steps=len(GATE),
                                       zero={"overlap_comm": True, "contiguous_gradients": True}),
    # stage 0 also takes a layer that only some ranks use (DeepSpeed's ZeRO-1/2/3 do not)
    "VRLAMB-s0-a2-gated-ranks": Case("VRLAMB", 0, gate=GATE_RANKS, steps=len(GATE_RANKS)),
    # ZeRO-1: some ranks only on a micro-step, but every rank (or none) within each step
    "VRLAMB-s1-a2-gated-ranks-stepwise": Case("VRLAMB", 1, gate=GATE_RANKS_STEPWISE, steps=len(GATE_RANKS_STEPWISE)),
}
# a NaN in one rank's gradient of the second group at step 1: the whole step is skipped
# (or raises) before any group is applied; the result is the reference without that step
NONFINITE = {
    "VRLAMB-s2-a2-nan-skip": Case("VRLAMB", 2, groups="decay", vr={"on_nonfinite": "skip"}, steps=NAN_STEPS,
                                  nan=NAN_AT_1),
    "VRLAMB-s1-a2-nan-raise": Case("VRLAMB", 1, groups="decay", steps=NAN_STEPS, nan=NAN_AT_1),
    "VRLAMB-s0-a2-nan-skip": Case("VRLAMB", 0, groups="decay", vr={"on_nonfinite": "skip"}, steps=NAN_STEPS,
                                  nan=NAN_AT_1),
    "VRLAMB-s3-a2-nan-skip": Case("VRLAMB", 3, groups="decay", vr={"on_nonfinite": "skip"}, steps=NAN_STEPS,
                                  nan=NAN_AT_1),
    "VRSGD-s3-a2-nan-raise": Case("VRSGD", 3, groups="decay", steps=NAN_STEPS, nan=NAN_AT_1),
    "VRSGD-s2-a2-nan-raise-interval2": Case("VRSGD", 2, groups="decay", vr={"gsnr_interval": 2},
                                            steps=[[0, 1.0], [1, 1.0], [2, 1.0], [3, 1.0]], nan=NAN_AT_1),
}
OTHER = {  # not exact by design: checked against the reference with their own tolerance
    "VRLAMB-s2-a2-sqbf16": Case("VRLAMB", 2, vr={"sq_comm_dtype": "bf16"}),
    "VRLAMB-s2-a2-bf16": Case("VRLAMB", 2, extra=BF16),
    "VRLAMB-s1-a2-bf16": Case("VRLAMB", 1, extra=BF16),
    "VRLAMB-s2-a2-fp16": Case("VRLAMB", 2, extra=FP16),
    "VRLAMB-s2-a2-autocast": Case("VRLAMB", 2, extra=AUTOCAST),
    "VRLAMB-s1-a2-autocast": Case("VRLAMB", 1, extra=AUTOCAST),
    "VRLAMB-s0-a2-autocast": Case("VRLAMB", 0, extra=AUTOCAST),
    "NVLAMB-s2-a2-autocast": Case("NVLAMB", 2, extra=AUTOCAST),
    "VRLAMB-s1-a2-telemetry": Case("VRLAMB", 1, vr={"telemetry_interval": 1}),
    "VRLAMB-s2-a2-telemetry": Case("VRLAMB", 2, vr={"telemetry_interval": 2}),
    "VRLAMB-s2-a2-fp16-overflow": Case("VRLAMB", 2, extra=FP16, steps=[[0, 1.0], [1, 1e5], [1, 1.0], [2, 1.0]]),
    "VRLAMB-s3-a2-bf16": Case("VRLAMB", 3, extra=BF16),
    "VRLAMB-s3-a2-fp16": Case("VRLAMB", 3, extra=FP16),
    "VRLAMB-s3-a2-autocast": Case("VRLAMB", 3, extra=AUTOCAST),
    "VRLAMB-s3-a2-telemetry": Case("VRLAMB", 3, vr={"telemetry_interval": 1}),
    "VRLAMB-s3-a2-fp16-overflow": Case("VRLAMB", 3, extra=FP16, steps=[[0, 1.0], [1, 1e5], [1, 1.0], [2, 1.0]]),
    # one step with telemetry: the per-layer GSNR of low-precision routes against the reference
    **{f"VRLAMB-s{s}-a2-{p}-gsnr": Case("VRLAMB", s, vr={"telemetry_interval": 1}, extra=x, steps=1)
       for s, p, x in ((2, "bf16", BF16), (1, "bf16", BF16), (2, "fp16", FP16), (2, "autocast", AUTOCAST),
                       (0, "autocast", AUTOCAST), (2, "fp32", {}), (3, "fp32", {}))},
    # bf16 with fp32 gradient reduction and accumulation: gbar is no longer rounded to bf16
    **{f"VRLAMB-s{s}-a2-bf16acc32-gsnr": Case("VRLAMB", s, vr={"telemetry_interval": 1}, steps=1, extra={
        **BF16, "communication_data_type": "fp32", "data_types": {"grad_accum_dtype": "fp32"}}) for s in (2,)},
}
# host reads (device syncs on a GPU) of one whole step, vrgd_ds's own (tests/ds_scripts/host_reads.py):
# the GSNR layer sums (ZeRO-1/2 and stage 0), and at stage 0 with clipping the factor clipping
# applied (DeepSpeed clips there); our LAMB under DeepSpeed: none. Nothing per micro-step or
# per bucket (the ZeRO-1/2 bucket agreement reads flags of a gloo group, never the device's);
# DeepSpeed's own multiplier of the gradients stays on the device.
READS = {f"{o}-s{s}-a2{'-clip' if c else ''}-reads": (Case(o, s, clip=c, count_reads=True), n) for o, s, c, n in (
    ("VRLAMB", 2, 0.0, 1), ("VRLAMB", 1, 0.0, 1), ("VRLAMB", 0, 0.0, 1), ("NVLAMB", 2, 0.0, 0),
    ("VRLAMB", 2, 0.05, 1), ("VRLAMB", 0, 0.05, 2), ("VRLAMB", 3, 0.0, 2), ("NVLAMB", 3, 0.0, 0))}
# measure-only noise scale (one top-level key) for optimizers that are not VR: parameters
# bitwise those of the same run without the key, numbers those of the explicit groups
MEASURED = {f"{o}-s{s}-a2{'-clip' if c else ''}": Case(o, s, clip=c, groups=g) for o, s, c, g in (
    ("NVLAMB", 2, 0.0, "decay"), ("AdamW", 2, 0.0, None), ("AdamW", 1, 0.0, None), ("AdamW", 0, 0.0, None),
    ("AdamW", 2, 0.05, None), ("LARS", 1, 0.0, "exclude"), ("AdamW", 3, 0.0, None), ("NVLAMB", 3, 0.0, "decay"))}
# a layer that only some ranks reach: ZeRO-1/2 buckets differ between the ranks; every rank
# stops with the same error before DeepSpeed reduces (the launch goes on with the next case)
DIVERGED_WORDS = ["gradient buckets", "a parameter gets a gradient on some ranks only",
                  "zero_optimization.stage 0, which supports it"]
DIVERGED = {
    "VRLAMB-s1-a2-gated-ranks": (Case("VRLAMB", 1, gate=GATE_RANKS, steps=len(GATE_RANKS)),
                                 ["ZeRO-1", "on some ranks the backward pass ends with it"]),
    "VRLAMB-s2-a2-gated-ranks-stepwise": (Case("VRLAMB", 2, gate=GATE_RANKS_STEPWISE, steps=len(GATE_RANKS_STEPWISE)),
                                          ["ZeRO-2", "are in it on some ranks only"]),
    "VRLAMB-s2-a2-gated-ranks-ov1-cg1": (Case("VRLAMB", 2, gate=GATE_RANKS, steps=len(GATE_RANKS),
                                              zero={"overlap_comm": True, "contiguous_gradients": True}),
                                         ["ZeRO-2", "are in it on some ranks only"]),
    "NVLAMB-s2-a2-gated-ranks": (Case("NVLAMB", 2, gate=GATE_RANKS, steps=len(GATE_RANKS)), ["ZeRO-2"]),
    "AdamW-s2-a2-gated-ranks-gns": (Case("AdamW", 2, gate=GATE_RANKS, steps=len(GATE_RANKS), extra=GNS), ["ZeRO-2"]),
}
REFUSED = {  # name: (case, words the error must contain)
    "VRLAMB-s3-offload": (Case("VRLAMB", 3, zero={"offload_optimizer": {"device": "cpu"}}),
                          ["'VRLAMB' with zero_optimization.offload_optimizer / offload_param",
                           "remove the offload settings"]),
    "NVLAMB-s3-hpz": (Case("NVLAMB", 3, zero={"zero_hpz_partition_size": 2}),
                      ["'NVLAMB' with zero_hpz_partition_size 2 (ZeRO++ hpZ)", "remove that setting"]),
    "NVLAMB-s2-offload": (Case("NVLAMB", 2, zero={"offload_optimizer": {"device": "cpu"}}),
                          ["offload_optimizer / offload_param", "remove the offload settings"]),
    "VRLAMB-s1-bf16-accum-fp32": (Case("VRLAMB", 1, extra={**BF16, "data_types": {"grad_accum_dtype": "fp32"}}),
                                  ["grad_accum_dtype fp32 at zero_optimization.stage 1", "BF16_Optimizer",
                                   "use zero_optimization.stage 2"]),
    "NVLAMB-s1-bf16-accum-fp32": (Case("NVLAMB", 1, extra={**BF16, "data_types": {"grad_accum_dtype": "fp32"}}),
                                  ["'NVLAMB' with bf16 and data_types.grad_accum_dtype fp32"]),
    "VRLAMB-s2-autocast-fp16": (Case("VRLAMB", 2, extra={"torch_autocast": {"enabled": True, "dtype": "float16"}}),
                                ["torch_autocast dtype float16", "use torch_autocast with dtype bfloat16"]),
    "VRLAMB-s0-bf16": (Case("VRLAMB", 0, extra=BF16), ["'VRLAMB' with bf16 and zero_optimization.stage 0",
                                                       "set zero_optimization.stage to 1 or 2"]),
    "VRLAMB-s0-fp16": (Case("VRLAMB", 0, extra=FP16), ["'VRLAMB' with fp16 and zero_optimization.stage 0"]),
    "NVLAMB-s0-fp16": (Case("NVLAMB", 0, extra=FP16), ["'NVLAMB' with fp16 and zero_optimization.stage 0",
                                                       "step with zero gradients while it is built"]),
    "VRLAMB-s0-bf16-instance": (Case("VRLAMB", 0, extra=BF16, client="instance"),
                                ["'VRLAMB' with bf16 and zero_optimization.stage 0"]),
    **{f"{o}-s{s}-compiled-autograd": (Case(o, s, compile="autograd"),
                                        [f"'{cls}' with engine.compile(compiled_autograd_enabled=True)",
                                         "call engine.compile() without it"])
       for o, cls, s in (("VRLAMB", "VRLAMB", 2), ("VRLAMB", "VRLAMB", 0), ("NVLAMB", "LAMB", 1))},
    "VRLAMB-s2-unmanaged": (Case("VRLAMB", 2, extra={"managed_gradient_accumulation": False}),
                            ["managed_gradient_accumulation false"]),
    "VRLAMB-s2-coalesce": (Case("VRLAMB", 2, coalesce=True),
                           ["'VRLAMB' with engine.coalesce_grad_reduction()", "train without it"]),
    "NVLAMB-s2-coalesce": (Case("NVLAMB", 2, coalesce=True),
                           ["'LAMB' with engine.coalesce_grad_reduction()", "not covered"]),
    "AdamW-s3-gns-offload": (Case("AdamW", 3, extra=GNS, zero={"offload_param": {"device": "cpu"}}),
                             ["'adamw' with zero_optimization.offload_optimizer / offload_param"]),
    "VRLAMB-s2-gns-interval": (Case("VRLAMB", 2, extra={"vrgd_noise_scale": {"interval": 2}}),
                               ["vrgd_noise_scale.interval: a VR optimizer measures", "telemetry_interval"]),
    "AdamW-s2-gns-badkey": (Case("AdamW", 2, extra={"vrgd_noise_scale": {"every": 2}}),
                            ["vrgd_noise_scale: unknown key 'every'; allowed: interval, ema_decay"]),
}


def _worker_cases(tmp_path, world):
    cases = []
    for table in (PARITY, NONFINITE, OTHER, {n: c for n, (c, _) in READS.items()}):
        cases += [c.worker_case(n, tmp_path) for n, c in table.items() if c.world == world]
    for n, c in MEASURED.items():
        cases += [c.worker_case(n + "-plain", tmp_path), replace(c, extra=GNS).worker_case(n + "-gns", tmp_path),
                  replace(c, extra=GNS_FIRST).worker_case(n + "-gns-first", tmp_path)]
    cases += [c.worker_case(n, tmp_path) for table in (REFUSED, DIVERGED) for n, (c, _) in table.items()
              if c.world == world]
    return cases


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("matrix")
    (tmp_path / "cases.json").write_text(json.dumps(_worker_cases(tmp_path, WORLD)))
    out = tmp_path / "results.pt"
    proc = run_deepspeed("train_tiny.py", None, tmp_path, "--cases", tmp_path / "cases.json", "--out", out)
    assert proc.returncode == 0, tail(proc)
    return torch.load(out), tmp_path, proc.stdout + proc.stderr


def result(matrix, name):
    res = matrix[0][name]
    assert "error" not in res, res.get("error")
    return res


@pytest.mark.parametrize("name", list(PARITY))
def test_zero_matches_single_process(matrix, name):
    assert max_rel_err(result(matrix, name)["params"], reference(PARITY[name])) < 2e-5


@pytest.mark.parametrize("name", list(READS))
def test_a_step_reads_back_only_what_it_must(matrix, name):
    """What vrgd_ds reads back to the host in one whole step (backward passes and
    engine.step()): on a GPU each read waits for the device. The counted step is exact too."""
    res = result(matrix, name)
    case, expected = READS[name]
    assert res["reads"]["ours"] == expected, res["reads"]
    assert max_rel_err(res["params"], reference(case)) < 2e-5


def test_stage0_hands_the_gradient_over(matrix):
    """Stage 0 writes the averaged gradient back into p.grad in place, so a gradient handed over
    into the optimizer's flat buffer stays there: our LAMB hands it over itself, the VR route's
    moment source places it; the last step gathers nothing, and the parity cases above are
    exact with it. Under ZeRO-1/2 the optimizer steps one flat partition per group."""
    nv, vr, s1 = (result(matrix, n) for n in ("NVLAMB-s0-a1", "VRLAMB-s0-a2", "NVLAMB-s1-a2"))
    assert nv["grads_home"] == [True] and nv["moved"] == [0]
    assert vr["grads_home"] == [None] and vr["moved"] == [0]  # the moment source's hand-over
    assert s1["grads_home"] == [None] and s1["moved"] == [0]  # a partition: nothing gathered


def test_frozen_parameters_do_not_move(matrix):
    start = dict(make_model().named_parameters())
    names = [n for n, _ in make_model().named_parameters()]
    for name in ("VRLAMB-s0-a2-frozen", "VRLAMB-s2-a2-frozen", "NVLAMB-s1-a2-frozen", "VRLAMB-s3-a2-frozen"):
        params = dict(zip(names, result(matrix, name)["params"]))
        assert torch.equal(params["0.bias"], start["0.bias"].detach())
        assert not torch.equal(params["0.weight"], start["0.weight"].detach())


def test_gsnr_interval_changes_the_trajectory(matrix):
    """The interval cases above are not trivially equal to the every-step reference."""
    assert max_rel_err(result(matrix, "VRLAMB-s2-a2-interval2")["params"],
                       reference(replace(PARITY["VRLAMB-s2-a2-interval2"], vr={}))) > 1e-4
    # stage 0: the backward hooks square only on GSNR steps (1 and 3 of 4)
    assert [u["squared_steps"] for u in result(matrix, "VRLAMB-s0-a2-interval2")["bytes"]] == [2] * WORLD
    assert [u["squared_steps"] for u in result(matrix, "VRLAMB-s0-a2")["bytes"]] == [STEPS] * WORLD


@pytest.mark.parametrize("name", list(NONFINITE))
def test_nonfinite_step_is_decided_for_all_groups_before_any_is_applied(matrix, name):
    case, res = NONFINITE[name], result(matrix, name)
    assert res["untouched"] == [True]  # parameters and all optimizer state, both groups
    skipping = case.vr.get("on_nonfinite") == "skip"
    assert len(res["raised"]) == (0 if skipping else 1)
    if not skipping:
        assert "non-finite gradient or squared gradient" in res["raised"][0]
        assert "no state was changed" in res["raised"][0]
    else:
        assert res["vr_skipped"] == 1
    kept = [s for s in case.data_steps if s != NAN_AT_1["step"]]
    assert max_rel_err(res["params"], reference(case, data_steps=kept)) < 2e-5
    # under ZeRO DeepSpeed's (forced) overflow check finds the NaN first, also on a reuse step of
    # gsnr_interval, which then makes no check of its own; stage 0 and one process keep theirs
    assert res["grads_checked_finite"] is (case.stage > 0)


@pytest.mark.parametrize("name,bound", [
    ("VRLAMB-s2-a2-sqbf16", 0.02), ("VRLAMB-s2-a2-bf16", 0.25), ("VRLAMB-s1-a2-bf16", 0.25),
    ("VRLAMB-s2-a2-fp16", 0.1), ("VRLAMB-s2-a2-autocast", 0.1), ("VRLAMB-s1-a2-autocast", 0.1),
    ("VRLAMB-s0-a2-autocast", 0.1), ("NVLAMB-s2-a2-autocast", 0.1), ("VRLAMB-s3-a2-bf16", 0.25),
    ("VRLAMB-s3-a2-fp16", 0.1), ("VRLAMB-s3-a2-autocast", 0.1)])
def test_low_precision_stays_close_to_fp32_reference(matrix, name, bound):
    case = OTHER[name]
    ref_case = Case(case.opt, 2)
    start = [p.detach() for p in make_model().parameters()]
    ref = reference(ref_case)
    res = result(matrix, name)
    assert res["skipped_steps"] == 0
    moved, err = max_rel_err(start, ref), max_rel_err(res["params"], ref)
    assert err < bound * moved, (err, moved)


@dataclass(frozen=True)
class Rounding:
    """How a low-precision route rounds the mean gradient it hands the optimizer: group
    gradients from the model in ``model`` dtype (under bf16 autocast if ``autocast``),
    scaled by the loss ``scale`` / accumulation; ZeRO-1 sums micro-steps locally in
    ``local`` dtype, then reduces in ``comm``; ZeRO-2 reduces each micro-step in ``comm``
    and accumulates in ``acc``."""

    model: torch.dtype = torch.float32
    autocast: bool = False
    comm: torch.dtype = torch.float32
    acc: torch.dtype = torch.float32
    local: torch.dtype = torch.float32
    scale: float = 1.0

    def mean(self, gg: torch.Tensor, stage: int, world=WORLD, gas=2) -> torch.Tensor:
        def acc(terms, dt):  # a running sum rounded after every addition, as += in dt does
            total = terms[0].to(dt).double()
            for t in terms[1:]:
                total = (total + t).to(dt).double()
            return total

        g = gg * self.scale / gas
        if stage == 1:
            local = [acc([g[j * world + r] for j in range(gas)], self.local) for r in range(world)]
            return acc(local, self.comm) / world / self.scale
        if stage == 2:
            steps = [acc([g[j * world + r] for r in range(world)], self.comm) / world for j in range(gas)]
            return acc(steps, self.acc) / self.scale
        return g.sum(0) / world / self.scale


BF16_ROUNDING = Rounding(torch.bfloat16, comm=torch.bfloat16, acc=torch.bfloat16, local=torch.bfloat16)
GSNR_ROUTES = {  # route in the case name: its rounding
    "fp32": Rounding(),
    "bf16": BF16_ROUNDING,
    "bf16acc32": replace(BF16_ROUNDING, acc=torch.float32),
    "fp16": Rounding(torch.float16, comm=torch.float16, acc=torch.float16, local=torch.float16, scale=2.0 ** 8),
    "autocast": Rounding(autocast=True, comm=torch.bfloat16),
}


def expected_gsnr_means(stage: int, rounding: Rounding, world=WORLD, gas=2, device="cpu") -> dict[str, float]:
    """Per layer, the first step's mean raw GSNR in float64 from the route's own group
    gradients (model dtype, autocast, device) and its rounded mean gradient."""
    history = []
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=rounding.autocast):
        reference(Case("VRLAMB", 2, gas, world=world, steps=1), history=history, model_dtype=rounding.model,
                  device=device)
    tiny = torch.finfo(torch.float32).tiny
    out = {}
    for n, gg in zip([n for n, _ in make_model().named_parameters()], history[0]):
        gbar, sq = rounding.mean(gg, stage, world, gas), (gg ** 2).mean(0)
        out[n] = (gbar ** 2 / ((sq - gbar ** 2).clamp_min(0) + tiny)).mean().item()
    return out


@pytest.mark.parametrize("name", [n for n in OTHER if n.endswith("-gsnr")])
def test_low_precision_gsnr_matches_reference_per_layer(matrix, name):
    """The per-layer mean raw GSNR of the first step against float64 arithmetic on the
    route's own group gradients and rounded mean gradient: every difference left is the
    adapter's (fp32 squares, fp32 sums), not the route's rounding."""
    expected = expected_gsnr_means(OTHER[name].stage, GSNR_ROUTES[name.split("-")[3]])
    rec = result(matrix, name)["telemetry"]
    for n, value in expected.items():
        assert rec["layers"][n]["gsnr_mean"] == pytest.approx(value, rel=2e-5), n


@pytest.mark.parametrize("stage", [2, 3])
def test_fp16_overflow_step_is_skipped_and_leaves_no_trace(matrix, stage):
    over, plain = result(matrix, f"VRLAMB-s{stage}-a2-fp16-overflow"), result(matrix, f"VRLAMB-s{stage}-a2-fp16")
    assert over["skipped_steps"] == 1 and plain["skipped_steps"] == 0
    assert over["vr_skipped"] == 0  # a loss-scaler overflow is DeepSpeed's, not a non-finite VR step
    for a, b in zip(over["params"], plain["params"]):
        assert torch.equal(a, b)


def adapter_sent(matrix, name):
    return [r["squares"] for r in result(matrix, name)["bytes"]]


def test_squares_go_to_their_owner_once(matrix):
    """ZeRO-2: each squared element travels once per micro-step, from each rank that does not
    own it to its owner (gloo: a point-to-point exchange; the owner's own squares stay
    home), 4 bytes in fp32, 2 in bf16; gsnr_interval 2 sends on every other step; chunks
    of 7 elements send the same bytes."""
    numel = sum(p.numel() for p in make_model().parameters())
    partition = -(-numel // (2 * WORLD)) * (2 * WORLD) // WORLD
    owned = [max(0, min(numel, (r + 1) * partition) - r * partition) for r in range(WORLD)]

    def sent(width, times):  # bytes rank r sends: the real elements the other ranks own
        return [(numel - owned[r]) * width * times for r in range(WORLD)]

    assert adapter_sent(matrix, "VRLAMB-s2-a2") == sent(4, 2 * STEPS)
    assert adapter_sent(matrix, "VRLAMB-s2-a2-chunk7") == sent(4, 2 * STEPS)
    assert adapter_sent(matrix, "VRLAMB-s2-a2-sqbf16") == sent(2, 2 * STEPS)
    assert adapter_sent(matrix, "VRLAMB-s2-a2-interval2") == sent(4, 2 * INTERVAL_STEPS // 2)
    # ZeRO-1 reduces once per step, after accumulation: micro-step squares come from hooks
    assert adapter_sent(matrix, "VRLAMB-s1-a2") == sent(4, STEPS)
    # ZeRO-3: rank r owns elements [r P, (r + 1) P) of every parameter, P = ceil(numel / ranks)
    per_param = [p.numel() for p in make_model().parameters()]
    owned3 = [sum(max(0, min(n, (r + 1) * -(-n // WORLD)) - r * -(-n // WORLD)) for n in per_param)
              for r in range(WORLD)]
    assert adapter_sent(matrix, "VRLAMB-s3-a2") == [(numel - owned3[r]) * 4 * 2 * STEPS for r in range(WORLD)]
    # gsnr_interval 2: squares on every other step only (ZeRO-3 empties the param groups
    # between steps; the interval is read from the optimizer state)
    assert adapter_sent(matrix, "VRLAMB-s3-a2-interval2") == [
        (numel - owned3[r]) * 4 * 2 * INTERVAL_STEPS // 2 for r in range(WORLD)]
    assert adapter_sent(matrix, "VRLAMB-s3-a2-chunk7") == adapter_sent(matrix, "VRLAMB-s3-a2")


def test_extra_state_is_partition_sized_under_zero2(matrix):
    """Kept between steps: the squared-gradient partition and the GSNR momentum (fp32)."""
    numel = sum(p.numel() for p in make_model().parameters())
    align = 2 * WORLD  # DeepSpeed pads the flat group to a multiple of nccl_start_alignment_factor x ranks
    partition = -(-numel // align) * align // WORLD
    assert [r["kept"] for r in result(matrix, "VRLAMB-s2-a2")["bytes"]] == [2 * partition * 4] * WORLD
    # ZeRO-1 with accumulation also keeps full-size micro-step squares (as it keeps full grads)
    assert [r["kept"] for r in result(matrix, "VRLAMB-s1-a2")["bytes"]] == [2 * partition * 4 + numel * 4] * WORLD
    # ZeRO-3: the partition is each parameter's ceil(numel / ranks) elements
    partition3 = sum(-(-p.numel() // WORLD) for p in make_model().parameters())
    assert [r["kept"] for r in result(matrix, "VRLAMB-s3-a2")["bytes"]] == [2 * partition3 * 4] * WORLD


def test_zero3_sub_groups_split_the_param_groups(matrix):
    """sub_group_size 10 splits the param groups into several sub-groups, which DeepSpeed
    steps one at a time (the inner optimizer once per sub-group, as ZeRO-1/2 step it once per
    param group); the case is exact above, and its GSNR record covers every layer."""
    assert result(matrix, "VRLAMB-s3-a2-decay-subgroups")["sub_groups"] == 3
    assert result(matrix, "VRAdamW-s3-a2-decay")["sub_groups"] == 2  # one per param group
    assert result(matrix, "VRLAMB-s3-a2")["sub_groups"] == 1
    split, whole = (result(matrix, n)["telemetry"] for n in ("VRLAMB-s3-a2-decay-subgroups", "VRLAMB-s3-a2-decay"))
    assert split["step"] == whole["step"] == STEPS and split["layers"] == whole["layers"]


@pytest.mark.parametrize("name,interval", [("VRLAMB-s1-a2-telemetry", 1), ("VRLAMB-s2-a2-telemetry", 2),
                                           ("VRLAMB-s3-a2-telemetry", 1)])
def test_telemetry_is_exact_and_reaches_the_monitor(matrix, name, interval):
    _, tmp_path, _ = matrix
    history = []
    reference(OTHER[name], history=history)
    rec = result(matrix, name)["telemetry"]
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
    assert_noise_matches(rec, history[last], b=48 // (WORLD * 2), names=names)
    csv = tmp_path / "csv" / name
    assert (csv / "VRGD_gns_b_simple_ema.csv").exists() and (csv / "VRGD_gns_trace_cov.csv").exists()
    rows = (csv / "VRGD_clamped_fraction.csv").read_text().split()
    assert rows[0] == "step,clamped_fraction" and len(rows) == 1 + len(range(0, STEPS, interval))
    assert float(rows[-1].split(",")[1]) == pytest.approx(rec["clamped_fraction"])
    assert (csv / "VRGD_gsnr_mean_0.weight.csv").exists()


def exact_noise(groups: list[torch.Tensor], b: int) -> tuple[dict, list[dict]]:
    """Section 7 on explicit group gradients (per parameter [k, ...], float64): the model's
    record and each layer's."""
    def one(flat):
        k = flat.shape[0]
        gbar = flat.mean(0)
        group_var = (flat - gbar).pow(2).sum().item() / (k - 1)
        grad_sq = gbar.pow(2).sum().item() - group_var / k
        return {"trace_cov": b * group_var, "grad_sq": grad_sq,
                "b_simple": b * group_var / grad_sq if grad_sq > 0 else None}
    k = groups[0].shape[0]
    return one(torch.cat([g.reshape(k, -1) for g in groups], 1)), [one(g.reshape(k, -1)) for g in groups]


def assert_noise_matches(rec, history_step, b, names, rel=1e-5):
    model, layers = exact_noise(history_step, b)
    for key, want in model.items():
        assert (rec[key] is None) if want is None else rec[key] == pytest.approx(want, rel=rel), key
    for n, want_layer in zip(names, layers):
        for key, want in want_layer.items():
            got = rec["layers"][n][key]
            assert (got is None) if want is None else got == pytest.approx(want, rel=rel), (n, key)


@pytest.mark.parametrize("name", list(MEASURED))
def test_measure_only_noise_scale_changes_nothing_and_is_exact(matrix, name):
    plain, measured = result(matrix, name + "-plain"), result(matrix, name + "-gns")
    for a, b in zip(plain["params"], measured["params"]):
        assert torch.equal(a, b)
    assert plain["telemetry"] is None
    rec = measured["telemetry"]
    assert rec["step"] == STEPS and rec["k"] == WORLD * 2 and "b_simple_ema" in rec
    tensors = len(list(make_model().parameters()))
    for used in measured["bytes"]:
        # nothing gradient-sized is sent: ZeRO-1/2 add the per-layer sums of the local squares
        # to the layer table; stage 0 all-reduces one float64 per parameter tensor and step
        if MEASURED[name].stage == 0:
            assert used["squares"] == STEPS * 8 * tensors, used
            assert used["squared_steps"] == STEPS, used
        else:
            assert used["squares"] == 0 and used["layer_stats"] > 0, used
        if MEASURED[name].stage in (0, 2, 3):  # stage 0: one float64 per parameter, no gradient-sized buffer
            assert used["kept"] == 0, used
    first = result(matrix, name + "-gns-first")["telemetry"]
    assert first["step"] == 1
    if MEASURED[name].stage == 0:  # interval 100: only the first step's backward hooks square anything
        assert [u["squared_steps"] for u in result(matrix, name + "-gns-first")["bytes"]] == [1] * WORLD
    history = []
    reference(replace(MEASURED[name], opt="NVLAMB", steps=1), history=history)
    names = [n for n, _ in make_model().named_parameters()]
    assert_noise_matches(first, history[0], b=48 // (WORLD * 2), names=names)


@pytest.mark.parametrize("name", list(REFUSED))
def test_unsupported_routes_are_refused_at_initialize(matrix, name):
    _, words = REFUSED[name]
    error = matrix[0][name].get("error")
    assert error is not None, f"{name} was not refused"
    for w in words:
        assert w in error, (w, error)


@pytest.mark.parametrize("name", list(DIVERGED))
def test_a_layer_some_ranks_reach_stops_every_rank_with_the_layer_named(matrix, name):
    """Before, DeepSpeed's reductions (and the squares beside them) fell out of step: gloo
    aborted, and once a ZeRO-1 launch hung. Now both ranks raise at the same bucket, and the
    launch goes on with its next case."""
    _, words = DIVERGED[name]
    error = matrix[0][name].get("error")
    assert error is not None, f"{name} ran through"
    assert error.startswith("RuntimeError: vrgd-ds: the data-parallel ranks are about to reduce different"), error
    for w in DIVERGED_WORDS + words:
        assert w in error, (w, error)
    if "are in it on some ranks only" in words:
        assert "3.weight" in error or "3.bias" in error, error  # the side layer, or a bucket it shifted


def test_small_k_warns_once_with_the_fix(matrix):
    log = matrix[2]
    # rank 0 says it once, however many engines with k = 4 the launch builds
    assert log.count("k = 2 data-parallel ranks x 2 gradient accumulation steps = 4 gradient groups; "
                     "the paper asks for k >= 8") == 1
    assert "Raise k with more ranks or a larger gradient_accumulation_steps" in log


# ---- 4 ranks: a param group smaller than the world size (some partitions pure padding) ----

PADDING = {f"{o}-s{s}-w4-small-group": Case(o, s, groups="small_last", world=4) for o, s in (
    ("VRLAMB", 1), ("VRLAMB", 2), ("NVLAMB", 2), ("VRAdamW", 2), ("VRLAMB", 3), ("NVLAMB", 3))}


@pytest.fixture(scope="module")
def matrix4(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("matrix4")
    cases = [c.worker_case(n, tmp_path) for n, c in PADDING.items()]
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    out = tmp_path / "results.pt"
    proc = run_deepspeed("train_tiny.py", None, tmp_path, "--cases", tmp_path / "cases.json", "--out", out, ranks=4)
    assert proc.returncode == 0, tail(proc)
    return torch.load(out), tmp_path, proc.stdout + proc.stderr


@pytest.mark.parametrize("name", list(PADDING))
def test_padding_only_partitions_join_every_collective(matrix4, name):
    assert max_rel_err(result(matrix4, name)["params"], reference(PADDING[name])) < 2e-5


# ---- bounded memory: squares of a bucket as large as the model --------------------------

def test_square_temporaries_are_one_chunk_whatever_the_bucket(tmp_path):
    """reduce_bucket_size larger than the model (one bucket per micro-step): the bytes the
    squares' reduction allocates (measured with the profiler) follow sq_chunk_numel, not the
    bucket; the kept state is the partition buffer."""
    width, chunk = 2048, 1024
    numel = sum(p.numel() for p in make_model(width).parameters())
    cases = []
    for name, c in (("chunked", chunk), ("whole", 1 << 30)):
        cfg = Case("VRLAMB", 2, vr={"sq_chunk_numel": c}, zero={"reduce_bucket_size": 10 * numel}).config()
        cases.append({"name": name, "config": cfg, "steps": 2, "width": width, "measure_memory": True})
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    out = tmp_path / "results.pt"
    proc = run_deepspeed("train_tiny.py", None, tmp_path, "--cases", tmp_path / "cases.json", "--out", out)
    assert proc.returncode == 0, tail(proc)
    res = torch.load(out)
    chunked, whole = res["chunked"]["peak_square_bytes"], res["whole"]["peak_square_bytes"]
    assert chunk * 4 <= chunked <= chunk * 4 + 4096, chunked  # one fp32 chunk (+ bookkeeping)
    assert whole >= numel * 4 // WORLD, whole  # one chunk holding a whole owner's share
    assert whole > 10 * chunked


# ---- checkpoints --------------------------------------------------------------------------

@pytest.mark.parametrize("opt,stage,vr,extra", [
    ("VRLAMB", 2, {}, {}), ("VRSGD", 1, {"gsnr_interval": 3}, {}),
    ("VRLAMB", 2, {}, {"groups": "decay", "frozen": ["0.bias"]}),
    ("VRLAMB", 1, {}, {"groups": "exclude", "elastic": True}),
    ("VRLAMB", 3, {"gsnr_interval": 3}, {"groups": "decay", "zero": {"sub_group_size": 10}})])
def test_checkpoint_resume_is_bitwise(tmp_path, opt, stage, vr, extra):
    cfg = Case(opt, stage, vr=vr).config()
    extra = dict(extra)
    if extra.pop("elastic", False):
        cfg["zero_optimization"]["elastic_checkpoint"] = True
    cfg["zero_optimization"].update(extra.pop("zero", {}))
    case_extra = ["--case-extra", json.dumps(extra)]
    straight, resumed, ckpt = tmp_path / "straight.pt", tmp_path / "resumed.pt", tmp_path / "ckpt"
    for args in (["--steps", 4, "--out", straight],
                 ["--steps", 2, "--save", ckpt, "--out", tmp_path / "half.pt"],
                 ["--steps", 2, "--start", 2, "--load", ckpt, "--out", resumed]):
        proc = run_deepspeed("train_tiny.py", cfg, tmp_path, *args, *case_extra)
        assert proc.returncode == 0, tail(proc)
    for a, b in zip(torch.load(straight), torch.load(resumed)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("saved,stage,extra", [
    (2, 2, {}), (2, 0, {}), (2, 2, {"groups": "decay", "frozen": ["0.bias"]}),
    (3, 3, {"groups": "decay", "frozen": ["0.bias"]}), (3, 2, {}), (2, 3, {})])
def test_two_rank_checkpoint_continues_on_one_rank(tmp_path, saved, stage, extra):
    """Save at step 2 with 2 ranks (ZeRO stage ``saved``, a = 2), consolidate, go on with 1
    rank (a = 4: the same k = 4 groups of 12 samples) at ZeRO stage ``stage``: the same
    trajectory as 4 steps on 2 ranks. A ZeRO-3 folder holds every parameter split over both
    ranks (frozen ones too)."""
    from vrgd_ds.deepspeed.checkpoint import consolidate, save_consolidated

    case_extra = ["--case-extra", json.dumps(extra)]
    ckpt = tmp_path / "ckpt"
    proc = run_deepspeed("train_tiny.py", Case("VRLAMB", saved).config(), tmp_path, "--steps", 2, "--save", ckpt,
                         "--out", tmp_path / "half.pt", *case_extra)
    assert proc.returncode == 0, tail(proc)
    merged = save_consolidated(ckpt / "last", tmp_path / "merged.pt")
    assert merged["saved_world_size"] == 2
    frozen = extra.get("frozen", [])
    for name, p in zip([n for n, _ in make_model().named_parameters()], torch.load(tmp_path / "half.pt")):
        saved = merged["module" if name in frozen else "weights"][name]
        assert torch.equal(saved, p)
        if name not in frozen:
            assert set(merged["state"][name]) >= {"exp_avg", "exp_avg_sq", "gsnr_momentum", "gsnr_step", "step"}
    one = Case("VRLAMB", stage, 4, world=1).config()
    proc = run_deepspeed("train_tiny.py", one, tmp_path, "--steps", 2, "--start", 2, "--load-consolidated",
                         tmp_path / "merged.pt", "--out", tmp_path / "one.pt", *case_extra, ranks=1)
    assert proc.returncode == 0, tail(proc)
    expected = reference(Case("VRLAMB", 2, steps=4, groups=extra.get("groups"), frozen=tuple(frozen)))
    assert max_rel_err(torch.load(tmp_path / "one.pt"), expected) < 2e-5
    with pytest.raises(FileNotFoundError, match="not a DeepSpeed ZeRO checkpoint folder"):
        consolidate(tmp_path)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_bf16_checkpoint_consolidates_and_continues_bitwise(tmp_path, stage):
    """With bf16 DeepSpeed names its shards bf16_zero_pp_rank_*: consolidation reads them
    (it used to refuse the folder, which failed every bf16 pretraining run at its HF export),
    and a run continued from the consolidated file is bitwise the run that never stopped."""
    from vrgd_ds.deepspeed.checkpoint import save_consolidated

    cfg = Case("VRLAMB", stage, extra=BF16).config()
    straight, resumed, ckpt = tmp_path / "straight.pt", tmp_path / "resumed.pt", tmp_path / "ckpt"
    proc = run_deepspeed("train_tiny.py", cfg, tmp_path, "--steps", 4, "--out", straight)
    assert proc.returncode == 0, tail(proc)
    proc = run_deepspeed("train_tiny.py", cfg, tmp_path, "--steps", 2, "--save", ckpt, "--out", tmp_path / "half.pt")
    assert proc.returncode == 0, tail(proc)
    assert sorted(p.name for p in (ckpt / "last").glob("*optim_states.pt")) == [
        f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(WORLD)]
    merged = save_consolidated(ckpt / "last", tmp_path / "merged.pt")
    assert merged["saved_world_size"] == WORLD
    half = torch.load(tmp_path / "half.pt")
    assert all(w.dtype == torch.float32 for w in merged["weights"].values())
    names = [n for n, _ in make_model().named_parameters()]
    assert len(half) == len(names)
    for name, p in zip(names, half):  # the run's bf16 parameters (saved as float) are its fp32 masters rounded
        assert torch.equal(merged["weights"][name].to(torch.bfloat16).float(), p)
    proc = run_deepspeed("train_tiny.py", cfg, tmp_path, "--steps", 2, "--start", 2, "--load-consolidated",
                         tmp_path / "merged.pt", "--out", resumed)
    assert proc.returncode == 0, tail(proc)
    for a, b in zip(torch.load(straight), torch.load(resumed)):
        assert torch.equal(a, b)


def test_a_folder_with_shards_of_two_kinds_or_a_missing_rank_is_refused(tmp_path):
    from vrgd_ds.deepspeed.seam import read_zero_checkpoint

    (tmp_path / "mp_rank_00_model_states.pt").write_bytes(b"")
    for name in ("zero_pp_rank_0_mp_rank_00_optim_states.pt", "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(ValueError, match="both zero_pp_rank_\\* and bf16_zero_pp_rank_\\*"):
        read_zero_checkpoint(tmp_path)
    (tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt").unlink()
    (tmp_path / "bf16_zero_pp_rank_2_mp_rank_00_optim_states.pt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"shards of ranks \[0, 2\]; ranks 0..2 are needed"):
        read_zero_checkpoint(tmp_path)


# ---- config checks ------------------------------------------------------------------------

@pytest.mark.parametrize("change,expected", [
    ({"optimizer": {"type": "VRLAMB", "params": {"lr": 0.01, "gsnr_interval": 0}}},
     "gsnr_interval must be an integer >= 1, got 0"),
    ({"optimizer": {"type": "VRLAMB", "params": {"lr": 0.01, "sq_comm_dtype": "fp16"}}},
     "sq_comm_dtype must be one of ('fp32', 'bf16'), got 'fp16'"),
    ({"optimizer": {"type": "VRLAMB", "params": {"lr": 0.01, "gamma": 1.5}}},
     "gamma must be in (0, 1], got 1.5"),
    ({"optimizer": {"type": "VRLAMB", "params": {"lr": "1e-3"}}},
     "optimizer 'VRLAMB': params key 'lr' must be a number, got '1e-3'"),
    ({"optimizer": {"type": "VRLAMB", "params": {"gamma": None}}},
     "optimizer 'VRLAMB': params key 'gamma' must be a number, got None"),
    ({"optimizer": {"type": "NVLAMB", "params": {"foreach": True}}},
     "params key 'foreach' is a Python-side option that the DeepSpeed adapter sets itself"),
    ({"optimizer": {"type": "VRLAMB", "params": {"gama": 0.2}}},
     "optimizer 'VRLAMB': unknown params key 'gama'; allowed: lr, betas"),
])
def test_bad_vr_configs_fail_at_initialize(tmp_path, change, expected):
    cfg = Case("VRLAMB", 2, 1).config()
    cfg.update(change)
    proc = run_deepspeed("train_tiny.py", cfg, tmp_path, "--out", tmp_path / "x.pt")
    assert proc.returncode != 0
    assert expected in proc.stderr + proc.stdout


def test_check_params_in_process():
    from vrgd_ds.deepspeed import check_params

    check_params("VRLAMB", {"lr": 1, "betas": [0.9, 0.99], "on_nonfinite": "skip", "bias_correction": False})
    for params, words in (({"betas": "0.9"}, "'betas' must be a list of numbers"),
                          ({"bias_correction": 1}, "'bias_correction' must be true or false"),
                          ({"on_nonfinite": 3}, "'on_nonfinite' must be a string"),
                          ({"moments": {}}, "'moments' is a Python-side option")):
        with pytest.raises(ValueError, match=words):
            check_params("VRLAMB", params)


def test_allowed_params_lists_the_hyperparameters():
    from vrgd_ds import VRLAMB
    from vrgd_ds.deepspeed import allowed_params

    allowed = set(allowed_params(VRLAMB))
    assert {"lr", "betas", "eps", "weight_decay", "gamma", "beta3", "sq_chunk_numel"} <= allowed
    assert not allowed & {"moments", "foreach", "compile"}


def test_hf_trainer_with_deepspeed_config_uses_our_lamb(tmp_path):
    """The reference client that never calls deepspeed.initialize itself: HF Trainer."""
    import math

    cfg = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
           "train_batch_size": "auto", "gradient_clipping": "auto",
           "optimizer": {"type": "NVLAMB", "params": {"lr": "auto", "weight_decay": "auto",
                                                      "betas": "auto", "eps": "auto"}},
           "zero_optimization": {"stage": 2, "reduce_bucket_size": 2000}}
    out = tmp_path / "hf"
    proc = run_deepspeed("hf_trainer_tiny.py", cfg, tmp_path, "--out", out)
    assert proc.returncode == 0, tail(proc)
    res = json.loads((out / "result.json").read_text())
    assert res["optimizer"] == "LAMB" and res["layout"] == "ZeroLayout"
    assert len(res["losses"]) == 3 and all(math.isfinite(v) for v in res["losses"])
    assert res["telemetry"] is None


def test_hf_trainer_zero3_builds_the_model_partitioned_and_steps_vrlamb(tmp_path):
    """HF Trainer at ZeRO-3: the model is built inside deepspeed.zero.Init (no rank ever holds
    it whole), VRLAMB from the config steps the partitions, and its record covers every layer."""
    import math

    cfg = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
           "train_batch_size": "auto", "gradient_clipping": "auto",
           "optimizer": {"type": "VRLAMB", "params": {"lr": "auto", "weight_decay": "auto", "betas": "auto",
                                                      "eps": "auto", "telemetry_interval": 1}},
           "zero_optimization": {"stage": 3, "reduce_bucket_size": 2000}}
    out = tmp_path / "hf"
    proc = run_deepspeed("hf_trainer_tiny.py", cfg, tmp_path, "--out", out)
    assert proc.returncode == 0, tail(proc)
    res = json.loads((out / "result.json").read_text())
    assert res["zero_init"] and res["optimizer"] == "VRLAMB" and res["layout"] == "ZeroLayout"
    assert len(res["losses"]) == 3 and all(math.isfinite(v) for v in res["losses"])
    rec = res["telemetry"]
    assert rec["step"] == 3 and rec["k"] == 2 * 2
    assert "bert.embeddings.word_embeddings.weight" in rec["layers"] and len(rec["layers"]) > 30
    assert all(math.isfinite(layer["gsnr_mean"]) for layer in rec["layers"].values())


def test_hf_trainer_measures_the_noise_scale_of_deepspeeds_adamw(tmp_path):
    """Measure-only mode through HF Trainer: DeepSpeed's AdamW, one extra config key."""
    import math

    cfg = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
           "train_batch_size": "auto", "gradient_clipping": "auto",
           "optimizer": {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto", "torch_adam": True}},
           "zero_optimization": {"stage": 2, "reduce_bucket_size": 2000},
           "vrgd_noise_scale": {"interval": 1, "ema_decay": 0.9}}
    out = tmp_path / "hf"
    proc = run_deepspeed("hf_trainer_tiny.py", cfg, tmp_path, "--out", out)
    assert proc.returncode == 0, tail(proc)
    res = json.loads((out / "result.json").read_text())
    rec = res["telemetry"]
    assert res["optimizer"] == "AdamW" and rec["step"] == 3 and rec["k"] == 2 * 2
    assert rec["trace_cov"] > 0 and math.isfinite(rec["grad_sq"])
    assert "bert.embeddings.word_embeddings.weight" in rec["layers"]
