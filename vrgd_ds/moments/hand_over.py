"""Handing a parameter's gradient over into a buffer of the optimizer's.

When a backward pass creates ``p.grad`` (``p.grad`` was None), a post-accumulate hook copies
it, while it is still in cache, into the view the optimizer gave for ``p`` (its *home*: a
slice of the flat gradient buffer its step reads) and makes ``p.grad`` that view, as DDP's
``gradient_as_bucket_view`` does with its buckets. Later backward passes of the step
accumulate into it in place, and the step finds every gradient where it reads them instead
of gathering them (one read and one write per element less, and autograd's own gradient
tensor is freed at once).

Left alone: a ``p.grad`` that existed before the backward pass (it keeps its identity and is
accumulated into), gradients made with ``create_graph=True`` (they keep their graph),
``torch.autograd.grad`` results (nothing is accumulated), and gradients whose dtype, shape
or layout differ from the home's.

Used by :class:`vrgd_ds.moments.MicroStepMoments` (inside its own hooks, next to the squares)
and by every vrgd_ds optimizer for the buckets whose gradients it gathered
(:meth:`vrgd_ds.optim.base.BaseOptimizer.flat_grads`), which hooks the parameters itself.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor


def eager_hook(hook):
    """``hook`` for ``register_hook`` / ``register_post_accumulate_grad_hook``, kept out of
    Dynamo: under compiled autograd the backward graph breaks around it and it runs eagerly,
    as without compilation. Traced, the bookkeeping in our hooks (dicts and sets of tensors,
    buffers made on first use) made Dynamo fail on some sequences of steps, and a traced hook
    would be specialised on that state. Costs under a microsecond a call."""
    return torch.compiler.disable(hook)


def check_flat_grads(on) -> bool:
    """The ``flat_grads`` switch of an optimizer or a moment source: True or False only."""
    if not isinstance(on, bool):
        raise ValueError(f"flat_grads must be True or False, got {on!r}")
    return on


class GradHandOver:
    def __init__(self):
        self.enabled = True  # False: p.grad stays where autograd puts it
        self.homes: dict[Tensor, Tensor] = {}  # parameter -> the view its p.grad goes to
        self.handed: set[Tensor] = set()  # parameters whose p.grad was handed over since clear()
        self._take: set[Tensor] = set()  # parameters whose p.grad was None when this backward pass began
        self._handles: dict[Tensor, list] = {}  # parameter -> its hooks (only where this object hooks them)

    def before(self, p: Tensor) -> None:
        """In a tensor hook of ``p`` (autograd is about to accumulate its gradient): note whether
        autograd will create ``p.grad`` (it is None, and the backward pass makes no graph)."""
        if p.grad is None and not torch.is_grad_enabled():
            self._take.add(p)
        else:
            self._take.discard(p)

    def after(self, p: Tensor) -> None:
        """In a post-accumulate hook of ``p``: if autograd just created ``p.grad``, copy it to
        ``p``'s home and make ``p.grad`` that view."""
        if p not in self._take:
            return
        self._take.discard(p)
        home, grad = self.homes.get(p), p.grad
        if (self.enabled and home is not None and grad is not None and not grad.requires_grad
                and grad.dtype == home.dtype and grad.shape == home.shape and grad.layout == torch.strided):
            home.copy_(grad)
            p.grad = home.view_as(home)
            self.handed.add(p)

    def set_home(self, p: Tensor, home: Tensor | None) -> None:
        """Hand ``p``'s gradient over to ``home`` from its next creation on (None: no more)."""
        if home is not None and home.shape == p.shape and home.dtype == p.dtype and home.device == p.device:
            self.homes[p] = home
        else:
            self.homes.pop(p, None)

    def hook(self, params: Iterable[Tensor]) -> None:
        """Register this object's own two hooks on each of ``params`` not hooked yet."""
        for p in params:
            if p not in self._handles:
                self._handles[p] = [p.register_hook(eager_hook(lambda grad, p=p: self.before(p))),
                                    p.register_post_accumulate_grad_hook(eager_hook(self.after))]

    def drop(self, params: Iterable[Tensor]) -> None:
        """No more hand-over for ``params``: homes forgotten, this object's hooks removed."""
        for p in params:
            self.homes.pop(p, None)
            self.handed.discard(p)
            self._take.discard(p)
            for h in self._handles.pop(p, []):
                h.remove()

    def drop_all(self) -> None:
        """:meth:`drop` for every parameter this object knows."""
        self.drop([*self._handles, *self.homes])

    def strays(self) -> list[Tensor]:
        """Parameters handed over since :meth:`clear` whose ``p.grad`` is now another tensor
        than their home (something re-pointed it after the hand-over: DDP's
        ``gradient_as_bucket_view``, Megatron's ``main_grad``, the user)."""
        return [p for p in self.handed
                if p.grad is not None and p in self.homes and p.grad.data_ptr() != self.homes[p].data_ptr()]

    def clear(self) -> None:
        """A step is over: forget which gradients this step's backward passes handed over."""
        self._take.clear()
        self.handed.clear()
