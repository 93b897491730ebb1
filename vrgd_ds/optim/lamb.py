"""LAMB (You et al., 2020, "Large Batch Optimization for Deep Learning: Training BERT
in 76 minutes"), the variant of NVIDIA's BERT recipe, docs/algorithm.md section 4:

    m = b1 m + (1 - b1) g ;  v = b2 v + (1 - b2) g^2
    mhat = m / (1 - b1^t) ;  vhat = v / (1 - b2^t)        (bias_correction=True)
    u = mhat / (sqrt(vhat) + eps) + wd * theta
    trust = ||theta|| / ||u||  if both norms > 0, else 1
    theta -= lr * trust * u

Norms are over the whole parameter tensor, also when the tensor is split across ZeRO
partitions (the layer layout reduces the partial sums). No trust clipping. Weight decay
is skipped for groups with ``exclude_from_adaptation=True``; the trust ratio is applied
to every tensor, as NVIDIA's recipe does. Arithmetic and optimizer state are fp32 for
any parameter dtype.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..gsnr import sq_norms_foreach
from .base import BaseOptimizer, GroupBatch, kernel, check_betas, check_eps, check_lr, check_weight_decay
from .layout import layer_totals


def trust_ratios(numer_sq: list[float], denom_sq: list[float]) -> list[float]:
    """||a|| / ||b|| from squared norms, 1 where either norm is 0."""
    return [
        math.sqrt(a) / math.sqrt(b) if a > 0.0 and b > 0.0 else 1.0
        for a, b in zip(numer_sq, denom_sq)
    ]


class LAMB(BaseOptimizer):
    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.01,
        bias_correction: bool = True,
        *,
        foreach: bool | None = None,
        compile: bool = False,
        group_defaults: dict | None = None,
    ):
        check_lr(lr)
        betas = check_betas(betas)
        check_eps(eps)
        check_weight_decay(weight_decay)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        bias_correction=bias_correction, **(group_defaults or {}))
        super().__init__(params, defaults, foreach=foreach, compile=compile)

    def _update(self, group: dict, batch: GroupBatch, grads: list) -> None:
        params = batch.params
        beta1, beta2 = group["betas"]
        wd, eps, foreach = self._weight_decay(group), group["eps"], self._use_foreach(group)
        steps = batch.per_view(self._advance_step(params))
        m = batch.views(self._state_tensor(p, "exp_avg") for p in params)
        v = batch.views(self._state_tensor(p, "exp_avg_sq") for p in params)
        p_views = batch.views(params)
        if group["bias_correction"]:
            bc1 = [1.0 - beta1**t for t in steps]
            bc2_sqrt = [math.sqrt(1.0 - beta2**t) for t in steps]
        else:
            bc1 = bc2_sqrt = [1.0] * len(steps)
        if foreach:
            _lamb_foreach(p_views, grads, m, v, bc1, bc2_sqrt, beta1, beta2, eps, wd,
                          self.layout, batch, group["lr"])
            return
        k_moments = kernel(lamb_moments, group["compile"])
        k_apply = kernel(lamb_apply, group["compile"])
        norms = [k_moments(src.fn, src.args, mi, vi, pv, beta1, beta2, b1, b2, eps, wd)
                 for src, mi, vi, pv, b1, b2 in zip(grads, m, v, p_views, bc1, bc2_sqrt)]
        w_sq, u_sq = layer_totals(self.layout, batch.flat_segments,
                                  torch.stack([n[0] for n in norms]), torch.stack([n[1] for n in norms]))
        for pv, mi, vi, b1, b2, t in zip(p_views, m, v, bc1, bc2_sqrt, trust_ratios(w_sq, u_sq)):
            k_apply(pv, mi, vi, b1, b2, eps, wd, -group["lr"] * t)


# ---- per-tensor kernels (eager loop or torch.compile) -------------------------------


def lamb_direction(m: Tensor, v: Tensor, w: Tensor, bc1: float, bc2_sqrt: float, eps: float,
                   wd: float) -> Tensor:
    """u = mhat / (sqrt(vhat) + eps) + wd * theta."""
    return (m / bc1) / (v.sqrt() / bc2_sqrt + eps) + wd * w


def lamb_moments(grad_fn, grad_args, m: Tensor, v: Tensor, p: Tensor, beta1: float, beta2: float,
                 bc1: float, bc2_sqrt: float, eps: float, wd: float) -> tuple[Tensor, Tensor]:
    """Pass 1: update m and v from the gradient; return ||theta||^2 and ||u||^2 partial sums."""
    g = grad_fn(*grad_args)
    m.lerp_(g, 1.0 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
    w = p.float()
    u = lamb_direction(m, v, w, bc1, bc2_sqrt, eps, wd)
    return (w * w).sum(), (u * u).sum()


def lamb_apply(p: Tensor, m: Tensor, v: Tensor, bc1: float, bc2_sqrt: float, eps: float, wd: float,
               scale: float) -> None:
    """Pass 2: theta += scale * u, recomputing u instead of storing it (no temporary)."""
    w = p.float()
    p.copy_(w + scale * lamb_direction(m, v, w, bc1, bc2_sqrt, eps, wd))


def _lamb_foreach(p_views, grads, m, v, bc1, bc2_sqrt, beta1, beta2, eps, wd, layout, batch, lr):
    g = [t.float() for t in grads]
    w = [t.float() for t in p_views]
    torch._foreach_lerp_(m, g, 1.0 - beta1)
    torch._foreach_mul_(v, beta2)
    torch._foreach_addcmul_(v, g, g, value=1.0 - beta2)
    u = torch._foreach_sqrt(v)
    torch._foreach_div_(u, bc2_sqrt)
    torch._foreach_add_(u, eps)
    torch._foreach_reciprocal_(u)
    torch._foreach_mul_(u, m)
    torch._foreach_div_(u, bc1)
    if wd != 0.0:
        torch._foreach_add_(u, w, alpha=wd)
    w_sq, u_sq = layer_totals(layout, batch.flat_segments, sq_norms_foreach(w), sq_norms_foreach(u))
    torch._foreach_mul_(u, [-lr * t for t in trust_ratios(w_sq, u_sq)])
    torch._foreach_add_(w, u)
    write_back(p_views, w)


def write_back(p_views: list[Tensor], w: list[Tensor]) -> None:
    """Copy fp32 working copies back into low-precision parameters."""
    for pv, wi in zip(p_views, w):
        if pv.dtype != torch.float32:
            pv.copy_(wi)
