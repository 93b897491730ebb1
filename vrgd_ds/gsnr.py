"""Gradient moments -> clamped, layer-normalised GSNR (docs/algorithm.md sections 1-3).

This is the only place the GSNR is computed. The formulas are plain elementwise functions
(:func:`raw_gsnr`, :func:`clamped_ratio`, :func:`momentum_update`); the optimizers run them
inside their flat passes (:mod:`vrgd_ds.optim.flat`) through the kernel stages at the end
of this file, which every VR optimizer shares: :func:`raw_gsnr_terms` (the layer sums of
r_raw) and :func:`scaled_grad` (g' = phat * gbar, fused into the first pass of the base
update). Per-layer statistics are sums over segments (a whole parameter, or under ZeRO the
piece of it that one rank owns) that the layer layout reduces
(:class:`vrgd_ds.optim.layout.LayerLayout`), so a layer split across partitions is exact.

The layer statistics the optimizers reduce are here too: the layer mean m of r_raw
(:func:`layer_means`), the per-segment clamp inputs with the m = 0 rule
(:func:`ratio_columns`), and the float64 path (:func:`overflowed`, :func:`wide_partials`).

Arithmetic is fp32 whatever the gradient dtype; layers whose fp32 r_raw overflows are
evaluated in float64 (:func:`raw_gsnr_wide`).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

TINY = torch.finfo(torch.float32).tiny
FP32_MAX = float(torch.finfo(torch.float32).max)
WIDE_CHUNK = 1 << 18  # elements per chunk of the float64 layer sums (wide_partials)


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


def raw_gsnr(g: Tensor, sq: Tensor, sq_scale) -> Tensor:
    """Elementwise r_raw = gbar^2 / (max(s - gbar^2, 0) + tiny), eq. 7; fp32 ``g`` and ``sq``.

    ``g`` holds the mean gradient gbar; ``sq_scale * sq`` is the mean of the squared group
    gradients in the same scale as ``g`` (the moment source's job). The one definition of
    the formula: the flat kernels and the list helpers below all call it.
    """
    var = (sq * sq_scale - g * g).clamp_min(0.0) + TINY
    return g * g / var


def raw_gsnr_wide(g: Tensor, sq: Tensor, sq_scale) -> Tensor:
    """r_raw with the moments in fp32 but the division in float64.

    Zero variance (fp32 cancellation of s - gbar^2 at small k) makes gbar^2 / tiny overflow
    fp32 once |gbar| > 2. The optimizers take this path only for layers whose fp32 sum came
    out +inf, so the contract's formula is evaluated exactly instead of turning into NaN.
    """
    g = g.float()
    var = (sq * sq_scale - g * g).clamp_min(0.0) + TINY
    g64 = g.double()
    return g64 * g64 / var.double()


def clamped_ratio(g: Tensor, sq: Tensor, sq_scale, inv_mean, gamma, wide: bool = False) -> Tensor:
    """r = clamp(r_raw / m, gamma, 1), eq. 8-9, fp32, as r_raw times ``inv_mean`` = 1 / m (one
    division per element fewer: the kernels are bound by their divisions on the CPU). ``inv_mean``
    and ``gamma`` broadcast against ``g`` (per-layer values); a layer whose mean m is 0 passes
    1 and gamma = 1, so r = 1."""
    raw = raw_gsnr_wide(g, sq, sq_scale) if wide else raw_gsnr(g, sq, sq_scale)
    return torch.minimum(torch.maximum(raw * inv_mean, gamma), torch.ones_like(raw)).float()


def momentum_update(mom: Tensor, r: Tensor, weight) -> Tensor:
    """p_t = beta3 * p_{t-1} + (1 - beta3) * r_t with ``weight`` = 1 - beta3 (section 3)."""
    return mom + weight * (r - mom)


# ---- layer statistics (the optimizers' per-layer scalars from the reduced layer sums) -----


def layer_means(sums: Sequence[float], layer_numels: Sequence[int]) -> list[float]:
    """The layer mean m of r_raw (eq. 8), per segment, from its layer's sum of r_raw."""
    return [s / n for s, n in zip(sums, layer_numels)]


def ratio_columns(means: Sequence[float], gamma: float) -> dict[str, list[float]]:
    """Per segment, the ``inv_mean`` and ``gamma`` that :func:`clamped_ratio` reads: 1 / m (in
    float64, rounded once) for the layer mean m, and gamma; or 1 and 1 where m = 0 (the
    layer's gradient is 0), so that r = 1 there."""
    return {"inv_mean": [1.0 / m if m > 0.0 else 1.0 for m in means],
            "gamma": [gamma if m > 0.0 else 1.0 for m in means]}


def inverse_not_normal(means: Sequence[float]) -> list[bool]:
    """The layers whose 1 / m is not a normal fp32 number (m under 2.9e-39 or over 8.5e37): in
    fp32 it would round to inf (r_raw = 0 then gives 0 * inf = NaN) or lose bits as a denormal.
    Like the layers of :func:`overflowed`, their sums are redone and their ratios computed in
    float64 (the :func:`raw_gsnr_wide` path), from 1 / m in float64. Every rank has the same
    layer means, so every rank takes the same path."""
    return [m > 0.0 and not TINY <= 1.0 / m <= FP32_MAX for m in means]


def overflowed(sums: Sequence[float]) -> list[bool]:
    """The layers whose fp32 sum of r_raw is +inf, to be summed again in float64
    (:func:`wide_partials`). A layer's sum is the same for each of its segments and on
    every rank, so every rank takes the float64 path for the same layers."""
    return [s == math.inf for s in sums]


def wide_partials(grads: Sequence[Tensor], sum_sqs: Sequence[Tensor], sq_scale: float,
                  redo: Sequence[bool]) -> Tensor:
    """Per view: the sum of :func:`raw_gsnr_wide` (float64) where ``redo``, else 0; a float64
    vector to be summed per layer by the caller, like the fp32 pass's partial sums."""
    def wide_sum(g: Tensor, q: Tensor) -> Tensor:  # a chunk at a time: bounded float64 temporaries
        g, q = g.reshape(-1), q.reshape(-1)
        total = torch.zeros((), dtype=torch.float64, device=g.device)
        for a in range(0, g.numel(), WIDE_CHUNK):
            total += raw_gsnr_wide(g[a:a + WIDE_CHUNK], q[a:a + WIDE_CHUNK], sq_scale).sum()
        return total

    return torch.stack([wide_sum(g, q) if r else torch.zeros((), dtype=torch.float64, device=g.device)
                        for g, q, r in zip(grads, sum_sqs, redo)])


# ---- list helpers (analysis and telemetry; the optimizers use the flat kernels) ----------


def raw_gsnr_foreach(grads: Sequence[Tensor], sum_sqs: Sequence[Tensor], sq_scale: float) -> list[Tensor]:
    """:func:`raw_gsnr` of each (gradient, squared-sum) pair, new fp32 tensors."""
    return [raw_gsnr(g.float(), q, sq_scale) for g, q in zip(grads, sum_sqs)]


def sums_foreach(tensors: Sequence[Tensor]) -> Tensor:
    """Sum of each non-negative tensor's elements (fp32 vector)."""
    if not tensors:
        return torch.zeros(0)
    return torch.stack(torch._foreach_norm(list(tensors), 1)).float()


def normalise_and_clamp_foreach(r_raw: list[Tensor], layer_means: Sequence[float], gamma: float) -> None:
    """r = clamp(r_raw / m, gamma, 1), r = 1 where the layer mean m is 0 (eq. 8-9); in place."""
    for r, m in zip(r_raw, layer_means):
        if m > 0.0:
            r.div_(m).clamp_(gamma, 1.0)
        else:
            r.fill_(1.0)


def bias_corrections(beta3: float, steps: Sequence[int]) -> list[float]:
    """1 / (1 - beta3^t) per tensor: phat_t = p_t * this (section 3)."""
    return [1.0 / (1.0 - beta3**t) for t in steps]


SQUARE_ROW = 2048  # elements per fp32 partial sum of square_sum


def square_sum(flat: Tensor, squared: bool, chunk_numel: int = 1 << 22) -> Tensor:
    """sum flat^2 (or sum flat, when already squared) as a float64 0-dim tensor: fp32
    elementwise, as the reduced squares would be, in fp32 partial sums over rows of
    ``SQUARE_ROW`` elements (a vectorised reduction, error ~ eps per row) that are added in
    float64; a chunk of ``chunk_numel`` at a time, so a gradient in another dtype is never
    converted whole. The rows' sums of squares come from ``vector_norm`` (squared again in
    float64): one read of the data and no temporary, where ``(x * x).sum(dtype=float64)``
    writes and reads a temporary and sums in float64 (2.2 against 48 ms for 11M elements on
    one CPU thread, relative difference 2e-9)."""
    total = torch.zeros((), dtype=torch.float64, device=flat.device)
    for at in range(0, flat.numel(), chunk_numel):
        chunk = flat[at:at + chunk_numel].float()
        whole = chunk.numel() - chunk.numel() % SQUARE_ROW
        if whole:
            rows = chunk[:whole].reshape(-1, SQUARE_ROW)
            if squared:
                total += rows.sum(dim=1).sum(dtype=torch.float64)
            else:
                total += torch.linalg.vector_norm(rows, dim=1).double().square().sum()
        if whole < chunk.numel():
            tail = chunk[whole:]
            total += (tail if squared else tail * tail).sum(dtype=torch.float64)
    return total


def grad_square_partials(grads: Sequence[Tensor]) -> Tensor:
    """Per view: [-sum gbar^2, sum gbar^2] as a float64 [n, 2] tensor (section 7; the
    measure-only meter, whose moment source sums the squares s per layer on its own, adds
    ``sq_scale`` times that sum to the first column): fp32 squares, fp32 row sums added in
    float64 (:func:`square_sum`)."""
    rows = []
    for g in grads:
        total = square_sum(g.reshape(-1), False)
        rows.append(torch.stack([-total, total]))
    if not rows:
        return torch.zeros(0, 2, dtype=torch.float64)
    return torch.stack(rows)


# ---- kernel stages of the flat passes (see vrgd_ds.optim.flat for spec, x, s, c) ----------


def raw_gsnr_terms(spec, x: dict, s: Tensor, c: Tensor):
    """Pass: r_raw per element, summed per layer for the layer mean m (eq. 8). With the flag
    "noise" (a telemetry step) also section 7's s - gbar^2 and gbar^2 per element (fp32), in
    the same read of gbar and the squares."""
    g = x["g"].float()
    r = raw_gsnr(g, x["sq"], spec.c(c, "sq_scale"))
    if not spec.has("noise"):
        return {}, (r,)
    gsq = g * g
    return {}, (r, x["sq"] * spec.c(c, "sq_scale") - gsq, gsq)


def clamped_count_terms(spec, x: dict, s: Tensor, c: Tensor):
    """Pass (telemetry): 1 where r_raw < gamma * m (clamped up to gamma), the column
    ``threshold`` (0 where m = 0: nothing counts), summed per layer."""
    r = raw_gsnr(x["g"].float(), x["sq"], spec.c(c, "sq_scale"))
    return {}, ((r < spec.s(s, "threshold")).to(r.dtype),)


def abs_grad_terms(spec, x: dict, s: Tensor, c: Tensor):
    """Pass: |gbar| per element; its layer sums are finite exactly when the gradient is."""
    return {}, (x["g"].float().abs(),)


def scaled_grad(spec, x: dict, s: Tensor, c: Tensor) -> tuple[Tensor, dict]:
    """The gradient a base update's pass works on, and the GSNR state it advanced.

    Mode flag of ``spec`` (:class:`vrgd_ds.optim.base.GradSource`): "off": gbar; "ratio":
    r * gbar; "mom": p_t = lerp(p_{t-1}, r, 1 - beta3), g' = p_t / (1 - beta3^t) * gbar;
    "store": p_t = r (kept for gsnr_interval); "reuse": g' from p_t already in ``x["mom"]``.
    """
    g = x["g"].float()
    if spec.has("off"):
        return g, {}
    if spec.has("reuse"):
        return x["mom"] * spec.s(s, "bc3") * g, {}
    r = clamped_ratio(g, x["sq"], spec.c(c, "sq_scale"), spec.s(s, "inv_mean"), spec.s(s, "gamma"), spec.has("wide"))
    if spec.has("ratio"):
        return r * g, {}
    mom = r if spec.has("store") else momentum_update(x["mom"], r, spec.c(c, "b3w"))
    return mom * spec.s(s, "bc3") * g, {"mom": mom}
