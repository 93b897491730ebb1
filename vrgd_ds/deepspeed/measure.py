"""Measure-only mode: the gradient noise scale for any optimizer under DeepSpeed.

One top-level key in the DeepSpeed config turns it on for plain LAMB, LARS, AdamW or any
other optimizer DeepSpeed runs:

    "vrgd_noise_scale": {"interval": 10, "ema_decay": 0.95}

Every ``interval`` applied steps the squared gradients are formed where a VR optimizer
forms them. Under ZeRO-1/2 (:mod:`.zero_moments`, ``norms_only``) each rank only adds up
its local squares per layer in float64: nothing gradient-sized is sent, the layer totals
ride in the one small table all-reduce below. At stage 0 (:mod:`.stage0_moments`,
``norms_only``) one number per parameter, its sum of local squares, is all-reduced after
DeepSpeed's gradient all-reduce. Before the optimizer steps, a pre-step hook (torch's
``register_step_pre_hook``) reads the mean gradient (and at stage 0 those sums) of each
layer; after DeepSpeed's whole step one collective sums them per layer and :class:`vrgd_ds.noise_scale.NoiseScaleTracker` turns
them into trace_cov, grad_sq, b_simple and b_simple_ema (docs/algorithm.md section 7). Nothing
the optimizer or DeepSpeed computes changes: parameters are bitwise those of the run
without the key (tested). The record goes where a VR optimizer's telemetry goes
(``named_telemetry(engine)``, DeepSpeed's monitor under ``VRGD/gns/...``).

With a VR optimizer the key only sets ``ema_decay``: the noise scale is part of its
telemetry (``telemetry_interval``).
"""

from __future__ import annotations

import torch

from .. import gsnr
from ..noise_scale import DEFAULT_EMA_DECAY, NoiseScaleTracker, check_ema_decay
from ..optim.layout import LayerLayout, Segment, segment_views

CONFIG_KEY = "vrgd_noise_scale"
CONFIG_FIELDS = ("interval", "ema_decay")


def noise_config(raw, vr: bool) -> dict | None:
    """The checked ``vrgd_noise_scale`` block, or None when the config has none."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ValueError(f"{CONFIG_KEY} must be an object like {{\"interval\": 10, \"ema_decay\": 0.95}}, "
                         f"got {raw!r}")
    unknown = sorted(set(raw) - set(CONFIG_FIELDS))
    if unknown:
        raise ValueError(f"{CONFIG_KEY}: unknown key {unknown[0]!r}; allowed: {', '.join(CONFIG_FIELDS)}")
    interval = raw.get("interval", 1)
    if vr and "interval" in raw:
        raise ValueError(f"{CONFIG_KEY}.interval: a VR optimizer measures the noise scale on its telemetry "
                         "steps; set the optimizer's telemetry_interval instead")
    if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
        raise ValueError(f"{CONFIG_KEY}.interval must be an integer >= 1, got {interval!r}")
    return {"interval": interval, "ema_decay": check_ema_decay(raw.get("ema_decay", DEFAULT_EMA_DECAY))}


class NoiseMeter:
    """Stands where a VR optimizer stands for the moment sources (``wants_moments``,
    ``sq_comm_dtype``) and records the noise scale of the steps it measures."""

    sq_comm_dtype = torch.float32

    def __init__(self, interval: int, ema_decay: float, layout: LayerLayout):
        self.interval = interval
        self.layout = layout
        self.noise_scale = NoiseScaleTracker(ema_decay)
        self.moments = None
        self.applied_steps = 0
        self.telemetry: dict | None = None
        self._seen: list[tuple[torch.Tensor, list]] = []  # this step's (partials, segments)

    def wants_moments(self) -> bool:
        return self.applied_steps % self.interval == 0

    def observe(self, optimizer, _args=None, _kwargs=None) -> None:
        """Pre-step hook: this call's layers (DeepSpeed may show one param group at a time)."""
        if not self.wants_moments():
            return
        src = self.moments
        if not getattr(src, "norms_only", False):
            raise RuntimeError("NoiseMeter needs a measure-only moment source (norms_only=True)")
        for group in optimizer.param_groups:
            grads, segments, whole = [], [], []
            for p in (p for p in group["params"] if p.grad is not None):
                segs = self.layout.segments(p)
                grads += segment_views(p.grad, segs)
                segments += segs
                if hasattr(src, "square_sum"):  # stage 0: one segment, the whole tensor
                    whole.append(src.square_sum(p))
            numel = torch.tensor([float(s.numel) for s in segments], dtype=torch.float64)
            partial = gsnr.grad_square_partials(grads)
            if whole:
                partial[:, 0] += torch.tensor(whole, dtype=torch.float64, device=partial.device) * src.sq_scale
            self._seen.append((torch.cat([partial, numel.to(partial.device).unsqueeze(1)], 1), segments))

    def finish_step(self, applied: bool) -> None:
        """After the whole step, on every rank: one collective for the layer sums."""
        seen, self._seen = self._seen, []
        src = self.moments
        if applied and self.wants_moments() and seen:
            if hasattr(src, "layer_square_sums"):  # ZeRO: every rank's local square sums per layer,
                norms = src.layer_square_sums()   # summed in the same table all-reduce
                rows = torch.zeros(norms.numel(), 3, dtype=torch.float64, device=norms.device)
                rows[:, 0] = norms * src.sq_scale
                seen.append((rows, [Segment(0, 0, i, 0) for i in range(norms.numel())]))
            device = seen[0][0].device
            table = self.layout.table(torch.cat([p.to(device) for p, _ in seen]), [s for _, segs in seen for s in segs])
            step = self.applied_steps + 1
            model, layers = self.noise_scale.update({i: (v, g) for i, (v, g, _) in table.items()}, src.group_count,
                                                    getattr(src, "samples_per_group", None),
                                                    getattr(src, "clip_scale", 1.0), step=step)
            for i, (_, _, n) in table.items():
                layers[i]["numel"] = int(n)
            self.telemetry = {"step": step, "k": int(src.group_count), **model, "layers": layers}
        if applied:
            self.applied_steps += 1
        self.moments.reset()  # stage 0's hook sums start again (ZeroMoments clears lazily)
