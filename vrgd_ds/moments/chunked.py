"""Squared gradients formed and reduced in bounded chunks.

The squares of a gradient bucket are never materialised whole: elements are squared into
one fp32 chunk of at most ``chunk_numel`` elements, the chunk is reduced, and the next
is formed. The extra memory is therefore one chunk (plus its copy in the wire dtype),
whatever DeepSpeed's ``reduce_bucket_size``; the README's memory table states the bound.

Chunk boundaries are a function of the piece lists only, which every rank builds from
the same (rank-independent) bucket contents: every rank issues the same collectives, in
the same order, with the same sizes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

DEFAULT_CHUNK_NUMEL = 1 << 22  # 16 MiB of fp32


def check_chunk_numel(n) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"sq_chunk_numel must be an integer >= 1, got {n!r}")
    return n


@dataclass(frozen=True)
class Transfer:
    """Elements [start, start + numel) of ``source`` (flat), squared unless ``squared``,
    land at [dst, dst + numel) of ``target`` (flat fp32) on the receiving rank."""

    source: Tensor
    start: int
    numel: int
    target: Tensor
    dst: int


class ChunkedSquares:
    def __init__(self, group, chunk_numel: int, comm_dtype: torch.dtype):
        self.group = group
        self.chunk_numel = check_chunk_numel(chunk_numel)
        self.comm_dtype = comm_dtype
        self.comm_bytes = 0  # payload this rank put into square collectives so far
        self.peak_chunk_numel = 0
        self._chunk: Tensor | None = None

    def _buffer(self, numel: int, device) -> Tensor:
        n = min(numel, self.chunk_numel)
        if self._chunk is None or self._chunk.numel() < n or self._chunk.device != torch.device(device):
            self._chunk = torch.empty(n, dtype=torch.float32, device=device)
        self.peak_chunk_numel = max(self.peak_chunk_numel, n)
        return self._chunk

    def release(self) -> None:
        """Drop the cached chunk (it is re-made on the next use)."""
        self._chunk = None

    def _chunks(self, transfers: Sequence[Transfer], squared: bool, finish: Callable) -> None:
        """Fill the chunk from ``transfers`` in order; call ``finish(chunk, placed)`` whenever
        it is full and at the end. ``placed``: (transfer, start in transfer, numel, at)."""
        total = sum(t.numel for t in transfers)
        if total == 0:
            return
        buf = self._buffer(total, transfers[0].source.device)
        at, placed = 0, []
        for t in transfers:
            done = 0
            while done < t.numel:
                n = min(t.numel - done, buf.numel() - at)
                view = buf.narrow(0, at, n)
                src = t.source.narrow(0, t.start + done, n)
                view.copy_(src)
                if not squared:
                    view.square_()
                placed.append((t, done, n, at))
                at, done = at + n, done + n
                if at == buf.numel():
                    finish(buf.narrow(0, 0, at), placed)
                    at, placed = 0, []
        if at:
            finish(buf.narrow(0, 0, at), placed)

    def reduce_to(self, owner: int, transfers: Sequence[Transfer], squared: bool, rank: int) -> None:
        """Sum the squares of ``transfers`` over the group into rank ``owner``'s targets."""
        dst_global = dist.get_global_rank(self.group, owner)

        def finish(chunk: Tensor, placed) -> None:
            msg = chunk if self.comm_dtype == torch.float32 else chunk.to(self.comm_dtype)
            self.comm_bytes += msg.numel() * msg.element_size()
            dist.reduce(msg, dst_global, group=self.group)
            if owner == rank:
                received = msg if msg is chunk else msg.float()
                for t, done, n, at in placed:
                    t.target.narrow(0, t.dst + done, n).add_(received.narrow(0, at, n))

        self._chunks(transfers, squared, finish)

    def allreduce(self, tensors: Sequence[Tensor]) -> None:
        """All-reduce fp32 ``tensors`` in place, a chunk at a time (already squared)."""
        transfers = [Transfer(t.view(-1), 0, t.numel(), t.view(-1), 0) for t in tensors]

        def finish(chunk: Tensor, placed) -> None:
            msg = chunk if self.comm_dtype == torch.float32 else chunk.to(self.comm_dtype)
            self.comm_bytes += msg.numel() * msg.element_size()
            dist.all_reduce(msg, group=self.group)
            received = msg if msg is chunk else msg.float()
            for t, done, n, at in placed:
                t.target.narrow(0, t.dst + done, n).copy_(received.narrow(0, at, n))

        self._chunks(transfers, True, finish)
