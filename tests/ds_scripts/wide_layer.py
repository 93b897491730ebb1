"""Worker for tests/test_deepspeed_routes.py: a layer whose fp32 GSNR sum overflows, held by one
rank only.

    deepspeed --num_gpus 2 tests/ds_scripts/wide_layer.py --out RESULTS.pt

The model's last bias gets the same gradient, 1e3, from every micro-batch (the loss is
1e3 x the mean of the outputs' sums): its variance is 0 and r_raw = gbar^2 / tiny overflows
fp32, so that layer's sum is redone in float64. Under ZeRO-1/2 on 2 ranks the bias lies in
rank 1's partition only. VR-LAMB, 2 micro-steps per step (k = 4), 3 steps, at ZeRO stages
0, 1 and 2 in one launch (a fresh model and engine each); rank 0 saves the parameters, and
every rank the number of float64 layer-sum calls it made and the segments it redid.
"""

import argparse
import sys

import torch

import vrgd_ds  # noqa: F401  (registers the optimizers with DeepSpeed)
import deepspeed
import torch.distributed as dist
from vrgd_ds import gsnr

STEPS, GAS, MICRO = 3, 2, 4
SCALE = 1e3


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1))


def batch(step):
    """The step's 16 samples; micro-batch j of the step is samples 4j .. 4j + 3."""
    return torch.randn(MICRO * GAS * 2, 6, generator=torch.Generator().manual_seed(700 + step))


def loss_fn(out):
    return SCALE * out.sum() / out.shape[0]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--local_rank", type=int, default=0)
    args = ap.parse_args()
    calls = []
    wide_partials = gsnr.wide_partials

    def counted(grads, sum_sqs, sq_scale, redo):  # the real function; what each rank redid
        calls.append(sum(bool(r) for r in redo))
        return wide_partials(grads, sum_sqs, sq_scale, redo)

    gsnr.wide_partials = counted
    out = {}
    for stage in (0, 1, 2):
        calls.clear()
        model = make_model()
        cfg = {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": GAS,
               "gradient_clipping": 0.0, "zero_optimization": {"stage": stage, "reduce_bucket_size": 20},
               "optimizer": {"type": "VRLAMB", "params": {"lr": 0.02, "betas": [0.9, 0.999], "eps": 1e-6,
                                                          "weight_decay": 0.01, "gamma": 0.1, "beta3": 0.9}}}
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
        world, rank = dist.get_world_size(), dist.get_rank()
        for step in range(STEPS):
            xs = batch(step).chunk(world * GAS)
            for j in range(GAS):
                engine.backward(loss_fn(engine(xs[j * world + rank])))
                engine.step()
        everyone = [None] * world
        dist.all_gather_object(everyone, list(calls))
        out[stage] = {"params": [p.detach().clone() for p in model.parameters()], "redone": everyone}
        print(f"[wide_layer] stage {stage} rank {rank}: float64 sums {calls}", flush=True)
    if dist.get_rank() == 0:
        torch.save(out, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
