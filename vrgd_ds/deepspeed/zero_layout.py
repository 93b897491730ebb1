"""Layer layout of ZeRO stage 1/2 partitions.

Under ZeRO-1/2 the wrapped optimizer sees one flat fp32 partition per param group. The
partition holds consecutive pieces of the group's parameters in DeepSpeed's flattening
order, and a parameter may continue on the next rank (:class:`.seam.GroupPartition` maps
the pieces). Per-layer partial statistics are summed over the data-parallel group with
one all-reduce of a fixed-size [layers, c] table per call, which every rank joins: a rank
whose partition of a group is pure padding holds one empty segment of that group.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from ..optim.layout import LayerLayout, Segment
from .seam import ZeroSnapshot


class ZeroLayout(LayerLayout):
    def __init__(self, snap: ZeroSnapshot):
        self.snap = snap
        self.group = snap.dp_group
        self.layer_count = snap.layer_count
        self._segments = {id(g.flat): g.segments for g in snap.groups}
        self.comm_bytes = 0  # payload of the layer-statistics all-reduces so far

    def segments(self, param: Tensor) -> list[Segment]:
        try:
            return self._segments[id(param)]
        except KeyError:
            raise RuntimeError("ZeroLayout got a tensor that is not one of the ZeRO fp32 "
                               f"partitions (shape {tuple(param.shape)})") from None

    def _summed(self, partial: Tensor, segments: Sequence[Segment]) -> tuple[Tensor, Tensor]:
        index = torch.tensor([s.layer for s in segments], dtype=torch.long, device=partial.device)
        table = torch.zeros(self.layer_count, partial.shape[1], dtype=partial.dtype, device=partial.device)
        table.index_add_(0, index, partial)
        dist.all_reduce(table, group=self.group)
        self.comm_bytes += table.numel() * table.element_size()
        return table, index

    def reduce(self, partial: Tensor, segments: Sequence[Segment]) -> Tensor:
        """One all-reduce of a [layers, c] table, whatever the number of segments."""
        table, index = self._summed(partial, segments)
        return table[index]

    def table(self, partial: Tensor, segments: Sequence[Segment]) -> dict[int, list[float]]:
        """Every layer's row (all ranks' segments summed); layers absent from all are left out.
        The last column must be a count that is positive for present layers."""
        table, _ = self._summed(partial, segments)
        return {i: row for i, row in enumerate(table.tolist()) if row[-1] > 0}
