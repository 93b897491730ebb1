"""The 2-rank megatron-core runs behind tests/test_megatron.py (spawned once, many cases).

Each case builds a fresh model, Megatron DDP and optimizer (through
``vrgd_ds.megatron.get_megatron_optimizer`` and Megatron's OptimizerParamScheduler) and
trains STEPS steps the way Megatron's schedules do: ``zero_grad_buffer``, a micro-batches
with ``no_sync`` on all but the last (loss / a), ``finish_grad_sync`` (under tensor
parallelism ``finalize_model_grads``), ``step``. The global
batch of step s is cut into W * a micro-batches; rank r takes r*a .. r*a + a - 1.

The model: 6 -> 16 -> 16 -> 3 with tanh. Its 16x16 weight straddles the two ranks'
distributed-optimizer shards in every layout used here; with overlap (bucket_size 100)
there are 2 or 3 buckets, and rank 1's shard holds no bias at all, so its no-weight-decay
param group is empty there (the placeholder case).
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent / "ds_scripts"))
from tiny_problem import GATE, batch, make_model as tiny_model  # noqa: E402
from spawn_ranks import save_results, started  # noqa: E402

WORLD, STEPS, CLIP, BUCKET = 2, 3, 0.05, 100
# name: (reference base, VROptimizerConfig fields, reference hyperparameters)
HP = {
    "vrlamb": ("lamb", dict(lr=0.02, weight_decay=0.01, adam_eps=1e-6, vr_gamma=0.1, vr_beta3=0.9),
               dict(lr=0.02, weight_decay=0.01, eps=1e-6)),
    "lamb": ("lamb", dict(lr=0.02, weight_decay=0.01, adam_eps=1e-6), dict(lr=0.02, weight_decay=0.01, eps=1e-6)),
    "lars": ("lars", dict(lr=2.0, weight_decay=0.001, sgd_momentum=0.9, lars_eta=0.001),
             dict(lr=2.0, weight_decay=0.001, momentum=0.9, eta=0.001)),
    "vrlars": ("lars", dict(lr=2.0, weight_decay=0.001, sgd_momentum=0.9, lars_eta=0.001, vr_gamma=0.1),
               dict(lr=2.0, weight_decay=0.001, momentum=0.9, eta=0.001)),
    "vrsgd": ("sgd", dict(lr=0.2, weight_decay=0.01, vr_gamma=0.1), dict(lr=0.2, weight_decay=0.01)),
    "vrmomentum": ("sgd", dict(lr=0.05, weight_decay=0.01, sgd_momentum=0.9, vr_gamma=0.1),
                   dict(lr=0.05, weight_decay=0.01, momentum=0.9)),
    "vradam": ("adam", dict(lr=0.01, weight_decay=0.1, adam_eps=1e-8, vr_gamma=0.1, vr_beta3=0.9),
               dict(lr=0.01, weight_decay=0.1, eps=1e-8, decoupled=True)),
}


@dataclass(frozen=True)
class MCase:
    """One Megatron run: optimizer name (a key of HP), the distributed optimizer on or off,
    overlap_grad_reduce, micro-batches per step, gradient clipping (0: off), and extra
    settings (bf16, fp16, grad_reduce_in_fp32, overlap_param_gather, vr_gamma)."""

    optimizer: str
    distributed: bool
    overlap: bool
    accum: int
    clip: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def low_precision(self) -> bool:
        return bool(self.extra.get("bf16") or self.extra.get("fp16"))


CASES = {
    "vrlamb-do0-ov0-a2": MCase("vrlamb", distributed=False, overlap=False, accum=2),
    "vrlamb-do0-ov1-a2": MCase("vrlamb", distributed=False, overlap=True, accum=2),
    "vrlamb-do1-ov0-a2": MCase("vrlamb", distributed=True, overlap=False, accum=2),
    "vrlamb-do1-ov1-a2": MCase("vrlamb", distributed=True, overlap=True, accum=2),
    "vrlamb-do1-ov1-a3-clip": MCase("vrlamb", distributed=True, overlap=True, accum=3, clip=CLIP),
    "vrlamb-do1-ov1-a2-pg": MCase("vrlamb", distributed=True, overlap=True, accum=2,
                                  extra={"overlap_param_gather": True}),
    "lamb-do1-ov1-a2": MCase("lamb", distributed=True, overlap=True, accum=2),
    "lamb-do1-ov0-a1": MCase("lamb", distributed=True, overlap=False, accum=1),
    "lars-do1-ov1-a2": MCase("lars", distributed=True, overlap=True, accum=2),
    "vrlars-do1-ov1-a2": MCase("vrlars", distributed=True, overlap=True, accum=2),
    "vrsgd-do0-ov1-a4-clip": MCase("vrsgd", distributed=False, overlap=True, accum=4, clip=CLIP),
    "vrmomentum-do1-ov0-a2": MCase("vrmomentum", distributed=True, overlap=False, accum=2),
    "vradam-do1-ov1-a2": MCase("vradam", distributed=True, overlap=True, accum=2),
    "vrlamb-gamma1-do1-ov1-a2": MCase("vrlamb", distributed=True, overlap=True, accum=2, extra={"vr_gamma": 1.0}),
    "vrlamb-do1-ov1-a2-bf16": MCase("vrlamb", distributed=True, overlap=True, accum=2, extra={"bf16": True}),
    "vrlamb-do0-ov1-a2-bf16": MCase("vrlamb", distributed=False, overlap=True, accum=2, extra={"bf16": True}),
    "vrlamb-do1-ov1-a2-bf16grads": MCase("vrlamb", distributed=True, overlap=True, accum=2,
                                         extra={"bf16": True, "grad_reduce_in_fp32": False}),
    "vrlamb-do1-ov1-a2-fp16": MCase("vrlamb", distributed=True, overlap=True, accum=2, extra={"fp16": True}),
    # GatedMLP (tiny_problem): a side layer without a gradient on some micro-steps, alike on every rank
    **{f"{o}-do{d:d}-ov0-a2-gated": MCase(o, distributed=d, overlap=False, accum=2, extra={"gate": GATE})
       for o, d in (("vrlamb", False), ("vrlamb", True), ("vradam", True))},
}


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16),
                               torch.nn.Tanh(), torch.nn.Linear(16, 3))


def loss_fn(out, y):
    return torch.nn.functional.mse_loss(out.float(), y)


def split(step, accum, world=WORLD):
    x, y = batch(step)
    return list(zip(x.chunk(world * accum), y.chunk(world * accum)))


def build(name, distributed, overlap, clip, extra, model=None, device="cpu"):
    """Model, Megatron DDP, optimizer and scheduler. ``model``: the model (default make_model()),
    or a list of model chunks (virtual pipeline stages: each its own DDP, bucketing off on all but
    the first as Megatron-LM wraps them; the DDPs are returned as a list)."""
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from megatron.core.transformer import TransformerConfig

    from vrgd_ds.megatron import VROptimizerConfig, get_megatron_optimizer

    bf16, fp16 = extra.get("bf16", False), extra.get("fp16", False)
    dtype = torch.bfloat16 if bf16 else torch.float16 if fp16 else torch.float32
    chunks = [m.to(device, dtype) for m in (model if isinstance(model, list) else
                                            [make_model() if model is None else model])]
    tp = parallel_state.get_tensor_model_parallel_world_size()
    config = TransformerConfig(**{**dict(num_layers=1, hidden_size=8, num_attention_heads=tp, bf16=bf16, fp16=fp16,
                                         params_dtype=dtype, tensor_model_parallel_size=tp,
                                         sequence_parallel=extra.get("sequence_parallel", False),
                                         qk_layernorm=extra.get("qk_layernorm", False)),
                                  **extra.get("model_config", {})})
    ddp_config = DistributedDataParallelConfig(
        overlap_grad_reduce=overlap, use_distributed_optimizer=distributed, bucket_size=BUCKET,
        overlap_param_gather=extra.get("overlap_param_gather", False),
        grad_reduce_in_fp32=extra.get("grad_reduce_in_fp32", True))
    ddps = [DistributedDataParallel(config, ddp_config, m, disable_bucketing=i > 0) for i, m in enumerate(chunks)]
    fields = dict(HP[name][1], **{k: v for k, v in extra.items() if k.startswith("vr_")})
    opt_config = VROptimizerConfig(optimizer=name, min_lr=0.0, clip_grad=clip, bf16=bf16, fp16=fp16,
                                   initial_loss_scale=2.0**12, use_distributed_optimizer=distributed, **fields)
    opt = get_megatron_optimizer(opt_config, ddps, config_overrides=extra.get("config_overrides"))
    scheduler = OptimizerParamScheduler(
        opt, init_lr=opt_config.lr, max_lr=opt_config.lr, min_lr=0.0, lr_warmup_steps=0,
        lr_decay_steps=STEPS + 1, lr_decay_style="constant", start_wd=opt_config.weight_decay,
        end_wd=opt_config.weight_decay, wd_incr_steps=STEPS + 1, wd_incr_style="constant")
    return ddps if isinstance(model, list) else ddps[0], opt, scheduler


def train(rank, ddp, opt, scheduler, accum, dtype=torch.float32, device="cpu", schedule=None, world=None,
          gate=None):
    """``schedule``: (data step, input factor) per optimizer step; default: steps 0 .. STEPS-1.
    ``rank`` of ``world`` data-parallel ranks (default: all ranks). ``gate``: per data step, the
    gated model's ``use_side`` per micro-step.
    Returns whether Megatron applied each step (False: fp16 overflow, skipped)."""
    applied = []
    for step, factor in schedule or [(s, 1.0) for s in range(STEPS)]:
        ddp.zero_grad_buffer()
        opt.zero_grad()
        micro = split(step, accum, world or dist.get_world_size())
        for j in range(accum):
            if gate is not None:
                ddp.module.use_side = gate[step][j]
            xb, yb = (t.to(device) for t in micro[rank * accum + j])
            with ddp.no_sync() if j < accum - 1 else contextlib.nullcontext():
                loss = loss_fn(ddp((xb * factor).to(dtype)), yb) / accum
                (opt.scale_loss(loss) if dtype == torch.float16 else loss).backward()
        finish_grads(ddp)
        ok, _, _ = opt.step()
        applied.append(bool(ok))
        if ok:
            scheduler.step(1)
    return applied


def schedule(ddp, opt) -> None:
    """What Megatron-LM's training loop sets on the model config for Megatron's schedules
    (``get_forward_backward_func``); ``ddp``: the DDP, or the list of model chunks."""
    from megatron.core.distributed import finalize_model_grads

    chunks = ddp if isinstance(ddp, list) else [ddp]
    one = len(chunks) == 1
    config = chunks[0].config
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = chunks[0].no_sync if one else [d.no_sync for d in chunks]
    config.grad_sync_func = None
    if chunks[0].ddp_config.overlap_grad_reduce:
        config.grad_sync_func = chunks[0].start_grad_sync if one else [d.start_grad_sync for d in chunks]
    config.grad_scale_func = opt.scale_loss if config.fp16 else None


def finish_grads(ddp) -> None:
    """What Megatron's schedules do after the backward passes: ``finalize_model_grads`` (the
    data-parallel reduction; under tensor parallelism also the tensor-parallel sum of the
    partial gradients of sequence parallelism and qk_layernorm), or without tensor
    parallelism only the data-parallel reduction, which is all it would do there."""
    if ddp.tp_group.size() > 1:
        from megatron.core.distributed import finalize_model_grads

        finalize_model_grads([ddp])
    else:
        ddp.finish_grad_sync()


def run_case(rank, case: MCase, device="cpu"):
    name, distributed, overlap, accum, clip, extra = (
        case.optimizer, case.distributed, case.overlap, case.accum, case.clip, case.extra)
    gate = extra.get("gate")
    ddp, opt, scheduler = build(name, distributed, overlap, clip, extra, device=device,
                                model=gated_model() if gate else None)
    dtype = torch.bfloat16 if extra.get("bf16") else torch.float16 if extra.get("fp16") else torch.float32
    train(rank, ddp, opt, scheduler, accum, dtype, device, gate=gate,
          schedule=[(s, 1.0) for s in sorted(gate)] if gate else None)
    if extra.get("overlap_param_gather"):
        ddp.start_param_sync(force_sync=True)  # the last step's all-gather waits for a forward
    inner = opt.chained_optimizers[0].optimizer
    layout = getattr(inner.layout, "_segments", {})
    moments = getattr(inner, "moments", None)
    return {
        "params": [p.detach().float().cpu().clone() for p in ddp.module.parameters()],
        "bucket_groups": len(ddp.bucket_groups),
        "straddles": any(s.numel < s.layer_numel for s in layout.values() if s.numel),
        "group_numels": [[p.numel() for p in g["params"]] for g in inner.param_groups],
        "weight_decays": [g["weight_decay"] for g in inner.param_groups],
        "squares_bytes": moments.comm_bytes if moments is not None else 0,
        "k": moments.group_count if moments is not None else None,
    }


def capture_moments(rank, dtype, accum=2):
    """One low-precision step's GSNR inputs (no distributed optimizer: whole parameters):
    the mean gradient and sq_scale * sum_sq of every inner fp32 tensor, in model order."""
    low = {"bf16": dtype == torch.bfloat16, "fp16": dtype == torch.float16}
    ddp, opt, _ = build("vrlamb", False, True, 0.0, low)
    ddp.zero_grad_buffer()
    micro = split(0, accum)
    for j in range(accum):
        xb, yb = micro[rank * accum + j]
        with ddp.no_sync() if j < accum - 1 else contextlib.nullcontext():
            loss = loss_fn(ddp(xb.to(dtype)), yb) / accum
            (opt.scale_loss(loss) if dtype == torch.float16 else loss).backward()
    ddp.finish_grad_sync()
    inner = opt.chained_optimizers[0]
    scale = float(inner.get_loss_scale())
    assert not opt.prepare_grads()
    mains = {id(model): main for models, mains in zip(inner.float16_groups, inner.fp32_from_float16_groups)
             for model, main in zip(models, mains)}
    src = inner.optimizer.moments
    tensors = [mains[id(p)] for p in ddp.module.parameters()]
    return {"grad": [t.grad.clone() for t in tensors], "msq": [src.sq_scale * src.sum_sq(t) for t in tensors],
            "k": src.group_count, "loss_scale": scale}


def run_fp16_overflow(rank):
    """Inputs x 1e5 overflow fp16 on the second step: Megatron skips it; the run must then
    equal the run without that step (the squares of the skipped step leave no trace)."""
    ddp, opt, scheduler = build("vrlamb", True, True, 0.0, {"fp16": True})
    applied = train(rank, ddp, opt, scheduler, 2, torch.float16, schedule=[(0, 1.0), (1, 1e5), (1, 1.0), (2, 1.0)])
    return {"applied": applied, "params": [p.detach().float().clone() for p in ddp.module.parameters()]}


def gated_model():
    return tiny_model(16, gated=True)


def float64_reference(name, groups, clip, gamma=None, model_fn=None, gate=None):
    """docs/algorithm.md over ``groups`` explicit group gradients per step; biases (Megatron's
    wd_mult 0) get no weight decay and, for LARS, no trust ratio. ``gate``: the gated model,
    over its steps (group i is micro-step i % a of rank i // a)."""
    from reference import Reference, group_grads

    base, _, hp = HP[name]
    gamma = gamma if gamma is not None else (0.1 if name.startswith("vr") else None)
    beta3 = 0.9 if name in ("vrlamb", "vradam") else 0.0
    model = gated_model() if gate else (model_fn or make_model)()
    params = list(model.parameters())
    ref = Reference(params, base, gamma=gamma, beta3=beta3, **hp)
    no_decay = {"weight_decay": 0.0, **({"excluded": True} if base in ("lamb", "lars") else {})}
    per_param = [no_decay if p.dim() == 1 else {} for p in params]
    for step in sorted(gate) if gate else range(STEPS):
        with torch.no_grad():
            for p, t in zip(params, ref.theta):
                p.copy_(t.float())
        x, y = batch(step)
        flags = gate[step] if gate else None
        grads = group_grads(model, loss_fn, x, y, groups, before_group=None if flags is None else (
            lambda i: setattr(model, "use_side", flags[i % len(flags)])))
        if clip > 0.0:  # Megatron clips the mean gradient by its total norm
            norm = torch.sqrt(sum((g.mean(0) ** 2).sum() for g in grads)).item()
            coef = min(1.0, clip / (norm + 1e-6))
            assert coef < 1.0  # the case must really clip
            grads = [g * coef for g in grads]
        ref.step(grads, per_param)
    return ref.theta


RESUME_CASES = ("vrlamb-do1-ov1-a2", "vrlamb-do0-ov1-a2", "vrlamb-do1-ov1-a2-bf16", "vrlamb-do0-ov1-a2-bf16",
                "vrlamb-do1-ov1-a2-fp16", "lars-do1-ov1-a2", "vrlamb-do1-ov1-a2-pg")
SHARDED_RESUME_CASES = ("vrlamb-do1-ov1-a2", "vrlamb-do0-ov1-a2", "vrlamb-do1-ov1-a2-fp16")


def _params(ddp):
    if ddp.ddp_config.overlap_param_gather:
        ddp.start_param_sync(force_sync=True)  # the last step's all-gather waits for a forward
    return [p.detach().float().cpu().clone() for p in ddp.module.parameters()]


def _dtype(extra):
    return torch.bfloat16 if extra.get("bf16") else torch.float16 if extra.get("fp16") else torch.float32


FIRST, REST = [(s, 1.0) for s in range(3)], [(3, 1.0), (4, 1.0)]


def run_resume(rank, out_dir, cases: dict, device="cpu", sharded=False, model=None, world=None):
    """Per case: 3 steps, save_optimizer, 2 more steps ("a"); then a new model and optimizer,
    its weights moved off (+1), load_optimizer, the same 2 steps ("b"): a == b bitwise.
    ``sharded``: into a folder, saved twice (the second save replaces the first version).
    ``model``: makes the model (default make_model); ``rank`` of ``world`` data-parallel ranks."""
    from vrgd_ds.megatron import load_optimizer, save_optimizer

    out = {}
    for cid, case in cases.items():
        dtype = _dtype(case.extra)
        path = Path(out_dir) / (f"{cid}.optimizer" if sharded else f"{cid}.optimizer.pt")
        new_run = lambda: build(case.optimizer, case.distributed, case.overlap, case.clip, case.extra,  # noqa: E731
                                model=model() if model else None, device=device)
        ddp, opt, scheduler = new_run()
        train(rank, ddp, opt, scheduler, case.accum, dtype, device, schedule=FIRST, world=world)
        for _ in range(2 if sharded else 1):
            save_optimizer(opt, ddp, path, sharded=sharded)
        listing = sorted(f.name for f in path.iterdir()) if sharded else None
        train(rank, ddp, opt, scheduler, case.accum, dtype, device, schedule=REST, world=world)
        a = _params(ddp)
        ddp, opt, scheduler = new_run()
        with torch.no_grad():
            for p in ddp.module.parameters():
                p.add_(1.0)
        load_optimizer(opt, ddp, path)
        train(rank, ddp, opt, scheduler, case.accum, dtype, device, schedule=REST, world=world)
        out[cid] = {"a": a, "b": _params(ddp), "listing": listing}
    return out


def run_cross(rank, out_dir):
    """The distributed optimizer's file (run_resume) loaded without the distributed optimizer."""
    from vrgd_ds.megatron import load_optimizer

    case = CASES["vrlamb-do0-ov1-a2"]
    ddp, opt, scheduler = build(case.optimizer, case.distributed, case.overlap, case.clip, case.extra)
    load_optimizer(opt, ddp, Path(out_dir) / "vrlamb-do1-ov1-a2.optimizer.pt")
    train(rank, ddp, opt, scheduler, case.accum, schedule=REST)
    return {"params": _params(ddp),
            "files": sorted(f.name for f in Path(out_dir).iterdir() if "optimizer" in f.name)}


def run_checkpoint_refusals(rank, out_dir):
    """Bad checkpoints and a failed save: every rank raises, naming what is wrong."""
    from vrgd_ds.megatron import load_optimizer, save_optimizer

    def error(fn):
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - the message is what is tested
            return f"{type(e).__name__}: {e}"
        return None

    good = Path(out_dir) / "vrlamb-do1-ov1-a2.optimizer.pt"
    ddp, opt, _ = build("lamb", True, True, 0.0, {})
    lamb_file = Path(out_dir) / "lamb.optimizer.pt"
    save_optimizer(opt, ddp, lamb_file)
    other = Path(out_dir) / "other.pt"
    if rank == 0:
        torch.save({"weights": {}}, other)
    dist.barrier()
    wide = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16), torch.nn.Tanh(),
                               torch.nn.Linear(16, 4))
    blocker = Path(out_dir) / "a-file"
    blocker.touch()
    out = {}
    ddp, opt, _ = build("vrlamb", True, True, 0.0, {})
    out["optimizer"] = error(lambda: load_optimizer(opt, ddp, lamb_file))
    out["format"] = error(lambda: load_optimizer(opt, ddp, other))
    damaged = Path(out_dir) / "damaged.pt"
    if rank == 0:
        damaged.write_bytes(good.read_bytes()[:1000])  # a file cut short
    dist.barrier()
    out["damaged"] = error(lambda: load_optimizer(opt, ddp, damaged))
    out["one rank"] = error(lambda: load_optimizer(opt, ddp, good if rank == 0 else Path(out_dir) / "missing.pt"))
    out["save"] = error(lambda: save_optimizer(opt, ddp, blocker / "optimizer.pt"))
    kept = Path(out_dir) / "kept.optimizer.pt"
    if rank == 0:
        kept.write_bytes(good.read_bytes())
    dist.barrier()
    out["user state"] = error(lambda: save_optimizer(opt, ddp, kept, user_state={"loader": object()}))
    out["kept intact"] = kept.read_bytes() == good.read_bytes()
    ddp, opt, _ = build("vrlamb", True, True, 0.0, {}, model=wide)
    out["shape"] = error(lambda: load_optimizer(opt, ddp, good))
    out.update(sharded_refusals(rank, out_dir, error, good))
    return out


def sharded_refusals(rank, out_dir, error, a_file):
    """A refused sharded save leaves the folder's complete version (and removes its own);
    folders and files that are not a sharded checkpoint are refused, naming why."""
    from vrgd_ds.megatron import load_optimizer, save_optimizer

    ddp, opt, _ = build("vrlamb", True, True, 0.0, {})
    folder = Path(out_dir) / "sharded-kept"
    save_optimizer(opt, ddp, folder, sharded=True)
    listing = lambda: (sorted(f.name for f in folder.iterdir()), (folder / "latest").read_text())  # noqa: E731
    before = listing()
    out = {"sharded user state": error(lambda: save_optimizer(opt, ddp, folder, user_state={"x": object()},
                                                              sharded=True))}
    out["sharded loads"] = error(lambda: load_optimizer(opt, ddp, folder))
    ddp, opt, _ = build("vrlamb", True, True, 0.0, {})  # rank 0 loads, rank 1 fails: their states differ
    stepped = Path(out_dir) / "vrlamb-do1-ov1-a2.optimizer"  # run_resume's, after 3 steps
    error(lambda: load_optimizer(opt, ddp, stepped if rank == 0 else Path(out_dir) / "missing"))
    out["sharded mixed"] = error(lambda: save_optimizer(opt, ddp, folder, sharded=True))  # after the shards
    out["sharded kept"] = listing() == before == (["latest", "v000001"], "v000001\n")
    foreign = Path(out_dir) / "foreign"
    if rank == 0:
        foreign.mkdir()
        (foreign / "notes.txt").write_text("mine")
    dist.barrier()
    out["sharded foreign"] = error(lambda: save_optimizer(opt, ddp, foreign, sharded=True))
    out["sharded file"] = error(lambda: save_optimizer(opt, ddp, a_file, sharded=True))
    out["no latest"] = error(lambda: load_optimizer(opt, ddp, foreign))
    out["foreign kept"] = sorted(f.name for f in foreign.iterdir()) == ["notes.txt"]
    return out


def one_rank_worker(rank, init_file, out_dir):
    """1 rank: load the 2-rank distributed optimizer's file, report what each main tensor and
    its state hold, then train the 2 remaining steps with 4 micro-batches."""
    from megatron_cpu import redirect_cuda_to_cpu

    redirect_cuda_to_cpu()
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=0, world_size=1,
                            timeout=timedelta(seconds=120))
    started(out_dir, rank)
    from megatron.core import parallel_state

    from vrgd_ds.megatron import load_optimizer, save_optimizer

    parallel_state.initialize_model_parallel(1, 1)

    def load(name):
        ddp, opt, scheduler = build("vrlamb", True, True, 0.0, {})
        load_optimizer(opt, ddp, Path(out_dir).parent / name)
        shapes = {n: p.shape for n, p in ddp.module.named_parameters()}
        loaded = {n: {k: t.view(shapes[n]) for k, t in whole.items()}  # 1 rank: one piece, the whole
                  for n, [(_, _, whole)] in main_state(opt, ddp).items()}
        return ddp, opt, scheduler, loaded

    def compute():
        *_, from_shards = load("vrlamb-do1-ov1-a2.optimizer")  # the sharded folder of the same run
        ddp, opt, scheduler, loaded = load("vrlamb-do1-ov1-a2.optimizer.pt")
        train(rank, ddp, opt, scheduler, 4, schedule=REST)
        save_optimizer(opt, ddp, Path(out_dir) / "one-rank.optimizer", sharded=True)  # for 1 -> 2 ranks
        return {"loaded": loaded, "loaded from shards": from_shards, "params": _params(ddp)}

    save_results(out_dir, rank, compute)
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


def main_state(opt, ddp) -> dict:
    """{name: [(start, end, {"fp32": main weight, key: state tensor})]} of this rank's shard."""
    from vrgd_ds.megatron import seam

    inner = seam.inner_optimizers(opt)[0]
    names = {id(p): n for n, p in ddp.module.named_parameters()}
    out: dict = {}
    for group in seam.main_params(inner):
        for m in group:
            if m.model_param is not None:
                state = inner.optimizer.state[m.tensor]
                out.setdefault(names[id(m.model_param)], []).append((m.start, m.end, {
                    "fp32": m.tensor.detach().clone().reshape(-1),
                    **{k: v.detach().clone().reshape(-1) for k, v in state.items()
                       if torch.is_tensor(v) and v.dim() > 0}}))
    return out


def two_rank_load_worker(rank, init_file, out_dir):
    """2 ranks with the distributed optimizer load the 1-rank sharded folder (one_rank_worker's):
    what each rank's shard and model hold."""
    from megatron_cpu import redirect_cuda_to_cpu

    redirect_cuda_to_cpu()
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=120))
    started(out_dir, rank)
    from megatron.core import parallel_state

    from vrgd_ds.megatron import load_optimizer

    parallel_state.initialize_model_parallel(1, 1)

    def compute():
        ddp, opt, _ = build("vrlamb", True, True, 0.0, {})
        load_optimizer(opt, ddp, Path(out_dir).parent / "one-rank" / "one-rank.optimizer")
        return {"mains": main_state(opt, ddp), "params": _params(ddp)}

    save_results(out_dir, rank, compute)
    dist.barrier()
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


def run_nonfinite(rank):
    """A NaN in the gradient of a layer only one rank's shard holds (the distributed optimizer,
    2 ranks): every rank must take the same decision (raise, the default on_nonfinite), not
    only the rank that sees the NaN while the other waits in the next collective."""
    from vrgd_ds.megatron import seam

    ddp, opt, scheduler = build("vrlamb", True, False, 0.0, {})
    train(rank, ddp, opt, scheduler, 2, schedule=[(0, 1.0)])
    bias = ddp.module[4].bias  # 3 elements: in one shard
    holds = any(m.model_param is bias for group in seam.main_params(opt.chained_optimizers[0]) for m in group)
    ddp.zero_grad_buffer()
    opt.zero_grad()
    for j, (xb, yb) in enumerate(split(1, 2)[rank * 2:rank * 2 + 2]):
        with ddp.no_sync() if j == 0 else contextlib.nullcontext():
            (loss_fn(ddp(xb), yb) / 2).backward()
    if rank == 0:
        bias.main_grad[1] = float("nan")
    finish_grads(ddp)
    try:
        opt.step()
        error = None
    except Exception as e:
        error = f"{type(e).__name__}: {e}"
    return {"holds": holds, "error": error}


def run_refusals(rank):
    """Each unsupported setting, set on a real config, must be refused with its message."""
    from megatron_refusals import REFUSALS, try_refusal

    return {cid: try_refusal(rank, *spec) for cid, spec in REFUSALS.items()}


def worker(rank, init_file, out_dir):
    from megatron_cpu import start_gloo_worker

    start_gloo_worker(rank, init_file, out_dir, WORLD)
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(1, 1)

    def compute():
        results = {cid: run_case(rank, case) for cid, case in CASES.items()}
        results["bf16-moments"] = capture_moments(rank, torch.bfloat16)
        results["fp16-moments"] = capture_moments(rank, torch.float16)
        results["fp16-overflow"] = run_fp16_overflow(rank)
        results["refusals"] = run_refusals(rank)
        results["nonfinite"] = run_nonfinite(rank)
        results["resume"] = run_resume(rank, out_dir, {cid: CASES[cid] for cid in RESUME_CASES})
        results["resume sharded"] = run_resume(rank, out_dir, {cid: CASES[cid] for cid in SHARDED_RESUME_CASES},
                                               sharded=True)
        results["cross"] = run_cross(rank, out_dir)
        results["checkpoint refusals"] = run_checkpoint_refusals(rank, out_dir)
        return results

    save_results(out_dir, rank, compute)
    dist.barrier()
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()
