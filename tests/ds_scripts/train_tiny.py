"""Worker for tests/test_deepspeed_*.py: a tiny MLP trained through deepspeed.initialize.

    deepspeed --num_gpus 2 tests/ds_scripts/train_tiny.py --config CFG.json --steps N --out P.pt
    deepspeed --num_gpus 2 tests/ds_scripts/train_tiny.py --cases CASES.json --out RESULTS.pt

Each step's global batch (48 samples, seeded by step) is split into world x accumulation
micro-batches; rank r takes micro-batches r, r + world, ... Rank 0 saves the parameters.
``--cases`` runs many configurations in one launch (a fresh model and engine each) and
saves, per case: parameters, the VR telemetry, bytes the VR adapter sent and kept.
A case may list its steps as [data step, input scale] pairs (a large scale forces an
fp16 overflow on that step).
"""

import argparse
import json

import torch

import vrgd_ds  # noqa: F401  (registers the optimizers with DeepSpeed)
import deepspeed
import torch.distributed as dist
from tiny_problem import batch, make_model
from vrgd_ds.deepspeed.telemetry import named_telemetry, vr_optimizer


def train(engine, steps):
    world, rank = dist.get_world_size(), dist.get_rank()
    gas = engine.gradient_accumulation_steps()
    dtype = next(engine.module.parameters()).dtype  # bf16/fp16 configs cast the model
    for step, scale in steps:
        x, y = batch(step)
        xs, ys = (x * scale).chunk(world * gas), y.chunk(world * gas)
        for j in range(gas):
            i = j * world + rank
            loss = torch.nn.functional.mse_loss(engine(xs[i].to(dtype)).float(), ys[i])
            engine.backward(loss)
            engine.step()


def adapter_bytes(engine):
    """Bytes the VR adapter sent so far (squares, layer statistics) and keeps, on this rank."""
    opt = vr_optimizer(engine)
    if opt is None:
        return {"squares": 0, "layer_stats": 0, "kept": 0}
    kept = opt.moments.extra_bytes() if hasattr(opt.moments, "extra_bytes") else 0
    kept += sum(st["gsnr_momentum"].numel() * 4 for st in opt.state.values() if "gsnr_momentum" in st)
    return {"squares": getattr(opt.moments, "comm_bytes", 0),
            "layer_stats": getattr(opt.layout, "comm_bytes", 0), "kept": kept}


def run_case(case):
    if case["config"].get("fp16", {}).get("enabled"):
        # DeepSpeed's CPU accelerator reports no fp16; the tiny model runs in fp16 on CPU
        # anyway, which lets the test drive DeepSpeed's real fp16 ZeRO loss-scaling path.
        from deepspeed.accelerator import get_accelerator

        get_accelerator().is_fp16_supported = lambda: True
    model = make_model()
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                           config=case["config"])
    steps = case.get("steps", 3)
    train(engine, [(s, 1.0) for s in range(steps)] if isinstance(steps, int) else steps)
    per_rank = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, adapter_bytes(engine))
    return {"params": [p.detach().float().clone() for p in engine.module.parameters()],
            "telemetry": named_telemetry(engine), "bytes": per_rank,
            "skipped_steps": engine.skipped_steps}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config")
    ap.add_argument("--cases", help="JSON list of {name, config, steps}")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", required=True)
    ap.add_argument("--start", type=int, default=0, help="first step (after --load)")
    ap.add_argument("--save", default=None, help="engine.save_checkpoint here at the end")
    ap.add_argument("--load", default=None, help="engine.load_checkpoint from here first")
    ap.add_argument("--load-consolidated", default=None,
                    help="vrgd_ds.deepspeed.checkpoint.load_consolidated from this file first")
    ap.add_argument("--local_rank", type=int, default=0)
    args = ap.parse_args()
    if args.cases:
        results = {c["name"]: run_case(c) for c in json.loads(open(args.cases).read())}
        if dist.get_rank() == 0:
            torch.save(results, args.out)
    else:
        cfg = json.loads(open(args.config).read())
        model = make_model()
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
        if args.load:
            engine.load_checkpoint(args.load, tag="last")
        if args.load_consolidated:
            from vrgd_ds.deepspeed.checkpoint import load_consolidated

            load_consolidated(engine, args.load_consolidated)
        train(engine, [(s, 1.0) for s in range(args.start, args.start + args.steps)])
        if args.save:
            engine.save_checkpoint(args.save, tag="last")
        if dist.get_rank() == 0:
            torch.save([p.detach().float().clone() for p in engine.module.parameters()], args.out)
    dist.barrier()  # tear gloo down in step: a rank exiting mid-collective aborts the other
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
