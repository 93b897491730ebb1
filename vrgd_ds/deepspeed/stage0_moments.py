"""Squared gradients for DeepSpeed without ZeRO (stage 0, fp32).

Stage 0 keeps full local gradients and all-reduces them once, at the accumulation
boundary, after summing the micro-steps. Per-micro-step squares therefore come from
tensor hooks (:class:`~vrgd_ds.moments.MicroStepMoments`, one full-size fp32 buffer, the
same size as the full gradient stage 0 holds anyway), and are all-reduced right after
DeepSpeed all-reduces the gradients.

Scale: DeepSpeed divides each micro-step loss by the accumulation count a and averages the
reduced gradient over W ranks, so p.grad is the mean of the k = W * a group gradients and
the mean of squares in its scale is (k / W^2) * sum of local squares, times c^2 when
``gradient_clipping`` multiplied the gradient by c.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..moments.microstep import MicroStepMoments


class Stage0Moments(MicroStepMoments):
    def __init__(self, engine, comm_dtype=torch.float32):
        super().__init__(engine.module.parameters())
        self.group = engine.seq_data_parallel_group
        self.world = dist.get_world_size(group=self.group)
        self.comm_dtype = comm_dtype
        self.comm_bytes = 0

    @property
    def group_count(self) -> int:
        return self.world * self._backward_passes

    @property
    def sq_scale(self) -> float:
        return self.group_count / self.world**2 * self._clip_scale**2

    def allreduce_squares(self) -> None:
        bufs = [self._sum_sq.setdefault(p, torch.zeros_like(p, dtype=torch.float32)) for p in self.params]
        flat = torch.cat([b.view(-1) for b in bufs]).to(self.comm_dtype)
        dist.all_reduce(flat, group=self.group)
        self.comm_bytes += flat.numel() * flat.element_size()
        offset = 0
        for b in bufs:
            b.view(-1).copy_(flat[offset:offset + b.numel()])
            offset += b.numel()


def attach_stage0_moments(engine, vr_optimizer) -> Stage0Moments:
    moments = Stage0Moments(engine, vr_optimizer.sq_comm_dtype)
    vr_optimizer.moments = moments
    allreduce_gradients = engine.allreduce_gradients
    clip_fp32_gradients = engine.clip_fp32_gradients

    def allreduce_gradients_and_squares(*args, **kwargs):
        out = allreduce_gradients(*args, **kwargs)
        if engine.is_gradient_accumulation_boundary() and vr_optimizer.wants_moments():
            moments.allreduce_squares()
        return out

    def clip_and_record():
        grads = [p.grad for p in moments.params if p.grad is not None]
        before = torch.stack([g.float().square().sum() for g in grads]).sum()
        clip_fp32_gradients()
        after = torch.stack([g.float().square().sum() for g in grads]).sum()
        if before > 0:  # the factor DeepSpeed multiplied the gradient by
            moments._clip_scale *= float(torch.sqrt(after / before))

    engine.allreduce_gradients = allreduce_gradients_and_squares
    engine.clip_fp32_gradients = clip_and_record
    return moments
