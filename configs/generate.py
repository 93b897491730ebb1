"""Write the BERT-large phase configs at the paper's batch sizes (configs/bert_large_*.json).

    python configs/generate.py          # rewrites the files; tests check they are up to date

Table 1 of the paper / docs/algorithm.md section 6: 64k/32k takes 8599 steps and 128k/64k 4301,
phase 1 (seq 128) 90% of the steps and phase 2 (seq 512) the last 10%. 16k and 32k use the
LAMB paper's 31250 and 15625 steps; 96k/32k is not given, so phase 1 keeps the samples of
64k/32k's phase 1 (7739 x 64k) and phase 2 keeps its 860 steps at 32k (derived, not the
paper's). LRs: NVIDIA's LAMB recipe at 64k/32k (phase 1 6e-3 with warm-up 0.2843, phase 2
4e-3 with warm-up 0.128, poly power 0.5), scaled by the square-root rule to other batches
(reference 64k for phase 1, 32k for phase 2). bf16, ZeRO-2, micro-batch 64 (seq 128) and
16 (seq 512) per GPU; DeepSpeed derives the accumulation from the world size.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

HERE = Path(__file__).resolve().parent
K = 1024
# name: (phase-1 batch, phase-2 batch, phase-1 steps, phase-2 steps, source of the steps)
SETUPS = {
    "16k": (16 * K, 16 * K, 28125, 3125, "LAMB paper: 31250 steps, split 90/10"),
    "32k": (32 * K, 32 * K, 14063, 1562, "LAMB paper: 15625 steps, split 90/10"),
    "64k-32k": (64 * K, 32 * K, 7739, 860, "paper Table 1: 8599 steps, split 90/10"),
    "96k-32k": (96 * K, 32 * K, 5159, 860, "derived: phase-1 samples and phase-2 steps of 64k/32k"),
    "128k-64k": (128 * K, 64 * K, 3871, 430, "paper Table 1: 4301 steps, split 90/10"),
}
OPTIMIZERS = {"vrlamb": "VRLAMB", "lamb": "NVLAMB"}


def config(optimizer: str, phase: int, batch: int, steps: int) -> dict:
    ref_batch, ref_lr, warmup = (64 * K, 6e-3, 0.2843) if phase == 1 else (32 * K, 4e-3, 0.128)
    lr = round(ref_lr * math.sqrt(batch / ref_batch), 6)
    params = {"lr": lr, "betas": [0.9, 0.999], "eps": 1e-6, "weight_decay": 0.01}
    if optimizer == "VRLAMB":
        params.update(gamma=0.1, beta3=0.9, telemetry_interval=100)
    seq, pred, micro = (128, 20, 64) if phase == 1 else (512, 80, 16)
    return {
        "train_batch_size": batch, "train_micro_batch_size_per_gpu": micro, "gradient_clipping": 1.0,
        "optimizer": {"type": optimizer, "params": params},
        "bf16": {"enabled": True},
        "zero_optimization": {"stage": 2, "overlap_comm": True, "contiguous_gradients": True,
                              "reduce_bucket_size": 5e8, "allgather_bucket_size": 5e8},
        "tensorboard": {"enabled": True, "output_path": "runs/tensorboard", "job_name": f"bert-large-phase{phase}"},
        "steps_per_print": 100,
        "pretraining": {"phase": phase, "model": "large", "seq_len": seq, "max_predictions": pred,
                        "max_steps": steps, "warmup_proportion": warmup, "poly_power": 0.5,
                        "eval_every": 500, "eval_batches": 50, "checkpoint_every": 200, "seed": 42},
    }


def files() -> dict[str, dict]:
    out = {}
    for name, (b1, b2, s1, s2, _source) in SETUPS.items():
        for short, optimizer in OPTIMIZERS.items():
            out[f"bert_large_{name}_phase1_{short}.json"] = config(optimizer, 1, b1, s1)
            out[f"bert_large_{name}_phase2_{short}.json"] = config(optimizer, 2, b2, s2)
    return out


def main() -> None:
    for name, cfg in files().items():
        (HERE / name).write_text(json.dumps(cfg, indent=1) + "\n")
    print(f"wrote {len(files())} configs to {HERE}")


if __name__ == "__main__":
    main()
