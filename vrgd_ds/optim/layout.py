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


def layer_totals(layout: LayerLayout, segments: Sequence[Segment], *columns: Tensor) -> list[list[float]]:
    """Reduce per-segment partial sums column by column in one call; return Python floats.

    One small collective per call under ZeRO, whatever the number of layers.
    """
    if not segments:
        return [[] for _ in columns]
    partial = torch.stack([c.double() for c in columns], dim=1)
    total = layout.reduce(partial, segments)
    return [col.tolist() for col in total.t()]
