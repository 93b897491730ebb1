"""Squared gradients for DeepSpeed without ZeRO (stage 0, fp32 or bf16 autocast).

Stage 0 keeps full local gradients and all-reduces them once, at the accumulation
boundary, after summing the micro-steps. Per-micro-step squares therefore come from
tensor hooks (:class:`~vrgd_ds.moments.MicroStepMoments`, one full-size fp32 buffer, the
same size as the full gradient stage 0 holds anyway), and are all-reduced in bounded
chunks right after DeepSpeed all-reduces the gradients (:mod:`.seam`, patch 6).
Measure-only (``norms_only``): one number per parameter is all-reduced instead, the sum of
its local squares, which is all the noise scale needs.

Scale: DeepSpeed divides each micro-step loss by the accumulation count a and averages the
reduced gradient over W ranks, so p.grad is the mean of the k = W * a group gradients and
the mean of squares in its scale is (k / W^2) * sum of local squares, times c^2 when
``gradient_clipping`` multiplied the gradient by c (measured: seam patch 7).
"""

from __future__ import annotations

import torch

from ..moments.microstep import MicroStepMoments
from ..moments.chunked import ChunkedSquares


class Stage0Moments(MicroStepMoments):
    def __init__(self, params, group, world: int, comm_dtype, chunk_numel: int, samples_per_group=None,
                 norms_only: bool = False):
        super().__init__(params, samples_per_group)
        self.world = world
        self.group = group
        self.norms_only = norms_only
        self.squares = ChunkedSquares(group, chunk_numel, comm_dtype)
        self._norms: dict[int, float] = {}  # norms_only: id(param) -> sum of squares over all ranks
        self._norm_bytes = 0

    @property
    def comm_bytes(self) -> int:
        return self.squares.comm_bytes + self._norm_bytes

    @property
    def group_count(self) -> int:
        return self.world * self._backward_passes

    @property
    def sq_scale(self) -> float:
        return self.group_count / self.world**2 * self._clip_scale**2

    def allreduce_squares(self) -> None:
        if self.norms_only:
            self._allreduce_norms()
            return
        for p in self.params:  # every rank sends every parameter's squares, zeros where none reached it
            self._sum_sq.setdefault(p, torch.empty_like(p, dtype=torch.float32))
        bufs = [self.local_squares(p) for p in self.params]
        self.squares.allreduce(bufs)
        self.squares.release()

    def _allreduce_norms(self) -> None:
        """norms_only: each parameter's sum of local squares (float64), summed over the ranks in
        one all-reduce of one number per parameter; nothing gradient-sized is sent."""
        import torch.distributed as dist

        device = self.params[0].device
        local = torch.stack([self.local_squares(p).sum(dtype=torch.float64) if p in self._sum_sq
                             else torch.zeros((), dtype=torch.float64, device=device) for p in self.params])
        dist.all_reduce(local, group=self.group)
        self._norm_bytes += local.numel() * local.element_size()
        self._norms = {id(p): v for p, v in zip(self.params, local.tolist())}

    def place(self, params, squares, grads) -> None:
        """Squares only: DeepSpeed owns the gradients at stage 0."""
        super().place(params, squares, [None] * len(params))

    def square_sum(self, param) -> float:
        """norms_only: the sum over all ranks and elements of ``param``'s local squares (the
        scale of ``sum_sq``: ``sq_scale`` applies)."""
        return self._norms[id(param)]

    def measure_clip(self, clip) -> None:
        """Run DeepSpeed's clipping of p.grad and record the factor it applied."""
        grads = [p.grad for p in self.params if p.grad is not None]
        before = torch.stack([g.float().square().sum() for g in grads]).sum()
        clip()
        after = torch.stack([g.float().square().sum() for g in grads]).sum()
        if before > 0:
            self._clip_scale *= float(torch.sqrt(after / before))
