"""Worker for tests/test_deepspeed_*.py: a tiny MLP trained through deepspeed.initialize.

    deepspeed --num_gpus 2 tests/ds_scripts/train_tiny.py --config CFG.json --steps N --out P.pt

Each step's global batch (48 samples, seeded by step) is split into world x accumulation
micro-batches; rank r takes micro-batches r, r + world, ... Rank 0 saves the parameters.
"""

import argparse
import json

import torch

import vrgd_ds  # noqa: F401  (registers the optimizers with DeepSpeed)
import deepspeed
import torch.distributed as dist
from tiny_problem import batch, make_model


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", required=True)
    ap.add_argument("--start", type=int, default=0, help="first step (after --load)")
    ap.add_argument("--save", default=None, help="engine.save_checkpoint here at the end")
    ap.add_argument("--load", default=None, help="engine.load_checkpoint from here first")
    ap.add_argument("--local_rank", type=int, default=0)
    args = ap.parse_args()
    cfg = json.loads(open(args.config).read())
    model = make_model()
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    if args.load:
        engine.load_checkpoint(args.load)
    world, rank = dist.get_world_size(), dist.get_rank()
    gas = engine.gradient_accumulation_steps()
    dtype = next(engine.module.parameters()).dtype  # bf16 configs cast the model
    for step in range(args.start, args.start + args.steps):
        x, y = batch(step)
        xs, ys = x.chunk(world * gas), y.chunk(world * gas)
        for j in range(gas):
            i = j * world + rank
            loss = torch.nn.functional.mse_loss(engine(xs[i].to(dtype)).float(), ys[i])
            engine.backward(loss)
            engine.step()
    if args.save:
        engine.save_checkpoint(args.save, tag="last")
    if rank == 0:
        torch.save([p.detach().float().clone() for p in engine.module.parameters()], args.out)
    dist.barrier()  # tear gloo down in step: a rank exiting mid-collective aborts the other
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
