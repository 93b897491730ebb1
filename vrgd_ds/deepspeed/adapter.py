"""What vrgd-ds attaches to a DeepSpeed engine once its route is decided.

:func:`attach_to_engine` runs right after DeepSpeed built the optimizer wrapper (seam patch
1): it decides the route (:mod:`.routes`), gives the optimizer its layer layout and moment
source, and attaches the two adapters the seam's patches call:

- :class:`ZeroAdapter` on a ZeRO-1/2 optimizer: squares beside the gradient buckets, the
  measured gradient multiplier, the whole-step non-finite decision.
- :class:`EngineAdapter` on the engine: stage-0 squares and clip factor, telemetry after
  each step, refusal of contexts that change what a gradient group is.
"""

from __future__ import annotations

import warnings

import torch.distributed as dist

from ..optim.base import BaseOptimizer
from ..optim.vr import GSNRTransform
from . import routes, seam
from .stage0_moments import Stage0Moments
from .telemetry import TelemetryWriter
from .zero_layout import ZeroLayout
from .zero_moments import ZeroMoments


class ZeroAdapter:
    def __init__(self, optimizer, moments: ZeroMoments | None):
        self.optimizer = optimizer
        self.moments = moments

    def before_bucket_reduce(self, pairs) -> None:
        if self.moments is not None:
            self.moments.add_buckets(pairs)

    def gradient_multiplier(self, m: float) -> None:
        if self.moments is not None:
            self.moments.set_multiplier(m)

    def local_nonfinite(self) -> bool:
        return self.moments is not None and self.moments.nonfinite()

    def after_step(self, skipped: bool, loss_scaling: bool) -> None:
        if self.moments is None:
            return
        self.moments.end_step()
        if skipped and not loss_scaling:  # a non-finite gradient or square, not an fp16 overflow
            self.optimizer.skip_nonfinite_step("DeepSpeed skipped the whole step, every param group")

    def abandon_step(self) -> None:
        if self.moments is not None:
            self.moments.end_step()


class EngineAdapter:
    def __init__(self, engine, optimizer, route: str, stage0: Stage0Moments | None):
        self.optimizer = optimizer
        self.route = route
        self.stage0 = stage0
        self.telemetry = TelemetryWriter(engine, optimizer)

    def after_gradient_allreduce(self, boundary: bool) -> None:
        if self.stage0 is not None and boundary and self.optimizer.wants_moments():
            self.stage0.allreduce_squares()

    def clip_measured(self, clip) -> None:
        if self.stage0 is None:
            clip()
        else:
            self.stage0.measure_clip(clip)

    def after_engine_step(self) -> None:
        self.telemetry.write()
        if isinstance(self.optimizer, GSNRTransform):  # DeepSpeed counted the skip; now say why
            self.optimizer.raise_pending_nonfinite()

    def refuse_context(self, context: str) -> None:
        kind = "vr" if isinstance(self.optimizer, GSNRTransform) else "layer"
        raise routes.refuse_context(type(self.optimizer).__name__, context, kind)


def attach_to_engine(engine) -> None:
    """Decide the route of an engine whose optimizer is ours and attach the adapters."""
    opt = seam.basic_optimizer(engine)
    if not isinstance(opt, BaseOptimizer):
        return
    facts = seam.engine_facts(engine)
    vr = isinstance(opt, GSNRTransform)
    route = routes.decide(facts, "vr" if vr else "layer")
    if vr:
        opt.defer_nonfinite = True
    stage0 = None
    if facts.wrapper == "zero":
        zero = seam.zero_optimizer(engine)
        snap = seam.snapshot(zero)
        opt.layout = ZeroLayout(snap)
        moments = None
        if vr:
            moments = ZeroMoments(snap, opt, opt.sq_chunk_numel)
            opt.attach_moments(moments)
            seam.force_overflow_check(zero)
        seam.attach(zero, ZeroAdapter(opt, moments))
    elif vr:
        group = seam.data_parallel_group(engine)
        stage0 = Stage0Moments(seam.engine_module(engine).parameters(), group, dist.get_world_size(group=group),
                               opt.sq_comm_dtype, opt.sq_chunk_numel)
        opt.attach_moments(stage0)
    seam.attach(engine, EngineAdapter(engine, opt, route, stage0))
    advice = routes.group_count_advice(facts) if vr else None
    if advice and dist.get_rank() == 0:
        warnings.warn(advice, stacklevel=2)
