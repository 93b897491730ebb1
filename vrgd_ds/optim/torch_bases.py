"""Base updates with torch.optim semantics (SGD with momentum/nesterov, Adam, AdamW).

These call torch's own functional kernels (``torch.optim.sgd.sgd``,
``torch.optim.adam.adam``) so a VR optimizer with ``gamma = 1`` reproduces the torch
optimizer exactly; the state keys are torch's too. Optimizer state follows the
parameter dtype, as in torch.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.optim.adam import adam as torch_adam
from torch.optim.sgd import sgd as torch_sgd

from .base import (
    BaseOptimizer,
    GroupBatch,
    check_betas,
    check_eps,
    check_lr,
    check_momentum,
    check_weight_decay,
)


class SGDUpdate(BaseOptimizer):
    """torch ``SGD`` update (momentum, dampening, nesterov, coupled weight decay)."""

    def __init__(self, params, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0,
                 nesterov=False, *, foreach=None, compile=False, group_defaults=None):
        check_lr(lr)
        check_momentum(momentum)
        check_weight_decay(weight_decay)
        if nesterov and (momentum <= 0.0 or dampening != 0.0):
            raise ValueError(
                f"nesterov needs momentum > 0 and dampening = 0, got momentum={momentum}, "
                f"dampening={dampening}"
            )
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening,
                        weight_decay=weight_decay, nesterov=nesterov, **(group_defaults or {}))
        super().__init__(params, defaults, foreach=foreach, compile=compile)

    def _update(self, group: dict, batch: GroupBatch, grads: list) -> None:
        params = batch.params
        grads = self._materialize(group, batch, grads)
        bufs = [self.state[p].get("momentum_buffer") for p in params]
        torch_sgd(
            params, grads, bufs, foreach=self._use_foreach(group),
            weight_decay=self._weight_decay(group), momentum=group["momentum"], lr=group["lr"],
            dampening=group["dampening"], nesterov=group["nesterov"], maximize=False,
        )
        if group["momentum"] != 0.0:
            for p, b in zip(params, bufs):
                self.state[p]["momentum_buffer"] = b


class AdamUpdate(BaseOptimizer):
    """torch ``Adam`` (``decoupled=False``) or ``AdamW`` (``decoupled=True``) update."""

    decoupled_weight_decay = False
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 amsgrad=False, *, foreach=None, compile=False, group_defaults=None):
        check_lr(lr)
        betas = check_betas(betas)
        check_eps(eps)
        check_weight_decay(weight_decay)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        amsgrad=amsgrad, **(group_defaults or {}))
        super().__init__(params, defaults, foreach=foreach, compile=compile)

    def _update(self, group: dict, batch: GroupBatch, grads: list) -> None:
        params = batch.params
        grads = self._materialize(group, batch, grads)
        for p in params:
            st = self.state[p]
            if "step" not in st:
                st["step"] = torch.tensor(0.0, dtype=torch.float32)
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if group["amsgrad"]:
                    st["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        states = [self.state[p] for p in params]
        beta1, beta2 = group["betas"]
        torch_adam(
            params, grads,
            [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
            [s["max_exp_avg_sq"] for s in states] if group["amsgrad"] else [],
            [s["step"] for s in states],
            foreach=self._use_foreach(group), decoupled_weight_decay=self.decoupled_weight_decay,
            amsgrad=group["amsgrad"], beta1=beta1, beta2=beta2, lr=group["lr"],
            weight_decay=self._weight_decay(group), eps=group["eps"], maximize=False,
        )


class AdamWUpdate(AdamUpdate):
    decoupled_weight_decay = True
