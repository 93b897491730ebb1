"""The 4-rank runs behind tests/test_megatron_tp.py: tensor parallelism 2 x data parallelism 2.

The model is megatron_cases's (6 -> 16 -> 16 -> 3, tanh) with its first two layers made of
Megatron's own tensor-parallel layers: ``ColumnParallelLinear(6, 16)`` (weight rows and bias
split over the two tensor-parallel ranks), ``RowParallelLinear(16, 16)`` (weight columns
split; its bias is whole on both ranks), then a plain ``Linear(16, 3)`` that both ranks hold
whole. Its weights are ``make_model()``'s, cut into the two parts, so that the float64
reference of megatron_cases (the whole model, W_dp x a explicit groups) checks it. Rank r
is tensor-parallel rank r % 2 and data-parallel rank r // 2 (Megatron's order); the two
tensor-parallel ranks of a data-parallel rank take the same micro-batches.

The "-sp" cases add Megatron's sequence parallelism: the micro-batch's samples are the
sequence, each tensor-parallel rank holds half of them outside the split layers, so fc2's
bias and fc3 get partial gradients there, summed by ``finalize_model_grads``. The "-qk"
cases add ``qk_layernorm``: a HeadScale named ``q_layernorm`` after fc1, a weight of 4 that
the 4 heads of fc1's output share, 2 heads per rank (the reference: make_qk_model()).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent / "ds_scripts"))
from megatron_cases import MCase, _dtype, build, make_model, run_resume, train  # noqa: E402
from spawn_ranks import save_results  # noqa: E402

WORLD, TP = 4, 2
DP = WORLD // TP
SPLIT_DIM = {"fc1.weight": 0, "fc1.bias": 0, "fc2.weight": 1}  # the rest is whole on every rank

CASES = {
    "vrlamb-do0-ov1-a2": MCase("vrlamb", distributed=False, overlap=True, accum=2),
    "vrlamb-do1-ov1-a2": MCase("vrlamb", distributed=True, overlap=True, accum=2),
    "vrlamb-do1-ov0-a3-clip": MCase("vrlamb", distributed=True, overlap=False, accum=3, clip=0.05),
    "lamb-do1-ov1-a2": MCase("lamb", distributed=True, overlap=True, accum=2),
    "vrlars-do0-ov0-a2": MCase("vrlars", distributed=False, overlap=False, accum=2),
    "vradam-do1-ov1-a2": MCase("vradam", distributed=True, overlap=True, accum=2),
    "vrsgd-do1-ov1-a4-clip": MCase("vrsgd", distributed=True, overlap=True, accum=4, clip=0.05),
    "vrlamb-do1-ov1-a2-bf16": MCase("vrlamb", distributed=True, overlap=True, accum=2, extra={"bf16": True}),
    "vrlamb-do1-ov1-a2-fp16": MCase("vrlamb", distributed=True, overlap=True, accum=2, extra={"fp16": True}),
    "vrlamb-do1-ov1-a2-telemetry": MCase("vrlamb", distributed=True, overlap=True, accum=2,
                                         extra={"vr_telemetry_interval": 1}),
    # sequence parallelism: fc2's bias and fc3 get partial gradients on each tensor-parallel rank
    "vrlamb-do1-ov1-a2-sp": MCase("vrlamb", distributed=True, overlap=True, accum=2,
                                  extra={"sequence_parallel": True}),
    "vrlamb-do0-ov0-a4-clip-sp": MCase("vrlamb", distributed=False, overlap=False, accum=4, clip=0.05,
                                       extra={"sequence_parallel": True}),
    "vradam-do1-ov0-a2-sp": MCase("vradam", distributed=True, overlap=False, accum=2,
                                  extra={"sequence_parallel": True}),
    "vrlamb-do1-ov1-a2-bf16-sp": MCase("vrlamb", distributed=True, overlap=True, accum=2,
                                       extra={"bf16": True, "sequence_parallel": True}),
    "vrlamb-do0-ov1-a2-fp16-sp": MCase("vrlamb", distributed=False, overlap=True, accum=2,
                                       extra={"fp16": True, "sequence_parallel": True}),
    # qk_layernorm: q_layernorm.weight gets partial gradients (each rank has 2 of the 4 heads)
    "vrlamb-do1-ov1-a2-qk": MCase("vrlamb", distributed=True, overlap=True, accum=2, extra={"qk_layernorm": True}),
    "vradam-do0-ov0-a4-clip-qk": MCase("vradam", distributed=False, overlap=False, accum=4, clip=0.05,
                                       extra={"qk_layernorm": True}),
    "vrlamb-do1-ov1-a2-sp-qk": MCase("vrlamb", distributed=True, overlap=True, accum=2,
                                     extra={"sequence_parallel": True, "qk_layernorm": True}),
    "vrlamb-do1-ov1-a2-sp-telemetry": MCase("vrlamb", distributed=True, overlap=True, accum=2,
                                            extra={"sequence_parallel": True, "vr_telemetry_interval": 1}),
}


HEAD = 4  # features per head in the qk_layernorm cases: fc1's 16 outputs are 4 heads, 2 per rank


class HeadScale(torch.nn.Module):
    """A per-feature scale that every head shares, as a ``q_layernorm``'s weight is: on a
    tensor-parallel rank its gradient comes from that rank's heads only."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.linspace(0.8, 1.2, HEAD))

    def forward(self, h):
        return (h.unflatten(-1, (-1, HEAD)) * self.weight).flatten(-2)


def make_qk_model():
    """make_model() with a HeadScale after its first layer (the whole model of the qk cases)."""
    m = make_model()
    return torch.nn.Sequential(m[0], HeadScale(), *list(m)[1:])


class TPModel(torch.nn.Module):
    """make_model()'s network and weights, its first two layers split by tensor parallelism
    (with ``qk_layernorm``: make_qk_model()'s, the HeadScale named ``q_layernorm``)."""

    def __init__(self, perform_initialization: bool = True, sequence_parallel: bool = False,
                 qk_layernorm: bool = False):
        super().__init__()
        from megatron.core import parallel_state
        from megatron.core.model_parallel_config import ModelParallelConfig
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

        tp = parallel_state.get_tensor_model_parallel_world_size()  # TP, or 1 for the resharded loads
        config = ModelParallelConfig(tensor_model_parallel_size=tp, use_cpu_initialization=True,
                                     perform_initialization=perform_initialization,
                                     sequence_parallel=sequence_parallel)
        self.sequence_parallel = sequence_parallel
        keep = torch.nn.init.zeros_  # the weights are set below
        self.fc1 = ColumnParallelLinear(6, 16, config=config, init_method=keep, bias=True, gather_output=False)
        # Megatron sums the gradient of a q_layernorm over the tensor-parallel group by its name
        self.q_layernorm = HeadScale() if qk_layernorm else torch.nn.Identity()
        self.fc2 = RowParallelLinear(16, 16, config=config, init_method=keep, bias=True, input_is_parallel=True,
                                     skip_bias_add=False)
        self.fc3 = torch.nn.Linear(16, 3)
        whole = dict(zip([n for n, _ in self.named_parameters()],
                         (make_qk_model() if qk_layernorm else make_model()).parameters()))
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        with torch.no_grad():
            for name, p in self.named_parameters():
                w = whole[name]
                if name in SPLIT_DIM:
                    w = w.chunk(tp, SPLIT_DIM[name])[tp_rank]
                p.copy_(w)
        if sequence_parallel:  # fc3 sees this rank's part of the sequence only, like a norm in a GPT
            for p in self.fc3.parameters():
                p.sequence_parallel = True

    def forward(self, x):
        from megatron.core.tensor_parallel import (gather_from_sequence_parallel_region,
                                                   scatter_to_sequence_parallel_region)

        if self.sequence_parallel:
            # the micro-batch's samples are the sequence ([s, b=1, h]): each rank takes its
            # half, fc1 gathers it, fc2 reduce-scatters its output, fc3 (and fc2's bias) see a half
            x = scatter_to_sequence_parallel_region(x.unsqueeze(1))
        h, _ = self.fc1(x)
        h, _ = self.fc2(torch.tanh(self.q_layernorm(h)))
        out = self.fc3(torch.tanh(h))
        if not self.sequence_parallel:
            return out
        # every rank computes the same loss on the whole output: the backward takes its half
        return gather_from_sequence_parallel_region(out, tensor_parallel_output_grad=False).squeeze(1)


def run_case(case: MCase) -> dict:
    from megatron.core import parallel_state

    ddp, opt, scheduler = build(case.optimizer, case.distributed, case.overlap, case.clip, case.extra,
                                model=TPModel(sequence_parallel=case.extra.get("sequence_parallel", False),
                                              qk_layernorm=case.extra.get("qk_layernorm", False)))
    train(parallel_state.get_data_parallel_rank(), ddp, opt, scheduler, case.accum, _dtype(case.extra), world=DP)
    inner = opt.chained_optimizers[0].optimizer
    moments = getattr(inner, "moments", None)
    return {"params": {n: p.detach().float().clone() for n, p in ddp.module.named_parameters()},
            "tensor_parallel": {n: bool(getattr(p, "tensor_model_parallel", False))
                                for n, p in ddp.module.named_parameters()},
            "k": moments.group_count if moments is not None else None,
            "layout_bytes": inner.layout.comm_bytes,
            "telemetry": getattr(inner, "telemetry", None)}


def whole_params(results: list[dict], cid: str, dp_rank: int) -> list[torch.Tensor]:
    """The model's whole parameters (make_model()'s order) from the two tensor-parallel ranks
    of one data-parallel rank."""
    parts = [results[dp_rank * TP + t][cid]["params"] for t in range(TP)]
    return [torch.cat([part[name] for part in parts], SPLIT_DIM[name]) if name in SPLIT_DIM else parts[0][name]
            for name in parts[0]]


def _refused(fn, kinds=(ValueError, NotImplementedError)) -> str | None:
    """The message of the refusal ``fn`` raises (an error of another kind fails the run)."""
    try:
        fn()
    except kinds as e:
        return str(e)
    return None


def run_refusals() -> dict:
    """Refused under tensor parallelism, naming the parameter and setting: gradients Megatron
    averages over the tensor-parallel group after the data-parallel reduction, and split
    weights the layer statistics would take for whole ones."""
    out = {}

    def averaged():
        model = TPModel()
        model.fc3.weight.average_gradients_across_tp_domain = True
        build("vrlamb", True, True, 0.0, {}, model=model)

    out["average_gradients_across_tp_domain"] = _refused(averaged)

    def differs():  # a weight split by a layer of one's own, without the attribute
        from megatron.core import parallel_state

        model = TPModel()
        with torch.no_grad():
            model.fc3.weight[0, 0] += parallel_state.get_tensor_model_parallel_rank()
        build("vrlamb", False, True, 0.0, {}, model=model)

    out["differs"] = _refused(differs)
    # Megatron's layers mark their split weights only when they initialize them
    out["unmarked"] = _refused(lambda: build("vrlamb", True, True, 0.0, {},
                                             model=TPModel(perform_initialization=False)))
    return out


RESUME = ("vrlamb-do1-ov1-a2", "vrlamb-do0-ov1-a2")


def run_checkpoints(out_dir) -> dict:
    """Save and resume (both formats) under tensor parallelism; what the files hold."""
    from megatron.core import parallel_state

    from vrgd_ds.megatron.checkpoint import _Sharded

    dp_rank = parallel_state.get_data_parallel_rank()
    cases = {cid: CASES[cid] for cid in RESUME}
    out = {"resume": run_resume(dp_rank, out_dir, cases, model=TPModel, world=DP),
           "resume sharded": run_resume(dp_rank, out_dir, cases, sharded=True, model=TPModel, world=DP)}
    one = torch.load(Path(out_dir) / "vrlamb-do1-ov1-a2.optimizer.pt", weights_only=True)
    folder = _Sharded(Path(out_dir) / "vrlamb-do1-ov1-a2.optimizer")
    out["files"] = {"names": sorted(one["weights"]), "tensor_parallel_size": one["tensor_parallel_size"],
                    "sharded names": sorted(folder.params), "shards": sorted(f.name for f in folder.folder.iterdir())}
    return out


DIST = ("vrlamb-do1-ov1-a2", "vrlamb-do0-ov1-a2", "vrlamb-do1-ov1-a2-sp", "vrlamb-do1-ov1-a2-bf16-sp",
        "vrlamb-do0-ov1-a2-fp16-sp")


def model_sharded_state_dict(ddp, glu: bool = False) -> dict:
    """The test model's sharded state dict as a MegatronModule builds it: Megatron's layers
    their own (split by tensor parallelism), the others replicated; its tensors are the
    parameters (keep_vars). ``glu``: fc1's weight through Megatron's SwiGLU
    ShardedTensorFactory, as a GPT MLP with gated_linear_unit saves it (each rank's rows are
    its halves of two tensors)."""
    from megatron.core import parallel_state
    from megatron.core.transformer.utils import sharded_state_dict_default

    tp_group = parallel_state.get_tensor_model_parallel_group()
    out = {}
    for name, child in ddp.module.named_children():
        out.update(sharded_state_dict_default(child, f"{name}.", tp_group=tp_group))
    if glu:
        from megatron.core.transformer.mlp import apply_swiglu_sharded_factory

        out["fc1.weight"] = apply_swiglu_sharded_factory(out["fc1.weight"], ())
    return out


def dist_save(ddp, opt, folder: Path, glu: bool = False) -> None:
    from megatron.core import dist_checkpointing

    folder.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    model_sd = model_sharded_state_dict(ddp, glu)
    dist_checkpointing.save({"model": model_sd, "optimizer": opt.sharded_state_dict(model_sd)}, str(folder))


def dist_load(ddp, opt, folder: Path, glu: bool = False) -> dict:
    """Megatron-LM's load_checkpoint for torch_dist: the sharded state dicts (is_loading), the
    load, the model's weights, then the optimizer's state. Returns the loaded model weights."""
    from megatron.core import dist_checkpointing

    model_sd = model_sharded_state_dict(ddp, glu)
    loaded = dist_checkpointing.load({"model": model_sd,
                                      "optimizer": opt.sharded_state_dict(model_sd, is_loading=True)}, str(folder))
    weights = {k: v.detach().clone() for k, v in loaded["model"].items() if torch.is_tensor(v)}
    ddp.module.load_state_dict(loaded["model"])
    opt.load_state_dict(loaded["optimizer"])
    return weights


def _moved_off(ddp):
    with torch.no_grad():
        for p in ddp.module.parameters():
            p.add_(1.0)


def run_dist_checkpoints(out_dir) -> dict:
    """Megatron's distributed checkpointing (torch_dist): per case, 3 steps, save, 2 more ("a");
    a new run (weights moved off) loads it and takes the same 2 steps ("b"). Also: the
    distributed-optimizer checkpoint loaded without it ("cross"), a save before the first step,
    and the refusals: a VRAdamW run, fewer state keys, other param groups, fsdp_dtensor."""
    from megatron.core import parallel_state

    from megatron_cases import FIRST, REST, _params

    dp_rank = parallel_state.get_data_parallel_rank()
    out = {}

    def new_run(case, name=None):
        sp = case.extra.get("sequence_parallel", False)
        return build(name or case.optimizer, case.distributed, case.overlap, case.clip, case.extra,
                     model=TPModel(sequence_parallel=sp))

    for cid in DIST:
        case, folder = CASES[cid], Path(out_dir) / f"{cid}.dist"
        ddp, opt, scheduler = new_run(case)
        if cid == DIST[0]:  # saved before any step: no optimizer state yet
            dist_save(ddp, opt, Path(out_dir) / "unstepped.dist")
        train(dp_rank, ddp, opt, scheduler, case.accum, _dtype(case.extra), schedule=FIRST, world=DP)
        dist_save(ddp, opt, folder)
        train(dp_rank, ddp, opt, scheduler, case.accum, _dtype(case.extra), schedule=REST, world=DP)
        a = _params(ddp)
        ddp, opt, scheduler = new_run(case)
        _moved_off(ddp)
        dist_load(ddp, opt, folder)
        train(dp_rank, ddp, opt, scheduler, case.accum, _dtype(case.extra), schedule=REST, world=DP)
        out[cid] = {"a": a, "b": _params(ddp)}
    case = CASES[DIST[1]]  # the distributed optimizer's checkpoint, loaded without it
    ddp, opt, scheduler = new_run(case)
    _moved_off(ddp)
    dist_load(ddp, opt, Path(out_dir) / f"{DIST[0]}.dist")
    train(dp_rank, ddp, opt, scheduler, case.accum, schedule=REST, world=DP)
    out["cross"] = _params(ddp)
    case = CASES[DIST[0]]
    ddp, opt, scheduler = new_run(case)
    train(dp_rank, ddp, opt, scheduler, case.accum, schedule=FIRST + REST, world=DP)
    out["unstepped a"] = _params(ddp)
    ddp, opt, scheduler = new_run(case)
    _moved_off(ddp)
    dist_load(ddp, opt, Path(out_dir) / "unstepped.dist")
    train(dp_rank, ddp, opt, scheduler, case.accum, schedule=FIRST + REST, world=DP)
    out["unstepped b"] = _params(ddp)
    # fc1's weight saved as SwiGLU's two tensors: resumed, and loaded without the distributed optimizer
    ddp, opt, scheduler = new_run(case)
    train(dp_rank, ddp, opt, scheduler, case.accum, schedule=FIRST, world=DP)
    dist_save(ddp, opt, Path(out_dir) / "glu.dist", glu=True)
    out["glu saved"] = _params(ddp)
    for cid in DIST[:2]:
        ddp, opt, scheduler = new_run(CASES[cid])
        _moved_off(ddp)
        dist_load(ddp, opt, Path(out_dir) / "glu.dist", glu=True)
        train(dp_rank, ddp, opt, scheduler, case.accum, schedule=REST, world=DP)
        out[f"glu {cid}"] = _params(ddp)
    ddp, opt, _ = new_run(case, "vradam")
    out["other optimizer"] = _refused(lambda: dist_load(ddp, opt, Path(out_dir) / f"{DIST[0]}.dist"), RuntimeError)
    # VR-LAMB without GSNR momentum does not ask for it: the load must not drop it unnoticed
    ddp, opt, _ = build(case.optimizer, case.distributed, case.overlap, case.clip, {"vr_beta3": 0.0}, model=TPModel())
    out["other state"] = _refused(lambda: dist_load(ddp, opt, Path(out_dir) / f"{DIST[0]}.dist"), RuntimeError)
    # the param groups built another way (Megatron's config_overrides): the weights' weight decay
    # switched off moves every parameter to the other of the 2 groups; a learning-rate override
    # of one weight makes 3 groups
    from megatron.core.optimizer.optimizer_config import ParamKey

    for what, overrides in (("other groups", {ParamKey(name="*.weight"): {"wd_mult": 0.0}}),
                            ("more groups", {ParamKey(name="*.bias"): {"wd_mult": 0.0},
                                             ParamKey(name="*fc1.weight"): {"lr_mult": 2.0}})):
        ddp, opt, _ = build(case.optimizer, case.distributed, case.overlap, case.clip,
                            {"config_overrides": overrides}, model=TPModel())
        out[what] = _refused(lambda: dist_load(ddp, opt, Path(out_dir) / f"{DIST[0]}.dist"), RuntimeError)
    out["fsdp"] = _refused(lambda: opt.sharded_state_dict(model_sharded_state_dict(ddp),
                                                          metadata={"distrib_optim_sharding_type": "fsdp_dtensor"}),
                           RuntimeError)
    return out


def dist_load_without_tensor_parallelism(out_dir) -> dict:
    """The tensor-parallel 2 x data-parallel 2 checkpoint (distributed optimizer) loaded by 4
    data-parallel ranks, one micro-batch each (the same 4 gradient groups), with and without
    the distributed optimizer, then the same 2 steps."""
    from megatron_cases import REST

    out = {}
    for cid in DIST[:2]:
        case = CASES[cid]
        ddp, opt, scheduler = build(case.optimizer, case.distributed, case.overlap, case.clip, case.extra,
                                    model=TPModel())
        _moved_off(ddp)
        dist_load(ddp, opt, Path(out_dir) / f"{DIST[0]}.dist")
        train(dist.get_rank(), ddp, opt, scheduler, 1, schedule=REST)
        out[cid] = {n: p.detach().clone() for n, p in ddp.module.named_parameters()}
    # SwiGLU's fc1 from 2 tensor-parallel ranks to 1: the rows move ([w0; v0], [w1; v1] -> [w0; w1; v0; v1]),
    # the optimizer's fp32 weights as the model's own weights do
    for cid in DIST[:2]:
        case = CASES[cid]
        ddp, opt, _ = build(case.optimizer, case.distributed, case.overlap, case.clip, case.extra, model=TPModel())
        _moved_off(ddp)
        weights = dist_load(ddp, opt, Path(out_dir) / "glu.dist", glu=True)
        out[f"glu {cid}"] = {"model": weights, "after": {n: p.detach().clone() for n, p in ddp.module.named_parameters()}}
    return out


def telemetry_without_tensor_parallelism() -> dict:
    """The telemetry case on 4 data-parallel ranks, 1 micro-batch each, the whole model: the
    same 4 gradient groups as tensor-parallel 2 x data-parallel 2 with 2 micro-batches."""
    case = CASES["vrlamb-do1-ov1-a2-telemetry"]
    ddp, opt, scheduler = build(case.optimizer, case.distributed, case.overlap, case.clip, case.extra)
    train(dist.get_rank(), ddp, opt, scheduler, 1)
    return opt.chained_optimizers[0].optimizer.telemetry


def load_at_other_tp_size(out_dir) -> str | None:
    """The 2 x 2 checkpoint loaded by 4 data-parallel ranks without tensor parallelism: refused."""
    from vrgd_ds.megatron import load_optimizer

    ddp, opt, _ = build("vrlamb", True, True, 0.0, {})
    # every rank raises the RuntimeError that names the failed rank's ValueError
    return _refused(lambda: load_optimizer(opt, ddp, Path(out_dir) / "vrlamb-do1-ov1-a2.optimizer.pt"),
                    RuntimeError)


def worker(rank, init_file, out_dir):
    from megatron_cpu import start_gloo_worker

    start_gloo_worker(rank, init_file, out_dir, WORLD)
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(TP, 1)

    def compute():
        results = {cid: run_case(case) for cid, case in CASES.items()}
        results["ranks"] = {"tp": parallel_state.get_tensor_model_parallel_rank(),
                            "dp": parallel_state.get_data_parallel_rank()}
        results["refusals"] = run_refusals()
        results["checkpoints"] = run_checkpoints(out_dir)
        results["dist checkpoints"] = run_dist_checkpoints(out_dir)
        parallel_state.destroy_model_parallel()
        parallel_state.initialize_model_parallel(1, 1)
        results["other tp size"] = load_at_other_tp_size(out_dir)
        results["dist tp1"] = dist_load_without_tensor_parallelism(out_dir)
        results["telemetry dp4"] = telemetry_without_tensor_parallelism()
        return results

    save_results(out_dir, rank, compute)
    dist.barrier()
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()
