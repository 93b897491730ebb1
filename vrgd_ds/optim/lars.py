"""LARS (You, Gitman & Ginsburg, 2017, "Large Batch Training of Convolutional
Networks"), ALGORITHM.md section 4, per parameter tensor:

    local = eta * ||theta|| / (||g|| + wd * ||theta||)   if both norms > 0, else 1
    buf   = mu * buf + lr * local * (g + wd * theta)
    theta -= buf

Norms are over the whole parameter tensor, across ZeRO partitions. Groups with
``exclude_from_adaptation=True`` (bias, LayerNorm) use local = 1 and no weight decay.
No eps, no trust clipping; fp32 arithmetic and state for any parameter dtype.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..gsnr import partial_sq_norms
from .base import BaseOptimizer, GroupBatch, check_lr, check_momentum, check_weight_decay
from .lamb import write_back
from .layout import layer_totals


def lars_local_lr(w_sq: list[float], g_sq: list[float], eta: float, wd: float) -> list[float]:
    out = []
    for a, b in zip(w_sq, g_sq):
        wn, gn = math.sqrt(a), math.sqrt(b)
        out.append(eta * wn / (gn + wd * wn) if wn > 0.0 and gn > 0.0 else 1.0)
    return out


class LARS(BaseOptimizer):
    def __init__(
        self,
        params,
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        eta: float = 0.001,
        *,
        foreach: bool | None = None,
        **extra,
    ):
        check_lr(lr)
        check_momentum(momentum)
        check_weight_decay(weight_decay)
        if not eta > 0.0:
            raise ValueError(f"eta must be > 0, got {eta}")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, **extra)
        super().__init__(params, defaults, foreach=foreach)

    def _update(self, group: dict, batch: GroupBatch, grads: list[Tensor]) -> None:
        params = batch.params
        wd = self._weight_decay(group)
        foreach = self._use_foreach(group)
        self._advance_step(params)
        bufs = batch.views(self._state_tensor(p, "momentum_buffer") for p in params)
        g = [t.float() for t in batch.views(grads)]
        p_views = batch.views(params)
        w = [t.float() for t in p_views]
        n = len(g)
        if group["exclude_from_adaptation"]:
            local = [1.0] * n
        else:
            w_sq, g_sq = layer_totals(
                self.layout, batch.flat_segments,
                partial_sq_norms(w, foreach=foreach), partial_sq_norms(g, foreach=foreach),
            )
            local = lars_local_lr(w_sq, g_sq, group["eta"], wd)
        lr, mu = group["lr"], group["momentum"]
        scaled = [lr * x for x in local]
        if foreach:
            step = torch._foreach_add(g, w, alpha=wd) if wd != 0.0 else [t.clone() for t in g]
            torch._foreach_mul_(step, scaled)
            torch._foreach_mul_(bufs, mu)
            torch._foreach_add_(bufs, step)
            torch._foreach_sub_(w, bufs)
        else:
            for b, gi, wi, s in zip(bufs, g, w, scaled):
                step = gi.add(wi, alpha=wd) if wd != 0.0 else gi.clone()
                b.mul_(mu).add_(step.mul_(s))
                wi.sub_(b)
        write_back(p_views, w)
