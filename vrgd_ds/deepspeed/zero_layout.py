"""Layer layout of ZeRO stage 1/2/3 partitions.

Under ZeRO-1/2 the wrapped optimizer sees one flat fp32 partition per param group. The
partition holds consecutive pieces of the group's parameters in DeepSpeed's flattening
order, and a parameter may continue on the next rank (:class:`.seam.GroupPartition` maps
the pieces). Under ZeRO-3 it sees one per sub-group, holding this rank's piece of every
parameter of the sub-group (:class:`.seam.SubGroupPartition`). Per-layer partial statistics are summed over the data-parallel group with
one all-reduce of a fixed-size [layers, c] table per call, which every rank joins: a rank
whose partition of a group is pure padding holds one empty segment of that group.
"""

from __future__ import annotations

from torch import Tensor

from ..optim.layout import ReducedLayout, Segment
from .seam import ZeroSnapshot


class ZeroLayout(ReducedLayout):
    def __init__(self, snap: ZeroSnapshot):
        super().__init__(snap.layer_count, snap.dp_group)
        self.snap = snap
        self._segments = {id(g.flat): g.segments for g in snap.groups}

    def segments(self, param: Tensor) -> list[Segment]:
        try:
            return self._segments[id(param)]
        except KeyError:
            raise RuntimeError("ZeroLayout got a tensor that is not one of the ZeRO fp32 "
                               f"partitions (shape {tuple(param.shape)})") from None
