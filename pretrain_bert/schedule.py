"""LR schedule of NVIDIA's LAMB BERT recipe and the paper's square-root batch scaling.

Per phase: linear warm-up from 0 over ``warmup_proportion * total_steps`` steps, then
polynomial decay to 0 at ``total_steps``: ``lr * (1 - t / total) ** power`` (NVIDIA's
``PolyWarmUpScheduler``; power 0.5 for phase 1 and 2). The square-root rule (paper
section 5, docs/algorithm.md section 5): ``lr = lr_ref * sqrt(B / B_ref)``.
"""

from __future__ import annotations

import math

import torch


def check_schedule(total_steps: int, warmup_proportion: float, power: float) -> None:
    if not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"max_steps must be an integer >= 1, got {total_steps!r}")
    if not 0.0 <= warmup_proportion < 1.0:
        raise ValueError(f"warmup_proportion must be in [0, 1), got {warmup_proportion!r}")
    if not power > 0.0:
        raise ValueError(f"poly_power must be > 0, got {power!r}")


def poly_warmup(step: int, total_steps: int, warmup_proportion: float, power: float = 0.5) -> float:
    """LR multiplier for the optimizer step with 0-based index ``step``."""
    warmup = warmup_proportion * total_steps
    if step + 1 <= warmup:  # the first step already has a non-zero LR
        return (step + 1) / warmup
    return (1.0 - step / total_steps) ** power if step < total_steps else 0.0


def poly_warmup_scheduler(optimizer, total_steps: int, warmup_proportion: float,
                          power: float = 0.5) -> torch.optim.lr_scheduler.LambdaLR:
    check_schedule(total_steps, warmup_proportion, power)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: poly_warmup(s, total_steps, warmup_proportion, power))


def sqrt_scaled_lr(lr_ref: float, batch_ref: int, batch: int) -> float:
    """lr = lr_ref * sqrt(batch / batch_ref)."""
    if batch_ref <= 0 or batch <= 0:
        raise ValueError(f"batch sizes must be positive, got reference {batch_ref} and {batch}")
    return lr_ref * math.sqrt(batch / batch_ref)
