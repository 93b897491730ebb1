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

The six classes have one constructor definition: declaring
``class VRX(GSNRTransform, Base, beta3=...)`` assembles ``VRX.__init__`` from the base
update's signature (with the class's own defaults), the GSNR arguments (gamma, beta3)
and the options of :meth:`GSNRTransform._init_gsnr`, and writes the ``Args:`` section of
the class docstring from that signature (:mod:`.docs`). ``inspect.signature`` sees the
explicit signature, which DeepSpeed's config check reads
(:func:`vrgd_ds.deepspeed.check_params`), and calls are bound against it.
"""

from __future__ import annotations

import inspect
import math
from typing import Protocol, Sequence

import torch
from torch import Tensor

from .. import gsnr
from ..noise_scale import NoiseScaleTracker
from ..moments.chunked import DEFAULT_CHUNK_NUMEL, check_chunk_numel
from .base import GradSource
from .docs import with_args
from .flat import Spec
from .flat_group import GroupBatch
from .lamb import LAMB
from .lars import LARS
from .layout import layer_rows, segment_counts
from .telemetry import TelemetryRecorder, check_telemetry_interval, telemetry_due
from .torch_bases import AdamUpdate, AdamWUpdate, SGDUpdate

NONFINITE_POLICIES = ("raise", "skip")
SQ_COMM_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

GSNR_UPDATE = """\
The GSNR-scaled gradient g', per element (docs/algorithm.md sections 1-3), from gbar =
``p.grad`` (the mean of the k group gradients) and s, the mean of their squares (from
``moments``)::

    g'    = phat * gbar
    r_raw = gbar^2 / (s - gbar^2)
    r     = clamp(r_raw / m, gamma, 1)         m: the mean of r_raw over the layer (r = 1 where m = 0)
    p_t   = beta3 p_{t-1} + (1 - beta3) r      phat = p_t / (1 - beta3^t)   (beta3 = 0: phat = r)"""


class MomentSource(Protocol):
    """Where the second moment comes from (``vrgd_ds.moments`` or the DeepSpeed adapter).

    ``sq_scale * sum_sq(p)`` is the mean over the k groups of the squared group gradient,
    in the same scale as ``p.grad``, which holds the mean gradient.
    """

    group_count: int
    sq_scale: float
    # optional: True when the squares are rewritten before they are read again (after reset()),
    # so a step may overwrite them once it has read them (LAMB keeps u there)
    squares_consumable: bool

    def sum_sq(self, param: Tensor) -> Tensor: ...

    def reset(self) -> None: ...


class StepSource:
    """The moment source as one step reads it: ``sq_scale`` computed once (a source may derive
    it from probes of the gradients, :mod:`vrgd_ds.moments.microstep`) and, where the
    micro-batch gradients carried a loss scale S (``torch.amp.GradScaler``) that the gradient
    the step reads no longer has and the source was not told of, divided by S^2 (exact for the
    scaler's powers of 2). Everything else is the source's own."""

    def __init__(self, source: MomentSource, scale: Tensor | None = None):
        self._source = source
        self._scale = scale
        self._sq_scale = None

    def __getattr__(self, name):
        return getattr(self._source, name)

    @property
    def sq_scale(self) -> float | Tensor:
        if self._sq_scale is None:
            sq_scale = self._source.sq_scale
            if self._scale is not None:
                inv = self._scale.double().reciprocal().square()
                sq_scale = sq_scale * (inv.to(sq_scale.device) if isinstance(sq_scale, Tensor) else inv)
            self._sq_scale = sq_scale
        return self._sq_scale


class GSNRTransform:
    """Mixin: scale the gradient by its clamped, layer-normalised GSNR before the base update.

    Class keywords of a VR class declared on a base update (see the module docstring):
    ``beta3``, its default GSNR momentum; ``hyper``, the base's hyperparameters it takes
    (default: all); ``defaults``, its own defaults for some of them.
    """

    def __init_subclass__(cls, *, beta3: float | None = None, hyper: Sequence[str] | None = None,
                          defaults: dict | None = None, **kwargs):
        super().__init_subclass__(**kwargs)
        if beta3 is not None:
            _declare(cls, beta3, hyper, dict(defaults or {}))

    def _init_gsnr(self, *, moments: MomentSource | None = None, on_nonfinite: str = "raise",
                   gsnr_interval: int = 1, sq_comm_dtype: str = "fp32", telemetry_interval: int = 0,
                   sq_chunk_numel: int = DEFAULT_CHUNK_NUMEL) -> None:
        """Check and keep the VR options (their signature is the VR classes' keyword-only part)."""
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
        # set by the DeepSpeed ZeRO-1/2 adapter: DeepSpeed checks every gradient of the step for
        # inf/NaN (its overflow check, forced on) and skips the step on every rank if one is
        self.grads_checked_finite = False
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

    # torch.amp.GradScaler.step hands such an optimizer its loss scale and found-inf flag
    # (attributes ``grad_scale`` and ``found_inf``, for that call) instead of unscaling the
    # gradients and skipping the step itself: the squares must be unscaled with them (_amp)
    _step_supports_amp_scaling = True

    def step(self, closure=None):
        self.overflow = False
        self._loss_scale = None
        if getattr(self, "found_inf", None) is not None and self._amp():
            loss = None  # the scaler found an inf/NaN: skipped, nothing changed (it lowers the scale)
            self.overflow = True
            self._finish_step()
        else:
            loss = super().step(closure)  # ends in _finish_step
        return loss

    def _finish_step(self) -> None:
        """The moments start again; a moment source that can places its buffers (before the
        optimizer's own hand-over of the gradients, which leaves placed buckets to it)."""
        if self.moments is not None:
            self.moments.reset()
            self._place_moments()
        super()._finish_step()

    def _amp(self) -> bool:
        """A step driven by ``torch.amp.GradScaler.step``: True to skip it (an inf/NaN found).
        Else the gradients are brought to the unscaled mean, as the scaler would do for another
        optimizer, and the loss scale S is kept: the squares of the scaled micro-batch
        gradients are S^2 too large (:class:`StepSource`). With ``scaler.unscale_(optimizer)``
        before (to clip) the scaler has unscaled ``p.grad`` already and does not pass S; the
        moment source must then know the scaler (``MicroStepMoments(..., grad_scaler=scaler)``)."""
        if bool(self.found_inf.sum() > 0):
            return True
        scale = getattr(self, "grad_scale", None)
        if scale is not None:  # the gradients are still scaled: unscale them (exact for powers of 2)
            grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
            if any(g.dtype == torch.float16 for g in grads):  # what GradScaler.unscale_ refuses too
                raise ValueError(f"{type(self).__name__}: attempting to unscale FP16 gradients (GradScaler); "
                                 "keep fp32 parameters (autocast) or use bf16")
            inv = scale.double().reciprocal().float()
            with torch.no_grad():
                for g in grads:
                    g.mul_(inv.to(g.device))
            self._note_loss_scale(scale)
            return False
        scaler = getattr(self.moments, "grad_scaler", None)
        if scaler is not None:
            self._note_loss_scale(torch.tensor(float(scaler.get_scale()), dtype=torch.float64))
            return False
        if any(g["gamma"] < 1.0 for g in self.param_groups) and self.wants_moments():
            raise RuntimeError(
                f"{type(self).__name__}: scaler.unscale_(optimizer) was called before scaler.step(optimizer); "
                "it unscaled p.grad but not the squared gradients the GSNR needs. Give the moment source "
                "the scaler (MicroStepMoments(..., grad_scaler=scaler), or moments.grad_scaler = scaler; "
                "under HF Trainer / Accelerate: accelerator.scaler), or do not call unscale_")
        return False

    def _place_moments(self) -> None:
        """Ask a moment source that can (:meth:`vrgd_ds.moments.MicroStepMoments.place`) to keep
        its squares, and hand autograd the gradients, in the flat buffers the step reads, so the
        next steps find them there instead of gathering them. Once per bucket."""
        place = getattr(self.moments, "place", None)
        if place is None:
            return
        for index, (_, buckets) in self._buckets.items():
            if index >= len(self.param_groups) or self.param_groups[index]["gamma"] >= 1.0:
                continue
            for b in buckets:
                if b.placed_for is self.moments or len(b.params) < 2:
                    continue
                everyone = range(len(b.params))
                squares = b.views(b.buffer("sq", torch.float32), everyone)
                grads = (b.views(b.buffer("g", torch.float32), everyone) if b.params[0].dtype == torch.float32
                         else [None] * len(b.params))
                place(b.params, squares, grads)
                b.placed_for = self.moments

    # ---- gsnr_interval -----------------------------------------------------------------

    def _steps_taken(self, states) -> int:
        """Applied VR steps so far: the largest count in ``states`` (per-parameter state dicts;
        a parameter that had no gradient on some step catches up when it is next stepped)."""
        return max((int(st["vr_step"]) for st in states if "vr_step" in st), default=0)

    def wants_moments(self) -> bool:
        """Whether the coming step computes the GSNR, so a moment source must reduce the
        squared gradients; with ``gsnr_interval`` N only every N-th step does."""
        # every state a GSNR step has touched holds "vr_step" (a group with gamma 1 never gets
        # one), so all states are read, not param_groups: ZeRO-3 empties the groups between steps
        return self._steps_taken(self.state.values()) % self.gsnr_interval == 0

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

    def _note_loss_scale(self, scale: Tensor) -> None:
        """S for this step: a source that follows p.grad takes it (it also sees p.grad's
        unscaling); any other is read through :class:`StepSource`."""
        note = getattr(self.moments, "note_loss_scale", None)
        if note is not None:
            note(scale)
        else:
            self._loss_scale = scale

    def _moment_source(self) -> MomentSource:
        """The attached source as this step reads it (:class:`StepSource`)."""
        if self.moments is None:
            from ..deepspeed import registration_problem

            problem = registration_problem()
            raise RuntimeError(
                f"{type(self).__name__}.step() needs the second gradient moment: attach a source, "
                "e.g. vrgd_ds.moments.MicroStepMoments(model.parameters()) as moments=..., "
                "or use it through deepspeed.initialize"
                + (f" (not available here: {problem})" if problem else "")
            )
        return StepSource(self.moments, getattr(self, "_loss_scale", None))

    def _transform(self, batches: list[GroupBatch]) -> list[GradSource | None] | None:
        groups = self.param_groups
        out = super()._transform(batches)
        active = [i for i, b in enumerate(batches) if b.params and groups[i]["gamma"] < 1.0]
        if not active:
            return out
        # read without adding entries: a skipped step leaves the state as it was
        taken = self._steps_taken(self.state.get(p, {}) for i in active for p in batches[i].params)
        if taken % self.gsnr_interval != 0:
            out = self._reuse_ratios(batches, active, out)
        else:
            out = self._compute_ratios(batches, active, out, taken)
        if out is not None:
            for st in (st for i in active for st in batches[i].states(self.state)):
                st["vr_step"] = taken + 1
        return out

    def _compute_ratios(self, batches, active, out, taken):
        """A GSNR step: layer means of r_raw (one flat pass and one layer reduction for all
        groups), then per group the source that scales the gradient inside the base update."""
        src = self._moment_source()
        gsnr.check_group_count(src.group_count)
        sq_of = lambda p: self._sum_sq(src, p)  # noqa: E731
        moments = lambda bs: {"g": bs.grad_flat(), "sq": bs.squares_flat(sq_of)}  # noqa: E731
        # a telemetry step sums the noise-scale terms in the same pass (section 7)
        record = telemetry_due(taken, self.telemetry_interval, self.gsnr_interval)
        spec = Spec(("ok",), ("sq_scale",), ("noise",) if record else ())
        partial = torch.cat([batches[i].run(gsnr.raw_gsnr_terms, spec, moments, consts={"sq_scale": src.sq_scale},
                                            compile=self.param_groups[i]["compile"], n_terms=3 if record else 1)
                             for i in active])
        segments = [s for i in active for s in batches[i].flat_segments]
        # every layer's sum, the same on every rank: the decisions below are taken from them, as a
        # rank may hold no piece of the layer that takes the float64 path or is not finite
        (row_sums, row_numels), row_of = layer_rows(self.layout, segments, partial[:, 0],
                                                    segment_counts(segments, partial.device))

        def grads(i):  # per-segment views, only for the rare float64 sums
            return [v for bs in batches[i].steps for v in bs.segment_views(bs.grad_flat())]

        def sqs(i):
            return [v for bs in batches[i].steps for v in bs.segment_views(bs.squares_flat(sq_of))]

        numels = [seg.layer_numel for seg in segments]
        row_wide = _wide_layers(row_sums, row_numels)
        if any(row_wide):  # some rank holds a piece of such a layer: every rank joins the float64 sums
            row_sums = self._wide_sums(active, grads, sqs, src.sq_scale, segments, [row_wide[j] for j in row_of],
                                       row_sums, row_wide)
        sums = [row_sums[j] for j in row_of]
        if not all(math.isfinite(s) for s, n in zip(row_sums, row_numels) if n > 0):
            return self._nonfinite(sums, segments)
        wide = [row_wide[j] for j in row_of]
        all_means = gsnr.layer_means(sums, numels)
        if record:
            gammas = [self.param_groups[i]["gamma"] for i in active for _ in batches[i].flat_segments]
            counts = self._clamped_counts(batches, active, moments, src, all_means, gammas)
            self._recorder.add(taken + 1, self.layout, src, segments, sums, all_means, counts, partial[:, 1:],
                               gammas, self.noise_scale)
        at = 0
        for i in active:
            n = len(batches[i].flat_segments)
            out[i] = self._gsnr_source(self.param_groups[i], batches[i], all_means[at:at + n], wide[at:at + n],
                                       src, sq_of)
            at += n
        return out

    def _clamped_counts(self, batches, active, moments, src, means, gammas) -> Tensor:
        """Telemetry: per segment, how many elements have r_raw < gamma * m (one flat pass)."""
        thresholds = [g * m if m > 0.0 else 0.0 for g, m in zip(gammas, means)]
        spec, out, at = Spec(("ok", "threshold"), ("sq_scale",)), [], 0
        for i in active:
            n = len(batches[i].flat_segments)
            out.append(batches[i].run(gsnr.clamped_count_terms, spec, moments,
                                      cols={"threshold": thresholds[at:at + n]}, consts={"sq_scale": src.sq_scale},
                                      compile=self.param_groups[i]["compile"], n_terms=1)[:, 0])
            at += n
        return torch.cat(out)

    def element_state_keys(self, group: dict) -> tuple[str, ...]:
        """The base update's state, and the GSNR momentum when beta3 > 0 or gsnr_interval
        keeps the ratio for the next steps (:meth:`_gsnr_source`)."""
        kept = group["beta3"] > 0.0 or self.gsnr_interval > 1
        return (*super().element_state_keys(group), *(("gsnr_momentum",) if kept else ()))

    def _gsnr_source(self, group, batch, means, wide, src, sq_of) -> GradSource:
        """r = clamp(r_raw / m, gamma, 1) (r = 1 where m = 0), with GSNR momentum when beta3 > 0
        or when gsnr_interval keeps the ratio for the next steps."""
        beta3 = group["beta3"]
        mode = "mom" if beta3 > 0.0 else "store" if self.gsnr_interval > 1 else "ratio"
        bc3 = [1.0] * len(means)
        if mode != "ratio":
            bc3 = gsnr.bias_corrections(beta3, batch.per_view(self._advance_step(batch, "gsnr_step")))

        def tensors(bs):
            if mode == "ratio":
                return {"sq": bs.squares_flat(sq_of)}
            return {"sq": bs.squares_flat(sq_of), "mom": bs.state(self.state, "gsnr_momentum")}

        cols = {**gsnr.ratio_columns(means, group["gamma"]), "bc3": bc3}
        return GradSource(mode, cols, {"sq_scale": src.sq_scale, "b3w": 1.0 - beta3}, tensors,
                          wide if any(wide) else None, bool(getattr(src, "squares_consumable", False)))

    def _reuse_ratios(self, batches, active, out):
        """A step between GSNR computations: g' = phat_last * gbar, no second moment read.

        The non-finite check stays: one layer-summed |gbar| per tensor (same collective as a
        GSNR step, so every rank skips or raises together), unless DeepSpeed has checked every
        gradient of the step already (``grads_checked_finite``: ZeRO-1/2)."""
        groups = self.param_groups
        if not self.grads_checked_finite:
            spec = Spec(("ok",), ())
            partial = [batches[i].run(gsnr.abs_grad_terms, spec, lambda bs: {"g": bs.grad_flat()},
                                      compile=groups[i]["compile"], n_terms=1)[:, 0] for i in active]
            segments = [s for i in active for s in batches[i].flat_segments]
            partial = torch.cat(partial)
            (row_sums, row_numels), row_of = layer_rows(self.layout, segments, partial,
                                                        segment_counts(segments, partial.device))
            if not all(math.isfinite(s) for s, n in zip(row_sums, row_numels) if n > 0):  # every rank alike
                return self._nonfinite([row_sums[j] for j in row_of], segments)
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

    def _wide_sums(self, active, grads, sqs, sq_scale, segments, redo, row_sums, row_wide):
        """Every layer's sum, redone in float64 for the layers in ``row_wide`` (``redo``: this
        rank's segments of them; :meth:`_compute_ratios`). Every rank calls it when any layer
        is redone (one collective); a rank that holds no piece of one adds zeros."""
        partial = gsnr.wide_partials([g for i in active for g in grads(i)], [q for i in active for q in sqs(i)],
                                     sq_scale, redo)
        (wide,), _ = layer_rows(self.layout, segments, partial)
        return [w if r else s for w, r, s in zip(wide, row_wide, row_sums)]

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
                                 f"of {segments[bad[0]].layer_numel} elements" if bad else
                                 "in a layer that only other ranks hold pieces of")
        return None

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        gsnr.check_gamma(group["gamma"])
        gsnr.check_beta3(group["beta3"])


def _wide_layers(sums: Sequence[float], numels: Sequence[float]) -> list[bool]:
    """The layers (or segments) whose r_raw sum needs float64: the fp32 sum overflowed, or 1 / m
    is not a normal fp32 number; an absent layer (0 elements) never does."""
    means = gsnr.layer_means(sums, [n if n > 0 else 1.0 for n in numels])
    return [n > 0 and (o or i) for n, o, i in zip(numels, gsnr.overflowed(sums), gsnr.inverse_not_normal(means))]


def _vr_group_defaults(gamma: float = 0.1, beta3: float = 0.0) -> dict:
    """The param-group defaults a VR class adds to its base's (its signature is the VR
    classes' for these two; each class sets its own beta3 default)."""
    return dict(gamma=gsnr.check_gamma(gamma), beta3=gsnr.check_beta3(beta3))


def _declare(cls: type, beta3: float, hyper: Sequence[str] | None, defaults: dict) -> None:
    """Give a VR class its constructor and the Args section of its docstring.

    Signature: ``self, params``, the base update's hyperparameters (those in ``hyper``, with
    ``defaults`` in place of the base's), ``gamma, beta3`` (:func:`_vr_group_defaults`), then
    keyword-only the options of :meth:`GSNRTransform._init_gsnr` and the base's ``foreach``
    and ``compile``. Each argument goes to the function whose signature it came from."""
    if any(issubclass(b, GSNRTransform) and b is not GSNRTransform for b in cls.__bases__):
        raise TypeError(f"{cls.__name__}: declare a VR class (beta3=...) on a base update, not on a VR class")
    base_init = next(vars(k)["__init__"] for k in cls.__mro__[1:] if "__init__" in vars(k))
    P = inspect.Parameter
    base = list(inspect.signature(base_init).parameters.values())
    hyper_params = [p for p in base if p.kind is P.POSITIONAL_OR_KEYWORD and p.name not in ("self", "params")
                    and (hyper is None or p.name in hyper)]
    unknown = set(defaults).union(hyper or ()) - {p.name for p in hyper_params}
    if unknown:
        raise TypeError(f"{cls.__name__}: {base_init.__qualname__} has no argument {sorted(unknown)[0]!r}")
    hyper_params = [p.replace(default=defaults.get(p.name, p.default)) for p in hyper_params]
    group = [p.replace(default=beta3) if p.name == "beta3" else p
             for p in inspect.signature(_vr_group_defaults).parameters.values()]
    options = list(inspect.signature(GSNRTransform._init_gsnr).parameters.values())[1:]
    impl = [p for p in base if p.kind is P.KEYWORD_ONLY and p.name != "group_defaults"]
    sig = inspect.Signature([*base[:2], *hyper_params, *group, *options, *impl])
    base_names = [p.name for p in (*hyper_params, *impl)]

    def __init__(self, *args, **kwargs):
        try:
            bound = sig.bind(self, *args, **kwargs)
        except TypeError as e:
            raise TypeError(f"{cls.__name__}(): {e}") from None
        bound.apply_defaults()
        a = bound.arguments
        group_defaults = _vr_group_defaults(**{p.name: a[p.name] for p in group})
        super(cls, self).__init__(a["params"], **{n: a[n] for n in base_names}, group_defaults=group_defaults)
        self._init_gsnr(**{p.name: a[p.name] for p in options})

    __init__.__signature__ = sig
    __init__.__qualname__ = f"{cls.__qualname__}.__init__"
    __init__.__module__ = cls.__module__
    __init__.__doc__ = f"See :class:`{cls.__name__}` for the arguments."
    cls.__init__ = __init__
    # the GSNR momentum is fp32 for any parameter dtype, like the flat bases' own state
    cls.FP32_STATE = next(vars(k)["FP32_STATE"] for k in cls.__mro__[1:] if "FP32_STATE" in vars(k)) | {"gsnr_momentum"}
    with_args(cls, GSNR_UPDATE)


class VRSGD(GSNRTransform, SGDUpdate, beta3=0.0, hyper=("lr", "weight_decay")):
    """VR-SGD (paper Algorithm 1): plain SGD on the GSNR-scaled gradient g'.

    The update, with g' (below) in place of the gradient::

        theta <- theta - lr * (g' + weight_decay * theta)
    """


class VRMomentum(GSNRTransform, SGDUpdate, beta3=0.0, defaults={"momentum": 0.9}):
    """VR-Momentum: torch ``SGD`` with momentum (optionally Nesterov) on g'.

    torch's update, with g' (below) in place of the gradient::

        d = g' + weight_decay * theta
        b <- momentum * b + (1 - dampening) * d          (b = d on the first step)
        theta <- theta - lr * b                          (nesterov: theta - lr * (d + momentum * b))
    """


class VRAdam(GSNRTransform, AdamUpdate, beta3=0.9):
    """VR-Adam: torch ``Adam`` (L2 weight decay) on g'.

    torch's update, with g' (below) in place of the gradient::

        d = g' + weight_decay * theta
        m <- beta1 m + (1 - beta1) d ;  v <- beta2 v + (1 - beta2) d^2   (amsgrad: the running max of v)
        theta <- theta - lr * mhat / (sqrt(vhat) + eps),  mhat = m / (1 - beta1^t), vhat = v / (1 - beta2^t)
    """


class VRAdamW(GSNRTransform, AdamWUpdate, beta3=0.9, defaults={"weight_decay": 1e-2}):
    """VR-AdamW: torch ``AdamW`` (decoupled weight decay) on g'.

    torch's update, with g' (below) in place of the gradient::

        theta <- theta * (1 - lr * weight_decay)
        m <- beta1 m + (1 - beta1) g' ;  v <- beta2 v + (1 - beta2) g'^2  (amsgrad: the running max of v)
        theta <- theta - lr * mhat / (sqrt(vhat) + eps),  mhat = m / (1 - beta1^t), vhat = v / (1 - beta2^t)
    """


class VRLAMB(GSNRTransform, LAMB, beta3=0.9):
    """VR-LAMB: LAMB (:class:`~vrgd_ds.optim.lamb.LAMB`, NVIDIA's BERT variant) on g'.

    LAMB's update, with g' (below) in place of the gradient::

        m, v, mhat, vhat from g' as in Adam (bias_correction: mhat = m / (1 - beta1^t), ...)
        u = mhat / (sqrt(vhat) + eps) + weight_decay * theta
        theta <- theta - lr * ||theta|| / ||u|| * u      (norms over the whole layer; ratio 1 where one is 0)
    """


class VRLARS(GSNRTransform, LARS, beta3=0.0):
    """VR-LARS: LARS (:class:`~vrgd_ds.optim.lars.LARS`) on g'.

    LARS's update, with g' (below) in place of the gradient::

        local = eta * ||theta|| / (||g'|| + weight_decay * ||theta||)   (norms over the whole layer)
        b <- momentum * b + lr * local * (g' + weight_decay * theta) ;  theta <- theta - b
    """
