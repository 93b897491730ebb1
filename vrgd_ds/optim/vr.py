"""VR optimizers: the GSNR gradient transform in front of a base update.

Each class is ``GSNRTransform`` mixed into a base optimizer; the GSNR math lives in
:mod:`vrgd_ds.gsnr` and nowhere else, the telemetry record in :mod:`.telemetry`. Per
step (docs/algorithm.md sections 1-4):

1. read the mean gradient gbar (``p.grad``) and the mean of squared group gradients
   from the attached moment source (:mod:`vrgd_ds.moments`, or the DeepSpeed adapter);
2. the layer means of r_raw: one flat pass over each group (:mod:`.flat`) and one layer
   reduction for all groups (layers whose fp32 sum overflows are summed again in float64);
3. r = clamp(r_raw / layer mean, gamma, 1), with optional GSNR momentum ``beta3``, and
   g' = phat * gbar in place of the gradient: not a separate pass but a
   :class:`~.base.GradSource` that the base update's first pass evaluates
   (:func:`vrgd_ds.gsnr.scaled_grad`), so VR-LAMB reads and writes each element in three
   passes, LAMB in two.

``gamma = 1`` makes the transform the identity (r = phat = 1 exactly): no moments are
read and no GSNR state is kept, so the base optimizer's trajectory is reproduced bit
for bit.

A non-finite gradient or squared gradient is found from the per-layer GSNR sums the
step computes anyway (no extra pass). ``on_nonfinite="raise"`` (default) raises
``FloatingPointError`` before any state changes; ``"skip"`` skips the whole step,
leaves parameters and all optimizer state untouched and counts it in
``skipped_steps``.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
from torch import Tensor

from .. import gsnr
from ..noise_scale import NoiseScaleTracker
from ..moments.chunked import DEFAULT_CHUNK_NUMEL, check_chunk_numel
from .base import GradSource
from .flat import Spec
from .flat_group import GroupBatch
from .lamb import LAMB
from .lars import LARS
from .layout import layer_totals
from .telemetry import TelemetryRecorder, check_telemetry_interval, telemetry_due
from .torch_bases import AdamUpdate, AdamWUpdate, SGDUpdate

NONFINITE_POLICIES = ("raise", "skip")
SQ_COMM_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class MomentSource(Protocol):
    """Where the second moment comes from (``vrgd_ds.moments`` or the DeepSpeed adapter).

    ``sq_scale * sum_sq(p)`` is the mean over the k groups of the squared group gradient,
    in the same scale as ``p.grad``, which holds the mean gradient.
    """

    group_count: int
    sq_scale: float

    def sum_sq(self, param: Tensor) -> Tensor: ...

    def reset(self) -> None: ...


class GSNRTransform:
    """Mixin: scale the gradient by its clamped, layer-normalised GSNR before the base update."""

    def _init_gsnr(self, moments, on_nonfinite: str, gsnr_interval: int = 1,
                   sq_comm_dtype: str = "fp32", telemetry_interval: int = 0,
                   sq_chunk_numel: int = DEFAULT_CHUNK_NUMEL) -> None:
        if on_nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"on_nonfinite must be one of {NONFINITE_POLICIES}, got {on_nonfinite!r}")
        if isinstance(gsnr_interval, bool) or not isinstance(gsnr_interval, int) or gsnr_interval < 1:
            raise ValueError(f"gsnr_interval must be an integer >= 1, got {gsnr_interval!r}")
        if sq_comm_dtype not in SQ_COMM_DTYPES:
            raise ValueError(f"sq_comm_dtype must be one of {tuple(SQ_COMM_DTYPES)}, got {sq_comm_dtype!r}")
        self.telemetry_interval = check_telemetry_interval(telemetry_interval)
        self.moments = moments
        self.sq_chunk_numel = check_chunk_numel(sq_chunk_numel)
        self.overflow = False  # DeepSpeed's engine reads it: True when the last step was skipped
        self.defer_nonfinite = False
        self.pending_nonfinite: str | None = None
        self.on_nonfinite = on_nonfinite
        self.gsnr_interval = gsnr_interval
        self.sq_comm_dtype = SQ_COMM_DTYPES[sq_comm_dtype]
        self._recorder = TelemetryRecorder()
        self.noise_scale = NoiseScaleTracker()
        self.skipped_steps = 0

    @property
    def telemetry(self) -> dict | None:
        """The latest telemetry record (format: :mod:`.telemetry`), None before the first."""
        return self._recorder.record

    def state_dict(self):
        out = super().state_dict()
        out["noise_scale"] = self.noise_scale.state_dict()  # the EMAs a batch schedule reads
        return out

    def load_state_dict(self, state_dict) -> None:
        state_dict = dict(state_dict)
        noise = state_dict.pop("noise_scale", None)
        super().load_state_dict(state_dict)
        if noise is not None:
            self.noise_scale.load_state_dict(noise)

    def attach_moments(self, moments: MomentSource) -> None:
        self.moments = moments

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        if self.moments is not None:
            self.moments.reset()

    def step(self, closure=None):
        self.overflow = False
        loss = super().step(closure)
        if self.moments is not None:
            self.moments.reset()
        return loss

    # ---- gsnr_interval -----------------------------------------------------------------

    def _steps_taken(self, params) -> int:
        """Applied VR steps so far: the largest count of any parameter in ``params`` (a
        parameter that had no gradient on some step catches up when it is next stepped)."""
        return max((int(self.state[p]["vr_step"]) for p in params if "vr_step" in self.state.get(p, {})),
                   default=0)

    def wants_moments(self) -> bool:
        """Whether the coming step computes the GSNR, so a moment source must reduce the
        squared gradients; with ``gsnr_interval`` N only every N-th step does."""
        params = [p for g in self.param_groups if g["gamma"] < 1.0 for p in g["params"]]
        return self._steps_taken(params) % self.gsnr_interval == 0

    def skip_nonfinite_step(self, where: str) -> None:
        """The step is skipped as a whole because a gradient or squared gradient is not
        finite: count it, or raise for ``on_nonfinite="raise"``. No state has changed.

        With ``defer_nonfinite`` (set by the DeepSpeed adapter) the error is kept in
        ``pending_nonfinite`` instead, so DeepSpeed finishes its step bookkeeping (a skipped
        step, like an fp16 overflow) and the adapter raises it after ``engine.step()``."""
        self.overflow = True
        if self.on_nonfinite == "skip":
            self.skipped_steps += 1
            return
        msg = (f"{type(self).__name__}: non-finite gradient or squared gradient ({where}); no state was "
               "changed. Use on_nonfinite='skip' to skip such steps.")
        if self.defer_nonfinite:
            self.pending_nonfinite = msg
            return
        raise FloatingPointError(msg)

    def raise_pending_nonfinite(self) -> None:
        msg, self.pending_nonfinite = self.pending_nonfinite, None
        if msg is not None:
            raise FloatingPointError(msg)

    def _moment_source(self) -> MomentSource:
        if self.moments is None:
            from ..deepspeed import registration_problem

            problem = registration_problem()
            raise RuntimeError(
                f"{type(self).__name__}.step() needs the second gradient moment: attach a source, "
                "e.g. vrgd_ds.moments.MicroStepMoments(model.parameters()) as moments=..., "
                "or use it through deepspeed.initialize"
                + (f" (not available here: {problem})" if problem else "")
            )
        return self.moments

    def _transform(self, batches: list[GroupBatch]) -> list[GradSource | None] | None:
        groups = self.param_groups
        out = super()._transform(batches)
        active = [i for i, b in enumerate(batches) if b.params and groups[i]["gamma"] < 1.0]
        if not active:
            return out
        stepped = [p for i in active for p in batches[i].params]
        taken = self._steps_taken(stepped)
        if taken % self.gsnr_interval != 0:
            out = self._reuse_ratios(batches, active, out)
        else:
            out = self._compute_ratios(batches, active, out, taken)
        if out is not None:
            for p in stepped:
                self.state[p]["vr_step"] = taken + 1
        return out

    def _compute_ratios(self, batches, active, out, taken):
        """A GSNR step: layer means of r_raw (one flat pass and one layer reduction for all
        groups), then per group the source that scales the gradient inside the base update."""
        src = self._moment_source()
        gsnr.check_group_count(src.group_count)
        sq_of = lambda p: self._sum_sq(src, p)  # noqa: E731
        spec = Spec(("ok",), ("sq_scale",))
        partial = [batches[i].run(gsnr.raw_gsnr_terms, spec,
                                  lambda bs: {"g": bs.grad_flat(), "sq": bs.squares_flat(sq_of)},
                                  consts={"sq_scale": src.sq_scale}, compile=self.param_groups[i]["compile"],
                                  n_terms=1)[:, 0] for i in active]
        segments = [s for i in active for s in batches[i].flat_segments]
        (sums,) = layer_totals(self.layout, segments, torch.cat(partial))
        grads = {i: [v for bs in batches[i].steps for v in bs.segment_views(bs.grad_flat())] for i in active}
        sqs = {i: [v for bs in batches[i].steps for v in bs.segment_views(bs.squares_flat(sq_of))] for i in active}
        overflow = gsnr.overflowed(sums)
        if any(overflow):
            sums = self._wide_sums(active, grads, sqs, src.sq_scale, segments, overflow, sums)
        if not all(math.isfinite(s) for s in sums):
            return self._nonfinite(sums, segments)
        all_means = gsnr.layer_means(sums, [seg.layer_numel for seg in segments])
        if telemetry_due(taken, self.telemetry_interval, self.gsnr_interval):
            views = [(grads[i], sqs[i], self.param_groups[i]["gamma"]) for i in active]
            self._recorder.add(taken + 1, self.layout, src, views, segments, sums, all_means, self.noise_scale)
        at = 0
        for i in active:
            n = len(batches[i].flat_segments)
            out[i] = self._gsnr_source(self.param_groups[i], batches[i], all_means[at:at + n], overflow[at:at + n],
                                       src, sq_of)
            at += n
        return out

    def _gsnr_source(self, group, batch, means, wide, src, sq_of) -> GradSource:
        """r = clamp(r_raw / m, gamma, 1) (r = 1 where m = 0), with GSNR momentum when beta3 > 0
        or when gsnr_interval keeps the ratio for the next steps."""
        beta3 = group["beta3"]
        mode = "mom" if beta3 > 0.0 else "store" if self.gsnr_interval > 1 else "ratio"
        bc3 = [1.0] * len(means)
        if mode != "ratio":
            bc3 = gsnr.bias_corrections(beta3, batch.per_view(self._advance_step(batch.params, "gsnr_step")))

        def tensors(bs):
            if mode == "ratio":
                return {"sq": bs.squares_flat(sq_of)}
            return {"sq": bs.squares_flat(sq_of), "mom": bs.state(self.state, "gsnr_momentum")}

        cols = {**gsnr.ratio_columns(means, group["gamma"]), "bc3": bc3}
        return GradSource(mode, cols, {"sq_scale": src.sq_scale, "b3w": 1.0 - beta3}, tensors,
                          wide if any(wide) else None)

    def _reuse_ratios(self, batches, active, out):
        """A step between GSNR computations: g' = phat_last * gbar, no second moment read.

        The non-finite check stays: one layer-summed |gbar| per tensor (same collective as a
        GSNR step, so every rank skips or raises together)."""
        groups = self.param_groups
        spec = Spec(("ok",), ())
        partial = [batches[i].run(gsnr.abs_grad_terms, spec, lambda bs: {"g": bs.grad_flat()},
                                  compile=groups[i]["compile"], n_terms=1)[:, 0] for i in active]
        segments = [s for i in active for s in batches[i].flat_segments]
        (sums,) = layer_totals(self.layout, segments, torch.cat(partial))
        if not all(math.isfinite(s) for s in sums):
            return self._nonfinite(sums, segments)
        for i in active:
            b, group = batches[i], groups[i]
            missing = [p for p in b.params if "gsnr_momentum" not in self.state[p]]
            if missing:
                raise RuntimeError(
                    f"{type(self).__name__}: a parameter of shape {tuple(missing[0].shape)} has a gradient "
                    "on a step that reuses the GSNR (gsnr_interval > 1) but had none on the last GSNR "
                    "step; with gsnr_interval every parameter must get a gradient on GSNR steps")
            bc3 = gsnr.bias_corrections(group["beta3"], b.per_view(int(self.state[p]["gsnr_step"]) for p in b.params))
            out[i] = GradSource("reuse", {"bc3": bc3}, {}, lambda bs: {"mom": bs.state(self.state, "gsnr_momentum")})
        return out

    def _wide_sums(self, active, grads, sqs, sq_scale, segments, overflow, sums):
        """Layer sums redone in float64 for the layers whose fp32 GSNR sum overflowed."""
        partial = gsnr.wide_partials([g for i in active for g in grads[i]], [q for i in active for q in sqs[i]],
                                     sq_scale, overflow)
        (wide,) = layer_totals(self.layout, segments, partial)
        return [w if o else s for w, o, s in zip(wide, overflow, sums)]

    @staticmethod
    def _sum_sq(src: MomentSource, p: Tensor) -> Tensor:
        sq = src.sum_sq(p)
        if sq.shape != p.shape:
            raise RuntimeError(f"moment source gave sum_sq of shape {tuple(sq.shape)} for a "
                               f"parameter of shape {tuple(p.shape)}")
        return sq

    def _nonfinite(self, sums: list[float], segments) -> None:
        bad = [i for i, s in enumerate(sums) if not math.isfinite(s)]
        self.skip_nonfinite_step(f"in {len(bad)} of {len(sums)} parameter tensors, first: tensor #{bad[0]} "
                                 f"of {segments[bad[0]].layer_numel} elements")
        return None

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        gsnr.check_gamma(group["gamma"])
        gsnr.check_beta3(group["beta3"])


def _vr_defaults(gamma: float, beta3: float) -> dict:
    return dict(gamma=gsnr.check_gamma(gamma), beta3=gsnr.check_beta3(beta3))


class VRSGD(GSNRTransform, SGDUpdate):
    """VR-SGD (paper Algorithm 1): theta -= lr * (g' + wd * theta)."""

    def __init__(self, params, lr=1e-3, weight_decay=0.0, gamma=0.1, beta3=0.0, *,
                 moments=None, on_nonfinite="raise", gsnr_interval=1, sq_comm_dtype="fp32",
                 telemetry_interval=0, sq_chunk_numel=DEFAULT_CHUNK_NUMEL, foreach=None, compile=None):
        super().__init__(params, lr=lr, weight_decay=weight_decay, foreach=foreach, compile=compile,
                         group_defaults=_vr_defaults(gamma, beta3))
        self._init_gsnr(moments, on_nonfinite, gsnr_interval, sq_comm_dtype, telemetry_interval, sq_chunk_numel)


class VRMomentum(GSNRTransform, SGDUpdate):
    """VR-Momentum: torch SGD with momentum (optionally nesterov) on g'."""

    def __init__(self, params, lr=1e-3, momentum=0.9, dampening=0.0, weight_decay=0.0,
                 nesterov=False, gamma=0.1, beta3=0.0, *, moments=None,
                 on_nonfinite="raise", gsnr_interval=1, sq_comm_dtype="fp32", telemetry_interval=0,
                 sq_chunk_numel=DEFAULT_CHUNK_NUMEL, foreach=None, compile=None):
        super().__init__(params, lr=lr, momentum=momentum, dampening=dampening,
                         weight_decay=weight_decay, nesterov=nesterov, foreach=foreach, compile=compile,
                         group_defaults=_vr_defaults(gamma, beta3))
        self._init_gsnr(moments, on_nonfinite, gsnr_interval, sq_comm_dtype, telemetry_interval, sq_chunk_numel)


class VRAdam(GSNRTransform, AdamUpdate):
    """VR-Adam: torch Adam (L2 weight decay) on g'."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 amsgrad=False, gamma=0.1, beta3=0.9, *, moments=None,
                 on_nonfinite="raise", gsnr_interval=1, sq_comm_dtype="fp32", telemetry_interval=0,
                 sq_chunk_numel=DEFAULT_CHUNK_NUMEL, foreach=None, compile=None):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         amsgrad=amsgrad, foreach=foreach, compile=compile, group_defaults=_vr_defaults(gamma, beta3))
        self._init_gsnr(moments, on_nonfinite, gsnr_interval, sq_comm_dtype, telemetry_interval, sq_chunk_numel)


class VRAdamW(GSNRTransform, AdamWUpdate):
    """VR-AdamW: torch AdamW (decoupled weight decay) on g'."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 amsgrad=False, gamma=0.1, beta3=0.9, *, moments=None,
                 on_nonfinite="raise", gsnr_interval=1, sq_comm_dtype="fp32", telemetry_interval=0,
                 sq_chunk_numel=DEFAULT_CHUNK_NUMEL, foreach=None, compile=None):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         amsgrad=amsgrad, foreach=foreach, compile=compile, group_defaults=_vr_defaults(gamma, beta3))
        self._init_gsnr(moments, on_nonfinite, gsnr_interval, sq_comm_dtype, telemetry_interval, sq_chunk_numel)


class VRLAMB(GSNRTransform, LAMB):
    """VR-LAMB: LAMB (see :class:`vrgd_ds.optim.lamb.LAMB`) on g'."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01,
                 bias_correction=True, gamma=0.1, beta3=0.9, *, moments=None,
                 on_nonfinite="raise", gsnr_interval=1, sq_comm_dtype="fp32", telemetry_interval=0,
                 sq_chunk_numel=DEFAULT_CHUNK_NUMEL, foreach=None, compile=None):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         bias_correction=bias_correction, foreach=foreach, compile=compile,
                         group_defaults=_vr_defaults(gamma, beta3))
        self._init_gsnr(moments, on_nonfinite, gsnr_interval, sq_comm_dtype, telemetry_interval, sq_chunk_numel)


class VRLARS(GSNRTransform, LARS):
    """VR-LARS: LARS (see :class:`vrgd_ds.optim.lars.LARS`) on g'."""

    def __init__(self, params, lr=0.1, momentum=0.9, weight_decay=0.0, eta=0.001, gamma=0.1,
                 beta3=0.0, *, moments=None,
                 on_nonfinite="raise", gsnr_interval=1, sq_comm_dtype="fp32", telemetry_interval=0,
                 sq_chunk_numel=DEFAULT_CHUNK_NUMEL, foreach=None, compile=None):
        super().__init__(params, lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta,
                         foreach=foreach, compile=compile, group_defaults=_vr_defaults(gamma, beta3))
        self._init_gsnr(moments, on_nonfinite, gsnr_interval, sq_comm_dtype, telemetry_interval, sq_chunk_numel)
