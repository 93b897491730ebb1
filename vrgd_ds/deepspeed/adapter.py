"""What vrgd-ds attaches to a DeepSpeed engine once its route is decided.

:func:`attach_to_engine` runs right after DeepSpeed built the optimizer wrapper (seam patch
1): it decides the route (:mod:`.routes`), gives the optimizer its layer layout and moment
source, and attaches the two adapters the seam's patches call:

- :class:`ZeroAdapter` on a ZeRO-1/2/3 optimizer: squares beside the gradient buckets, the
  measured gradient multiplier, the whole-step non-finite decision.
- :class:`EngineAdapter` on the engine: stage-0 squares and clip factor, telemetry after
  each step, refusal of contexts that change what a gradient group is.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist

from ..moments.chunked import DEFAULT_CHUNK_NUMEL
from ..noise_scale import NoiseScaleTracker
from ..optim.base import BaseOptimizer
from ..optim.layout import LayerLayout
from ..optim.vr import GSNRTransform
from . import routes, seam
from .measure import CONFIG_KEY, NoiseMeter, noise_config
from .stage0_moments import Stage0Moments
from .telemetry import TelemetryWriter
from .zero_layout import ZeroLayout
from .zero_moments import ZeroMoments


class ZeroAdapter:
    def __init__(self, optimizer, moments: ZeroMoments | None, meter: NoiseMeter | None = None):
        self.optimizer = optimizer  # the VR optimizer, or None
        self.moments = moments
        self.meter = meter

    def before_bucket_reduce(self, pairs) -> None:
        if self.moments is not None:
            self.moments.add_buckets(pairs)

    def gradient_multiplier(self, m, loss_scale: float) -> None:  # m: a float or a device tensor
        if self.moments is not None:
            self.moments.set_multiplier(m, loss_scale)

    def local_nonfinite(self):  # measure-only never changes what DeepSpeed decides
        """A device bool tensor: this rank's squares hold a NaN or inf; None: nothing to check."""
        return None if self.optimizer is None else self.moments.nonfinite()

    def nonfinite_to_reduce(self):
        """ZeRO-3: this rank's non-finite flag as a uint8 tensor to all-reduce, or None on every
        rank alike when the step has no squares to check (measure-only, not a GSNR step)."""
        if self.optimizer is None or not self.moments.checking():
            return None
        flag = self.moments.nonfinite()
        device = self.moments.device
        return (flag if flag is not None else torch.zeros((), dtype=torch.bool)).to(device=device, dtype=torch.uint8)

    @property
    def wants_multiplier(self) -> bool:
        """Whether the factor DeepSpeed multiplies the gradients by is needed (VR, measure-only)."""
        return self.moments is not None

    def after_step(self, skipped: bool, loss_scaling: bool) -> None:
        if self.moments is None:
            return
        if self.meter is not None:
            self.meter.finish_step(applied=not skipped)
        self.moments.end_step()
        if self.optimizer is not None and skipped and not loss_scaling:  # non-finite, not an fp16 overflow
            self.optimizer.skip_nonfinite_step("DeepSpeed skipped the whole step, every param group")

    def abandon_step(self) -> None:
        if self.moments is not None:
            self.moments.end_step()


class EngineAdapter:
    def __init__(self, engine, optimizer, route: str, stage0: Stage0Moments | None, meter: NoiseMeter | None):
        self.optimizer = optimizer
        self.route = route
        self.stage0 = stage0
        self.meter = meter
        self.telemetry = TelemetryWriter(engine, meter if meter is not None else optimizer)

    def after_gradient_allreduce(self, boundary: bool) -> None:
        measuring = self.meter if self.meter is not None else self.optimizer
        if self.stage0 is not None and boundary and measuring.wants_moments():
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
        kind = "vr" if isinstance(self.optimizer, GSNRTransform) or self.meter is not None else "layer"
        raise routes.refuse_context(type(self.optimizer).__name__, context, kind)


def attach_to_engine(engine) -> None:
    """Decide the route of an engine whose optimizer is ours, or that measures the noise
    scale (:mod:`.measure`), and attach the adapters."""
    opt = seam.basic_optimizer(engine)
    vr = isinstance(opt, GSNRTransform)
    noise = noise_config(seam.vrgd_config(engine, CONFIG_KEY), vr)
    measure = noise is not None and not vr
    if not isinstance(opt, BaseOptimizer) and not measure:
        return
    facts = seam.engine_facts(engine)
    route = routes.decide(facts, "vr" if vr or measure else "layer")
    if vr:
        opt.defer_nonfinite = True
        if noise is not None:
            opt.noise_scale = NoiseScaleTracker(noise["ema_decay"])
    stage0 = meter = None
    if facts.wrapper in ("zero", "zero3"):
        zero = seam.zero_optimizer(engine)
        snap = seam.zero_snapshot(zero)
        layout = ZeroLayout(snap)
        if isinstance(opt, BaseOptimizer):
            opt.layout = layout
        moments = None
        if measure:
            meter = NoiseMeter(noise["interval"], noise["ema_decay"], layout)
        if vr or measure:
            moments = ZeroMoments(snap, meter or opt, opt.sq_chunk_numel if vr else DEFAULT_CHUNK_NUMEL,
                                  facts.micro_batch, seam.accumulation_of(engine), norms_only=not vr)
        if vr:
            opt.attach_moments(moments)
            seam.force_overflow_check(zero)  # every step, every rank: no inf/NaN reaches the optimizer
            opt.grads_checked_finite = True  # so a gsnr_interval reuse step skips its own check
        seam.attach(zero, ZeroAdapter(opt if vr else None, moments, meter))
    elif vr or measure:
        group = seam.data_parallel_group(engine)
        if measure:
            meter = NoiseMeter(noise["interval"], noise["ema_decay"], LayerLayout())
        stage0 = Stage0Moments(seam.engine_module(engine).parameters(), group, dist.get_world_size(group=group),
                               torch.float32 if measure else opt.sq_comm_dtype,
                               DEFAULT_CHUNK_NUMEL if measure else opt.sq_chunk_numel, facts.micro_batch,
                               norms_only=not vr)
        stage0.wants = (meter or opt).wants_moments
        if vr:
            opt.attach_moments(stage0)
        else:
            opt.register_step_post_hook(lambda *_: meter.finish_step(applied=True))
    if meter is not None:
        meter.moments = stage0 if stage0 is not None else moments
        opt.register_step_pre_hook(meter.observe)
    seam.attach(engine, EngineAdapter(engine, opt, route, stage0, meter))
    advice = routes.group_count_advice(facts) if vr or measure else None
    if advice and dist.get_rank() == 0:
        warnings.warn(advice, stacklevel=2)
