"""Squared gradients for ZeRO stage 2, reduced bucket by bucket beside the gradients.

ZeRO-2 reduces every micro-step's local gradients in buckets (``reduce_ipg_grads``) and
keeps only the owner's partition. Just before DeepSpeed reduces a bucket, this adapter
squares the bucket's local gradients in fp32, sums them over the data-parallel ranks and
adds the part that falls in this rank's fp32 partition to a partition-sized buffer. So
the extra state is one partition-sized fp32 buffer per param group plus one bucket-sized
temporary, never a full-model buffer.

This version sums the squared bucket with an all-reduce (every rank receives the whole
bucket and keeps its slice), which moves twice the bytes of a reduce-scatter; matching
DeepSpeed's reduce-scatter offsets is the planned optimisation.

Scale (the MomentSource contract of :mod:`vrgd_ds.optim.vr`): DeepSpeed divides each
micro-step loss by the accumulation count a and averages the reduced gradient over the W
ranks, so the partition gradient is the mean of the k = W * a group gradients. The
squares summed here are those of g_i / a (times the fp16 loss scale S), so the mean of
squared group gradients in the gradient's scale is ``sum * a / W / S^2 / c^2``, where c is
the clipping factor DeepSpeed applies to the gradient partition after the GSNR inputs
were formed (ALGORITHM.md section 1: clipping scales the mean only).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


class ZeroMoments:
    def __init__(self, zero_optimizer, layout):
        self.zero = zero_optimizer
        self.group = zero_optimizer.dp_process_group
        self.world = dist.get_world_size(group=self.group)
        self.accumulation = zero_optimizer.gradient_accumulation_steps
        self._unscale = 1.0
        self._consumed = False
        self._sq: dict[int, Tensor] = {}
        self._flat_of: dict[int, Tensor] = {}
        self._pieces: dict[int, tuple[int, int, int, int]] = {}  # id(param) -> (key, src, dst, n)
        for i, flat in enumerate(zero_optimizer.single_partition_of_fp32_groups):
            self._sq[id(flat)] = torch.zeros(flat.numel(), dtype=torch.float32, device=flat.device)
            self._flat_of[id(flat)] = flat
            tensors = zero_optimizer.round_robin_bit16_groups[i]
            for seg in layout.segments(flat):
                param = tensors[seg.layer - layout.layer_base[i]]
                src = self._piece_start(zero_optimizer, i, seg, tensors)
                self._pieces[id(param)] = (id(flat), src, seg.offset, seg.numel)

    @staticmethod
    def _piece_start(zero_optimizer, i, seg, tensors):
        """Offset inside the parameter where this rank's piece begins."""
        pid = dist.get_rank(group=zero_optimizer.real_dp_process_group[i])
        start = zero_optimizer.partition_size[i] * pid
        paddings = zero_optimizer.round_robin_bit16_padding[i] or [0] * len(tensors)
        cursor = 0
        for t, pad in zip(tensors, paddings):
            if cursor <= start + seg.offset < cursor + t.numel():
                return start + seg.offset - cursor
            cursor += t.numel() + pad
        raise AssertionError("segment outside its parameter group")

    # ---- called from the DeepSpeed hooks ---------------------------------------------

    def add_bucket(self, grads: list[Tensor], params: list[Tensor]) -> None:
        if self._consumed:  # first bucket of a new step: start from zero
            for buf in self._sq.values():
                buf.zero_()
            self._unscale, self._consumed = 1.0, False
        if not grads:
            return
        squares = torch.cat([g.detach().reshape(-1).float().square() for g in grads])
        dist.all_reduce(squares, group=self.group)
        offset = 0
        for g, p in zip(grads, params):
            piece = self._pieces.get(id(p))
            if piece is not None:
                key, src, dst, n = piece
                self._sq[key][dst:dst + n].add_(squares[offset + src:offset + src + n])
            offset += g.numel()

    def set_unscale(self, combined_scale: float) -> None:
        """DeepSpeed multiplied the gradient partition by 1 / combined_scale."""
        self._unscale = 1.0 / combined_scale

    # ---- MomentSource -------------------------------------------------------------------

    @property
    def group_count(self) -> int:
        return self.world * self.accumulation

    @property
    def sq_scale(self) -> float:
        return self.accumulation / self.world * self._unscale**2

    def sum_sq(self, param: Tensor) -> Tensor:
        try:
            return self._sq[id(param)]
        except KeyError:
            raise KeyError("ZeroMoments: not a ZeRO fp32 partition") from None

    def reset(self) -> None:
        """The step is over (applied or skipped). DeepSpeed steps one param group at a time,
        so the buffers are cleared lazily, when the next step's first bucket arrives."""
        self._consumed = True


def combined_scale(zero_optimizer, total_norm) -> float:
    """The factor DeepSpeed 0.19's ``unscale_and_clip_grads`` divides the partition by."""
    scale = float(zero_optimizer.loss_scale)
    if zero_optimizer.clip_grad > 0.0:
        norm = float(total_norm)
        clip = max(1.0, (norm / scale + 1e-6) / zero_optimizer.clip_grad)
        scale *= clip
    return scale


def attach_zero_moments(zero_optimizer, vr_optimizer) -> ZeroMoments:
    """Give a VR optimizer inside DeepSpeedZeroOptimizer (stage 2) its moment source."""
    if not zero_optimizer.partition_gradients:
        raise NotImplementedError("VR optimizers need ZeRO stage 2 (partitioned gradients)")
    moments = ZeroMoments(zero_optimizer, vr_optimizer.layout)
    vr_optimizer.moments = moments
    reduce_ipg_grads = zero_optimizer.reduce_ipg_grads
    unscale_and_clip = zero_optimizer.unscale_and_clip_grads
    step = zero_optimizer.step

    def reduce_ipg_grads_with_squares(comm_dtype=None):
        dtypes = [comm_dtype] if comm_dtype is not None else list(zero_optimizer.ipg_buckets)
        for dt in dtypes:
            bucket = zero_optimizer.ipg_buckets[dt]
            params = [zero_optimizer.param_dict[pid] for _, _, pid in bucket.params]
            moments.add_bucket(list(bucket.grads), params)
        return reduce_ipg_grads(comm_dtype)

    def unscale_and_clip_recorded(grad_groups_flat, total_norm):
        moments.set_unscale(combined_scale(zero_optimizer, total_norm))
        return unscale_and_clip(grad_groups_flat, total_norm)

    def step_then_release(*args, **kwargs):
        try:
            return step(*args, **kwargs)
        finally:
            moments.reset()

    zero_optimizer.reduce_ipg_grads = reduce_ipg_grads_with_squares
    zero_optimizer.unscale_and_clip_grads = unscale_and_clip_recorded
    zero_optimizer.step = step_then_release
    return moments
