"""Gradient moments -> clamped, layer-normalised GSNR (ALGORITHM.md sections 1-3).

This is the only place the GSNR is computed. Every VR optimizer calls these functions
in front of its base update; the DeepSpeed adapter feeds them partition views.

All functions work on lists of tensors ("views"): a view is a whole parameter, or, under
ZeRO, the piece of a parameter that one rank owns. Per-layer statistics are formed from
per-view partial sums that the caller reduces over all views of the same layer (see
:class:`vrgd_ds.optim.layout.LayerLayout`), so a layer split across partitions is exact.

Arithmetic is fp32 whatever the gradient dtype. Two paths with the same math: a
multi-tensor path on ``torch._foreach_*`` kernels and a per-tensor loop.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

TINY = torch.finfo(torch.float32).tiny


def check_gamma(gamma: float) -> float:
    if not 0.0 < gamma <= 1.0:
        raise ValueError(f"gamma must be in (0, 1], got {gamma}")
    return float(gamma)


def check_beta3(beta3: float) -> float:
    if not 0.0 <= beta3 < 1.0:
        raise ValueError(f"beta3 must be in [0, 1), got {beta3}")
    return float(beta3)


def check_group_count(k: int) -> int:
    if int(k) != k or k < 2:
        raise ValueError(
            f"the gradient variance needs at least 2 gradient groups, got k={k}; "
            "split the batch into k >= 2 micro-batches or data-parallel ranks"
        )
    return int(k)


def moments_from_sums(sum_g: Tensor, sum_sq: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(sum_i g_i, sum_i g_i^2, k) -> (gbar, mean of squares), eq. 7 of the paper."""
    check_group_count(k)
    return sum_g.float() / k, sum_sq.float() / k


def raw_gsnr(
    grads: Sequence[Tensor],
    sum_sqs: Sequence[Tensor],
    sq_scale: float,
    *,
    foreach: bool = True,
) -> list[Tensor]:
    """Elementwise r_raw = gbar^2 / (max(s - gbar^2, 0) + tiny), new fp32 tensors.

    ``grads`` hold the mean gradient gbar; ``sq_scale * sum_sqs`` is the mean of the
    squared group gradients in the same scale as ``grads`` (the moment source's job).
    """
    if not grads:
        return []
    if foreach:
        var = torch._foreach_mul(list(sum_sqs), sq_scale)
        g32 = [g.float() for g in grads]
        torch._foreach_addcmul_(var, g32, g32, value=-1.0)
        torch._foreach_clamp_min_(var, 0.0)
        torch._foreach_add_(var, TINY)
        r = torch._foreach_mul(g32, g32)
        torch._foreach_div_(r, var)
        return r
    out = []
    for g, sq in zip(grads, sum_sqs):
        g32 = g.float()
        var = (sq * sq_scale).addcmul_(g32, g32, value=-1.0).clamp_min_(0.0).add_(TINY)
        out.append((g32 * g32).div_(var))
    return out


def partial_sums(tensors: Sequence[Tensor], *, foreach: bool = True) -> Tensor:
    """Sum of each (non-negative) tensor's elements, as one fp32 vector."""
    if not tensors:
        return torch.zeros(0)
    if foreach:
        return torch.stack(torch._foreach_norm(list(tensors), 1)).float()
    return torch.stack([t.abs().sum() for t in tensors]).float()


def partial_sq_norms(tensors: Sequence[Tensor], *, foreach: bool = True) -> Tensor:
    """Sum of squares of each tensor's elements (fp32), to be reduced per layer."""
    if not tensors:
        return torch.zeros(0)
    if foreach:
        norms = torch._foreach_norm([t.float() for t in tensors], 2)
    else:
        norms = [t.float().norm(2) for t in tensors]
    return torch.stack(norms).square()


def normalise_and_clamp(
    r_raw: list[Tensor], layer_means: Sequence[float], gamma: float, *, foreach: bool = True
) -> list[Tensor]:
    """r = clamp(r_raw / m, gamma, 1), r = 1 where the layer mean m is 0 (eq. 8-9); in place."""
    ones = [i for i, m in enumerate(layer_means) if not m > 0.0]
    if foreach:
        divisors = [m if m > 0.0 else 1.0 for m in layer_means]
        torch._foreach_div_(r_raw, divisors)
        torch._foreach_clamp_min_(r_raw, gamma)
        torch._foreach_clamp_max_(r_raw, 1.0)
    else:
        for r, m in zip(r_raw, layer_means):
            if m > 0.0:
                r.div_(m).clamp_(gamma, 1.0)
    for i in ones:
        r_raw[i].fill_(1.0)
    return r_raw


def gsnr_momentum(
    r: list[Tensor],
    bufs: list[Tensor],
    beta3: float,
    steps: Sequence[int],
    *,
    foreach: bool = True,
) -> list[float]:
    """p_t = beta3 p_{t-1} + (1 - beta3) r_t in place on ``bufs``; returns 1/(1 - beta3^t).

    phat_t = bufs * the returned factor (section 3, one per tensor: t counts that tensor's
    applied steps); the caller folds it into the gradient product, saving a pass.
    """
    if foreach:
        torch._foreach_lerp_(bufs, r, 1.0 - beta3)
    else:
        for b, ri in zip(bufs, r):
            b.lerp_(ri, 1.0 - beta3)
    return [1.0 / (1.0 - beta3**t) for t in steps]


def scale_gradients(
    grads: Sequence[Tensor],
    ratios: list[Tensor],
    factors: Sequence[float] | None = None,
    *,
    foreach: bool = True,
) -> list[Tensor]:
    """g' = factor * ratio * gbar as new fp32 tensors (factor: bias correction of phat)."""
    if foreach:
        out = torch._foreach_mul(ratios, [g.float() for g in grads]) if ratios else []
        if factors is not None and out:
            torch._foreach_mul_(out, list(factors))
        return out
    out = []
    for i, (g, r) in enumerate(zip(grads, ratios)):
        t = r * g.float()
        out.append(t.mul_(factors[i]) if factors is not None else t)
    return out
