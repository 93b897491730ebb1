"""Squared gradients for DeepSpeed without ZeRO (stage 0, fp32 or bf16 autocast).

Stage 0 keeps full local gradients and all-reduces them once, at the accumulation
boundary, after summing the micro-steps. Per-micro-step squares therefore come from
tensor hooks (:class:`~vrgd_ds.moments.MicroStepMoments`, one full-size fp32 buffer, the
same size as the full gradient stage 0 holds anyway), and are all-reduced in bounded
chunks right after DeepSpeed all-reduces the gradients (:mod:`.seam`, patch 6).
The VR optimizer places both the squares and the gradients in its flat buffers
(:meth:`~vrgd_ds.moments.MicroStepMoments.place`): DeepSpeed's stage-0 all-reduce writes the
averaged gradient back into ``p.grad`` in place, so a gradient handed over stays there.
Measure-only (``norms_only``): the hooks keep one float64 number per parameter, the sum of
its local squares, which is all the noise scale needs; those are all-reduced instead, and no
gradient-sized buffer exists. On a step that uses no squares (``gsnr_interval``, the noise
scale's ``interval``) the hooks square nothing.

Scale: DeepSpeed divides each micro-step loss by the accumulation count a and averages the
reduced gradient over W ranks, so p.grad is the mean of the k = W * a group gradients and
the mean of squares in its scale is (k / W^2) * sum of local squares, times c^2 when
``gradient_clipping`` multiplied the gradient by c (measured: seam patch 7).
"""

from __future__ import annotations

from typing import Callable

import torch

from ..moments.microstep import MicroStepMoments
from ..gsnr import square_sum
from ..moments.chunked import ChunkedSquares


class Stage0Moments(MicroStepMoments):
    def __init__(self, params, group, world: int, comm_dtype, chunk_numel: int, samples_per_group=None,
                 norms_only: bool = False, *, accumulation: Callable[[], int]):
        super().__init__(params, samples_per_group)
        self.world = world
        # the engine's gradient_accumulation_steps: backward passes per step on every rank, by
        # DeepSpeed's contract (the hooks' own count would miss a pass that reached no parameter
        # every other pass reached, and could differ between ranks)
        self.accumulation = accumulation
        self.group = group
        self.norms_only = norms_only
        self.squares = ChunkedSquares(group, chunk_numel, comm_dtype)
        self._norms: dict[int, float] = {}  # norms_only: id(param) -> sum of squares over all ranks
        self._norm_bytes = 0
        self._local_norms: dict[torch.Tensor, torch.Tensor] = {}  # norms_only: this step's float64 sums
        # set by the adapter: whether the coming step uses the squares (gsnr_interval, the
        # noise scale's interval); asked once per step, at its first backward hook
        self.wants: Callable[[], bool] | None = None
        self._gate: bool | None = None
        self.squared_steps = 0  # steps whose backward hooks formed squares (diagnostics, tests)

    @property
    def comm_bytes(self) -> int:
        return self.squares.comm_bytes + self._norm_bytes

    @property
    def group_count(self) -> int:
        return self.world * self.accumulation()

    @property
    def sq_scale(self) -> float:
        return self.group_count / self.world**2 * self._clip_scale**2

    def _measuring(self) -> bool:
        if self._gate is None:
            self._gate = True if self.wants is None else bool(self.wants())
            self.squared_steps += self._gate
        return self._gate

    def extra_bytes(self) -> int:
        """Bytes of squared-gradient buffers this source allocated itself (views it was
        given in an optimizer's flat buffer, :meth:`place`, are the optimizer's)."""
        return sum(b.numel() * b.element_size() for b in self._sum_sq.values() if b._base is None)

    def _square(self, p, grad) -> None:
        """Nothing on a step that uses no squares; norms_only: one float64 number per
        parameter (its sum of squares) instead of a gradient-sized buffer."""
        if not self._measuring():
            return
        if not self.norms_only:
            super()._square(p, grad)
            return
        # fp32 row sums added in float64 (square_sum); the micro-steps add up in float64
        local = square_sum(grad.detach().reshape(-1), False, self.squares.chunk_numel)
        self._local_norms[p] = self._local_norms[p] + local if p in self._fresh else local
        self._fresh.add(p)

    def reset(self) -> None:
        super().reset()
        self._gate = None

    def allreduce_squares(self) -> None:
        if self._gate is False:  # the hooks skipped this step's squares: reducing zeros would be wrong
            raise RuntimeError("vrgd-ds: stage 0 was asked to reduce this step's squared gradients, but its "
                               "backward hooks were told that the step uses none; the step counters of the "
                               "optimizer and the moment source disagree (please report this)")
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
        local = torch.stack([self._local_norms[p] if p in self._fresh
                             else torch.zeros((), dtype=torch.float64, device=device) for p in self.params])
        dist.all_reduce(local, group=self.group)
        self._norm_bytes += local.numel() * local.element_size()
        self._norms = {id(p): v for p, v in zip(self.params, local.tolist())}

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
        # one read back (the factor enters sq_scale); 1 where there was no gradient to clip
        self._clip_scale *= float(torch.where(before > 0, torch.sqrt(after / before), 1.0))
