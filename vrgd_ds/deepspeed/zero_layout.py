"""Layer layout of ZeRO stage 1/2 partitions (DeepSpeedZeroOptimizer).

Under ZeRO-1/2 the wrapped optimizer sees one flat fp32 partition per param group. The
partition holds consecutive pieces of the group's parameters in DeepSpeed's flattening
order (``round_robin_bit16_groups`` with ``round_robin_bit16_padding``), and a parameter
may continue on the next rank. This module maps every piece to its parameter ("layer")
and sums per-layer partial statistics over the data-parallel group with one all-reduce.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from ..optim.layout import LayerLayout, Segment


def partition_segments(numels: Sequence[int], paddings: Sequence[int], partition_size: int,
                       partition_id: int, layer_base: int) -> list[Segment]:
    """The pieces of each tensor that fall in [partition_id * size, (partition_id + 1) * size)."""
    start, end = partition_size * partition_id, partition_size * (partition_id + 1)
    segments, cursor = [], 0
    for j, (n, pad) in enumerate(zip(numels, paddings)):
        lo, hi = max(cursor, start), min(cursor + n, end)
        if lo < hi:
            segments.append(Segment(lo - start, hi - lo, layer_base + j, n))
        cursor += n + pad
    return segments


def owner_pieces(numels: Sequence[int], paddings: Sequence[int], partition_size: int,
                 world: int) -> list[list[tuple[int, int, int, int]]]:
    """Per tensor: (owner rank, start in the tensor, start in the owner's partition, numel)
    for each piece, in DeepSpeed's flattening order with its padding."""
    out, cursor = [], 0
    for n, pad in zip(numels, paddings):
        pieces, lo = [], cursor
        while lo < cursor + n:
            owner = lo // partition_size
            hi = min(cursor + n, (owner + 1) * partition_size)
            if owner >= world:
                raise AssertionError("tensor beyond the last ZeRO partition")
            pieces.append((owner, lo - cursor, lo - owner * partition_size, hi - lo))
            lo = hi
        out.append(pieces)
        cursor += n + pad
    return out


class ZeroLayout(LayerLayout):
    def __init__(self, zero_optimizer):
        self.group = zero_optimizer.real_dp_process_group[0]
        self._segments: dict[int, list[Segment]] = {}
        layer_base = 0
        self.layer_base = []
        for i, flat in enumerate(zero_optimizer.single_partition_of_fp32_groups):
            self.layer_base.append(layer_base)
            tensors = zero_optimizer.round_robin_bit16_groups[i]
            paddings = zero_optimizer.round_robin_bit16_padding[i] or [0] * len(tensors)
            pg = zero_optimizer.real_dp_process_group[i]
            self._segments[id(flat)] = partition_segments(
                [t.numel() for t in tensors], paddings, zero_optimizer.partition_size[i],
                dist.get_rank(group=pg), layer_base)
            layer_base += len(tensors)
        self.layer_count = layer_base
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
