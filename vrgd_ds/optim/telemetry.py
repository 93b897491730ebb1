"""The VR optimizers' telemetry record (``telemetry_interval`` N > 0).

A VR optimizer records on its first GSNR step in every window of N applied steps
(:func:`telemetry_due`), from the statistics that step has anyway (the layer sums and means of
r_raw) plus the noise-scale partial sums, taken in the same flat pass as the r_raw sums
(:func:`vrgd_ds.gsnr.raw_gsnr_terms` with the flag "noise"), and one extra flat pass for the
clamped counts (:func:`vrgd_ds.gsnr.clamped_count_terms`). One layer-table collective makes
the record complete on every rank, also when a layer spans ZeRO partitions or Megatron
shards.

The record (``optimizer.telemetry``, a dict)::

    step, k, clamped_fraction,
    trace_cov, grad_sq, b_simple, b_simple_ema, group_var     (the whole model, section 7)
    layers: {layer index: {gsnr_mean, clamped_fraction, numel, gamma,
                           trace_cov, grad_sq, b_simple, b_simple_ema, group_var}}

DeepSpeed may step one param group at a time: the calls of one step add their layers to
that step's record, and the noise scale is redone over all layers seen so far
(:class:`vrgd_ds.noise_scale.NoiseScaleTracker`). :mod:`vrgd_ds.deepspeed.telemetry` names
the layers and writes the record through DeepSpeed's monitor.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ..noise_scale import NoiseScaleTracker
from .layout import LayerLayout, Segment


def check_telemetry_interval(interval: int) -> int:
    if isinstance(interval, bool) or not isinstance(interval, int) or interval < 0:
        raise ValueError(f"telemetry_interval must be an integer >= 0 (0: off), got {interval!r}")
    return interval


def telemetry_due(taken: int, interval: int, gsnr_interval: int) -> bool:
    """Whether the GSNR step after ``taken`` applied steps records: the first GSNR step in
    every window of ``interval`` steps (never for ``interval`` 0)."""
    return bool(interval) and taken % interval < gsnr_interval


class TelemetryRecorder:
    """Builds the record of a VR optimizer's GSNR steps (see the module docstring)."""

    def __init__(self):
        self.record: dict | None = None
        self._noise_sums: dict = {}  # this step's per-layer [sum (s - gbar^2), sum gbar^2]

    def add(self, step: int, layout: LayerLayout, src, segments: Sequence[Segment], sums: Sequence[float],
            means: Sequence[float], counts: Tensor, noise: Tensor, gammas: Sequence[float],
            tracker: NoiseScaleTracker) -> dict:
        """Record the layers of one GSNR step, per segment (``segments`` order): ``sums`` and
        ``means``, the layer sum and mean of r_raw; ``counts``, the elements with r_raw below
        gamma * m; ``noise``, [sum (s - gbar^2), sum gbar^2] (float64 [segments, 2]); the
        group's ``gamma``. ``src``: the moment source (k, sq_scale, samples per group, clip
        scale)."""
        # each segment carries its share of the layer total, so the shares add up exactly
        f64 = dict(dtype=torch.float64, device=counts.device)  # the collective's device (NCCL: the GPU)
        share = torch.tensor([s * seg.numel / seg.layer_numel for s, seg in zip(sums, segments)], **f64)
        numel = torch.tensor([float(seg.numel) for seg in segments], **f64)
        gamma = torch.tensor(list(gammas), **f64)
        noise = noise.to(**f64)
        columns = [share, noise[:, 0], noise[:, 1], counts.to(**f64), numel, gamma * numel]
        table = layout.table(torch.stack(columns, 1), segments)
        rec = self.record if self.record and self.record["step"] == step else {"step": step, "layers": {}}
        sums_of = {}
        for layer, (raw, var_sum, gsq_sum, clamped, n, gn) in table.items():
            rec["layers"][layer] = {"gsnr_mean": raw / n, "clamped_fraction": clamped / n,
                                    "numel": int(n), "gamma": gn / n}
            sums_of[layer] = (var_sum, gsq_sum)
        if self._noise_sums.get("step") != step:
            self._noise_sums = {"step": step, "layers": {}}
        self._noise_sums["layers"].update(sums_of)
        total = sum(v["numel"] for v in rec["layers"].values())
        rec["k"] = int(src.group_count)
        rec["clamped_fraction"] = sum(v["clamped_fraction"] * v["numel"] for v in rec["layers"].values()) / total
        self._add_noise_scale(rec, src, tracker)
        self.record = rec
        return rec

    def _add_noise_scale(self, rec: dict, src, tracker: NoiseScaleTracker) -> None:
        """The gradient noise scale (section 7) of the layers recorded so far this step."""
        model, layers = tracker.update(
            self._noise_sums["layers"], rec["k"], getattr(src, "samples_per_group", None),
            getattr(src, "clip_scale", 1.0), step=rec["step"])
        rec.update(model)
        for layer, values in layers.items():
            rec["layers"][layer].update(values)
