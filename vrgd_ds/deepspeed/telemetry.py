"""VR telemetry under DeepSpeed: the optimizer's record with parameter names, written
through DeepSpeed's monitor (TensorBoard / CSV / W&B, whatever the config enables).

The optimizer records (``telemetry_interval`` N > 0) on its first GSNR step in every
window of N steps: k, the overall fraction of elements clamped at gamma, and per layer
the mean raw GSNR and the clamped fraction, complete on every rank even when a layer
spans ZeRO partitions. Tags: ``VRGD/k``, ``VRGD/clamped_fraction``,
``VRGD/gsnr_mean/<param name>``, ``VRGD/clamped_fraction/<param name>``; the x value is
the engine's ``global_steps``.
"""

from __future__ import annotations


def layer_names(engine) -> list[str]:
    """Names of the telemetry's layer indices: ZeRO's flattening order, or the optimizer's."""
    names = {id(p): n for n, p in engine.module.named_parameters()}
    zero = engine.optimizer
    groups = getattr(zero, "round_robin_bit16_groups", None)
    if groups is None:
        groups = [g["params"] for g in vr_optimizer(engine).param_groups]
    return [names.get(id(p), f"param{i}") for i, p in enumerate(p for g in groups for p in g)]


def vr_optimizer(engine):
    """The VR optimizer inside the engine (under ZeRO it is wrapped), or None."""
    from ..optim.vr import GSNRTransform

    opt = engine.optimizer
    while opt is not None and not isinstance(opt, GSNRTransform):
        opt = getattr(opt, "optimizer", None)
    return opt


def named_telemetry(engine) -> dict | None:
    """The latest record as a dict, with ``layers`` keyed by parameter name."""
    opt = vr_optimizer(engine)
    if opt is None or opt.telemetry is None:
        return None
    names = layer_names(engine)
    rec = dict(opt.telemetry)
    rec["layers"] = {names[i]: v for i, v in sorted(rec["layers"].items())}
    return rec


def monitor_events(rec: dict, step: int) -> list[tuple[str, float, int]]:
    events = [("VRGD/k", float(rec["k"]), step), ("VRGD/clamped_fraction", rec["clamped_fraction"], step)]
    for name, v in rec["layers"].items():
        events.append((f"VRGD/gsnr_mean/{name}", v["gsnr_mean"], step))
        events.append((f"VRGD/clamped_fraction/{name}", v["clamped_fraction"], step))
    return events


def attach_telemetry_writer(engine, optimizer) -> None:
    """After each engine.step, write a new record (if any) through engine.monitor."""
    if not optimizer.telemetry_interval:
        return
    step = engine.step
    written = {"step": None}

    def step_and_write(*args, **kwargs):
        out = step(*args, **kwargs)
        rec = optimizer.telemetry
        if rec is not None and rec["step"] != written["step"]:
            written["step"] = rec["step"]
            monitor = getattr(engine, "monitor", None)
            if monitor is not None and monitor.enabled:
                monitor.write_events(monitor_events(named_telemetry(engine), engine.global_steps))
        return out

    engine.step = step_and_write
