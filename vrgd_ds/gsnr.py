"""Gradient moments -> clamped, layer-normalised GSNR (docs/algorithm.md sections 1-3).

This is the only place the GSNR is computed. Every VR optimizer calls these functions
in front of its base update; the DeepSpeed adapter feeds them partition views.

All functions work on lists of tensors ("views"): a view is a whole parameter, or, under
ZeRO, the piece of a parameter that one rank owns. Per-layer statistics are formed from
per-view partial sums that the caller reduces over all views of the same layer (see
:class:`vrgd_ds.optim.layout.LayerLayout`), so a layer split across partitions is exact.

Arithmetic is fp32 whatever the gradient dtype. Two paths with the same math: a
multi-tensor path on ``torch._foreach_*`` kernels (the ``*_foreach`` functions), and
per-tensor kernels (:func:`gsnr_sum`, :func:`gsnr_grad`) that the optimizers run in a
loop, either eagerly or under ``torch.compile``, which fuses each into one pass over
memory and lets the base update fuse :func:`gsnr_grad` into its own first pass.
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


def raw_gsnr_foreach(grads: Sequence[Tensor], sum_sqs: Sequence[Tensor], sq_scale: float) -> list[Tensor]:
    """Elementwise r_raw = gbar^2 / (max(s - gbar^2, 0) + tiny), new fp32 tensors.

    ``grads`` hold the mean gradient gbar; ``sq_scale * sum_sqs`` is the mean of the
    squared group gradients in the same scale as ``grads`` (the moment source's job).
    """
    if not grads:
        return []
    var = torch._foreach_mul(list(sum_sqs), sq_scale)
    g32 = [g.float() for g in grads]
    torch._foreach_addcmul_(var, g32, g32, value=-1.0)
    torch._foreach_clamp_min_(var, 0.0)
    torch._foreach_add_(var, TINY)
    r = list(torch._foreach_mul(g32, g32))
    torch._foreach_div_(r, var)
    return r


def sums_foreach(tensors: Sequence[Tensor]) -> Tensor:
    """Sum of each non-negative tensor's elements (fp32 vector)."""
    if not tensors:
        return torch.zeros(0)
    return torch.stack(torch._foreach_norm(list(tensors), 1)).float()


def sq_norms_foreach(tensors: Sequence[Tensor]) -> Tensor:
    """Sum of squares of each tensor's elements (fp32 vector), to be reduced per layer."""
    if not tensors:
        return torch.zeros(0)
    return torch.stack(torch._foreach_norm([t.float() for t in tensors], 2)).square()


def normalise_and_clamp_foreach(r_raw: list[Tensor], layer_means: Sequence[float], gamma: float) -> None:
    """r = clamp(r_raw / m, gamma, 1), r = 1 where the layer mean m is 0 (eq. 8-9); in place."""
    torch._foreach_div_(r_raw, [m if m > 0.0 else 1.0 for m in layer_means])
    torch._foreach_clamp_min_(r_raw, gamma)
    torch._foreach_clamp_max_(r_raw, 1.0)
    for r, m in zip(r_raw, layer_means):
        if not m > 0.0:
            r.fill_(1.0)


def bias_corrections(beta3: float, steps: Sequence[int]) -> list[float]:
    """1 / (1 - beta3^t) per tensor: phat_t = p_t * this (section 3)."""
    return [1.0 / (1.0 - beta3**t) for t in steps]


def scaled_grads_foreach(
    grads: Sequence[Tensor], r: list[Tensor], bufs: list[Tensor] | None, beta3: float,
    factors: Sequence[float] | None,
) -> list[Tensor]:
    """GSNR momentum (in place on ``bufs``) then g' = phat * gbar as new fp32 tensors."""
    if bufs is not None:
        torch._foreach_lerp_(bufs, r, 1.0 - beta3)
        r = bufs
    out = torch._foreach_mul(r, [g.float() for g in grads]) if r else []
    if factors is not None and out:
        torch._foreach_mul_(out, list(factors))
    return out


# ---- per-tensor kernels (eager loop or torch.compile) -------------------------------


def _raw(g: Tensor, sq: Tensor, sq_scale: float) -> Tensor:
    var = (sq * sq_scale - g * g).clamp_min(0.0) + TINY
    return g * g / var


def raw_gsnr_wide(g: Tensor, sq: Tensor, sq_scale: float) -> Tensor:
    """r_raw with the moments in fp32 but the division in float64.

    Zero variance (fp32 cancellation of s - gbar^2 at small k) makes gbar^2 / tiny overflow
    fp32 once |gbar| > 2. The optimizers take this path only for layers whose fp32 sum came
    out +inf, so the contract's formula is evaluated exactly instead of turning into NaN.
    """
    g = g.float()
    var = (sq * sq_scale - g * g).clamp_min(0.0) + TINY
    g64 = g.double()
    return g64 * g64 / var.double()


def gsnr_sum(g: Tensor, sq: Tensor, sq_scale: float) -> Tensor:
    """Sum over the tensor of r_raw (a 0-d fp32 tensor), for the layer mean."""
    return _raw(g.float(), sq, sq_scale).sum()


def gsnr_grad(
    g: Tensor, sq: Tensor, sq_scale: float, mean: float, gamma: float,
    mom: Tensor | None, beta3: float, bias_correction: float, update_momentum: bool,
    wide: bool = False,
) -> Tensor:
    """g' = phat * gbar for one tensor (fp32), eq. 8-9 and section 3.

    With ``mom`` (GSNR momentum buffer, beta3 > 0): p_t = lerp(p_{t-1}, r, 1 - beta3) in
    place when ``update_momentum``; otherwise ``mom`` already holds p_t (a second pass
    over the same step) and r is not needed. ``wide``: r_raw in float64 (see
    :func:`raw_gsnr_wide`), for layers whose fp32 GSNR overflowed.
    """
    g = g.float()
    if mom is not None and not update_momentum:
        return mom * bias_correction * g
    if wide:
        r = (raw_gsnr_wide(g, sq, sq_scale) / mean).clamp(gamma, 1.0).float()
    elif mean > 0.0:
        r = (_raw(g, sq, sq_scale) / mean).clamp(gamma, 1.0)
    else:
        r = torch.ones_like(g)
    if mom is None:
        return r * g
    mom.lerp_(r, 1.0 - beta3)
    return mom * bias_correction * g


def clamped_counts(grads: Sequence[Tensor], sum_sqs: Sequence[Tensor], sq_scale: float,
                   layer_means: Sequence[float], gamma: float) -> Tensor:
    """Per tensor: how many elements have r_raw / m < gamma, i.e. are clamped up to gamma.

    Telemetry only (one extra pass on the steps that record it); float64 counts.
    """
    counts = [(_raw(g.float(), q, sq_scale) < gamma * m).sum() if m > 0.0
              else torch.zeros((), dtype=torch.long, device=g.device)
              for g, q, m in zip(grads, sum_sqs, layer_means)]
    return torch.stack(counts).double() if counts else torch.zeros(0, dtype=torch.float64)


def noise_partials(grads: Sequence[Tensor], sum_sqs: Sequence[Tensor], sq_scale: float) -> Tensor:
    """Per view: [sum (s - gbar^2), sum gbar^2] as a float64 [n, 2] tensor (section 7), the
    elementwise terms in fp32, their sums in float64; to be summed per layer by the caller."""
    rows = []
    for g, q in zip(grads, sum_sqs):
        g = g.float()
        gsq = g * g
        rows.append(torch.stack([(q * sq_scale - gsq).sum(dtype=torch.float64), gsq.sum(dtype=torch.float64)]))
    if not rows:
        return torch.zeros(0, 2, dtype=torch.float64)
    return torch.stack(rows)


def as_fp32(g: Tensor) -> Tensor:
    """The identity gradient source of the base optimizers."""
    return g.float()
