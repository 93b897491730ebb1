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
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent / "ds_scripts"))
from megatron_cases import MCase, _dtype, build, make_model, run_resume, train  # noqa: E402
from spawn_ranks import save_results, started  # noqa: E402

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

        config = ModelParallelConfig(tensor_model_parallel_size=TP, use_cpu_initialization=True,
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
                    w = w.chunk(TP, SPLIT_DIM[name])[tp_rank]
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
    from megatron_cpu import redirect_cuda_to_cpu

    redirect_cuda_to_cpu()
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=120))
    started(out_dir, rank)
    torch.set_num_threads(1)
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(TP, 1)

    def compute():
        results = {cid: run_case(case) for cid, case in CASES.items()}
        results["ranks"] = {"tp": parallel_state.get_tensor_model_parallel_rank(),
                            "dp": parallel_state.get_data_parallel_rank()}
        results["refusals"] = run_refusals()
        results["checkpoints"] = run_checkpoints(out_dir)
        parallel_state.destroy_model_parallel()
        parallel_state.initialize_model_parallel(1, 1)
        results["other tp size"] = load_at_other_tp_size(out_dir)
        results["telemetry dp4"] = telemetry_without_tensor_parallelism()
        return results

    save_results(out_dir, rank, compute)
    dist.barrier()
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()
