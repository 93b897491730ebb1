"""VR telemetry under DeepSpeed: the optimizer's record (built by
:mod:`vrgd_ds.optim.telemetry`) with parameter names, written through DeepSpeed's monitor
(TensorBoard / CSV / W&B, whatever the config enables).

The optimizer records (``telemetry_interval`` N > 0) on its first GSNR step in every
window of N steps: k, the overall fraction of elements clamped at gamma, the gradient
noise scale (:mod:`vrgd_ds.noise_scale`), and per layer the mean raw GSNR, the clamped
fraction and the noise scale, complete on every rank even when a layer spans ZeRO
partitions. Tags: ``VRGD/k``, ``VRGD/clamped_fraction``, ``VRGD/gns/<b_simple |
b_simple_ema | trace_cov | grad_sq>``, ``VRGD/gsnr_mean/<param name>``,
``VRGD/clamped_fraction/<param name>``, ``VRGD/gns/<b_simple | b_simple_ema>/<param
name>``; the x value is the engine's ``global_steps``.
"""

from __future__ import annotations

from . import seam


def vr_optimizer(engine):
    """The VR optimizer DeepSpeed steps, or None."""
    from ..optim.vr import GSNRTransform

    opt = seam.inner_optimizer(engine)
    return opt if isinstance(opt, GSNRTransform) else None


def parameter_names(engine, params) -> list[str]:
    """The module's name of each of ``params`` (``param{i}`` where it has none)."""
    names = {id(p): n for n, p in seam.engine_module(engine).named_parameters()}
    return [names.get(id(p), f"param{i}") for i, p in enumerate(params)]


def layer_names(engine) -> list[str]:
    """Names of the telemetry's layer indices: ZeRO's flattening order, or the optimizer's."""
    opt = seam.inner_optimizer(engine)
    adapter = seam.adapter_of(engine)
    layout = adapter.meter.layout if adapter is not None and adapter.meter is not None else opt.layout
    snap = getattr(layout, "snap", None)
    params = snap.all_params() if snap is not None else [p for g in opt.param_groups for p in g["params"]]
    return parameter_names(engine, params)


def named_telemetry(engine) -> dict | None:
    """The latest record as a dict, with ``layers`` keyed by parameter name: the VR
    optimizer's telemetry, or the measure-only noise scale (``vrgd_noise_scale``)."""
    opt = vr_optimizer(engine)
    adapter = seam.adapter_of(engine)
    if opt is None and adapter is not None and adapter.meter is not None:
        opt = adapter.meter
    if opt is None or opt.telemetry is None:
        return None
    names = layer_names(engine)
    rec = dict(opt.telemetry)
    rec["layers"] = {names[i]: v for i, v in sorted(rec["layers"].items())}
    return rec


NOISE_KEYS = ("b_simple", "b_simple_ema", "trace_cov", "grad_sq")


def noise_scale_source(engine) -> bool:
    """Whether the engine measures the gradient noise scale: a VR optimizer with telemetry,
    or the measure-only ``vrgd_noise_scale`` key."""
    opt = vr_optimizer(engine)
    adapter = seam.adapter_of(engine)
    return bool((opt is not None and opt.telemetry_interval) or (adapter is not None and adapter.meter is not None))


def monitor_events(rec: dict, step: int) -> list[tuple[str, float, int]]:
    events = [("VRGD/k", float(rec["k"]), step)]
    if "clamped_fraction" in rec:  # a VR optimizer's record (a measure-only one has no GSNR)
        events.append(("VRGD/clamped_fraction", rec["clamped_fraction"], step))
    events += [(f"VRGD/gns/{key}", float(rec[key]), step) for key in NOISE_KEYS if rec.get(key) is not None]
    for name, v in rec["layers"].items():
        if "gsnr_mean" in v:
            events.append((f"VRGD/gsnr_mean/{name}", v["gsnr_mean"], step))
            events.append((f"VRGD/clamped_fraction/{name}", v["clamped_fraction"], step))
        events += [(f"VRGD/gns/{key}/{name}", float(v[key]), step) for key in ("b_simple", "b_simple_ema")
                   if v.get(key) is not None]
    return events


class TelemetryWriter:
    """After each engine step, write a new record (if any) through the engine's monitor."""

    def __init__(self, engine, optimizer):
        self.engine = engine
        self.optimizer = optimizer
        self._written = None

    def write(self) -> None:
        rec = getattr(self.optimizer, "telemetry", None)
        if rec is None or rec["step"] == self._written:
            return
        self._written = rec["step"]
        seam.write_monitor(self.engine, monitor_events(named_telemetry(self.engine), seam.global_steps(self.engine)))
