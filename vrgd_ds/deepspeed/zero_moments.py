"""Squared gradients for ZeRO stages 1 and 2, reduced bucket by bucket beside the gradients.

DeepSpeed reduces gradients in buckets (``reduce_ipg_grads``): under ZeRO-2 every
micro-step, under ZeRO-1 once per step, at the accumulation boundary. Just before it
reduces a bucket, this adapter forms the bucket's local squared gradients in fp32 and
sends each piece to the rank whose fp32 partition owns it (one ``reduce`` per owner, the
pattern of DeepSpeed's own ``reduce_scatter`` path), where it is added to a
partition-sized buffer. Every rank ends the step with sum g^2 for exactly its partition.

- ZeRO-2: the bucket holds one micro-step's local gradient, so the squares are those of
  the bucket. Extra state: one partition-sized fp32 buffer per param group plus a
  bucket-sized temporary; never a full-model buffer.
- ZeRO-1: the bucket holds the sum over micro-steps, too late to square. With
  gradient accumulation the per-micro-step squares come from tensor hooks
  (:class:`~vrgd_ds.moments.MicroStepMoments`, one full-size fp32 buffer, like the full
  gradient ZeRO-1 keeps anyway); without accumulation the bucket is squared directly.
- ``gsnr_interval`` N: on the steps that reuse the last GSNR nothing is squared or sent.
- ``sq_comm_dtype="bf16"`` halves the bytes of the squares on the wire; they are summed
  in bf16 by the collective and added to the fp32 buffer.

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

from ..moments.microstep import MicroStepMoments
from .zero_layout import owner_pieces


class ZeroMoments:
    def __init__(self, zero_optimizer, vr_optimizer, local: MicroStepMoments | None = None):
        self.zero = zero_optimizer
        self.vr = vr_optimizer
        self.local = local
        self.group = zero_optimizer.dp_process_group
        self.world = dist.get_world_size(group=self.group)
        self.rank = dist.get_rank(group=self.group)
        self.accumulation = zero_optimizer.gradient_accumulation_steps
        self.comm_dtype = vr_optimizer.sq_comm_dtype
        self.comm_bytes = 0  # payload this rank has put into square reductions so far
        self._unscale = 1.0
        self._consumed = False
        self._sq: dict[int, Tensor] = {}
        # id(bit16 param) -> [(owner rank, start in param, start in owner's partition, numel)]
        self._pieces: dict[int, list[tuple[int, int, int, int]]] = {}
        self._buffer_of: dict[int, Tensor] = {}  # id(bit16 param) -> this rank's buffer
        for i, flat in enumerate(zero_optimizer.single_partition_of_fp32_groups):
            self._sq[id(flat)] = buf = torch.zeros(flat.numel(), dtype=torch.float32, device=flat.device)
            tensors = zero_optimizer.round_robin_bit16_groups[i]
            paddings = zero_optimizer.round_robin_bit16_padding[i] or [0] * len(tensors)
            pieces = owner_pieces([t.numel() for t in tensors], paddings, zero_optimizer.partition_size[i],
                                  dist.get_world_size(group=zero_optimizer.real_dp_process_group[i]))
            for t, p in zip(tensors, pieces):
                self._pieces[id(t)] = p
                self._buffer_of[id(t)] = buf

    # ---- called from the DeepSpeed hooks ---------------------------------------------

    def add_bucket(self, grads: list[Tensor], params: list[Tensor]) -> None:
        if self._consumed:  # first bucket of a new step: start from zero
            for buf in self._sq.values():
                buf.zero_()
            self._unscale, self._consumed = 1.0, False
        if not grads or not self.vr.wants_moments():
            return
        if self.local is not None:
            squares = torch.cat([self._local_sq(p).reshape(-1) for p in params])
        else:
            squares = torch.cat([g.detach().reshape(-1).float().square() for g in grads])
        # gather each owner's pieces into one message; bucket order is the same on all ranks
        sends: list[list[Tensor]] = [[] for _ in range(self.world)]
        mine: list[tuple[Tensor, int, int]] = []  # (buffer, start in partition, numel)
        offset = 0
        for p in params:
            for owner, src, dst, n in self._pieces.get(id(p), ()):
                sends[owner].append(squares.narrow(0, offset + src, n))
                if owner == self.rank:
                    mine.append((self._buffer_of[id(p)], dst, n))
            offset += p.numel()
        messages, works = [], []
        for owner, parts in enumerate(sends):
            if not parts:
                continue
            msg = torch.cat(parts).to(self.comm_dtype)
            self.comm_bytes += msg.numel() * msg.element_size()
            works.append(dist.reduce(msg, dist.get_global_rank(self.group, owner), group=self.group,
                                     async_op=True))
            if owner == self.rank:
                messages.append(msg)
        for w in works:
            w.wait()
        if messages:
            at = 0
            received = messages[0].float()
            for buf, dst, n in mine:
                buf.narrow(0, dst, n).add_(received.narrow(0, at, n))
                at += n

    def _local_sq(self, p: Tensor) -> Tensor:
        try:
            return self.local.sum_sq(p)
        except KeyError:  # no gradient reached this parameter on this rank
            return torch.zeros(p.numel(), dtype=torch.float32, device=p.device)

    def set_unscale(self, combined_scale: float) -> None:
        """DeepSpeed multiplied the gradient partition by 1 / combined_scale."""
        self._unscale = 1.0 / combined_scale

    def extra_bytes(self) -> int:
        """Bytes this adapter keeps between steps on this rank (not counting optimizer state)."""
        own = sum(b.numel() * b.element_size() for b in self._sq.values())
        if self.local is not None:
            own += sum(p.numel() * 4 for p in self.local.params)
        return own

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

    def end_step(self) -> None:
        """After DeepSpeed's whole optimizer step (all groups, or an overflow skip)."""
        self._consumed = True
        if self.local is not None:
            self.local.reset()


def combined_scale(zero_optimizer, total_norm) -> float:
    """The factor DeepSpeed 0.19's ``unscale_and_clip_grads`` divides the partition by."""
    scale = float(zero_optimizer.loss_scale)
    if zero_optimizer.clip_grad > 0.0:
        norm = float(total_norm)
        clip = max(1.0, (norm / scale + 1e-6) / zero_optimizer.clip_grad)
        scale *= clip
    return scale


def attach_zero_moments(zero_optimizer, vr_optimizer) -> ZeroMoments:
    """Give a VR optimizer inside DeepSpeedZeroOptimizer (stage 1 or 2) its moment source."""
    local = None
    if not zero_optimizer.partition_gradients and zero_optimizer.gradient_accumulation_steps > 1:
        params = [p for group in zero_optimizer.round_robin_bit16_groups for p in group]
        local = MicroStepMoments(params)
    moments = ZeroMoments(zero_optimizer, vr_optimizer, local)
    vr_optimizer.moments = moments
    reduce_ipg_grads = zero_optimizer.reduce_ipg_grads
    unscale_and_clip = zero_optimizer.unscale_and_clip_grads
    step = zero_optimizer.step

    def reduce_ipg_grads_with_squares(comm_dtype=None):
        dtypes = [comm_dtype] if comm_dtype is not None else list(zero_optimizer.ipg_buckets)
        for dt in dtypes:
            bucket = zero_optimizer.ipg_buckets[dt]
            params = [zero_optimizer.bit16_groups[i][j] for i, j, _ in bucket.params]
            moments.add_bucket(list(bucket.grads), params)
        return reduce_ipg_grads(comm_dtype)

    def unscale_and_clip_recorded(grad_groups_flat, total_norm):
        moments.set_unscale(combined_scale(zero_optimizer, total_norm))
        return unscale_and_clip(grad_groups_flat, total_norm)

    def step_then_release(*args, **kwargs):
        try:
            return step(*args, **kwargs)
        finally:
            moments.end_step()

    zero_optimizer.reduce_ipg_grads = reduce_ipg_grads_with_squares
    zero_optimizer.unscale_and_clip_grads = unscale_and_clip_recorded
    zero_optimizer.step = step_then_release
    return moments
