"""Flat kernels: one pass over a flat buffer, with per-segment (per-layer) sums in the same pass.

A param group's tensors are flat 1-D buffers (a ZeRO partition already is one; outside
ZeRO see :mod:`.flat_group`) and :class:`~.layout.Segment`-like ``(offset, numel)`` pairs
say which elements belong to which layer. A *pass* is a plain function of per-element
tensors and per-segment scalars, ``fn(spec, x, s, c) -> (new values, terms)``: ``x`` maps
names to element tensors, ``s`` holds one row of per-segment scalars per element row,
``c`` the pass constants, ``terms`` are per-element values whose per-segment sums the pass
returns. The math lives in those functions (:mod:`vrgd_ds.gsnr`, :mod:`.lamb`, ...);
this module only decides where they run. :func:`run_pass` evaluates a pass

- over the bulk of the buffer as ``[rows, ROW]`` blocks in which every row lies inside one
  segment, so per-segment scalars are per row and the per-segment sums are row sums added
  up per segment in float64: one compiled kernel and one pass over memory, whatever the
  number of layers;
- over the few *edge* elements (rows that straddle a segment boundary, and the tail of
  each run of adjacent segments) gathered with per-element scalars and scattered back.

Both evaluate the same function on the same values, and elements outside every segment
(ZeRO padding, parameters without a gradient) are never written. The row kernel is
compiled with ``torch.compile`` (one compile per pass function, dynamic row count, cached
on disk by Inductor); where compilation fails it runs eagerly on row chunks after one
warning.
"""

from __future__ import annotations

import inspect
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from ..gsnr import WIDE_CHUNK  # the float64 path's chunk (run_on_segments)

ROW = 1024  # elements per row of the bulk kernel: long rows vectorise and leave few row sums,
# short ones leave few edge elements (at most one row per segment boundary)
EAGER_ROWS = 1024  # rows per eager chunk: bounds the temporaries of the uncompiled fallback
COMPILE_MIN = 1 << 18  # compile=None compiles only buffers this large: below, compiling costs more than it saves


@dataclass(frozen=True)
class Spec:
    """The static part of a pass: names of its per-segment scalar columns and constants, and
    flags its function branches on (each distinct Spec is its own compiled kernel)."""

    cols: tuple[str, ...]
    consts: tuple[str, ...]
    flags: tuple = ()

    def s(self, s: Tensor, name: str) -> Tensor:
        i = self.cols.index(name)
        return s[:, i:i + 1]

    def c(self, c: Tensor, name: str) -> Tensor:
        return c[self.consts.index(name)]

    def has(self, flag) -> bool:
        return flag in self.flags


class SegmentSum:
    """Adds per-element (or per-row) values into per-segment totals in a fixed order, so that a
    resumed run repeats a run bit for bit: ``index_add_`` on the CPU (serial), elsewhere a sort
    and ``segment_reduce`` (CUDA's ``index_add_`` adds atomically, in no fixed order)."""

    def __init__(self, seg: Tensor, count: int):
        self.seg = seg
        ordered = bool((seg[1:] >= seg[:-1]).all()) if seg.numel() > 1 else True
        self.order = None if ordered else torch.argsort(seg, stable=True)
        self.lengths = torch.bincount(seg, minlength=count + 1)

    def add_to(self, total: Tensor, values: Tensor) -> None:
        if values.device.type == "cpu":  # serial on the CPU: already in a fixed order
            total.index_add_(0, self.seg, values)
            return
        if self.order is not None:
            values = values[self.order]
        # unsafe: the lengths were made from seg here; the check would read them back to the host
        total += torch.segment_reduce(values, "sum", lengths=self.lengths, axis=0, unsafe=True)


@dataclass(frozen=True)
class Block:
    start: int
    rows: int
    row_seg: Tensor  # int64 [rows]: the segment of each row
    row_ok: Tensor  # bool [rows, 1]: the whole row lies inside that segment
    sums: SegmentSum


class FlatPlan:
    """Blocks and edge elements of one flat buffer for a list of ``(offset, numel)`` segments."""

    def __init__(self, segments: Sequence[tuple[int, int]], device, row: int | None = None):
        self.segments = list(segments)
        self.count = len(self.segments)
        self.device = torch.device(device)
        self.row = ROW if row is None else row
        self.blocks: list[Block] = []
        edges: list[Tensor] = []
        order = sorted((i for i, (_, n) in enumerate(self.segments) if n > 0), key=lambda i: self.segments[i][0])
        run: list[int] = []
        for i in order:
            off, n = self.segments[i]
            end = self.segments[run[-1]][0] + self.segments[run[-1]][1] if run else off
            if off < end:
                raise ValueError(f"segments overlap at element {off}")
            if off != end:
                edges.append(self._close(run))
                run = []
            run.append(i)
        if run:
            edges.append(self._close(run))
        idx = torch.cat(edges) if edges else torch.zeros(0, dtype=torch.long)
        self.edge_idx = idx.to(self.device)
        self.edge_seg = self.segment_of(idx).to(self.device)
        self.edge_sums = SegmentSum(self.edge_seg, self.count)
        self.numel = sum(n for _, n in self.segments)

    def segment_of(self, idx: Tensor) -> Tensor:
        """Segment index (into ``segments``) of each flat element index in ``idx``."""
        live = [i for i, (_, n) in enumerate(self.segments) if n > 0]
        live.sort(key=lambda i: self.segments[i][0])
        starts = torch.tensor([self.segments[i][0] for i in live], dtype=torch.long)
        ids = torch.tensor(live, dtype=torch.long)
        return ids[torch.searchsorted(starts, idx, right=True) - 1] if len(live) else idx

    def _close(self, run: list[int]) -> Tensor:
        """Add the block of one run of adjacent segments; return its edge element indices."""
        start = self.segments[run[0]][0]
        stop = self.segments[run[-1]][0] + self.segments[run[-1]][1]
        rows = (stop - start) // self.row
        if rows < 2:  # too small for a block: all of it is edge
            return torch.arange(start, stop, dtype=torch.long)
        first = start + torch.arange(rows, dtype=torch.long) * self.row
        seg_first, seg_last = self.segment_of(first), self.segment_of(first + self.row - 1)
        ok = seg_first == seg_last
        seg_first = seg_first.to(self.device)
        self.blocks.append(Block(start, rows, seg_first, ok.view(-1, 1).to(self.device),
                                 SegmentSum(seg_first, self.count)))
        straddling = first[~ok].view(-1, 1) + torch.arange(self.row, dtype=torch.long)
        tail = torch.arange(start + rows * self.row, stop, dtype=torch.long)
        return torch.cat([straddling.view(-1), tail])


def to_device(host: Tensor, device) -> Tensor:
    """A tensor made on the host, on ``device`` without waiting for it: a blocking copy from
    pageable memory makes the host wait until the device has finished all queued work (one
    stream synchronisation per small table, each step). To CUDA it goes through pinned memory
    and a queued copy; torch's caching host allocator keeps the pinned block until the copy ran."""
    device = torch.device(device)
    if device.type == "cpu":
        return host
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def segment_table(spec: Spec, values: dict[str, Sequence[float] | Tensor], count: int, device,
                  dtype=torch.float32) -> Tensor:
    """[count + 1, len(spec.cols)] per-segment scalars in ``spec.cols`` order (a spare last row
    keeps the table's size dynamic in the compiled kernel even for one segment). A column is a
    sequence of Python floats or a 1-D tensor on ``device`` (per-layer statistics that stay on
    the device: LAMB's trust ratios); both are rounded once, from float64, to ``dtype``."""
    table = torch.ones(count + 1, len(spec.cols), dtype=torch.float64)
    on_device = {}
    for j, name in enumerate(spec.cols):
        col = values.get(name)  # "ok" (1: the kernel updates the segment) defaults to all ones
        if isinstance(col, Tensor):
            on_device[j] = col
        elif col is not None:
            table[:count, j] = torch.tensor(list(col), dtype=torch.float64)
    table = to_device(table, device)
    for j, col in on_device.items():
        table[:count, j] = col
    return table.to(dtype)


def constants(spec: Spec, values: dict[str, float | Tensor], device) -> Tensor:
    """The pass constants in ``spec.consts`` order, float32. A value may be a 0-d tensor on
    ``device`` (a moment source's ``sq_scale`` after clipping): it is rounded there, once,
    from float64, like a Python float is here."""
    vals = [values[name] for name in spec.consts]
    c = to_device(torch.tensor([0.0 if isinstance(v, Tensor) else float(v) for v in vals], dtype=torch.float32),
                  device)
    for i, v in enumerate(vals):
        if isinstance(v, Tensor):
            c[i] = v
    return c


# ---- the two evaluators ---------------------------------------------------------------


def _block_kernel(fn: Callable, spec: Spec, x: dict, writes: tuple, outs: dict, table: Tensor,
                  row_seg: Tensor, row_ok: Tensor, c: Tensor) -> Tensor | None:
    """A block: rows of one segment each; row sums of the terms ([rows, n_terms] float64).
    Rows that are not inside one segment (or whose segment is switched off) keep their
    values; the edge pass writes them."""
    s = table[row_seg]
    ok = row_ok & (s[:, :1] > 0)
    new, terms = fn(spec, x, s, c)
    sums = torch.stack([torch.where(ok, t, 0.0).sum(1) for t in terms], 1).double() if terms else None
    for k in writes:  # after the sums: a term may be an input that is written
        x[k].copy_(torch.where(ok, new[k], x[k]))
    for k, t in outs.items():
        t.copy_(new[k])
    return sums


def _edge_kernel(fn: Callable, spec: Spec, flat: dict, writes: tuple, outs: dict, table: Tensor,
                 idx: Tensor, seg: Tensor, c: Tensor) -> Tensor | None:
    """Gathered elements as a [n, 1] block with per-element scalars, scattered back; the terms
    per element ([n, n_terms] float64)."""
    s = table[seg]
    ok = s[:, :1] > 0
    x = {k: t[idx].unsqueeze(1) for k, t in flat.items()}
    new, terms = fn(spec, x, s, c)
    out = torch.stack([torch.where(ok, t, 0.0).squeeze(1) for t in terms], 1).double() if terms else None
    for k in writes:
        flat[k].index_copy_(0, idx, torch.where(ok, new[k], x[k]).squeeze(1).to(flat[k].dtype))
    for k, t in outs.items():
        t.index_copy_(0, idx, new[k].squeeze(1).to(t.dtype))
    return out


_COMPILED: dict[Callable, Callable] = {}
_FAILED: set[str] = set()  # device types where compilation failed once (warned)
# One graph per pass function and spec: more than dynamo's default of 8 per code object. Where
# torch.compile takes a limit per compiled region it goes there; older torch gets the global
# limit patched around each call (about 35 us a call on this CPU, 6 calls per VR-LAMB step).
RECOMPILE_LIMIT = 64
_REGION_LIMIT = "recompile_limit" in inspect.signature(torch.compile).parameters


_LOG: list[dict] | None = None  # set by record_passes()
_SYNC = False  # record_passes(sync=True) on a machine with CUDA


@contextmanager
def record_passes(sync: bool = False):
    """Within the block, every flat pass and every gather into a flat buffer appends a dict to
    the yielded list: ``kind`` ("block", "edge" or "gather"), ``fn`` (the pass function or the
    gathered buffer's name), ``flags``, ``elements``, ``reads`` and ``writes`` (arrays of that
    many elements read, and written), ``arrays`` (distinct arrays: one read and written back in
    place counts once) and ``seconds`` (host clock). What ``benchmarks.optim_step`` reports as
    time per array. On CUDA a pass returns before its kernels ran: there the times mean
    something only with ``sync`` True, which waits for the device before each pass starts and
    ends (so a step recorded that way loses its overlap of host and device work)."""
    global _LOG, _SYNC
    outer, _LOG = (_LOG, _SYNC), []
    _SYNC = sync and torch.cuda.is_available()
    try:
        yield _LOG
    finally:
        _LOG, _SYNC = outer


def recording() -> bool:
    """Whether a :func:`record_passes` block is active."""
    return _LOG is not None


def pass_clock() -> float:
    """The host clock for a recorded pass; under ``record_passes(sync=True)`` read once the
    device has finished its queued work."""
    if _SYNC:
        torch.cuda.synchronize()
    return time.perf_counter()


def log_pass(kind: str, fn: str, flags: tuple, elements: int, reads: int, writes: int, arrays: int,
             seconds: float) -> None:
    if _LOG is not None:
        _LOG.append(dict(kind=kind, fn=fn, flags=list(flags), elements=elements, reads=reads, writes=writes,
                         arrays=arrays, seconds=seconds))


def _log_kernel(kind: str, fn: Callable, spec: Spec, elements: int, flat: dict, writes: tuple, outs: dict,
                t0: float) -> None:
    log_pass(kind, fn.__name__, spec.flags, elements, len(flat), len(writes) + len(outs), len(flat) + len(outs),
             pass_clock() - t0)


def _recompile_limit() -> int:
    return max(RECOMPILE_LIMIT, torch._dynamo.config.recompile_limit)


def _eager_block(fn, spec, x, writes, outs, table, row_seg, row_ok, c) -> Tensor | None:
    """The block kernel uncompiled, a chunk of rows at a time (bounded temporaries)."""
    rows, parts = row_seg.numel(), []
    for a in range(0, rows, EAGER_ROWS):
        n = min(EAGER_ROWS, rows - a)
        parts.append(_block_kernel(fn, spec, {k: t.narrow(0, a, n) for k, t in x.items()}, writes,
                                   {k: t.narrow(0, a, n) for k, t in outs.items()}, table,
                                   row_seg.narrow(0, a, n), row_ok.narrow(0, a, n), c))
    return torch.cat(parts) if parts[0] is not None else None


def _run(kernel: Callable, eager: Callable, compile: bool | None, device: str, args: tuple, dynamic: list[Tensor]):
    """``kernel(*args)`` compiled (``compile`` None: falling back to ``eager`` with one warning
    where compilation fails; True: errors raise; False: ``eager`` always)."""
    if compile is False or (compile is None and device in _FAILED) or torch.compiler.is_compiling():
        return eager(*args)
    if kernel not in _COMPILED:
        _COMPILED[kernel] = torch.compile(kernel, dynamic=False, fullgraph=True,
                                          **({"recompile_limit": _recompile_limit()} if _REGION_LIMIT else {}))
    for t in dynamic:  # sizes vary by group and model: compile once for all
        torch._dynamo.maybe_mark_dynamic(t, 0)
    try:
        if _REGION_LIMIT:
            return _COMPILED[kernel](*args)
        with torch._dynamo.config.patch(recompile_limit=_recompile_limit()):
            return _COMPILED[kernel](*args)
    except Exception as e:  # no C++ compiler, unsupported platform...: the same math, eagerly
        if compile is True:
            raise
        _FAILED.add(device)
        first = str(e).splitlines()[0] if str(e) else ""
        warnings.warn(f"vrgd_ds: torch.compile of the flat optimizer kernels failed on {device} "
                      f"({type(e).__name__}: {first}); running them eagerly from now on (same results, "
                      "slower). Pass compile=False to skip the attempt.", RuntimeWarning, stacklevel=5)
        return eager(*args)


def run_pass(fn: Callable, spec: Spec, plan: FlatPlan, flat: dict[str, Tensor], writes: Sequence[str] = (),
             outs: dict[str, Tensor] | None = None, table: Tensor | None = None, c: Tensor | None = None,
             compile: bool | None = None, n_terms: int = 0) -> Tensor | None:
    """Evaluate ``fn`` over every segment of ``plan``; return the per-segment sums of its terms
    ([segments, n_terms] float64), or None without terms.

    ``flat``: the 1-D tensors ``fn`` reads, those named in ``writes`` are updated in place;
    ``outs``: 1-D tensors ``fn`` only writes (same names in its result)."""
    writes, outs = tuple(writes), outs or {}
    device = plan.device
    if compile is None and plan.numel < COMPILE_MIN:
        compile = False
    total = torch.zeros(plan.count + 1, n_terms, dtype=torch.float64, device=device)
    log = recording()
    for b in plan.blocks:
        n = b.rows * plan.row
        x = {k: t.narrow(0, b.start, n).view(b.rows, plan.row) for k, t in flat.items()}
        o = {k: t.narrow(0, b.start, n).view(b.rows, plan.row) for k, t in outs.items()}
        args = (fn, spec, x, writes, o, table, b.row_seg, b.row_ok, c)
        t0 = pass_clock() if log else 0.0
        sums = _run(_block_kernel, _eager_block, compile, device.type, args,
                    [*x.values(), *o.values(), table, b.row_seg, b.row_ok])
        if log:
            _log_kernel("block", fn, spec, n, flat, writes, outs, t0)
        if n_terms:
            b.sums.add_to(total, sums)
    if plan.edge_idx.numel():
        args = (fn, spec, flat, writes, outs, table, plan.edge_idx, plan.edge_seg, c)
        t0 = pass_clock() if log else 0.0
        terms = _run(_edge_kernel, _edge_kernel, compile, device.type, args,
                     [*flat.values(), *outs.values(), table, plan.edge_idx, plan.edge_seg])
        if log:
            _log_kernel("edge", fn, spec, plan.edge_idx.numel(), flat, writes, outs, t0)
        if n_terms:
            plan.edge_sums.add_to(total, terms)
    return total[:plan.count] if n_terms else None


def _span_kernel(fn: Callable, spec: Spec, flat: dict, writes: tuple, outs: dict, table: Tensor,
                 start: int, n: int, seg: int, c: Tensor) -> Tensor | None:
    """Elements [start, start + n) of one segment as an [n, 1] block with that segment's
    scalars (views, no gather); the sums of its terms ([1, n_terms] float64)."""
    s = table[seg:seg + 1]
    ok = s[:, :1] > 0
    x = {k: t.narrow(0, start, n).unsqueeze(1) for k, t in flat.items()}
    new, terms = fn(spec, x, s, c)
    sums = torch.stack([torch.where(ok, t, 0.0).sum(dtype=torch.float64) for t in terms]).view(1, -1) \
        if terms else None
    for k in writes:  # after the sums: a term may be an input that is written
        x[k].copy_(torch.where(ok, new[k], x[k]))
    for k, t in outs.items():
        t.narrow(0, start, n).copy_(new[k].squeeze(1))
    return sums


def run_on_segments(fn: Callable, spec: Spec, plan: FlatPlan, seg_ids: Sequence[int], flat: dict[str, Tensor],
                    writes: Sequence[str] = (), outs: dict[str, Tensor] | None = None,
                    table: Tensor | None = None, c: Tensor | None = None, n_terms: int = 0) -> Tensor | None:
    """Like :func:`run_pass`, but only over the elements of ``seg_ids``, eagerly: the rare
    float64 path for layers whose fp32 GSNR overflowed. A segment is contiguous in the flat
    buffer, so it is taken as views, ``WIDE_CHUNK`` elements at a time: the temporaries stay
    bounded whatever the layers' size."""
    total = torch.zeros(plan.count + 1, n_terms, dtype=torch.float64, device=plan.device) if n_terms else None
    for i in seg_ids:
        off, numel = plan.segments[i]
        for a in range(off, off + numel, WIDE_CHUNK):
            sums = _span_kernel(fn, spec, flat, tuple(writes), outs or {}, table, a,
                                min(WIDE_CHUNK, off + numel - a), i, c)
            if n_terms:
                total[i] += sums[0]
    return total[:plan.count] if n_terms else None
