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

import torch
from torch import Tensor

from ..gsnr import scaled_grad
from .base import BaseOptimizer, GradSource, check_lr, check_momentum, check_weight_decay, times_lr
from .docs import with_args
from .flat import Spec
from .flat_group import GroupBatch
from .layout import layer_sums


def lars_local_lr(w_sq: Tensor, g_sq: Tensor, eta: float, wd: float) -> Tensor:
    """eta ||theta|| / (||g|| + wd ||theta||) from squared norms (float64 tensors), 1 where
    either norm is 0 (or NaN); on the device, so the step never waits for it."""
    wn, gn = w_sq.sqrt(), g_sq.sqrt()
    return torch.where((wn > 0.0) & (gn > 0.0), eta * wn / (gn + wd * wn), 1.0)


@with_args
class LARS(BaseOptimizer):
    """LARS (docs/algorithm.md section 4), per layer::

        local = eta * ||theta|| / (||g|| + weight_decay * ||theta||)   (1 where either norm is 0)
        b <- momentum * b + lr * local * (g + weight_decay * theta) ;  theta <- theta - b

    Norms over the whole layer, across ZeRO partitions; groups with
    ``exclude_from_adaptation=True`` use local = 1 and no weight decay. No eps, no trust
    clipping; fp32 state and arithmetic for any parameter dtype.
    """

    FP32_STATE = frozenset({"momentum_buffer"})

    def __init__(
        self,
        params,
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        eta: float = 0.001,
        *,
        foreach: bool | None = None,
        compile: bool | None = None,
        group_defaults: dict | None = None,
    ):
        check_lr(lr)
        check_momentum(momentum)
        check_weight_decay(weight_decay)
        if not eta > 0.0:
            raise ValueError(f"eta must be > 0, got {eta}")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, **(group_defaults or {}))
        super().__init__(params, defaults, foreach=foreach, compile=compile)

    def element_state_keys(self, group: dict) -> tuple[str, ...]:
        return ("momentum_buffer",)

    def _update(self, group: dict, batch: GroupBatch, source: GradSource | None) -> None:
        """Adapted groups: a norms pass (advancing the gradient source), then the update pass
        (the source again, without advancing it). Excluded groups: the update pass only."""
        source = source or GradSource()
        wd = self._weight_decay(group)
        self._advance_step(batch)
        n = len(batch.flat_segments)
        consts = {"wd": wd, "mu": group["momentum"]}

        def tensors(bs, src):
            return {"g": bs.grad_flat(), "p": bs.param_flat(), **src.tensors(bs)}

        apply_source, lr_local = source, [group["lr"]] * n
        if not group["exclude_from_adaptation"]:
            spec = source.spec((), ())
            sums = batch.run(lars_norms, spec, lambda bs: tensors(bs, source), writes=source.writes,
                             cols=source.cols, consts=source.consts, compile=group["compile"], n_terms=2,
                             wide=source.wide, wide_spec=source.wide_spec(spec))
            w_sq, g_sq = layer_sums(self.layout, batch.flat_segments, sums[:, 0], sums[:, 1])
            lr_local = times_lr(lars_local_lr(w_sq, g_sq, group["eta"], wd), group["lr"])
            apply_source = source.again()
        spec = apply_source.spec(("lr_local",), tuple(consts))
        batch.run(lars_apply, spec,
                  lambda bs: {**tensors(bs, apply_source), "buf": bs.state(self.state, "momentum_buffer")},
                  writes=("buf", "p", *apply_source.writes), cols={"lr_local": lr_local, **apply_source.cols},
                  consts={**consts, **apply_source.consts}, compile=group["compile"],
                  wide=apply_source.wide, wide_spec=apply_source.wide_spec(spec))


# ---- pass functions (see vrgd_ds.optim.flat) ----------------------------------------------


def lars_norms(spec: Spec, x: dict, s: Tensor, c: Tensor):
    """Pass 1: ||theta||^2 and ||g||^2 terms (advancing the gradient source's state)."""
    g, new = scaled_grad(spec, x, s, c)
    w = x["p"].float()
    return new, (w * w, g * g)


def lars_apply(spec: Spec, x: dict, s: Tensor, c: Tensor):
    """Pass 2: buf = mu * buf + lr * local * (g + wd * theta); theta -= buf."""
    g, new = scaled_grad(spec, x, s, c)
    w = x["p"].float()
    buf = x["buf"] * spec.c(c, "mu") + (g + spec.c(c, "wd") * w) * spec.s(s, "lr_local")
    new.update(buf=buf, p=w - buf)
    return new, ()
