"""The skeleton every optimizer of this package shares.

``step()`` collects, per param group, the parameters that have a gradient and their
layout segments; a gradient transform may replace the gradients (identity for the base
optimizers, the GSNR scaling for the VR ones, see :mod:`vrgd_ds.optim.vr`); then the
base update of the subclass runs on the result.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import Tensor

from ..gsnr import as_fp32
from .layout import LayerLayout, Segment, segment_views

_COMPILED: dict[Callable, Callable] = {}


def kernel(fn: Callable, compiled: bool) -> Callable:
    """``fn`` itself, or its ``torch.compile`` (dynamic shapes, one compile per kernel)."""
    if not compiled:
        return fn
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=True)
    return _COMPILED[fn]


@dataclass(frozen=True)
class GradSource:
    """A gradient view that the base update computes inside its own kernels.

    ``fn(*args)`` gives the fp32 gradient; ``fn(*repeat_args)`` gives it again later in
    the same step without touching state (the GSNR momentum is advanced only once).
    Lets the compiled path fuse the GSNR scaling into the base update's first pass.
    """

    fn: Callable
    args: tuple
    repeat_args: tuple | None = None

    def again(self) -> tuple[Callable, tuple]:
        return self.fn, self.args if self.repeat_args is None else self.repeat_args


def check_lr(lr: float) -> None:
    if isinstance(lr, Tensor):
        lr = float(lr)
    if not lr >= 0.0:
        raise ValueError(f"lr must be >= 0, got {lr}")


def check_weight_decay(weight_decay: float) -> None:
    if not weight_decay >= 0.0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")


def check_eps(eps: float) -> None:
    if not eps >= 0.0:
        raise ValueError(f"eps must be >= 0, got {eps}")


def check_betas(betas: Any) -> tuple[float, float]:
    try:
        b1, b2 = (float(b) for b in betas)
    except (TypeError, ValueError):
        raise ValueError(f"betas must be a pair of floats in [0, 1), got {betas!r}") from None
    for name, b in (("betas[0]", b1), ("betas[1]", b2)):
        if not 0.0 <= b < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {b}")
    return b1, b2


def check_momentum(momentum: float) -> None:
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}")


@dataclass
class GroupBatch:
    """The parameters of one param group that have a gradient, as layout segments."""

    params: list[Tensor]
    segments: list[list[Segment]]
    flat_segments: list[Segment] = field(default_factory=list)

    def views(self, tensors: Iterable[Tensor]) -> list[Tensor]:
        """Segment views of per-parameter tensors (same order as ``params``)."""
        out: list[Tensor] = []
        for t, segs in zip(tensors, self.segments):
            out.extend(segment_views(t, segs))
        return out

    def per_view(self, values: Iterable[Any]) -> list[Any]:
        """Repeat a per-parameter value for each of the parameter's segments."""
        out: list[Any] = []
        for v, segs in zip(values, self.segments):
            out.extend([v] * len(segs))
        return out


class BaseOptimizer(torch.optim.Optimizer):
    """``torch.optim.Optimizer`` with layout-aware parameter views and a gradient transform."""


    def __init__(self, params, defaults: dict, foreach: bool | None = None, compile: bool = False):
        defaults = dict(defaults, foreach=foreach, compile=compile, exclude_from_adaptation=False)
        super().__init__(params, defaults)
        self.layout = LayerLayout()

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("layout", LayerLayout())

    @staticmethod
    def _use_foreach(group: dict) -> bool:
        """Multi-tensor eager path; ``compile=True`` runs the per-tensor kernels compiled."""
        if group["compile"]:
            return False
        return True if group["foreach"] is None else bool(group["foreach"])

    @staticmethod
    def _weight_decay(group: dict) -> float:
        """Excluded groups (bias, LayerNorm) skip weight decay (docs/algorithm.md section 4)."""
        return 0.0 if group["exclude_from_adaptation"] else group["weight_decay"]

    def _state_tensor(self, p: Tensor, key: str, dtype: torch.dtype = torch.float32) -> Tensor:
        state = self.state[p]
        if key not in state:
            state[key] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
        return state[key]

    def _advance_step(self, params: list[Tensor], key: str = "step") -> list[int]:
        steps = []
        for p in params:
            st = self.state[p]
            st[key] = int(st.get(key, 0)) + 1
            steps.append(st[key])
        return steps

    def _collect(self, group: dict) -> GroupBatch:
        params = []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            params.append(p)
        segments = [self.layout.segments(p) for p in params]
        batch = GroupBatch(params, segments)
        batch.flat_segments = [s for segs in segments for s in segs]
        return batch

    def _transform(self, batches: list[GroupBatch]) -> list[list] | None:
        """Per group, per view: the gradient for the base update (a tensor on the foreach
        path, a :class:`GradSource` on the per-tensor path); None skips the step."""
        out = []
        for group, b in zip(self.param_groups, batches):
            views = b.views(p.grad for p in b.params)
            out.append(views if self._use_foreach(group) else [GradSource(as_fp32, (v,)) for v in views])
        return out

    def _update(self, group: dict, batch: GroupBatch, grads: list) -> None:
        raise NotImplementedError

    def _materialize(self, group: dict, batch: GroupBatch, grads: list) -> list[Tensor]:
        """Per-view gradients -> one tensor per parameter, in the gradient's dtype."""
        if grads and isinstance(grads[0], GradSource):
            grads = [kernel(s.fn, group["compile"])(*s.args) for s in grads]
        out, start = [], 0
        for p, segs in zip(batch.params, batch.segments):
            pieces = grads[start:start + len(segs)]
            start += len(segs)
            if len(segs) == 1 and segs[0].numel == p.numel():
                t = pieces[0]
            else:  # segments may leave gaps (ZeRO padding): those elements get a zero gradient
                t = torch.zeros(p.numel(), dtype=pieces[0].dtype, device=p.device)
                for seg, piece in zip(segs, pieces):
                    t[seg.offset:seg.offset + seg.numel] = piece.reshape(-1)
            out.append(t.view(p.shape).to(p.grad.dtype))
        return out

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        batches = [self._collect(g) for g in self.param_groups]
        grads = self._transform(batches)
        if grads is None:
            return loss
        for group, batch, g in zip(self.param_groups, batches, grads):
            if batch.params:
                self._update(group, batch, g)
                # applied steps of the group (DeepSpeed's elastic checkpoints save and restore it)
                group["step"] = group.get("step", 0) + 1
        return loss
