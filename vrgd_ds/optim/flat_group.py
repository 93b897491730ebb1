"""A param group's parameters, gradients, squares and state as flat buffers (for :mod:`.flat`).

Under ZeRO-1/2 a group's optimizer parameter already is one flat fp32 partition, and all
of this is views. Outside ZeRO a group holds many parameters; those of one device and
dtype (a *bucket*) are viewed as one flat buffer, once, at the first step:

- parameters that own their storage alone (an ordinary ``nn.Parameter``) are copied into
  one new buffer and ``p.data`` is pointed at their slice: the same Parameter objects with
  the same values, as DeepSpeed ZeRO and Megatron do with their flat buffers. Every step
  checks the pointers and redoes it if something re-pointed them (``module.to()``,
  ``load_state_dict(assign=True)``);
- parameters that already are consecutive slices of one buffer (Megatron's, or another
  vrgd_ds optimizer's over the same parameters) are used as they are;
- anything else is gathered into a work buffer and scattered back after the update.

Gradients are what autograd (or DDP, DeepSpeed) made: a view where they lie flat at the
parameters' offsets (a ZeRO partition, or gradients a moment source handed over in the
bucket's own buffer: :meth:`vrgd_ds.moments.MicroStepMoments.place`), otherwise gathered
each step (one read and one write per element). Squared gradients from a moment source
likewise. A pass may overwrite an input the step owns once it has read it
(:meth:`BucketStep.scratch`). Optimizer state is
one flat fp32 buffer per key and ``optimizer.state[p][key]`` the parameter-shaped view of
it, so ``state_dict`` keeps its per-parameter keys; a state tensor that is not that view
(a loaded checkpoint) is copied in and replaced by the view.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import Tensor

from .flat import (FlatPlan, Spec, constants, log_pass, pass_clock, recording, run_on_segments, run_pass,
                   segment_table)
from .layout import Segment

PLAN_CACHE = 8  # plans kept per bucket (one per set of parameters with a gradient)


def aliased_flat(tensors: Sequence[Tensor], offsets: Sequence[int], numel: int) -> Tensor | None:
    """A 1-D tensor of ``numel`` elements of which each tensor is the slice at its offset, if
    they lie so in one storage; else None."""
    t0 = tensors[0]
    base = t0.storage_offset() - offsets[0]
    storage = t0.untyped_storage()
    if base < 0 or (base + numel) * t0.element_size() > storage.nbytes():
        return None
    for t, off in zip(tensors, offsets):
        if (t.dtype != t0.dtype or not t.is_contiguous() or t.storage_offset() != base + off
                or t.untyped_storage().data_ptr() != storage.data_ptr()):
            return None
    return torch.empty(0, dtype=t0.dtype, device=t0.device).set_(storage, base, (numel,), (1,))


def _owns_storage(p: Tensor) -> bool:
    return (type(p.data) is Tensor and p.is_contiguous() and p.storage_offset() == 0
            and p.untyped_storage().nbytes() == p.numel() * p.element_size())


class FlatBucket:
    """The parameters of one param group with one device and dtype, as one flat buffer."""

    def __init__(self, params: list[Tensor]):
        self.params = params
        self.offsets, at = [], 0
        for p in params:
            if not p.is_contiguous():
                raise ValueError(f"vrgd_ds optimizers need contiguous parameters, got a non-contiguous "
                                 f"tensor of shape {tuple(p.shape)}")
            self.offsets.append(at)
            at += p.numel()
        self.numel = at
        self.index = {id(p): j for j, p in enumerate(params)}
        flat = aliased_flat(params, self.offsets, self.numel)
        self.flat = flat if flat is not None else self._flatten()
        self.ptrs = [p.data_ptr() for p in params]
        self.work: dict[str, Tensor] = {}
        self.state_bufs: dict[str, Tensor] = {}
        self.state_views: dict[str, list[Tensor]] = {}  # per key, the parameter-shaped views of its buffer
        self.plans: dict[tuple, FlatPlan] = {}
        self.placed_for: object = None  # the moment source whose buffers live in this bucket's (see place)
        self.copied: dict[str, bool] = {}  # per name: the last gather returned its work buffer, all copied in
        self.moved: dict[str, int] = {}  # per name: tensors the last gather copied (0: all lay where it reads)
        self.grads_home: bool | None = None  # the optimizer hands p.grad over here (None: not yet; False: never)

    def _flatten(self) -> Tensor | None:
        if len(self.params) < 2 or not all(_owns_storage(p) for p in self.params):
            return None  # not ours to move: gathered and scattered each step
        p0 = self.params[0]
        flat = torch.empty(self.numel, dtype=p0.dtype, device=p0.device)
        with torch.no_grad():
            for p, off in zip(self.params, self.offsets):
                view = flat.narrow(0, off, p.numel()).view_as(p)
                view.copy_(p)
                p.data = view
        return flat

    def valid(self) -> bool:
        """The parameters still are what this bucket was built from (same places in memory)."""
        return all(p.data_ptr() == ptr and p.is_contiguous() for p, ptr in zip(self.params, self.ptrs))

    def plan(self, segments: list[tuple[int, int]]) -> FlatPlan:
        key = tuple(segments)
        if key not in self.plans:
            if len(self.plans) >= PLAN_CACHE:
                self.plans.pop(next(iter(self.plans)))
            self.plans[key] = FlatPlan(segments, self.params[0].device)
        return self.plans[key]

    def buffer(self, name: str, dtype: torch.dtype) -> Tensor:
        """A cached work buffer of the bucket's size (zero where nothing was written)."""
        buf = self.work.get(name)
        if buf is None or buf.dtype != dtype:
            buf = self.work[name] = torch.zeros(self.numel, dtype=dtype, device=self.params[0].device)
        return buf

    def gathered(self, name: str, tensors: Sequence[Tensor], js: Sequence[int], dtype=torch.float32) -> Tensor:
        """Flat tensor holding ``tensors[i]`` at the offset of parameter ``js[i]``: a view where
        they already lie so (in ``dtype``), else a work buffer they are copied into."""
        self.copied[name], self.moved[name] = False, 0
        if tensors[0].dtype == dtype:
            flat = aliased_flat(tensors, [self.offsets[j] for j in js], self.numel)
            if flat is not None:
                return flat
        buf = self.buffer(name, dtype)
        t0 = pass_clock() if recording() else 0.0
        ptr = buf.untyped_storage().data_ptr()
        mine = [t.untyped_storage().data_ptr() == ptr for t in tensors]  # already in buf (placed by a moment source)
        if len(js) == len(self.params) and not any(mine) and all(t.dtype == dtype for t in tensors):
            torch.cat([t.reshape(-1) for t in tensors], out=buf)  # one call (torch's foreach copy is slow on CPU)
        else:
            for view, t, m in zip(self.views(buf, js), tensors, mine):
                if not (m and t.data_ptr() == view.data_ptr()):
                    view.copy_(t.reshape(view.shape))
        self.copied[name] = not any(mine)
        self.moved[name] = len(mine) - sum(mine)
        if recording():
            log_pass("gather", name, (), sum(t.numel() for t, m in zip(tensors, mine) if not m), 1, 1, 2,
                     pass_clock() - t0)
        return buf

    def views(self, flat: Tensor, js: Iterable[int]) -> list[Tensor]:
        """Parameter-shaped views of ``flat`` for parameters ``js``."""
        return [flat.narrow(0, self.offsets[j], self.params[j].numel()).view_as(self.params[j]) for j in js]

    def state(self, states: Sequence[dict], key: str, js: Sequence[int]) -> Tensor:
        """The flat fp32 buffer of state ``key``; ``states[i][key]``, the state of parameter
        ``js[i]``, become its views (zero when new, copied in when they were something else)."""
        if len(self.params) == 1:  # one tensor (a ZeRO partition): the state tensor is the buffer
            p, st = self.params[0], states[0]
            t = st.get(key)
            if t is None or t.dtype != torch.float32 or not t.is_contiguous():
                t = st[key] = (torch.zeros_like(p, dtype=torch.float32) if t is None
                               else t.to(torch.float32).contiguous())
            return t.view(-1)
        buf = self.state_bufs.get(key)
        if buf is None:
            buf = self.state_bufs[key] = torch.zeros(self.numel, dtype=torch.float32,
                                                     device=self.params[0].device)
            self.state_views[key] = self.views(buf, range(len(self.params)))
        views = self.state_views[key]
        for j, st in zip(js, states):
            t, view = st.get(key), views[j]
            if t is view:  # the usual case: the state is still this buffer's view
                continue
            if t is None:
                view.zero_()
            elif t.data_ptr() != view.data_ptr() or t.shape != view.shape or t.dtype != view.dtype:
                view.copy_(t)
            st[key] = view
        return buf


@dataclass
class BucketStep:
    """One bucket of one param group on one step: its parameters that have a gradient."""

    bucket: FlatBucket
    js: list[int]  # indices into bucket.params
    segments: list[Segment]  # layout segments of those parameters, in order
    plan: FlatPlan
    cache: dict[str, Tensor] = field(default_factory=dict)
    _states: list[dict] | None = field(default=None, repr=False)

    @property
    def params(self) -> list[Tensor]:
        return [self.bucket.params[j] for j in self.js]

    def states(self, state: dict) -> list[dict]:
        """``state[p]`` of each parameter, looked up once per step (a tensor-keyed lookup costs
        a Python call; a VR step reads several keys of every parameter)."""
        if self._states is None:
            self._states = [state[p] for p in self.params]
        return self._states

    def param_flat(self) -> Tensor:
        if self.bucket.flat is not None:
            return self.bucket.flat
        if "p" not in self.cache:
            self.cache["p"] = self.bucket.gathered("p", self.params, self.js, self.params[0].dtype)
        return self.cache["p"]

    def grad_flat(self) -> Tensor:
        if "g" not in self.cache:
            self.cache["g"] = self.bucket.gathered("g", [p.grad for p in self.params], self.js)
        return self.cache["g"]

    def squares_flat(self, sum_sq: Callable[[Tensor], Tensor]) -> Tensor:
        if "sq" not in self.cache:
            self.cache["sq"] = self.bucket.gathered("sq", [sum_sq(p) for p in self.params], self.js)
        return self.cache["sq"]

    def state(self, state: dict, key: str) -> Tensor:
        return self.bucket.state(self.states(state), key, self.js)

    def scratch(self, squares_consumable: bool = False) -> str | None:
        """Which flat input ("g" or "sq") the step may overwrite once a pass has read it, or None:
        the gradient when it was copied into the bucket's own buffer (no one else sees that copy),
        else the squared gradients when they were copied there or their moment source lets the
        step consume them. Call after ``grad_flat``/``squares_flat``."""
        copied = self.bucket.copied
        if "g" in self.cache and copied.get("g"):
            return "g"
        if "sq" in self.cache and (squares_consumable or copied.get("sq")):
            return "sq"
        return None

    def finish(self) -> None:
        """Scatter gathered parameters back (no-op when the bucket aliases them)."""
        if "p" in self.cache:
            for p, view in zip(self.params, self.bucket.views(self.cache["p"], self.js)):
                p.copy_(view)

    def segment_views(self, flat: Tensor) -> list[Tensor]:
        """1-D views of ``flat``, one per segment (what the telemetry reads)."""
        return [flat.narrow(0, off, n) for off, n in self.plan.segments]


@dataclass
class GroupBatch:
    """The parameters of one param group that have a gradient, bucket by bucket."""

    params: list[Tensor]
    segments: list[list[Segment]]
    flat_segments: list[Segment] = field(default_factory=list)
    steps: list[BucketStep] = field(default_factory=list)

    def states(self, state: dict) -> list[dict]:
        """``state[p]`` of each of ``params``, in that order (:meth:`BucketStep.states`)."""
        return [st for bs in self.steps for st in bs.states(state)]

    def scratch(self, squares_consumable: bool = False) -> str | None:
        """The input every bucket may overwrite (:meth:`BucketStep.scratch`), or None."""
        names = {bs.scratch(squares_consumable) for bs in self.steps}
        return names.pop() if len(names) == 1 else None

    def per_view(self, values: Iterable[Any]) -> list[Any]:
        """Repeat a per-parameter value for each of the parameter's segments."""
        out: list[Any] = []
        for v, segs in zip(values, self.segments):
            out.extend([v] * len(segs))
        return out

    def run(self, fn: Callable, spec: Spec, flat: Callable[[BucketStep], dict], *, writes: Sequence[str] = (),
            outs: Callable[[BucketStep], dict] | None = None, cols: dict[str, Sequence[float]] | None = None,
            consts: dict[str, float] | None = None, compile: bool | None = None, n_terms: int = 0,
            wide: Sequence[bool] | None = None, wide_spec: Spec | None = None) -> Tensor | None:
        """Run one flat pass over every bucket; per-segment sums of its terms ([segments, n_terms]
        float64, in ``flat_segments`` order) or None. ``cols``: per-segment scalars in that order
        (Python floats, or a tensor on the device: :func:`~.flat.segment_table`).
        ``wide``: segments the pass skips and then runs eagerly under ``wide_spec`` in float64."""
        cols, consts, sums, at = cols or {}, consts or {}, [], 0
        for bs in self.steps:
            n = len(bs.segments)
            mine = {k: v[at:at + n] if isinstance(v, Tensor) else list(v[at:at + n]) for k, v in cols.items()}
            skip = [i for i in range(n) if wide is not None and wide[at + i]]
            if skip:
                mine["ok"] = [0.0 if i in skip else 1.0 for i in range(n)]
            device = bs.bucket.params[0].device
            tensors, o = flat(bs), outs(bs) if outs else None
            table = segment_table(spec, mine, n, device)
            part = run_pass(fn, spec, bs.plan, tensors, writes, o, table, constants(spec, consts, device),
                            compile, n_terms)
            if skip:
                mine["ok"] = [1.0] * n
                wtable = segment_table(wide_spec, mine, n, device, torch.float64)
                extra = run_on_segments(fn, wide_spec, bs.plan, skip, tensors, writes, o, wtable,
                                        constants(wide_spec, consts, device), n_terms)
                part = part + extra if n_terms else None
            sums.append(part)
            at += n
        return torch.cat(sums) if n_terms and sums else None
