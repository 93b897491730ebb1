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

from ..gsnr import scaled_grad
from .base import BaseOptimizer, GradSource, adam_consts, adam_defaults, adam_moments, times_lr
from .docs import with_args
from .flat import Spec
from .flat_group import GroupBatch
from .layout import layer_sums


def trust_ratios(numer_sq: Tensor, denom_sq: Tensor) -> Tensor:
    """||a|| / ||b|| from squared norms (float64 tensors), 1 where either norm is 0 (or NaN);
    on the device, so the step never waits for it."""
    both = (numer_sq > 0.0) & (denom_sq > 0.0)
    return torch.where(both, numer_sq.sqrt() / denom_sq.sqrt(), 1.0)


@with_args
class LAMB(BaseOptimizer):
    """LAMB, the variant of NVIDIA's BERT recipe (docs/algorithm.md section 4), per layer::

        m <- beta1 m + (1 - beta1) g ;  v <- beta2 v + (1 - beta2) g^2
        mhat = m / (1 - beta1^t) ;  vhat = v / (1 - beta2^t)      (bias_correction; else m, v)
        u = mhat / (sqrt(vhat) + eps) + weight_decay * theta
        theta <- theta - lr * ||theta|| / ||u|| * u               (ratio 1 where either norm is 0)

    Norms over the whole layer, across ZeRO partitions; no trust clipping; fp32 state and
    arithmetic for any parameter dtype.
    """

    FP32_STATE = frozenset({"exp_avg", "exp_avg_sq"})

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
        compile: bool | None = None,
        group_defaults: dict | None = None,
    ):
        defaults = adam_defaults(lr, betas, eps, weight_decay, bias_correction=bias_correction,
                                 **(group_defaults or {}))
        super().__init__(params, defaults, foreach=foreach, compile=compile)

    def element_state_keys(self, group: dict) -> tuple[str, ...]:
        return ("exp_avg", "exp_avg_sq")

    def _update(self, group: dict, batch: GroupBatch, source: GradSource | None) -> None:
        """Two passes: moments and the two norms (with the gradient source fused in), then the
        trust-ratio update. The first pass writes u over an input it has read where the step
        owns one (:meth:`~.flat_group.BucketStep.scratch`: a gathered gradient copy, squared
        gradients the moment source lets it consume), so the second reads p and u; else (plain
        LAMB on a ZeRO partition) it recomputes u from p, m and v."""
        source = source or GradSource()
        steps = batch.per_view(self._advance_step(batch))
        cols = direction_columns(steps, group["betas"], group["eps"], group["bias_correction"])
        consts = adam_consts(group["betas"], group["eps"], wd=self._weight_decay(group))
        # gathered first: where u may go depends on what was gathered
        inputs = {id(bs): {"g": bs.grad_flat(), "p": bs.param_flat(), "m": bs.state(self.state, "exp_avg"),
                           "v": bs.state(self.state, "exp_avg_sq"), **source.tensors(bs)} for bs in batch.steps}

        def tensors(bs):
            return inputs[id(bs)]

        scratch = batch.scratch(source.consumable)
        spec = source.spec(DIRECTION_COLS, tuple(consts), *((f"u_to_{scratch}",) if scratch else ()))
        sums = batch.run(lamb_moments, spec, tensors, writes=("m", "v", *source.writes, *((scratch,) if scratch else ())),
                         cols={**cols, **source.cols}, consts={**consts, **source.consts}, compile=group["compile"],
                         n_terms=2, wide=source.wide, wide_spec=source.wide_spec(spec))
        w_sq, u_sq = layer_sums(self.layout, batch.flat_segments, sums[:, 0], sums[:, 1])
        scale = -times_lr(trust_ratios(w_sq, u_sq), group["lr"])  # stays on the device
        if scratch:
            batch.run(lamb_apply_u, Spec(("ok", "scale"), ()),
                      lambda bs: {"p": bs.param_flat(), "u": tensors(bs)[scratch]}, writes=("p",),
                      cols={"scale": scale}, compile=group["compile"])
            return
        batch.run(lamb_apply, Spec(("ok", *DIRECTION_COLS, "scale"), ("wd",)),
                  lambda bs: {k: v for k, v in tensors(bs).items() if k in ("p", "m", "v")}, writes=("p",),
                  cols={**cols, "scale": scale}, consts=consts, compile=group["compile"])


# ---- pass functions (see vrgd_ds.optim.flat) ----------------------------------------------


DIRECTION_COLS = ("v_scale", "eps_bc1")  # per segment (each layer has its own step count)


def direction_columns(steps, betas, eps: float, bias_correction: bool) -> dict[str, list[float]]:
    """The per-segment scalars of :func:`lamb_direction`, in float64 (rounded to fp32 once):
    ``v_scale`` = bc1 / sqrt(bc2) and ``eps_bc1`` = eps * bc1, with bc_i = 1 - beta_i^t (1
    without bias correction)."""
    beta1, beta2 = betas
    bc1 = [1.0 - beta1**t if bias_correction else 1.0 for t in steps]
    bc2s = [math.sqrt(1.0 - beta2**t) if bias_correction else 1.0 for t in steps]
    return {"v_scale": [a / b for a, b in zip(bc1, bc2s)], "eps_bc1": [eps * a for a in bc1]}


def lamb_direction(m: Tensor, v: Tensor, w: Tensor, v_scale, eps_bc1, wd) -> Tensor:
    """u = mhat / (sqrt(vhat) + eps) + wd * theta, as m / (sqrt(v) * bc1 / sqrt(bc2) + eps * bc1)
    + wd * theta: the bias corrections multiply the denominator through, so that an element
    costs one division instead of three (on the CPU the pass is bound by its divisions). The
    same value up to rounding; without bias correction, the same operations."""
    return m / (v.sqrt() * v_scale + eps_bc1) + wd * w


def lamb_moments(spec: Spec, x: dict, s: Tensor, c: Tensor):
    """Pass 1: m and v from the gradient (m = lerp(m, g, 1 - b1)); ||theta||^2 and ||u||^2 terms."""
    g, new = scaled_grad(spec, x, s, c)
    w = x["p"].float()
    m, v = adam_moments(spec, x, c, g)
    u = lamb_direction(m, v, w, spec.s(s, "v_scale"), spec.s(s, "eps_bc1"), spec.c(c, "wd"))
    new.update(m=m, v=v)
    for name in ("g", "sq"):  # u over an input already read (LAMB._update: the step owns it)
        if spec.has(f"u_to_{name}"):
            new[name] = u
    return new, (w * w, u * u)


def lamb_apply_u(spec: Spec, x: dict, s: Tensor, c: Tensor):
    """Pass 2 with u kept by pass 1: theta += scale * u, scale = -lr * trust ratio of the layer."""
    return {"p": x["p"].float() + spec.s(s, "scale") * x["u"]}, ()


def lamb_apply(spec: Spec, x: dict, s: Tensor, c: Tensor):
    """Pass 2 recomputing u from p, m and v: theta += scale * u with scale = -lr * trust ratio."""
    w = x["p"].float()
    u = lamb_direction(x["m"], x["v"], w, spec.s(s, "v_scale"), spec.s(s, "eps_bc1"), spec.c(c, "wd"))
    return {"p": w + spec.s(s, "scale") * u}, ()
