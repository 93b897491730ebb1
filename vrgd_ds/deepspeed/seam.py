"""The one module of vrgd-ds that names DeepSpeed internals.

Everything else in :mod:`vrgd_ds.deepspeed` works on the plain objects built here:

- :class:`EngineFacts`: the settings of an engine, read once after DeepSpeed built its
  optimizer wrapper, that decide the route (:mod:`.routes`).
- :class:`ZeroSnapshot`: the partitioning of a ZeRO-1/2 optimizer (per param group: the
  flat fp32 partition this rank owns, the parameters in DeepSpeed's flattening order with
  their alignment padding, the partition size, rank, world and process group), built once;
  of a ZeRO-3 optimizer, per sub-group (:class:`SubGroupPartition`).
- :class:`CheckpointFiles`: a ZeRO-1/2/3 checkpoint folder read into plain tensors and dicts.

Tested DeepSpeed: exactly the versions in ``TESTED_DEEPSPEED`` (pinned in pyproject.toml);
:func:`self_check` verifies at registration that every method patched below exists, and
:func:`snapshot` that every attribute read exists, naming the missing one.

Patches. Each is installed on the class by :func:`install`, keeps the original as
``__wrapped__``, does nothing unless the instance carries a vrgd-ds adapter
(``_vrgd_adapter``), and is undone by :func:`unregister`:

1. ``DeepSpeedEngine._configure_optimizer`` (runtime/engine.py): before it, the JSON
   ``optimizer.params`` keys are checked and the routes whose wrapper would already step the
   optimizer while being built are refused; after it (the final wrapper exists, whether the
   optimizer came from the config, a client instance or a client callable) the route is
   decided and the adapter attached, or refused with the setting named.
2. ``DeepSpeedZeroOptimizer.reduce_ipg_grads`` (runtime/zero/stage_1_and_2.py): just before
   DeepSpeed reduces the pending buckets, the adapter gets their (param, grad) pairs in the
   order DeepSpeed reduces them (``sort_dtypes`` over the dtype buckets, then bucket order),
   and whether this is the backward pass's last call (the epilogue's, without a dtype), so
   that the ranks can check they reduce the same buckets (:class:`.adapter.BucketAgreement`).
3. ``DeepSpeedZeroOptimizer.unscale_and_clip_grads``: a one-element probe is appended to
   the list DeepSpeed scales, so the adapter reads the exact factor DeepSpeed multiplied
   the gradient partition by (loss scale and clipping), never a re-derived formula.
4. ``DeepSpeedZeroOptimizer.has_overflow_partitioned_grads_serial``: the local overflow
   flag also holds the adapter's (non-finite squared gradients); DeepSpeed all-reduces it
   and skips the whole step, all param groups, before any group is applied.
5. ``DeepSpeedZeroOptimizer.step``: the adapter is told when DeepSpeed's whole step (all
   groups, or an overflow skip) is over, and may raise for a skipped non-finite step.
6. ``DeepSpeedEngine.allreduce_gradients`` (stage 0): the squares are all-reduced right
   after the gradients, at the accumulation boundary.
7. ``DeepSpeedEngine.clip_fp32_gradients`` (stage 0): the clip factor is measured (norm
   before / after).
8. ``DeepSpeedEngine.step``: telemetry is written through the monitor after each step.
9. ``DeepSpeedEngine.coalesce_grad_reduction`` and ``DeepSpeedEngine.no_sync``: refused
   where the adapter says so (they change what a gradient group is).
9a. ``DeepSpeedEngine.compile``: ``compiled_autograd_enabled=True`` is refused (Dynamo would
   trace DeepSpeed's gradient hooks, and the adapter's code in them); ``engine.compile()``
   without it (the module compiled) is exact and passes through.

ZeRO-3, on ``DeepSpeedZeroOptimizer_Stage3`` (runtime/zero/stage3.py):

10. ``__reduce_and_partition_ipg_grads`` (name-mangled): just before DeepSpeed
    reduce-scatters a bucket (every micro-step), the adapter gets its (param, local
    gradient) pairs in ``ds_id`` order; the squares go to the rank that owns each piece.
11. ``unscale_and_clip_grads(sub_group_id, total_norm)``: the sub-group's fp32 partition is
    swapped for a one-element probe whose gradient is 1 for one call, so the adapter reads
    the factor DeepSpeed multiplies by; then the real call.
12. ``_overflow_check_and_loss_scale_update(update_scale=False)`` (the step's first call):
    DeepSpeed checks overflow for fp16 only; for a VR optimizer the adapter's non-finite
    flag is then all-reduced over the data-parallel group (one byte, one read), and a set
    flag skips the whole step, every sub-group, as DeepSpeed's own overflow does.
13. ``step``: as patch 5. DeepSpeed steps the inner optimizer once per sub-group (a param
    group has several under a small ``sub_group_size``), as ZeRO-1/2 step it once per
    param group. After the step (taken, skipped or raised) the gradient partitions
    (``grad_partitions_flat_buffer``) are zeroed. DeepSpeed copies a parameter's reduced
    gradient into its partition on a step's first micro-step, adds on later ones, and
    never clears the partition: a parameter with no gradient on the first micro-step (a
    branch not taken, an expert no token chose) would add onto, or keep, the previous
    step's gradient. Zeroed, a micro-step without a gradient counts as a zero gradient, as
    on ZeRO-0/1/2 and in the reference. DeepSpeed 0.19's own optimizers at ZeRO-3 keep the
    stale gradient (AdamW off by 4.5e-2 on the tests' gated model).

Instance attribute written: ``DeepSpeedZeroOptimizer.check_grad_overflow = True`` for the
VR optimizers (DeepSpeed checks overflow only for fp16 by default), so a non-finite step
is skipped or raised as a whole.

Collective order. Every collective vrgd-ds issues under DeepSpeed is issued on every rank
in the same order with the same sizes: squares follow DeepSpeed's own (rank-independent)
bucket order and are cut into chunks from rank-independent piece lists; the layer
statistics are one all-reduce of a [layers, c] table per call whatever a rank holds (a
rank whose partition of a group is pure padding gets one empty segment, so it joins every
call); each call site is reached on every rank because the decisions before it (GSNR
step or not, overflow, telemetry) are functions of rank-independent values.
"""

from __future__ import annotations

import functools
import inspect
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor

from ..optim.layout import Segment

TESTED_DEEPSPEED = ("0.19.8",)
ADAPTER_ATTR = "_vrgd_adapter"

# ---- versions ---------------------------------------------------------------------------


def version_problem(version: str) -> str | None:
    """None if ``version`` is a tested DeepSpeed, else the message that says so."""
    if version in TESTED_DEEPSPEED:
        return None
    return (f"vrgd-ds is tested with DeepSpeed {', '.join(TESTED_DEEPSPEED)} and patches its ZeRO "
            f"internals by version; found DeepSpeed {version}. Install a tested version "
            f"(pip install 'deepspeed=={TESTED_DEEPSPEED[-1]}')")


def _classes():
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    return DeepSpeedEngine, DeepSpeedZeroOptimizer


def _stage3_class():
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

    return DeepSpeedZeroOptimizer_Stage3


def self_check() -> None:
    """Every method the patches wrap must exist (a DeepSpeed refactor fails here, loudly)."""
    engine_cls, zero_cls = _classes()
    for cls, names in ((engine_cls, _ENGINE_PATCHES), (zero_cls, _ZERO_PATCHES), (_stage3_class(), _ZERO3_PATCHES)):
        for name in names:
            if not callable(getattr(cls, name, None)):
                import deepspeed

                raise RuntimeError(f"vrgd-ds: DeepSpeed {deepspeed.__version__} has no {cls.__name__}.{name}; "
                                   f"{version_problem(deepspeed.__version__) or 'this is a bug'}")


# ---- engine facts ------------------------------------------------------------------------


@dataclass(frozen=True)
class EngineFacts:
    """What decides an engine's route, in plain values (see :mod:`.routes`)."""

    optimizer_name: str
    stage: int
    wrapper: str  # "none", "zero", "zero3", "bf16_optimizer", "fp16_unfused", "fp16_fused", other class name
    fp16: bool
    bf16: bool
    grad_accum_dtype: str | None
    autocast_dtype: str | None  # torch_autocast's dtype, None when off
    offload_optimizer: bool
    offload_param: bool
    moe: bool
    pipeline: bool
    tensor_parallel: int
    sequence_parallel: int
    managed_accumulation: bool
    accumulation: int
    dp_world: int
    micro_batch: int
    quantized: bool  # ZeRO++ quantized weights or gradients
    hpz_partition_size: int  # ZeRO++ hierarchical partitioning (1: off)
    zenflow: bool
    deepcompile: bool


def _wrapper_kind(optimizer, basic) -> str:
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    _, zero_cls = _classes()
    if optimizer is basic:
        return "none"
    if type(optimizer) is zero_cls:
        return "zero"
    if isinstance(optimizer, BF16_Optimizer):
        return "bf16_optimizer"
    if isinstance(optimizer, FP16_UnfusedOptimizer):
        return "fp16_unfused"
    if isinstance(optimizer, FP16_Optimizer):
        return "fp16_fused"
    if type(optimizer) is _stage3_class():
        return "zero3"
    return type(optimizer).__name__


def _model_parallel_size(engine) -> int:
    mpu = engine.mpu
    size = int(engine.autotp_size() or 1)
    for getter in ("get_tensor_model_parallel_world_size", "get_model_parallel_world_size"):
        fn = getattr(mpu, getter, None)
        if fn is not None:
            try:
                size = max(size, int(fn()))
            except Exception:  # groups not initialised: no model parallelism
                pass
            break
    return size


def engine_facts(engine) -> EngineFacts:
    import deepspeed

    try:
        _, grad_accum = engine.get_data_types()
        autocast = engine.torch_autocast_dtype() if engine.torch_autocast_enabled() else None
        return EngineFacts(
            optimizer_name=engine.optimizer_name() or type(engine.basic_optimizer).__name__,
            stage=int(engine.zero_optimization_stage()),
            wrapper=_wrapper_kind(engine.optimizer, engine.basic_optimizer),
            fp16=bool(engine.fp16_enabled()), bf16=bool(engine.bfloat16_enabled()),
            grad_accum_dtype=str(grad_accum).replace("torch.", "") if grad_accum is not None else None,
            autocast_dtype=str(autocast).replace("torch.", "") if autocast is not None else None,
            offload_optimizer=bool(engine.zero_cpu_offload()), offload_param=bool(engine.zero_offload_param()),
            moe=bool(engine.has_moe_layers), pipeline=bool(engine.pipeline_parallelism),
            tensor_parallel=_model_parallel_size(engine),
            sequence_parallel=int(getattr(engine, "sequence_parallel_size", 1) or 1),
            managed_accumulation=bool(engine.managed_gradient_accumulation()),
            accumulation=int(engine.gradient_accumulation_steps()),
            dp_world=int(engine.dp_world_size),
            micro_batch=int(engine.train_micro_batch_size_per_gpu()),
            quantized=bool(engine.zero_quantized_weights() or engine.zero_quantized_gradients()),
            hpz_partition_size=int(engine.zero_hpz_partition_size() or 1),
            zenflow=bool(getattr(engine, "zenflow", False)),
            deepcompile=bool(engine.is_deepcompile_enabled()),
        )
    except AttributeError as e:
        raise RuntimeError(f"vrgd-ds: DeepSpeed {deepspeed.__version__} engine lacks an attribute the "
                           f"route check reads ({e}); {version_problem(deepspeed.__version__) or ''}") from e


def precision_before_wrapper(engine) -> tuple[int, str | None]:
    """(ZeRO stage, "fp16" / "bf16" / None) before DeepSpeed builds its optimizer wrapper."""
    low = "fp16" if engine.fp16_enabled() else "bf16" if engine.bfloat16_enabled() else None
    return int(engine.zero_optimization_stage()), low


def vrgd_config(engine, key: str):
    """A vrgd-ds block of the engine's DeepSpeed config (DeepSpeed keeps unknown top-level keys)."""
    return engine._config._param_dict.get(key)


def basic_optimizer(engine):
    return engine.basic_optimizer


def engine_module(engine) -> torch.nn.Module:
    return engine.module


def data_parallel_group(engine):
    return engine.seq_data_parallel_group


def write_monitor(engine, events: list[tuple[str, float, int]]) -> None:
    monitor = getattr(engine, "monitor", None)
    if monitor is not None and monitor.enabled:
        monitor.write_events(events)


def global_steps(engine) -> int:
    return int(engine.global_steps)


# ---- ZeRO partitioning -------------------------------------------------------------------


@dataclass(frozen=True)
class Piece:
    """Elements [start, start + numel) of a parameter live at [dst, dst + numel) of rank
    ``owner``'s flat partition."""

    owner: int
    start: int
    dst: int
    numel: int


@dataclass
class Partition:
    """This rank's flat fp32 partition of a ZeRO param group (stage 1/2) or sub-group
    (stage 3): what the inner optimizer steps. ``pieces`` (per parameter: where each piece
    of it lives, on which rank) and ``segments`` (this rank's layer segments, never empty)
    are made by the subclass from the layout DeepSpeed chose."""

    index: int  # the param group
    flat: Tensor
    params: list[Tensor]  # the model's (bit16) parameters in DeepSpeed's flattening order
    rank: int
    world: int
    process_group: Any
    layer_base: int

    def __post_init__(self):
        self.pieces: list[list[Piece]] = []
        self.segments: list[Segment] = []
        self._map()
        if not self.segments:  # pure padding here: an empty segment keeps every collective joined
            first = self.params[0]  # a ZeRO-3 parameter's numel() is its local size; ds_numel the layer's
            self.segments.append(Segment(0, 0, self.layer_base, int(getattr(first, "ds_numel", first.numel()))))

    def _map(self) -> None:
        raise NotImplementedError


@dataclass
class GroupPartition(Partition):
    """ZeRO-1/2: the group's parameters flattened one after another (each followed by its
    alignment padding) and cut into ``partition_size`` pieces, one per rank; a parameter may
    continue on the next rank."""

    paddings: list[int] = field(default_factory=list)
    partition_size: int = 0

    def _map(self) -> None:
        cursor, size = 0, self.partition_size
        start, end = size * self.rank, size * (self.rank + 1)
        for j, (p, pad) in enumerate(zip(self.params, self.paddings)):
            n, lo, mine = p.numel(), cursor, []
            while lo < cursor + n:
                owner = lo // size
                if owner >= self.world:
                    raise AssertionError("a tensor lies beyond the last ZeRO partition")
                hi = min(cursor + n, (owner + 1) * size)
                mine.append(Piece(owner, lo - cursor, lo - owner * size, hi - lo))
                lo = hi
            self.pieces.append(mine)
            a, b = max(cursor, start), min(cursor + n, end)
            if a < b:
                self.segments.append(Segment(a - start, b - a, self.layer_base + j, n))
            cursor += n + pad


@dataclass
class ZeroSnapshot:
    groups: list[Partition]
    dp_group: Any
    dp_rank: int
    dp_world: int
    accumulation: int
    partition_gradients: bool  # ZeRO-2: gradients are reduced every micro-step
    layer_count: int

    def group_of(self, flat: Tensor) -> Partition:
        for g in self.groups:
            if g.flat is flat:
                return g
        raise KeyError("not one of this ZeRO optimizer's fp32 partitions")

    def all_params(self) -> list[Tensor]:
        return [p for g in self.groups for p in g.params]


def snapshot(zero) -> ZeroSnapshot:
    """The partitioning of a DeepSpeedZeroOptimizer (stage 1 or 2), read once."""
    import deepspeed
    import torch.distributed as dist

    try:
        groups, base = [], 0
        for i, flat in enumerate(zero.single_partition_of_fp32_groups):
            params = list(zero.round_robin_bit16_groups[i])
            paddings = list(zero.round_robin_bit16_padding[i] or [0] * len(params))
            pg = zero.real_dp_process_group[i]
            groups.append(GroupPartition(i, flat, params, dist.get_rank(group=pg), dist.get_world_size(group=pg), pg,
                                         base, paddings=paddings, partition_size=int(zero.partition_size[i])))
            base += len(params)
        return ZeroSnapshot(groups, zero.dp_process_group, dist.get_rank(group=zero.dp_process_group),
                            dist.get_world_size(group=zero.dp_process_group),
                            int(zero.gradient_accumulation_steps), bool(zero.partition_gradients), base)
    except AttributeError as e:
        raise RuntimeError(f"vrgd-ds: DeepSpeed {deepspeed.__version__}'s ZeRO optimizer lacks an attribute "
                           f"the adapter reads ({e}); {version_problem(deepspeed.__version__) or ''}") from e


@dataclass
class SubGroupPartition(Partition):
    """One ZeRO-3 sub-group on this rank. Every parameter is split evenly over the ranks:
    rank r holds elements [r P, (r + 1) P) of it (P = ``partition_numel``, zero-padded past
    the end on the last ranks), and the sub-group's flat fp32 partition is its parameters'
    pieces one after another, at the same offsets on every rank. A param group may have
    several sub-groups."""

    def _map(self) -> None:
        offset = 0
        for j, p in enumerate(self.params):
            size, n = int(p.partition_numel()), int(p.ds_numel)
            pieces = [Piece(r, r * size, offset, min(size, n - r * size)) for r in range(self.world) if r * size < n]
            self.pieces.append(pieces)
            mine = [pc for pc in pieces if pc.owner == self.rank]
            if mine:
                self.segments.append(Segment(offset, mine[0].numel, self.layer_base + j, n))
            offset += size
        if offset != self.flat.numel():
            raise AssertionError(f"ZeRO-3 sub-group of {offset} partition elements has a flat partition of "
                                 f"{self.flat.numel()}")


def snapshot3(zero) -> ZeroSnapshot:
    """The partitioning of a DeepSpeedZeroOptimizer_Stage3, read once: one group per sub-group,
    in DeepSpeed's sub-group order (the order it steps them in)."""
    import deepspeed
    import torch.distributed as dist

    try:
        dp = zero.dp_process_group
        dp_world = dist.get_world_size(group=dp)
        if zero.grad_partitions_flat_buffer is None:  # patch 13 clears it; None only under offload (refused)
            raise NotImplementedError("vrgd-ds: this ZeRO-3 optimizer keeps no gradient partitions "
                                      "(offload); not supported")
        groups, base = [], 0
        for i, flat in enumerate(zero.fp32_partitioned_groups_flat):
            pg = zero._get_sub_group_process_group(i)
            if dist.get_world_size(group=pg) != dp_world:
                raise NotImplementedError(
                    f"vrgd-ds: ZeRO-3 sub-group {i} is partitioned over {dist.get_world_size(group=pg)} ranks, "
                    f"not the {dp_world} data-parallel ranks (MiCS or another partition group); not supported")
            params = list(zero.fp16_groups[i])
            groups.append(SubGroupPartition(int(zero.sub_group_to_group_id[i]), flat, params,
                                            dist.get_rank(group=pg), dp_world, pg, base))
            base += len(params)
        return ZeroSnapshot(groups, dp, dist.get_rank(group=dp), dp_world, int(zero.gradient_accumulation_steps),
                            True, base)
    except AttributeError as e:
        raise RuntimeError(f"vrgd-ds: DeepSpeed {deepspeed.__version__}'s ZeRO-3 optimizer lacks an attribute "
                           f"the adapter reads ({e}); {version_problem(deepspeed.__version__) or ''}") from e


def zero_snapshot(zero) -> ZeroSnapshot:
    return snapshot3(zero) if type(zero) is _stage3_class() else snapshot(zero)


def is_stage3(engine) -> bool:
    return type(engine.optimizer) is _stage3_class()


def full_parameters(engine, params: list[Tensor]):
    """A context in which ``params`` hold their full values, to be overwritten alike on every
    rank. ZeRO-3: DeepSpeed's ``GatheredParameters`` with rank 0 as the modifier (on exit
    rank 0's values are broadcast and partitioned again); other stages: nothing to do."""
    import contextlib

    if not is_stage3(engine):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=0)


def zero_optimizer(engine):
    return engine.optimizer


def inner_optimizer(engine):
    """The optimizer DeepSpeed steps (the basic optimizer, under any wrapper)."""
    return engine.basic_optimizer


def force_overflow_check(zero) -> None:
    zero.check_grad_overflow = True


def attach(obj, adapter) -> None:
    setattr(obj, ADAPTER_ATTR, adapter)


def adapter_of(obj):
    return getattr(obj, ADAPTER_ATTR, None)


def stage0_fp32_clip(engine) -> float:
    return float(engine.gradient_clipping())


def accumulation_of(engine) -> Callable[[], int]:
    """The engine's gradient accumulation steps, read when called (it can change)."""
    return lambda: int(engine.gradient_accumulation_steps())


def is_accumulation_boundary(engine) -> bool:
    return bool(engine.is_gradient_accumulation_boundary())


# ---- patches -----------------------------------------------------------------------------

_ENGINE_PATCHES = ("_configure_optimizer", "allreduce_gradients", "clip_fp32_gradients", "step",
                   "coalesce_grad_reduction", "no_sync", "compile")
_ZERO_PATCHES = ("reduce_ipg_grads", "unscale_and_clip_grads", "has_overflow_partitioned_grads_serial", "step")
_ZERO3_REDUCE = "_DeepSpeedZeroOptimizer_Stage3__reduce_and_partition_ipg_grads"  # name-mangled private method
_ZERO3_PATCHES = (_ZERO3_REDUCE, "unscale_and_clip_grads", "_overflow_check_and_loss_scale_update", "step")
_installed: list[tuple[type, str, Callable]] = []


def _patch(cls, name: str, make: Callable[[Callable], Callable]) -> None:
    original = getattr(cls, name)
    replacement = functools.wraps(original)(make(original))
    replacement.__wrapped__ = original
    setattr(cls, name, replacement)
    _installed.append((cls, name, original))


def _zero_step(original):
    """ZeRO-1/2/3 ``step``: the adapter hears when the whole step (all groups, or a skip) is over."""
    def run(self, *args, **kwargs):
        adapter = adapter_of(self)
        if adapter is None:
            return original(self, *args, **kwargs)
        try:
            out = original(self, *args, **kwargs)
        except BaseException:
            adapter.abandon_step()
            raise
        adapter.after_step(skipped=bool(self.overflow), loss_scaling=bool(self.dynamic_loss_scale))
        return out
    return run


def install(on_configured: Callable, check_config: Callable) -> None:
    """Install the class-level patches (once). ``check_config(engine, client_optimizer)`` runs
    before DeepSpeed builds the optimizer, ``on_configured(engine)`` after the final wrapper exists."""
    if _installed:
        return
    self_check()
    engine_cls, zero_cls = _classes()

    def configure_optimizer(original):
        def run(self, client_optimizer, model_parameters):
            check_config(self, client_optimizer)
            out = original(self, client_optimizer, model_parameters)
            on_configured(self)
            return out
        return run

    def reduce_ipg_grads(original):
        def run(self, comm_dtype=None):
            adapter = adapter_of(self)
            if adapter is not None:
                # comm_dtype None: the call at the end of the backward pass (the epilogue's)
                adapter.before_bucket_reduce(_pending_buckets(self, comm_dtype), last=comm_dtype is None)
            return original(self, comm_dtype)
        return run

    def unscale_and_clip_grads(original):
        def run(self, grad_groups_flat, total_norm):
            adapter = adapter_of(self)
            if adapter is None or not adapter.wants_multiplier:  # plain LAMB/LARS: no read back
                return original(self, grad_groups_flat, total_norm)
            probe = torch.ones(1, dtype=grad_groups_flat[0].dtype, device=grad_groups_flat[0].device)
            out = original(self, [*grad_groups_flat, probe], total_norm)
            # the factor stays on the device (sq_scale there): no read back (loss_scale is a float)
            adapter.gradient_multiplier(probe[0].double(), float(self.loss_scale))
            return out
        return run

    def has_overflow_local(original):
        def run(self):
            flag = original(self)
            adapter = adapter_of(self)
            ours = adapter.local_nonfinite() if adapter is not None else None
            # combined on the device: DeepSpeed all-reduces the flag and reads it once
            return flag if ours is None else flag | ours.to(flag.device)
        return run

    def allreduce_gradients(original):
        def run(self, *args, **kwargs):
            out = original(self, *args, **kwargs)
            adapter = adapter_of(self)
            if adapter is not None:
                adapter.after_gradient_allreduce(is_accumulation_boundary(self))
            return out
        return run

    def clip_fp32_gradients(original):
        def run(self):
            adapter = adapter_of(self)
            if adapter is None:
                return original(self)
            return adapter.clip_measured(lambda: original(self))
        return run

    def engine_step(original):
        def run(self, *args, **kwargs):
            out = original(self, *args, **kwargs)
            adapter = adapter_of(self)
            if adapter is not None:
                adapter.after_engine_step()
            return out
        return run

    def compile_engine(original):
        def run(self, *args, **kwargs):
            adapter = adapter_of(self)
            if adapter is not None:
                call = inspect.signature(original).bind(self, *args, **kwargs)
                if call.arguments.get("compiled_autograd_enabled"):
                    adapter.refuse_compiled_autograd()
            return original(self, *args, **kwargs)
        return run

    def refusing_context(name):
        def make(original):
            def run(self, *args, **kwargs):
                adapter = adapter_of(self)
                if adapter is not None:
                    adapter.refuse_context(name)
                return original(self, *args, **kwargs)
            return run
        return make

    _install_stage3()
    _patch(engine_cls, "_configure_optimizer", configure_optimizer)
    _patch(engine_cls, "allreduce_gradients", allreduce_gradients)
    _patch(engine_cls, "clip_fp32_gradients", clip_fp32_gradients)
    _patch(engine_cls, "step", engine_step)
    _patch(engine_cls, "coalesce_grad_reduction", refusing_context("engine.coalesce_grad_reduction()"))
    _patch(engine_cls, "no_sync", refusing_context("engine.no_sync()"))
    _patch(engine_cls, "compile", compile_engine)
    _patch(zero_cls, "reduce_ipg_grads", reduce_ipg_grads)
    _patch(zero_cls, "unscale_and_clip_grads", unscale_and_clip_grads)
    _patch(zero_cls, "has_overflow_partitioned_grads_serial", has_overflow_local)
    _patch(zero_cls, "step", _zero_step)


def _install_stage3() -> None:
    """Patches 10-13 (ZeRO-3), on ``DeepSpeedZeroOptimizer_Stage3`` (runtime/zero/stage3.py)."""
    cls = _stage3_class()

    def reduce_and_partition(original):
        def run(self, communication_data_type):
            adapter = adapter_of(self)
            if adapter is not None:  # ds_id order: the same on every rank
                params = sorted(self.ipg_buckets[communication_data_type].params, key=lambda p: p.ds_id)
                adapter.before_bucket_reduce([(p, p.grad) for p in params])
            return original(self, communication_data_type)
        return run

    def unscale_and_clip_grads(original):
        def run(self, sub_group_id, total_norm):
            adapter = adapter_of(self)
            if adapter is not None and adapter.wants_multiplier:
                flats = self.fp32_partitioned_groups_flat
                real = flats[sub_group_id]
                probe = torch.zeros(1, dtype=real.dtype, device=real.device)
                probe.grad = torch.ones_like(probe)
                flats[sub_group_id] = probe  # DeepSpeed's own scaling, applied to a one
                try:
                    original(self, sub_group_id, total_norm)
                finally:
                    flats[sub_group_id] = real
                adapter.gradient_multiplier(probe.grad[0].double(), float(self.loss_scale))
            return original(self, sub_group_id, total_norm)
        return run

    def overflow_check(original):
        def run(self, update_scale=True):
            out = original(self, update_scale)
            adapter = adapter_of(self)
            if adapter is None or update_scale or self.overflow:
                return out
            flag = adapter.nonfinite_to_reduce()  # None on every rank alike, or a uint8 on each
            if flag is not None:
                import torch.distributed as dist

                dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.dp_process_group)
                self.overflow = bool(flag.item())
            return self.overflow
        return run

    def step(original):
        inner = _zero_step(original)

        def run(self, *args, **kwargs):
            try:
                return inner(self, *args, **kwargs)
            finally:
                if adapter_of(self) is not None:  # on the current stream: the next reduce waits for it
                    self.grad_partitions_flat_buffer.zero_()
        return run

    _patch(cls, _ZERO3_REDUCE, reduce_and_partition)
    _patch(cls, "unscale_and_clip_grads", unscale_and_clip_grads)
    _patch(cls, "_overflow_check_and_loss_scale_update", overflow_check)
    _patch(cls, "step", step)


def unregister_patches() -> None:
    while _installed:
        cls, name, original = _installed.pop()
        setattr(cls, name, original)


def patched() -> list[str]:
    return [f"{cls.__name__}.{name}" for cls, name, _ in _installed]


def _pending_buckets(zero, comm_dtype) -> list[tuple[Tensor, Tensor]]:
    """(param, local gradient) in the order DeepSpeed's reduce_ipg_grads reduces them."""
    from deepspeed.runtime.torch_autocast import sort_dtypes

    dtypes = [comm_dtype] if comm_dtype is not None else sort_dtypes(zero.ipg_buckets.keys())
    pairs = []
    for dt in dtypes:
        bucket = zero.ipg_buckets[dt]
        for (i, j, _), grad in zip(bucket.params, bucket.grads):
            pairs.append((zero.bit16_groups[i][j], grad))
    return pairs


# ---- registration in torch.optim and ZeRO's list -------------------------------------------


def register_names(names: dict[str, type]) -> None:
    from deepspeed.runtime.zero import utils as zero_utils

    for name, cls in names.items():
        existing = getattr(torch.optim, name, None)
        if existing is not None and existing is not cls:
            raise RuntimeError(f"torch.optim.{name} already exists and is not vrgd_ds's: "
                               "cannot register it for DeepSpeed configs")
        setattr(torch.optim, name, cls)
        if isinstance(cls, type) and cls not in zero_utils.ZERO_SUPPORTED_OPTIMIZERS:
            zero_utils.ZERO_SUPPORTED_OPTIMIZERS.append(cls)


def unregister_names(names: dict[str, type]) -> None:
    from deepspeed.runtime.zero import utils as zero_utils

    for name, cls in names.items():
        if getattr(torch.optim, name, None) is cls:
            delattr(torch.optim, name)
        if cls in zero_utils.ZERO_SUPPORTED_OPTIMIZERS:
            zero_utils.ZERO_SUPPORTED_OPTIMIZERS.remove(cls)


def config_optimizer_params(engine) -> tuple[str | None, dict]:
    return engine.optimizer_name(), dict(engine.optimizer_params() or {})


# ---- checkpoint files ----------------------------------------------------------------------


@dataclass
class ShardGroup:
    fp32: Tensor  # this shard's flat partition, without DeepSpeed's trailing padding
    state: dict  # optimizer state of the flat partition (tensors shaped like fp32, or scalars)
    hyperparameters: dict
    slices: dict[str, tuple[int, int]]  # parameter name -> (start, numel) in fp32


@dataclass
class CheckpointFiles:
    folder: str
    param_shapes: list[dict[str, torch.Size]]  # per group, in flattening order
    module: dict[str, Tensor]  # the module state dict (frozen parameters included)
    shards: list[list[ShardGroup]]  # per rank, per group
    engine: dict


def _torch_load(path):
    # DeepSpeed's own shards are pickles of its classes (loss scaler, fragment addresses):
    # they must come from a trusted source, which the README states.
    return torch.load(path, map_location="cpu", weights_only=False)


def read_zero_checkpoint(folder) -> CheckpointFiles:
    """Read a DeepSpeed ZeRO-1/2/3 checkpoint tag folder of any world size."""
    from pathlib import Path

    folder = Path(folder)
    model_file = folder / "mp_rank_00_model_states.pt"
    # DeepSpeed names the shards bf16_zero_pp_rank_* when bf16 is enabled (any ZeRO stage)
    shards_by_kind: dict[str, dict[int, Path]] = {}
    for path in folder.glob("*zero_pp_rank_*_mp_rank_00_optim_states.pt"):
        m = re.fullmatch(r"(bf16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt", path.name)
        if m:
            shards_by_kind.setdefault(m.group(1) or "", {})[int(m.group(2))] = path
    stage3 = not model_file.exists() and (folder / "zero_pp_rank_0_mp_rank_00_model_states.pt").exists()
    if not (model_file.exists() or stage3) or not shards_by_kind:
        raise FileNotFoundError(
            f"{folder} is not a DeepSpeed ZeRO checkpoint folder: it needs "
            "mp_rank_00_model_states.pt (ZeRO-3: zero_pp_rank_*_mp_rank_00_model_states.pt) and "
            "zero_pp_rank_*_mp_rank_00_optim_states.pt "
            "(bf16_zero_pp_rank_* with bf16) (pass the tag folder, e.g. checkpoints/global_step100)")
    if len(shards_by_kind) > 1:
        raise ValueError(f"{folder} holds both zero_pp_rank_* and bf16_zero_pp_rank_* optimizer shards: "
                         "two runs saved into one tag folder; keep the shards of one run")
    by_rank = next(iter(shards_by_kind.values()))
    if sorted(by_rank) != list(range(len(by_rank))):
        raise ValueError(f"{folder}: optimizer shards of ranks {sorted(by_rank)}; ranks 0..{max(by_rank)} "
                         "are needed (a shard is missing)")
    shard_files = [by_rank[r] for r in range(len(by_rank))]
    optim = [_torch_load(s)["optimizer_state_dict"] for s in shard_files]
    saved_by = optim[0]["partition_count"]
    saved_by = saved_by[0] if isinstance(saved_by, (list, tuple)) else saved_by
    if len(optim) != saved_by:
        raise ValueError(f"{folder}: {len(optim)} optimizer shards but the checkpoint was saved by "
                         f"{saved_by} ranks")
    if stage3:
        return _read_zero3(folder, optim)
    model_states = _torch_load(model_file)
    shapes = model_states["param_shapes"]
    shards = []
    for sd in optim:
        base = sd["base_optimizer_state"]
        if isinstance(base, dict):  # torch state_dict: states keyed by group index
            states = [base["state"].get(i, {}) for i in range(len(shapes))]
            hyper = [{k: v for k, v in g.items() if k != "params"} for g in base["param_groups"]]
        else:  # elastic_checkpoint: a list of per-group states, no param groups
            states, hyper = list(base), [{} for _ in shapes]
        shards.append([
            ShardGroup(sd["single_partition_of_fp32_groups"][i], states[i], hyper[i],
                       {n: (int(f.start), int(f.numel)) for n, f in sd["param_slice_mappings"][i].items()})
            for i in range(len(shapes))])
    return CheckpointFiles(str(folder), [dict(s) for s in shapes], dict(model_states.get("module") or {}),
                           shards, _engine_counters(model_states))


def _engine_counters(model_states: dict) -> dict:
    return {k: model_states.get(k) for k in ("global_steps", "global_samples", "skipped_steps", "lr_scheduler")}


def _read_zero3(folder, optim: list[dict]) -> CheckpointFiles:
    """A ZeRO-3 tag folder: per rank its model states (frozen parameter fragments) and its
    optimizer shard (one fp32 flat partition and one optimizer state per sub-group). Rank r
    holds elements [r P, (r + 1) P) of every parameter (P = ceil(numel / ranks)), so each
    sub-group is read as a group whose slices are these pieces, in rank order."""
    world = len(optim)
    states = []
    for r in range(world):
        path = folder / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt"
        if not path.exists():
            raise ValueError(f"{folder}: ZeRO-3 model states of rank {r} are missing ({path.name})")
        states.append(_torch_load(path))
    shapes = states[0]["param_shapes"]
    shards = []
    for r, sd in enumerate(optim):
        base, flats = sd["optimizer_state_dict"], sd["fp32_flat_groups"]
        hyper = {}  # state index (= sub-group, DeepSpeed adds them in order) -> its group's hyperparameters
        for g in base["param_groups"]:
            hyper.update({i: {k: v for k, v in g.items() if k != "params"} for i in g["params"]})
        groups = []
        for i, group_shapes in enumerate(shapes):
            slices, offset = {}, 0
            for name, shape in group_shapes.items():
                n = int(torch.Size(shape).numel())
                size = -(-n // world)
                slices[name] = (offset, max(0, min(size, n - r * size)))
                offset += size
            if flats[i].numel() != offset:
                raise ValueError(f"{folder}: rank {r}'s ZeRO-3 sub-group {i} holds {flats[i].numel()} elements, "
                                 f"its parameters' pieces {offset}; not a checkpoint of {world} ranks")
            groups.append(ShardGroup(flats[i], base["state"].get(i, {}), hyper.get(i, {}), slices))
        shards.append(groups)
    module = dict(states[0].get("module") or {})
    for name, shape in (states[0].get("frozen_param_shapes") or {}).items():  # partitioned like the rest
        pieces = [s["frozen_param_fragments"][name].reshape(-1) for s in states]
        module[name] = torch.cat(pieces).narrow(0, 0, torch.Size(shape).numel()).view(shape).clone()
    return CheckpointFiles(str(folder), [dict(s) for s in shapes], module, shards, _engine_counters(states[0]))


def restore_engine_counters(engine, saved: dict) -> None:
    engine.global_steps = saved.get("global_steps") or 0
    engine.global_samples = saved.get("global_samples") or 0
    engine.skipped_steps = saved.get("skipped_steps") or 0
    if engine.lr_scheduler is not None and saved.get("lr_scheduler") is not None:
        engine.lr_scheduler.load_state_dict(saved["lr_scheduler"])

