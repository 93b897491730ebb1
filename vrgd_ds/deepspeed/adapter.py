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
from torch import Tensor

from ..moments.chunked import DEFAULT_CHUNK_NUMEL
from ..noise_scale import NoiseScaleTracker
from ..optim.base import BaseOptimizer
from ..optim.layout import LayerLayout
from ..optim.vr import GSNRTransform
from . import routes, seam
from .measure import CONFIG_KEY, NoiseMeter, noise_config
from .stage0_moments import Stage0Moments
from .telemetry import TelemetryWriter, parameter_names
from .zero_layout import ZeroLayout
from .zero_moments import ZeroMoments


_HOST_GROUPS: dict[tuple[int, ...], object] = {}


def host_group(group):
    """A gloo group over the ranks of ``group`` (``group`` itself where it is gloo), so that a
    few flags can be agreed on without waiting for the device; None where none can be made
    (``group`` is not the whole world: ``new_group`` would need every rank to build every
    such group). Built once per process and set of ranks, on every rank alike."""
    if dist.get_backend(group) == "gloo":
        return group
    ranks = tuple(dist.get_process_group_ranks(group))
    if len(ranks) != dist.get_world_size():
        return None
    if ranks not in _HOST_GROUPS:
        _HOST_GROUPS[ranks] = dist.new_group(list(ranks), backend="gloo")
    return _HOST_GROUPS[ranks]


def _read_flags(differ: Tensor) -> list[int]:
    """The indices set in a CPU tensor of flags (a host read, no wait for the device)."""
    return torch.nonzero(differ).flatten().tolist()


class BucketAgreement:
    """ZeRO-1/2: before DeepSpeed reduces a gradient bucket, every rank checks that all ranks are
    about to reduce the same parameters (and that all are at the end of the backward pass, or
    none is). A parameter with a gradient on some ranks only (a branch or an expert that only
    some ranks' data reach) makes the ranks' buckets differ; DeepSpeed's reductions, and the
    squares exchanged beside them, then fall out of step: an abort, or a hang. Checked, every
    rank raises the same error at the same bucket instead, naming the parameters.

    Cost per bucket: one all-reduce of 2 x (parameters + 1) int32 over a gloo group
    (:func:`host_group`) and a host read of its result: no wait for the device. Where no gloo
    group can be made, the all-reduce runs on ``group`` and the read waits for the device."""

    def __init__(self, params: list[Tensor], names: list[str], group, device, stage: int):
        self.index = {id(p): i for i, p in enumerate(params)}
        self.names = names  # of params
        self.stage = stage
        host = host_group(group)
        self.group, self.device = (host, torch.device("cpu")) if host is not None else (group, device)

    def check(self, params, last: bool) -> None:
        n = len(self.names)
        have = torch.zeros(2 * (n + 1), dtype=torch.int32)
        idx = [self.index[id(p)] for p in params if id(p) in self.index]
        if idx:
            have[torch.tensor(idx)] = 1
        have[n] = int(last)
        have[n + 1:] = -have[:n + 1]
        have = have.to(self.device)
        dist.all_reduce(have, op=dist.ReduceOp.MAX, group=self.group)  # [max, -min] per element
        differ = _read_flags((have[:n + 1] != -have[n + 1:]).cpu())
        if not differ:
            return
        which = [self.names[i] for i in differ if i < n]
        what = (f"{', '.join(which[:8])}{f' and {len(which) - 8} more' if len(which) > 8 else ''} "
                "are in it on some ranks only") if which else \
            "on some ranks the backward pass ends with it, on others more gradients follow"
        raise RuntimeError(
            f"vrgd-ds: the data-parallel ranks are about to reduce different DeepSpeed ZeRO-{self.stage} "
            f"gradient buckets: {what}. ZeRO-1/2 need the same buckets on every rank, or their reductions "
            "fall out of step (an abort or a hang); they differ when a parameter gets a gradient on some "
            "ranks only (a branch or an expert that only some ranks' data reach). Let every rank's backward "
            "pass reach the same parameters (e.g. add 0 * the unused branch's output to the loss), or use "
            "zero_optimization.stage 0, which supports it")


class ZeroAdapter:
    def __init__(self, optimizer, moments: ZeroMoments | None, meter: NoiseMeter | None = None,
                 agreement: BucketAgreement | None = None):
        self.optimizer = optimizer  # the VR optimizer, or None
        self.moments = moments
        self.meter = meter
        self.agreement = agreement  # ZeRO-1/2: the ranks' buckets checked alike (None: ZeRO-3)

    def before_bucket_reduce(self, pairs, last: bool = False) -> None:
        if self.agreement is not None:
            self.agreement.check([p for p, _ in pairs], last)
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

    def refuse_compiled_autograd(self) -> None:
        raise routes.refuse_compiled_autograd(type(self.optimizer).__name__)


_ADVISED: set[str] = set()  # the group-count advice given in this process


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
        agreement = None
        if not seam.is_stage3(engine):
            params = snap.all_params()
            agreement = BucketAgreement(params, parameter_names(engine, params), snap.dp_group,
                                        snap.groups[0].flat.device, facts.stage)
        seam.attach(zero, ZeroAdapter(opt if vr else None, moments, meter, agreement))
    elif vr or measure:
        group = seam.data_parallel_group(engine)
        if measure:
            meter = NoiseMeter(noise["interval"], noise["ema_decay"], LayerLayout())
        stage0 = Stage0Moments(seam.engine_module(engine).parameters(), group, dist.get_world_size(group=group),
                               torch.float32 if measure else opt.sq_comm_dtype,
                               DEFAULT_CHUNK_NUMEL if measure else opt.sq_chunk_numel, facts.micro_batch,
                               norms_only=not vr, accumulation=engine.gradient_accumulation_steps)
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
    if advice and dist.get_rank() == 0 and advice not in _ADVISED:
        # once per process, kept here: Python's own once-per-place registry is cleared when
        # the filters change, as torch.compile does
        _ADVISED.add(advice)
        warnings.warn(advice, stacklevel=2)
