"""Base updates with torch.optim semantics (SGD with momentum/nesterov, Adam, AdamW).

These call torch's own functional kernels (``torch.optim.sgd.sgd``,
``torch.optim.adam.adam``) so a VR optimizer with ``gamma = 1`` reproduces the torch
optimizer exactly; the state keys are torch's too. Optimizer state follows the
parameter dtype, as in torch. ``foreach=None`` (default) takes torch's fused kernels
where torch has them for the parameters' device (one pass over memory, the fastest
torch update), ``True`` its multi-tensor kernels, ``False`` its per-tensor loop.

The VR optimizers (a step with ``gamma < 1``) take one of two routes. Adam and AdamW with
``foreach=None`` and fp32 parameters: one flat pass (:mod:`.flat`) computes g'
(:func:`vrgd_ds.gsnr.scaled_grad`) and applies torch's Adam/AdamW arithmetic to it in the
same pass (:func:`adam_pass`), writing only the parameters and the state, which keeps
torch's keys (``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq`` as views of flat fp32
buffers, ``step`` torch's float32 tensor), so either route continues the other's state.
Otherwise (SGD, ``foreach`` set, other dtypes) one flat pass writes g' into a work buffer
that torch's update then reads per parameter.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.optim.adam import adam as torch_adam
from torch.optim.optimizer import _get_fused_kernels_supported_devices
from torch.optim.sgd import sgd as torch_sgd

from ..gsnr import scaled_grad
from .base import BaseOptimizer, GradSource, adam_consts, adam_defaults, adam_moments, check_lr, check_momentum, check_weight_decay
from .flat import Spec
from .flat_group import GroupBatch


def scaled_grad_pass(spec: Spec, x: dict, s: Tensor, c: Tensor):
    """Pass: g' = the gradient source's output, written to a work buffer for torch's update."""
    g, new = scaled_grad(spec, x, s, c)
    new["g_out"] = g
    return new, ()


def adam_pass(spec: Spec, x: dict, s: Tensor, c: Tensor):
    """Pass: torch's Adam (AdamW with flag "decoupled", the running max of v with "amsgrad")
    on g' = the gradient source's output, in torch's order of operations."""
    g, new = scaled_grad(spec, x, s, c)
    w = x["p"]
    if spec.has("decoupled"):
        w = w * spec.c(c, "decay")
    else:
        g = g + spec.c(c, "wd") * w
    m, v = adam_moments(spec, x, c, g)
    if spec.has("amsgrad"):
        new["vmax"] = torch.maximum(x["vmax"], v)
    denom = new.get("vmax", v).sqrt() / spec.s(s, "bc2s") + spec.c(c, "eps")
    new.update(p=w - spec.s(s, "step_size") * m / denom, m=m, v=v)
    return new, ()


class TorchUpdate(BaseOptimizer):
    """Gradients for torch's functional update, and the choice of its implementation."""

    @staticmethod
    def _impl(group: dict, params: list[Tensor]) -> dict:
        if group["foreach"] is not None:
            return {"foreach": bool(group["foreach"]), "fused": False}
        fused = (params[0].device.type in _get_fused_kernels_supported_devices()
                 and all(p.dtype.is_floating_point for p in params))
        return {"foreach": False, "fused": True} if fused else {"foreach": None, "fused": None}

    def _grads(self, group: dict, batch: GroupBatch, source: GradSource | None) -> list[Tensor]:
        """Per parameter, the gradient torch's update reads: ``p.grad``, or g' from one flat pass
        (elements outside every segment, e.g. ZeRO padding, get 0, as without a transform)."""
        if source is None:
            return [p.grad if _whole(p, segs) else _covered(p.grad, segs)
                    for p, segs in zip(batch.params, batch.segments)]
        spec = source.spec((), ())
        batch.run(scaled_grad_pass, spec, lambda bs: {"g": bs.grad_flat(), **source.tensors(bs)},
                  writes=source.writes, outs=lambda bs: {"g_out": bs.bucket.buffer("g_out", torch.float32)},
                  cols=source.cols, consts=source.consts, compile=group["compile"],
                  wide=source.wide, wide_spec=source.wide_spec(spec))
        out = []
        for bs in batch.steps:
            for p, g in zip(bs.params, bs.bucket.views(bs.bucket.work["g_out"], bs.js)):
                out.append(g if p.grad.dtype == torch.float32 else g.to(p.grad.dtype))
        return out


def _whole(p: Tensor, segs) -> bool:
    return len(segs) == 1 and segs[0].offset == 0 and segs[0].numel == p.numel()


def _covered(grad: Tensor, segs) -> Tensor:
    """The gradient where segments cover the parameter, 0 elsewhere (ZeRO padding)."""
    out = torch.zeros_like(grad).view(-1)
    flat = grad.reshape(-1)
    for s in segs:
        out.narrow(0, s.offset, s.numel).copy_(flat.narrow(0, s.offset, s.numel))
    return out.view_as(grad)


class SGDUpdate(TorchUpdate):
    """torch ``SGD`` update (momentum, dampening, nesterov, coupled weight decay)."""

    def __init__(self, params, lr: float = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, *, foreach: bool | None = None,
                 compile: bool | None = None, group_defaults: dict | None = None):
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

    def element_state_keys(self, group: dict) -> tuple[str, ...]:
        return ("momentum_buffer",) if group["momentum"] != 0.0 else ()

    def _update(self, group: dict, batch: GroupBatch, source: GradSource | None) -> None:
        params = batch.params
        grads = self._grads(group, batch, source)
        bufs = [self.state[p].get("momentum_buffer") for p in params]
        torch_sgd(
            params, grads, bufs, **self._impl(group, params),
            weight_decay=self._weight_decay(group), momentum=group["momentum"], lr=group["lr"],
            dampening=group["dampening"], nesterov=group["nesterov"], maximize=False,
        )
        if group["momentum"] != 0.0:
            for p, b in zip(params, bufs):
                self.state[p]["momentum_buffer"] = b


class AdamUpdate(TorchUpdate):
    """torch ``Adam`` (``decoupled=False``) or ``AdamW`` (``decoupled=True``) update."""

    decoupled_weight_decay = False

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, amsgrad: bool = False, *, foreach: bool | None = None,
                 compile: bool | None = None, group_defaults: dict | None = None):
        defaults = adam_defaults(lr, betas, eps, weight_decay, amsgrad=amsgrad, **(group_defaults or {}))
        super().__init__(params, defaults, foreach=foreach, compile=compile)

    def element_state_keys(self, group: dict) -> tuple[str, ...]:
        return ("exp_avg", "exp_avg_sq", *(("max_exp_avg_sq",) if group["amsgrad"] else ()))

    def _update(self, group: dict, batch: GroupBatch, source: GradSource | None) -> None:
        if source is not None and group["foreach"] is None and all(p.dtype == torch.float32 for p in batch.params):
            self._flat_update(group, batch, source)
            return
        params = batch.params
        grads = self._grads(group, batch, source)
        impl = self._impl(group, params)
        for p in params:
            st = self.state[p]
            if "step" not in st:
                st["step"] = torch.tensor(0.0, dtype=torch.float32)
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if group["amsgrad"]:
                    st["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if impl["fused"] and st["step"].device != p.device:  # torch's fused kernel keeps it there
                st["step"] = st["step"].to(p.device)
        states = [self.state[p] for p in params]
        beta1, beta2 = group["betas"]
        torch_adam(
            params, grads,
            [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
            [s["max_exp_avg_sq"] for s in states] if group["amsgrad"] else [],
            [s["step"] for s in states], **impl,
            decoupled_weight_decay=self.decoupled_weight_decay,
            amsgrad=group["amsgrad"], beta1=beta1, beta2=beta2, lr=group["lr"],
            weight_decay=self._weight_decay(group), eps=group["eps"], maximize=False,
        )

    def _flat_update(self, group: dict, batch: GroupBatch, source: GradSource) -> None:
        """torch's update with the gradient source fused in: one flat pass (:func:`adam_pass`)
        that writes the parameters and the state, no g' buffer."""
        beta1, beta2 = group["betas"]
        lr, wd = float(group["lr"]), self._weight_decay(group)
        steps = batch.per_view(self._advance_torch_steps(batch.states(self.state)))
        cols = {"step_size": [lr / (1.0 - beta1**t) for t in steps],
                "bc2s": [math.sqrt(1.0 - beta2**t) for t in steps]}
        consts = adam_consts(group["betas"], group["eps"], wd=wd, decay=1.0 - lr * wd)
        keys = {"m": "exp_avg", "v": "exp_avg_sq", **({"vmax": "max_exp_avg_sq"} if group["amsgrad"] else {})}
        flags = [f for f, on in (("decoupled", self.decoupled_weight_decay), ("amsgrad", group["amsgrad"])) if on]
        spec = source.spec(tuple(cols), tuple(consts), *flags)

        def tensors(bs):
            return {"g": bs.grad_flat(), "p": bs.param_flat(),
                    **{k: bs.state(self.state, key) for k, key in keys.items()}, **source.tensors(bs)}

        batch.run(adam_pass, spec, tensors, writes=("p", *keys, *source.writes), cols={**cols, **source.cols},
                  consts={**consts, **source.consts}, compile=group["compile"], wide=source.wide,
                  wide_spec=source.wide_spec(spec))

    def _advance_torch_steps(self, states: list[dict]) -> list[float]:
        """torch's ``step`` tensor of each parameter, incremented in place; kept on the CPU, where
        it is read every step (torch's fused route moves it to the parameter's device)."""
        steps = []
        for st in states:
            t = st.get("step")
            if t is None or t.device.type != "cpu":
                t = st["step"] = torch.tensor(0.0, dtype=torch.float32) if t is None else t.cpu()
            steps.append(t)
        # read all at once and fill (a per-tensor add_ and item() cost twice as much host time)
        for t, old in zip(steps, torch.tensor(steps, dtype=torch.float64).tolist()):
            t.fill_(old + 1.0)  # = t + 1 rounded to t's dtype, as add_ gives
        return torch.tensor(steps, dtype=torch.float64).tolist()


class AdamWUpdate(AdamUpdate):
    decoupled_weight_decay = True
