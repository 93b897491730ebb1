"""LARS (You, Gitman & Ginsburg, 2017, "Large Batch Training of Convolutional
Networks"), docs/algorithm.md section 4, per parameter tensor:

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

from ..gsnr import sq_norms_foreach
from .base import BaseOptimizer, GroupBatch, kernel, check_lr, check_momentum, check_weight_decay
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
        compile: bool = False,
        group_defaults: dict | None = None,
    ):
        check_lr(lr)
        check_momentum(momentum)
        check_weight_decay(weight_decay)
        if not eta > 0.0:
            raise ValueError(f"eta must be > 0, got {eta}")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, **(group_defaults or {}))
        super().__init__(params, defaults, foreach=foreach, compile=compile)

    def _update(self, group: dict, batch: GroupBatch, grads: list) -> None:
        params = batch.params
        wd, foreach, compiled = self._weight_decay(group), self._use_foreach(group), group["compile"]
        self._advance_step(params)
        bufs = batch.views(self._state_tensor(p, "momentum_buffer") for p in params)
        p_views = batch.views(params)
        n = len(p_views)
        adapt = not group["exclude_from_adaptation"]
        if foreach:
            g = [t.float() for t in grads]
            w = [t.float() for t in p_views]
            if adapt:
                w_sq, g_sq = layer_totals(self.layout, batch.flat_segments,
                                          sq_norms_foreach(w), sq_norms_foreach(g))
        elif adapt:
            k_norms = kernel(lars_norms, compiled)
            norms = [k_norms(src.fn, src.args, pv) for src, pv in zip(grads, p_views)]
            w_sq, g_sq = layer_totals(self.layout, batch.flat_segments,
                                      torch.stack([x[0] for x in norms]), torch.stack([x[1] for x in norms]))
        local = lars_local_lr(w_sq, g_sq, group["eta"], wd) if adapt else [1.0] * n
        lr, mu = group["lr"], group["momentum"]
        scaled = [lr * x for x in local]
        if foreach:
            step = torch._foreach_add(g, w, alpha=wd) if wd != 0.0 else [t.clone() for t in g]
            torch._foreach_mul_(step, scaled)
            torch._foreach_mul_(bufs, mu)
            torch._foreach_add_(bufs, step)
            torch._foreach_sub_(w, bufs)
            write_back(p_views, w)
            return
        k_apply = kernel(lars_apply, compiled)
        for src, pv, b, s in zip(grads, p_views, bufs, scaled):
            fn, args = src.again() if adapt else (src.fn, src.args)
            k_apply(fn, args, pv, b, wd, s, mu)


# ---- per-tensor kernels (eager loop or torch.compile) -------------------------------


def lars_norms(grad_fn, grad_args, p: Tensor) -> tuple[Tensor, Tensor]:
    """Pass 1: ||theta||^2 and ||g||^2 partial sums."""
    g = grad_fn(*grad_args)
    w = p.float()
    return (w * w).sum(), (g * g).sum()


def lars_apply(grad_fn, grad_args, p: Tensor, buf: Tensor, wd: float, scaled_lr: float,
               mu: float) -> None:
    """Pass 2: buf = mu * buf + lr * local * (g + wd * theta); theta -= buf."""
    g = grad_fn(*grad_args)
    w = p.float()
    buf.mul_(mu).add_((g + wd * w) * scaled_lr)
    p.copy_(w - buf)
