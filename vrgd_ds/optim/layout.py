"""How the tensors an optimizer sees map onto model layers.

Outside ZeRO every optimizer parameter is one whole layer (one ``nn.Parameter``). Under
ZeRO an optimizer parameter is a flat fp32 partition holding pieces ("segments") of many
layers, and one layer may continue on another rank. Layer statistics (GSNR mean, LAMB
and LARS norms) are then per-segment partial sums, summed over every segment of the
layer on every rank. A :class:`LayerLayout` answers both questions; the optimizers never
need to know which case they are in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from .flat import to_device


@dataclass(frozen=True)
class Segment:
    """Elements [offset, offset + numel) of a flattened optimizer parameter.

    ``layer`` identifies the model layer the elements belong to (None: the whole
    optimizer parameter is the layer) and ``layer_numel`` is that layer's full size.
    """

    offset: int
    numel: int
    layer: int | None
    layer_numel: int


class LayerLayout:
    """Default layout: each optimizer parameter is a whole layer; no communication."""

    def segments(self, param: Tensor) -> list[Segment]:
        return [Segment(0, param.numel(), None, param.numel())]

    def reduce(self, partial: Tensor, segments: Sequence[Segment]) -> Tensor:
        """Sum ``partial`` ([n_segments, c]) over all segments of the same layer."""
        return partial

    def table(self, partial: Tensor, segments: Sequence[Segment]) -> dict[int, list[float]]:
        """Per layer, ``partial`` summed over all its segments on all ranks, for every layer
        (not only those this rank holds); keys are layer indices. Used by telemetry."""
        return {i: row for i, row in enumerate(partial.tolist())}

    def rows(self, partial: Tensor, segments: Sequence[Segment]) -> tuple[Tensor, list[int]]:
        """Every layer's row of ``partial`` summed over all its segments on all ranks (the same
        rows on every rank; 0 for a layer no rank holds a piece of), and each segment's row.
        A decision every rank must take alike (skip the step, redo a layer in float64) is read
        from all rows, since a rank may hold no piece of the layer it is about."""
        return partial, list(range(len(segments)))


class ReducedLayout(LayerLayout):
    """Layers whose pieces live on several ranks (ZeRO partitions, Megatron's optimizer
    shards): per-layer sums by one all-reduce of a fixed-size [layers, c] table per call,
    which every rank of ``group`` joins whatever it holds. Subclasses map tensors to
    segments."""

    def __init__(self, layer_count: int, group):
        self.layer_count = layer_count
        self.group = group
        self.comm_bytes = 0  # payload of the layer-statistics all-reduces so far

    def _summed(self, partial: Tensor, segments: Sequence[Segment]) -> tuple[Tensor, Tensor]:
        index = to_device(torch.tensor([s.layer for s in segments], dtype=torch.long), partial.device)
        table = torch.zeros(self.layer_count, partial.shape[1], dtype=partial.dtype, device=partial.device)
        table.index_add_(0, index, partial)
        self._all_reduce(table)
        return table, index

    def _all_reduce(self, table: Tensor) -> None:
        """Sum the [layers, c] table over the ranks that hold pieces of the layers."""
        import torch.distributed as dist

        dist.all_reduce(table, group=self.group)
        self.comm_bytes += table.numel() * table.element_size()

    def reduce(self, partial: Tensor, segments: Sequence[Segment]) -> Tensor:
        table, index = self._summed(partial, segments)
        return table[index]

    def rows(self, partial: Tensor, segments: Sequence[Segment]) -> tuple[Tensor, list[int]]:
        table, _ = self._summed(partial, segments)
        return table, [s.layer for s in segments]

    def table(self, partial: Tensor, segments: Sequence[Segment]) -> dict[int, list[float]]:
        """Every layer's row (all ranks' segments summed); layers absent from all are left out.
        The last column must be a count that is positive for present layers."""
        table, _ = self._summed(partial, segments)
        return {i: row for i, row in enumerate(table.tolist()) if row[-1] > 0}


def segment_views(tensor: Tensor, segments: Sequence[Segment]) -> list[Tensor]:
    """Flat (1-D) views of ``tensor`` (shaped like its parameter), one per segment.

    Views, never copies: the optimizers update state and parameters through them.
    """
    if not tensor.is_contiguous():
        raise ValueError(f"vrgd_ds optimizers need contiguous parameters and state, got a "
                         f"non-contiguous tensor of shape {tuple(tensor.shape)}")
    flat = tensor.view(-1)
    if len(segments) == 1 and segments[0].offset == 0 and segments[0].numel == flat.numel():
        return [flat]
    return [flat.narrow(0, s.offset, s.numel) for s in segments]


def layer_sums(layout: LayerLayout, segments: Sequence[Segment], *columns: Tensor) -> list[Tensor]:
    """Reduce per-segment partial sums column by column in one call; float64 tensors on the
    device, one value per segment (nothing is read back to the host).

    One small collective per call under ZeRO, whatever the number of layers.
    """
    partial = torch.stack([c.double() for c in columns], dim=1)
    return list(layout.reduce(partial, segments).t()) if segments else [c.double() for c in columns]


def layer_rows(layout: LayerLayout, segments: Sequence[Segment],
               *columns: Tensor) -> tuple[list[list[float]], list[int]]:
    """Per column, its totals for every layer (:meth:`LayerLayout.rows`, the same on every
    rank), and each segment's row; the last column should be each segment's element count
    (:func:`segment_counts`), whose totals tell the layers present (count > 0) from those no
    rank holds. One collective and one read back to the host (a device sync)."""
    if not segments:
        return [[] for _ in columns], []
    rows, at = layout.rows(torch.stack([c.double() for c in columns], dim=1), segments)
    return rows.t().tolist(), at


def segment_counts(segments: Sequence[Segment], device) -> Tensor:
    """Each segment's element count as a float64 column for :func:`layer_rows`."""
    return to_device(torch.tensor([float(s.numel) for s in segments], dtype=torch.float64), device)
