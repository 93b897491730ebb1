"""LAMB (You et al., 2020, "Large Batch Optimization for Deep Learning: Training BERT
in 76 minutes"), the variant of NVIDIA's BERT recipe, ALGORITHM.md section 4:

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

from ..gsnr import partial_sq_norms
from .base import BaseOptimizer, GroupBatch, check_betas, check_eps, check_lr, check_weight_decay
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
        **extra,
    ):
        check_lr(lr)
        betas = check_betas(betas)
        check_eps(eps)
        check_weight_decay(weight_decay)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        bias_correction=bias_correction, **extra)
        super().__init__(params, defaults, foreach=foreach)

    def _update(self, group: dict, batch: GroupBatch, grads: list[Tensor]) -> None:
        params = batch.params
        beta1, beta2 = group["betas"]
        wd = self._weight_decay(group)
        eps = group["eps"]
        foreach = self._use_foreach(group)
        steps = batch.per_view(self._advance_step(params))
        m = batch.views(self._state_tensor(p, "exp_avg") for p in params)
        v = batch.views(self._state_tensor(p, "exp_avg_sq") for p in params)
        g = [t.float() for t in batch.views(grads)]
        p_views = batch.views(params)
        w = [t.float() for t in p_views]
        if group["bias_correction"]:
            bc1 = [1.0 - beta1**t for t in steps]
            bc2_sqrt = [math.sqrt(1.0 - beta2**t) for t in steps]
        else:
            bc1 = bc2_sqrt = [1.0] * len(steps)

        if foreach:
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
        else:
            u = []
            for mi, vi, gi, wi, b1c, b2c in zip(m, v, g, w, bc1, bc2_sqrt):
                mi.lerp_(gi, 1.0 - beta1)
                vi.mul_(beta2).addcmul_(gi, gi, value=1.0 - beta2)
                ui = vi.sqrt().div_(b2c).add_(eps).reciprocal_().mul_(mi).div_(b1c)
                if wd != 0.0:
                    ui.add_(wi, alpha=wd)
                u.append(ui)

        w_sq, u_sq = layer_totals(
            self.layout, batch.flat_segments,
            partial_sq_norms(w, foreach=foreach), partial_sq_norms(u, foreach=foreach),
        )
        scales = [-group["lr"] * t for t in trust_ratios(w_sq, u_sq)]
        apply_scaled_update(p_views, w, u, scales, foreach=foreach)


def apply_scaled_update(
    p_views: list[Tensor], w: list[Tensor], u: list[Tensor], scales: list[float], *, foreach: bool
) -> None:
    """p += scale_i * u_i, in fp32; written back for low-precision parameters."""
    if foreach:
        torch._foreach_mul_(u, scales)
        torch._foreach_add_(w, u)
    else:
        for wi, ui, s in zip(w, u, scales):
            wi.add_(ui, alpha=s)
    write_back(p_views, w)


def write_back(p_views: list[Tensor], w: list[Tensor]) -> None:
    """Copy fp32 working copies back into low-precision parameters."""
    for pv, wi in zip(p_views, w):
        if pv.dtype != torch.float32:
            pv.copy_(wi)
