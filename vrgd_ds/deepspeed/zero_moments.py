"""Squared gradients for ZeRO stages 1 and 2, reduced bucket by bucket beside the gradients.

DeepSpeed reduces gradients in buckets: under ZeRO-2 every micro-step, under ZeRO-1 once
per step, at the accumulation boundary. Just before it reduces the pending buckets
(:mod:`.seam`, patch 2), this adapter squares the buckets' local gradients and sends each
piece to the rank whose fp32 partition owns it (a ``reduce`` per owner, DeepSpeed's own
reduce-scatter pattern; with gloo a point-to-point exchange), in bounded chunks
(:mod:`vrgd_ds.moments.chunked`), where it is added to a partition-sized fp32 buffer. Every rank ends the step with sum g^2 for exactly its
partition.

- ZeRO-2: the bucket holds one micro-step's local gradient, so its squares are the
  squares of that group. Extra state: one partition-sized fp32 buffer per param group;
  temporaries: one chunk.
- ZeRO-1: the bucket holds the sum over micro-steps, too late to square. With gradient
  accumulation the per-micro-step squares come from tensor hooks
  (:class:`~vrgd_ds.moments.MicroStepMoments`, one full-size fp32 buffer, like the full
  gradient ZeRO-1 keeps anyway); without accumulation the bucket is squared directly.
- ``gsnr_interval`` N: on the steps that reuse the last GSNR nothing is squared or sent.
- ``sq_comm_dtype="bf16"`` halves the bytes of the squares on the wire.
- Measure-only noise scale (``norms_only``): section 7 needs only each layer's sum of the
  squares, so nothing gradient-sized is sent: every rank adds up, per layer, the squares of
  the local gradients it would have sent (fp32 row sums added in float64,
  :func:`vrgd_ds.gsnr.square_sum`), and the meter sums these layer
  totals over the ranks in the one small all-reduce it makes anyway
  (:meth:`layer_square_sums`). Same numbers, no second gradient reduction.

Scale (the MomentSource contract of :mod:`vrgd_ds.optim.vr`): DeepSpeed divides each
micro-step loss by the accumulation count a and averages the reduced gradient over the W
ranks, so the partition gradient is the mean of the k = W * a group gradients. The squares
summed here are those of g_i / a (times any loss scale), so the mean of squared group
gradients in the gradient's scale is ``sum * a / W * m^2``, where m is the factor DeepSpeed
multiplied the gradient partition by (loss scale and clipping), read by a probe (seam
patch 3), not re-derived (docs/algorithm.md section 1: clipping scales the mean only).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ..moments.microstep import MicroStepMoments
from .seam import ZeroSnapshot
from ..gsnr import square_sum
from ..moments.chunked import ChunkedSquares, Transfer


class ZeroMoments:
    squares_consumable = True  # zeroed by the first bucket of the next step before any is reduced

    def __init__(self, snap: ZeroSnapshot, vr_optimizer, chunk_numel: int, samples_per_group: int | None = None,
                 accumulation: Callable[[], int] | None = None, norms_only: bool = False):
        self.snap = snap
        self.norms_only = norms_only
        self.samples_per_group = samples_per_group
        self.vr = vr_optimizer
        # the engine's current accumulation (DeepSpeed's set_train_batch_size may change it)
        self.accumulation = accumulation or (lambda: snap.accumulation)
        self.local = None
        if not snap.partition_gradients and snap.accumulation > 1:
            self.local = MicroStepMoments(snap.all_params())
            self.local.follow_rescaling = False  # DeepSpeed's own gradients: only its squares are used
            self.local.per_rank = True  # this rank's squares, which the adapter reduces
        self.squares = ChunkedSquares(snap.dp_group, chunk_numel, vr_optimizer.sq_comm_dtype)
        self._multiplier, self._loss_scale = 1.0, 1.0
        self._consumed = False
        self._sq = {} if norms_only else {
            id(g.flat): torch.zeros(g.flat.numel(), dtype=torch.float32, device=g.flat.device) for g in snap.groups}
        self._pieces, self._target = {}, {}  # id(param) -> its pieces / its owner's buffer
        self._layer = {}  # id(param) -> its layer index (norms_only)
        for g in snap.groups:
            for j, (p, pieces) in enumerate(zip(g.params, g.pieces)):
                self._pieces[id(p)] = pieces
                self._target[id(p)] = self._sq.get(id(g.flat))
                self._layer[id(p)] = g.layer_base + j
        self._norms = torch.zeros(snap.layer_count if norms_only else 0, dtype=torch.float64,
                                  device=snap.groups[0].flat.device)

    @property
    def comm_bytes(self) -> int:
        return self.squares.comm_bytes

    # ---- from the seam -----------------------------------------------------------------

    def add_buckets(self, pairs: list[tuple[Tensor, Tensor]]) -> None:
        """Square and send the (param, local gradient) pairs DeepSpeed is about to reduce."""
        if self._consumed:  # first bucket of a new step: start from zero
            for buf in self._sq.values():
                buf.zero_()
            self._norms.zero_()
            self._multiplier, self._consumed = 1.0, False
        if not pairs or not self.vr.wants_moments():
            return
        if self.local is None and not self.snap.partition_gradients and self.accumulation() > 1:
            raise RuntimeError(
                f"vrgd-ds: ZeRO-1 started without gradient accumulation and now accumulates "
                f"{self.accumulation()} micro-steps (set_train_batch_size): its per-micro-step squares "
                "need hooks set up at initialize; use ZeRO stage 2, or start with gradient_accumulation_steps > 1")
        if self.norms_only:
            for p, grad in pairs:
                if id(p) in self._layer:
                    source = self._local_sq(p) if self.local is not None else grad.detach().reshape(-1)
                    self._norms[self._layer[id(p)]] += square_sum(source, self.local is not None,
                                                                  self.squares.chunk_numel)
            return
        sends: list[list[Transfer]] = [[] for _ in range(self.snap.dp_world)]
        for p, grad in pairs:
            source = self._local_sq(p) if self.local is not None else grad.detach().reshape(-1)
            for piece in self._pieces.get(id(p), ()):
                sends[piece.owner].append(Transfer(source, piece.start, piece.numel,
                                                   self._target[id(p)], piece.dst))
        self.squares.reduce_scatter(sends, squared=self.local is not None, rank=self.snap.dp_rank)

    def layer_square_sums(self) -> Tensor:
        """norms_only: this rank's float64 sum of its local squares per layer ([layer_count]), in
        the scale of ``sum_sq`` before the ranks are summed (``sq_scale`` applies)."""
        return self._norms

    def _local_sq(self, p: Tensor) -> Tensor:
        try:
            return self.local.sum_sq(p).view(-1)
        except KeyError:  # no gradient reached this parameter on this rank
            return torch.zeros(p.numel(), dtype=torch.float32, device=p.device)

    def set_multiplier(self, m: float | Tensor, loss_scale: float = 1.0) -> None:
        """DeepSpeed multiplied the gradient partition by ``m`` = 1 / (loss scale x clip)
        (seam patch 3); ``m`` may be a float64 tensor on the device (it then enters
        ``sq_scale`` there and is read back only when ``clip_scale`` is asked for)."""
        self._multiplier, self._loss_scale = m, loss_scale

    @property
    def clip_scale(self) -> float:
        """The factor clipping multiplied the mean gradient by (1: unclipped)."""
        return float(self._multiplier) * self._loss_scale

    def checking(self) -> bool:
        """Whether this step's squares are checked for NaN/inf: the same on every rank."""
        return not self._consumed and self.vr.wants_moments()

    @property
    def device(self) -> torch.device:
        return self.snap.groups[0].flat.device

    def nonfinite(self) -> Tensor | None:
        """Whether this rank's reduced squares hold a NaN or inf, as a bool tensor on their
        device (nothing is read back: DeepSpeed all-reduces it with its own overflow flag);
        None when there is nothing to check (not a GSNR step, or no squares on this rank)."""
        if self._consumed or not self.vr.wants_moments():
            return None
        # min and max propagate NaN and hold any inf: one pass, no mask (a tenth of isfinite().all())
        ends = [torch.stack(torch.aminmax(b)) for b in self._sq.values() if b.numel()]
        return ~torch.isfinite(torch.cat(ends)).all() if ends else None

    def end_step(self) -> None:
        """After DeepSpeed's whole optimizer step (all groups, or a skip)."""
        self._consumed = True
        self.squares.release()
        if self.local is not None:
            self.local.reset()

    def extra_bytes(self) -> int:
        """Bytes this adapter keeps between steps on this rank (not counting optimizer state)."""
        own = sum(b.numel() * b.element_size() for b in self._sq.values())
        if self.local is not None:
            own += sum(p.numel() * 4 for p in self.local.params)
        return own

    # ---- MomentSource ------------------------------------------------------------------

    @property
    def group_count(self) -> int:
        return self.snap.dp_world * self.accumulation()

    @property
    def sq_scale(self) -> float | Tensor:  # a device tensor once DeepSpeed's multiplier is one
        return self.accumulation() / self.snap.dp_world * self._multiplier**2

    def sum_sq(self, param: Tensor) -> Tensor:
        if self.norms_only:
            raise RuntimeError("ZeroMoments(norms_only=True) keeps per-layer sums only (layer_square_sums)")
        try:
            return self._sq[id(param)]
        except KeyError:
            raise KeyError("ZeroMoments: not a ZeRO fp32 partition") from None

    def reset(self) -> None:
        """The inner optimizer stepped one param group; DeepSpeed steps them one at a time,
        so the buffers are cleared lazily, when the next step's first bucket arrives."""
