"""Squared micro-batch gradients in a buffer laid out like Megatron's gradient buffer.

For every dense ``_ParamAndGradBuffer`` of every model chunk (several under virtual
pipeline parallelism, each with its own buffers and bucket groups) there is one fp32
squares buffer of the same length, and every parameter's squares live at the same
offsets as its ``main_grad``. A tensor hook sees each backward pass's gradient h of a parameter before
Megatron's post-accumulate hook adds it into ``main_grad`` and adds h^2 into the
parameter's view of the squares buffer. Right after Megatron starts a bucket group's
gradient collective, the same collective runs on the same slices of the squares buffer,
with the same scaling, over the same group (reduce-scatter into the same shard
boundaries with the distributed optimizer, all-reduce without; asynchronous exactly when
the gradients are); it is waited for right after Megatron waits for the gradients. So
each rank ends the step with sum h^2 for exactly the elements its optimizer updates.

Scale (the ``MomentSource`` contract of :mod:`vrgd_ds.optim.vr`): with the k = W x a
groups (W data-parallel ranks, a backward passes per rank), every group's h is the same
multiple of its group gradient, and Megatron's reduced gradient is ``f * sum h`` where
f is the bucket's gradient scaling factor (1/W, or 1 with an averaging collective of
1/W). The squares get the same f, so the mean of squared group gradients in the scale of
the reduced gradient is ``f * k * squares``. Between the reduction and the inner
optimizer step Megatron divides the gradient by the loss scale S (fp16) and multiplies
it by a clipping factor c: ``sq_scale = f * k * (c / S)^2``. S is read before Megatron
prepares the gradients; c is measured, not re-derived: |g|^2 over this rank's optimizer
tensors after gradient preparation and again at the step (each summed over the
tensor-parallel group, so that every tensor-parallel rank has the same c to the last bit),
whose ratio is c^2 because clipping scales all gradients by one factor (where all those
gradients are zero, c = 1, which cannot change the GSNR: gbar = 0 there).

Sequence parallelism: a parameter that sees only this rank's part of the sequence (a norm,
a row-parallel bias; Megatron marks it ``sequence_parallel``) gets a partial gradient h_t on
each tensor-parallel rank t, and Megatron sums main_grad over the tensor-parallel group in
``finalize_model_grads``, after the data-parallel reduction. A group's gradient is the sum
over t, so the hook first sums h over the tensor-parallel group (one all-reduce of that
parameter per backward pass, a copy: the h autograd accumulates is left alone) and adds the
square of the sum; every tensor-parallel rank then holds the same squares, as it will hold
the same gradient.

k: every rank counts its backward passes; the first read of ``group_count`` in a step
checks with one small all-reduce that all ranks counted the same.

Reset: Megatron zeroes its gradient buffers in ``DistributedDataParallel.zero_grad_buffer``
at the start of each iteration (each chunk's); a chunk's squares buffers are zeroed right
after it, so a step that Megatron skips (fp16 overflow) leaves nothing behind.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
from torch import Tensor

from ..moments.hand_over import eager_hook
from . import seam


class BufferSquares:
    def __init__(self, chunks: list):
        per_chunk = [seam.dense_buffers(ddp) for ddp in chunks]
        self.layouts = [b for layouts in per_chunk for b in layouts]
        self.squares = [torch.zeros(b.numel, dtype=torch.float32, device=b.device) for b in self.layouts]
        self.comm_bytes = 0  # payload this rank has put into square reductions so far
        self._passes: dict[Tensor, int] = {}
        self._handles = []
        summed = {p for ddp in chunks for p in seam.tensor_parallel_summed(ddp)}
        whole_tp = seam.tensor_parallel_group(chunks[0])
        tp_group = whole_tp if summed else None
        self._tp_group = whole_tp if whole_tp.size() > 1 else None  # see _clip_sq
        for buf, sq in zip(self.layouts, self.squares):
            for p in buf.params:
                start, end = buf.index[p]
                self._handles.append(p.register_hook(eager_hook(self._hook_for(
                    p, sq[start:end].view(p.shape), tp_group if p in summed else None))))
        self.syncs: list[seam.BucketSync] = []
        first = 0  # the chunk's first buffer in self.layouts
        for ddp, layouts in zip(chunks, per_chunk):
            at = len(self.syncs)  # the chunk's first bucket group in self.syncs
            syncs = seam.hook_bucket_groups(ddp, lambda i, force, at=at: self._start(at + i, force),
                                            lambda i, at=at: self._finish(at + i))
            self.syncs += [dataclasses.replace(s, buckets=tuple((first + b, *rest) for b, *rest in s.buckets))
                           for s in syncs]
            buffers = range(first, first + len(layouts))
            seam.hook_zero_grad_buffer(ddp, lambda buffers=buffers: self.zero(buffers))
            first += len(layouts)
        self._pending: list[list | None] = [None] * len(self.syncs)
        scales = {f for s in self.syncs for *_, f in s.buckets}
        if len(scales) > 1:
            raise NotImplementedError(f"vrgd_ds.megatron: buckets with different gradient scaling "
                                      f"factors {sorted(scales)} (expert parallelism) are not supported")
        sync = self.syncs[0]
        self.world = sync.size
        self.group = sync.group
        avg = 1.0 / sync.size if sync.op == dist.ReduceOp.AVG else 1.0
        self.reduce_scale = scales.pop() * avg  # f: the reduced gradient is f * sum h
        self._views: dict[int, Tensor] = {}
        self._tensors: list[Tensor] = []
        self._reset_step()

    # ---- filling: tensor hooks, then Megatron's bucket collectives -------------------

    def _hook_for(self, p: Tensor, view: Tensor, tp_group=None):
        def hook(grad: Tensor) -> None:
            g = grad.float()
            if tp_group is not None:  # a partial gradient (sequence parallelism): the group's is the sum
                g = g.clone() if g is grad else g
                dist.all_reduce(g, group=tp_group)
                self.comm_bytes += g.numel() * g.element_size()
            view.addcmul_(g, g)
            self._passes[p] = self._passes.get(p, 0) + 1
        return hook

    def _start(self, i: int, force_all_reduce: bool) -> None:
        if self._pending[i] is not None:  # Megatron's start was a no-op: its collective is in flight
            return
        sync = self.syncs[i]
        works = []
        for b, offset, numel, scale in sync.buckets:
            view = self.squares[b].narrow(0, offset, numel)
            if scale != 1.0:
                view.mul_(scale)
            if sync.sharded and not force_all_reduce:
                shard = view.narrow(0, sync.rank * (numel // sync.size), numel // sync.size)
                works.append(dist.reduce_scatter_tensor(shard, view, op=sync.op, group=sync.group,
                                                        async_op=sync.async_op))
            else:
                works.append(dist.all_reduce(view, op=sync.op, group=sync.group, async_op=sync.async_op))
            self.comm_bytes += numel * view.element_size()
        self._pending[i] = works if sync.async_op else None

    def _finish(self, i: int) -> None:
        for w in self._pending[i] or ():
            w.wait()
        self._pending[i] = None

    def zero(self, buffers) -> None:
        """Start a new step: called right after Megatron zeroes a chunk's gradient buffers, with
        the indices of that chunk's buffers."""
        for b in buffers:
            self.squares[b].zero_()
            for p in self.layouts[b].params:
                self._passes.pop(p, None)
        self._reset_step()

    # ---- which squares belong to which optimizer tensor ------------------------------

    def bind(self, mains: list[seam.MainParam]) -> None:
        """Map each inner-optimizer tensor to its elements of the squares buffers."""
        where = {p: (i, buf.index[p][0]) for i, buf in enumerate(self.layouts) for p in buf.params}
        for m in mains:
            if m.model_param is None:  # a zero-element placeholder (see optimizer.py)
                self._views[id(m.tensor)] = m.tensor.new_zeros(m.tensor.shape)
            else:
                b, start = where[m.model_param]
                flat = self.squares[b].narrow(0, start + m.start, m.end - m.start)
                self._views[id(m.tensor)] = flat.view(m.tensor.shape)
            self._tensors.append(m.tensor)

    # ---- loss scale and clipping: what Megatron did to the gradient after the reduction

    def before_prepare(self, loss_scale: float) -> None:
        self._loss_scale = loss_scale

    def after_prepare(self) -> None:
        self._prepared_sq = self._grad_sq()

    def _grad_sq(self) -> float:
        grads = [t.grad for t in self._tensors if t.grad is not None and t.grad.numel() > 0]
        if not grads:
            return 0.0
        return float(torch.stack(torch._foreach_norm(grads, 2)).double().square().sum())

    def _clip_sq(self) -> float:
        """c^2: |g|^2 at the step over |g|^2 after Megatron prepared the gradients. Under tensor
        parallelism the two sums are added over the tensor-parallel group first (one all-reduce
        of two numbers): the ratio is the same, and every tensor-parallel rank then has the same
        c to the last bit, so a layer held whole on each of them (a replicated bias) gets the
        same update on each (measured from each rank's own tensors, it differed in the last
        bits, and the replicas drifted apart)."""
        before = self._prepared_sq
        if before is None:
            raise RuntimeError("vrgd_ds.megatron: the optimizer step ran without Megatron's "
                               "prepare_grads; step through the Megatron optimizer")
        now = self._grad_sq()
        if self._tp_group is not None:
            both = torch.tensor([before, now], dtype=torch.float64, device=self.squares[0].device)
            dist.all_reduce(both, group=self._tp_group)
            before, now = both.tolist()
        return now / before if before > 0.0 else 1.0

    # ---- MomentSource -----------------------------------------------------------------

    @property
    def group_count(self) -> int:
        if self._k is None:
            local = max(self._passes.values(), default=0)
            device = self.squares[0].device
            both = torch.tensor([local, -local], dtype=torch.float64, device=device)
            dist.all_reduce(both, op=dist.ReduceOp.MAX, group=self.group)
            most, fewest = int(both[0].item()), -int(both[1].item())
            if most != local or fewest != local:
                raise RuntimeError(
                    f"ranks ran different numbers of backward passes this step (from {fewest} to "
                    f"{most}, {local} here); the VR optimizers need the same number of micro-batches "
                    "on every data-parallel rank")
            self._k = self.world * local
        return self._k

    @property
    def sq_scale(self) -> float:
        if self._sq_scale is None:
            self._sq_scale = self.reduce_scale * self.group_count * self._clip_sq() / self._loss_scale**2
        return self._sq_scale

    def sum_sq(self, param: Tensor) -> Tensor:
        try:
            return self._views[id(param)]
        except KeyError:
            raise KeyError(f"no squared gradients for an optimizer tensor of shape {tuple(param.shape)}: "
                           "it is not one of the Megatron optimizer's tensors") from None

    def reset(self) -> None:
        """The step is over; the buffers are zeroed with Megatron's in ``zero_grad_buffer``."""
        self._reset_step()

    def _reset_step(self) -> None:
        self._k = None
        self._sq_scale = None
        self._loss_scale = 1.0
        self._prepared_sq = None

    def extra_bytes(self) -> int:
        """Bytes this adapter keeps on this rank: the squares buffers."""
        return sum(sq.numel() * sq.element_size() for sq in self.squares)
