"""Worker for tests/test_deepspeed_*.py: a tiny MLP trained through deepspeed.initialize.

    deepspeed --num_gpus 2 tests/ds_scripts/train_tiny.py --config CFG.json --steps N --out P.pt
    deepspeed --num_gpus 2 tests/ds_scripts/train_tiny.py --cases CASES.json --out RESULTS.pt

Each step's global batch (48 samples, seeded by step) is split into world x accumulation
micro-batches; rank r takes micro-batches r, r + world, ... Rank 0 saves the parameters.
``--cases`` runs many configurations in one launch (a fresh model and engine each) and
saves, per case: parameters, the VR telemetry, bytes the VR adapter sent and kept, and
the error if the case raised (refusals are cases too). Case keys besides name/config:

- steps: a count, or [data step, input scale] pairs (a large scale forces fp16 overflow)
- groups: "decay" (biases in a weight_decay 0 group), "exclude" (biases in an
  exclude_from_adaptation group) or "small_last" (the last bias alone, weight_decay 0);
  default one group
- client: "instance" or "callable" (the optimizer built here, not by the config)
- frozen: parameter names with requires_grad=False
- nan: {"step": s, "param": name, "rank": r}: that gradient gets a NaN on that rank
- coalesce: backward passes inside engine.coalesce_grad_reduction()
- width: the hidden width of the MLP (default 5)
- gas_changes: {"step": accumulation}: engine.set_train_batch_size before that step
- gate: {"step": [flag per micro-step]}: the model is tiny_problem.GatedMLP, whose side layer
  a micro-step runs through only where its flag is true, or on the ranks its flag lists
- measure_memory: record the peak bytes the squares' reduction allocated
- compile: "model" (engine.compile(): torch.compile of the module) or "autograd" (and
  compiled autograd for the backward passes)
- count_reads: count the host reads (CPU) or device syncs (CUDA) of the last step's backward
  passes and engine.step(), vrgd_ds's and everyone else's (tests/ds_scripts/host_reads.py)
"""

import argparse
import contextlib
import json
import os
import sys

import torch

import vrgd_ds  # noqa: F401  (registers the optimizers with DeepSpeed)
import deepspeed
import torch.distributed as dist
from host_reads import HostReads
from tiny_problem import batch, make_model, uses_side
from vrgd_ds.deepspeed import DS_NAMES
from vrgd_ds.deepspeed.telemetry import named_telemetry, vr_optimizer


def micro_batches(engine, step, scale):
    world, rank = dist.get_world_size(), dist.get_rank()
    gas = engine.gradient_accumulation_steps()
    x, y = batch(step)
    xs, ys = (x * scale).chunk(world * gas), y.chunk(world * gas)
    return [(xs[j * world + rank], ys[j * world + rank]) for j in range(gas)]


def loss_of(engine, x, y):
    p = next(engine.module.parameters())  # bf16/fp16 configs cast the model
    return torch.nn.functional.mse_loss(engine(x.to(device=p.device, dtype=p.dtype)).float(), y.to(p.device))


def train(engine, steps, coalesce=False, on_step=None, before=None, gas_changes=None, gate=None):
    for step, scale in steps:
        if before is not None:
            before(step)
        if gas_changes and str(step) in gas_changes:  # DeepSpeed's public way to grow the batch
            engine.set_train_batch_size(engine.train_micro_batch_size_per_gpu() * dist.get_world_size()
                                        * gas_changes[str(step)])
        pairs = micro_batches(engine, step, scale)
        flags = (gate or {}).get(str(step), [True] * len(pairs))

        def backward(j):  # the gated model's side layer (tiny_problem.GatedMLP)
            engine.module.use_side = uses_side(flags[j], dist.get_rank())
            engine.backward(loss_of(engine, *pairs[j]))

        if coalesce:
            with engine.coalesce_grad_reduction():
                for j in range(len(pairs)):
                    backward(j)
        else:
            for j in range(len(pairs) - 1):
                backward(j)
                engine.step()
            backward(len(pairs) - 1)
        if on_step is not None:
            on_step(step, lambda: engine.step())
        else:
            engine.step()


def adapter_bytes(engine):
    """Bytes the VR adapter sent so far (squares, layer statistics) and keeps, on this rank."""
    opt = vr_optimizer(engine)
    if opt is None:
        from vrgd_ds.deepspeed import seam

        adapter = seam.adapter_of(engine)
        meter = adapter.meter if adapter is not None else None
        if meter is None:
            return {"squares": 0, "layer_stats": 0, "kept": 0}
        return {"squares": getattr(meter.moments, "comm_bytes", 0), "layer_stats": getattr(meter.layout, "comm_bytes", 0),
                "kept": meter.moments.extra_bytes() if hasattr(meter.moments, "extra_bytes") else 0,
                "squared_steps": getattr(meter.moments, "squared_steps", None)}
    kept = opt.moments.extra_bytes() if hasattr(opt.moments, "extra_bytes") else 0
    kept += sum(st["gsnr_momentum"].numel() * 4 for st in opt.state.values() if "gsnr_momentum" in st)
    return {"squares": getattr(opt.moments, "comm_bytes", 0),
            "layer_stats": getattr(opt.layout, "comm_bytes", 0), "kept": kept,
            "squared_steps": getattr(opt.moments, "squared_steps", None)}


def param_groups(model, how):
    named = list(model.named_parameters())
    if how is None:
        return [p for _, p in named]
    weights = [p for n, p in named if not n.endswith("bias")]
    biases = [p for n, p in named if n.endswith("bias")]
    if how == "small_last":  # a group smaller than the world size: some ranks hold only padding
        return [{"params": [p for n, p in named if n != "2.bias"]},
                {"params": [p for n, p in named if n == "2.bias"], "weight_decay": 0.0}]
    extra = {"decay": {"weight_decay": 0.0}, "exclude": {"exclude_from_adaptation": True}}[how]
    return [{"params": weights}, {"params": biases, **extra}]


def build(case):
    cfg = json.loads(json.dumps(case["config"]))
    if cfg.get("fp16", {}).get("enabled") and not torch.cuda.is_available():
        # DeepSpeed's CPU accelerator reports no fp16; the tiny model runs in fp16 on CPU
        # anyway, which lets the test drive DeepSpeed's real fp16 loss-scaling path.
        from deepspeed.accelerator import get_accelerator

        get_accelerator().is_fp16_supported = lambda: True
    model = make_model(case.get("width", 5), gated="gate" in case)
    for name, p in model.named_parameters():
        p.requires_grad_(name not in case.get("frozen", ()))
    params = param_groups(model, case.get("groups"))
    client = case.get("client")
    optimizer = None
    if client:
        spec = cfg.pop("optimizer")
        cls, hp = DS_NAMES[spec["type"]], spec.get("params", {})
        optimizer = (lambda ps: cls(ps, **hp)) if client == "callable" else cls(params, **hp)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=params, optimizer=optimizer, config=cfg)
    if case.get("compile"):
        torch._dynamo.reset()  # each case compiles its own module: no recompile limit across cases
        engine.compile(compiled_autograd_enabled=case["compile"] == "autograd")
    return engine


class NaNInjector:
    def __init__(self, engine, spec):
        self.spec, self.step = spec, None
        p = dict(engine.module.named_parameters())[spec["param"]]
        p.register_hook(self.hook)

    def hook(self, grad):
        if self.step == self.spec["step"] and dist.get_rank() == self.spec["rank"]:
            grad = grad.clone()
            grad.view(-1)[0] = float("nan")
        return grad


def full_params(engine):
    """The model's parameters as float32 CPU copies (ZeRO-3: gathered from the ranks' partitions)."""
    params = list(engine.module.parameters())
    stage3 = engine.zero_optimization_stage() == 3
    with deepspeed.zero.GatheredParameters(params) if stage3 else contextlib.nullcontext():
        return [p.detach().float().cpu().clone() for p in params]


def state_tensors(engine):
    opt = engine.basic_optimizer
    return [t.detach().clone() for st in opt.state.values() for t in st.values() if torch.is_tensor(t)]


def run_case(case):
    try:
        engine = build(case)
    except Exception as e:  # a refusal at initialize is this case's result
        return {"error": f"{type(e).__name__}: {e}"}
    steps = case.get("steps", 3)
    steps = [(s, 1.0) for s in range(steps)] if isinstance(steps, int) else steps
    record = {"raised": [], "untouched": []}
    injector = NaNInjector(engine, case["nan"]) if "nan" in case else None
    peaks = []
    if case.get("measure_memory"):
        peaks = measure_square_allocations(engine)

    def on_step(step, do_step):
        before = (full_params(engine), state_tensors(engine))
        try:
            do_step()
        except FloatingPointError as e:
            record["raised"].append(str(e))
        if injector is not None and step == injector.spec["step"]:
            after = (full_params(engine), state_tensors(engine))
            record["untouched"].append(all(torch.equal(a, b) for a, b in zip(before[0] + before[1],
                                                                                after[0] + after[1])))

    reads = HostReads(next(engine.module.parameters()).device) if case.get("count_reads") else None
    counted = steps[-1:] if reads is not None else []  # the last step, backward passes and engine.step()
    try:
        train(engine, steps[:len(steps) - len(counted)], coalesce=case.get("coalesce", False), on_step=on_step,
              before=(lambda s: setattr(injector, "step", s)) if injector is not None else None,
              gas_changes=case.get("gas_changes"), gate=case.get("gate"))
        if counted:
            with reads:
                train(engine, counted)
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}"}
    per_rank = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, adapter_bytes(engine))
    opt = vr_optimizer(engine)
    return {"params": full_params(engine),
            "telemetry": named_telemetry(engine), "bytes": per_rank,
            "skipped_steps": engine.skipped_steps, "vr_skipped": getattr(opt, "skipped_steps", None),
            "grads_checked_finite": getattr(opt, "grads_checked_finite", None),
            "peak_square_bytes": max(peaks, default=None), **record,
            "sub_groups": len(engine.optimizer.fp16_groups) if engine.zero_optimization_stage() == 3 else None,
            # per flat bucket of our optimizer: whether it hands p.grad over itself
            # (vrgd_ds.optim.base), and how many gradients its last step gathered
            "grads_home": [b.grads_home for _, bs in getattr(engine.basic_optimizer, "_buckets", {}).values()
                           for b in bs],
            "moved": [b.moved.get("g") for _, bs in getattr(engine.basic_optimizer, "_buckets", {}).values()
                      for b in bs],
            **({"reads": reads.summary()} if reads is not None else {})}


def measure_square_allocations(engine):
    """Wrap the adapter's square reduction with the profiler: the peak bytes it allocated
    above what was allocated when it started, per call."""
    from torch.profiler import ProfilerActivity, profile

    moments = vr_optimizer(engine).moments
    original, peaks = moments.add_buckets, []

    def measured(pairs):
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            original(pairs)
        current = peak = 0
        for e in sorted(prof.events(), key=lambda e: e.time_range.start):
            current += e.self_cpu_memory_usage
            peak = max(peak, current)
        peaks.append(peak)

    moments.add_buckets = measured
    return peaks


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config")
    ap.add_argument("--cases", help="JSON list of cases (see the module docstring)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", required=True)
    ap.add_argument("--start", type=int, default=0, help="first step (after --load)")
    ap.add_argument("--save", default=None, help="engine.save_checkpoint here at the end")
    ap.add_argument("--load", default=None, help="engine.load_checkpoint from here first")
    ap.add_argument("--load-consolidated", default=None,
                    help="vrgd_ds.deepspeed.checkpoint.load_consolidated from this file first")
    ap.add_argument("--case-extra", default="{}", help="JSON of case keys (groups, frozen) for --config")
    ap.add_argument("--local_rank", type=int, default=0)
    args = ap.parse_args()
    if args.cases:
        results = {c["name"]: run_case(c) for c in json.loads(open(args.cases).read())}
        if dist.get_rank() == 0:
            torch.save(results, args.out)
    else:
        case = {"config": json.loads(open(args.config).read()), **json.loads(args.case_extra)}
        engine = build(case)
        if args.load:
            engine.load_checkpoint(args.load, tag="last")
        if args.load_consolidated:
            from vrgd_ds.deepspeed.checkpoint import load_consolidated

            load_consolidated(engine, args.load_consolidated)
        train(engine, [(s, 1.0) for s in range(args.start, args.start + args.steps)])
        if args.save:
            engine.save_checkpoint(args.save, tag="last")
        params = full_params(engine)
        if dist.get_rank() == 0:
            torch.save(params, args.out)
    dist.barrier()  # tear gloo down in step: a rank exiting mid-collective aborts the other
    dist.destroy_process_group()
    # Everything is written and torch.distributed is torn down. Interpreter shutdown itself
    # aborted now and then after the bf16 / autocast cases: 'terminate called without an
    # active exception', with no thread running Python (fault handler), in 4 of about 150
    # launches of test_mixed_dtype_routes_never_abort. Leave without it.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
