"""DeepSpeed integration: optimizers selected by name in the JSON config.

``import vrgd_ds`` calls :func:`register` when DeepSpeed is installed. After it, a config
``"optimizer": {"type": "NVLAMB", "params": {...}}`` builds this package's optimizer through
DeepSpeed's own fallback for names it does not know (``getattr(torch.optim, type)``), and
ZeRO accepts it. Names: VRSGD, VRMomentum, VRAdam, VRAdamW, VRLAMB, VRLARS, and the plain
NVLAMB (our LAMB; "Lamb"/"LAMB" is DeepSpeed's CUDA kernel) and LARS.

NVLAMB and LARS run under ZeRO stages 0, 1 and 2 with whole-layer norms across
partitions (:mod:`.zero_layout`). The VR optimizers run under ZeRO stages 1 and 2 (fp32,
bf16, fp16 with dynamic loss scaling) with the squared gradients reduced to their owners
beside each gradient bucket (:mod:`.zero_moments`), and without ZeRO in fp32
(:mod:`.stage0_moments`). ZeRO-3, offload, and bf16/fp16 at stage 0 are refused at
initialize with the setting named. Telemetry: :mod:`.telemetry`.
"""

from __future__ import annotations

import inspect

import torch

from ..optim import LAMB, LARS, VR_OPTIMIZERS
from ..optim.base import BaseOptimizer
from ..optim.vr import GSNRTransform

SUPPORTED_DEEPSPEED = ((0, 19), (0, 20))  # [lower, upper) on (major, minor)
DS_NAMES = {**VR_OPTIMIZERS, "NVLAMB": LAMB, "LARS": LARS}
_registered = False


def check_deepspeed_version(version: str) -> None:
    try:
        major, minor = (int(x) for x in version.split(".")[:2])
    except ValueError:
        raise RuntimeError(f"cannot parse the DeepSpeed version {version!r}") from None
    lo, hi = SUPPORTED_DEEPSPEED
    if not lo <= (major, minor) < hi:
        raise RuntimeError(
            f"vrgd-ds supports DeepSpeed >= {lo[0]}.{lo[1]}, < {hi[0]}.{hi[1]}; found {version}. "
            "Its ZeRO internals are patched by version; install a supported DeepSpeed."
        )


def register() -> None:
    """Make the optimizers selectable by name in DeepSpeed configs (idempotent)."""
    global _registered
    if _registered:
        return
    import deepspeed
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.runtime.zero import utils as zero_utils
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    check_deepspeed_version(deepspeed.__version__)
    for name, cls in DS_NAMES.items():
        existing = getattr(torch.optim, name, None)
        if existing is not None and existing is not cls:
            raise RuntimeError(f"torch.optim.{name} already exists and is not vrgd_ds's: "
                               "cannot register it for DeepSpeed configs")
        setattr(torch.optim, name, cls)
        if cls not in zero_utils.ZERO_SUPPORTED_OPTIMIZERS:
            zero_utils.ZERO_SUPPORTED_OPTIMIZERS.append(cls)
    _wrap(DeepSpeedEngine, "_configure_basic_optimizer", _after_basic_optimizer, _check_params)
    _wrap(DeepSpeedZeroOptimizer, "__init__", _after_zero_init)
    _registered = True


def _wrap(cls, name, after, before=None):
    original = getattr(cls, name)

    def wrapped(self, *args, **kwargs):
        if before is not None:
            before(self)
        result = original(self, *args, **kwargs)
        after(self, result, *args, **kwargs)
        return result

    wrapped.__wrapped__ = original
    setattr(cls, name, wrapped)


def allowed_params(cls) -> list[str]:
    """The config "params" keys an optimizer class accepts."""
    sig = inspect.signature(cls.__init__)
    return [n for n, p in sig.parameters.items()
            if n not in ("self", "params", "group_defaults") and p.kind is not p.VAR_KEYWORD]


def _check_params(engine) -> None:
    cls = DS_NAMES.get(engine.optimizer_name())
    if cls is None:
        return
    allowed = allowed_params(cls)
    for key in engine.optimizer_params() or {}:
        if key not in allowed:
            raise ValueError(f"optimizer {engine.optimizer_name()!r}: unknown params key {key!r}; "
                             f"allowed: {', '.join(allowed)}")


def _after_basic_optimizer(engine, optimizer, *args, **kwargs) -> None:
    if not isinstance(optimizer, BaseOptimizer):
        return
    name = engine.optimizer_name()
    if engine.zero_optimization_stage() >= 3:
        raise NotImplementedError(
            f"optimizer type {name!r} with zero_optimization.stage {engine.zero_optimization_stage()}: "
            "vrgd-ds supports ZeRO stages 0, 1 and 2 (layer norms across ZeRO-3 partitions are not "
            "implemented, and running would give wrong trust ratios)"
        )
    if engine.zero_cpu_offload() or engine.zero_offload_param():
        raise NotImplementedError(
            f"optimizer type {name!r} with zero_optimization.offload_optimizer / offload_param: "
            "offload is not supported by vrgd-ds; remove the offload settings"
        )
    if isinstance(optimizer, GSNRTransform):
        stage = engine.zero_optimization_stage()
        low = "fp16" if engine.fp16_enabled() else "bf16" if engine.bfloat16_enabled() else None
        if stage == 0 and low:
            raise NotImplementedError(
                f"optimizer type {name!r} with {low} and zero_optimization.stage 0: the VR optimizers run "
                f"in {low} under ZeRO stage 1 or 2 (stage 0 only in fp32, where DeepSpeed's {low} "
                "optimizer wrapper is not hooked); set zero_optimization.stage to 1 or 2"
            )
        if stage == 0:
            from .stage0_moments import attach_stage0_moments

            attach_stage0_moments(engine, optimizer)
        from .telemetry import attach_telemetry_writer

        attach_telemetry_writer(engine, optimizer)


def _after_zero_init(zero_optimizer, *_args, **_kwargs) -> None:
    inner = zero_optimizer.optimizer
    if isinstance(inner, BaseOptimizer):
        from .zero_layout import ZeroLayout

        inner.layout = ZeroLayout(zero_optimizer)
        if isinstance(inner, GSNRTransform):
            from .zero_moments import attach_zero_moments

            attach_zero_moments(zero_optimizer, inner)


__all__ = ["register", "check_deepspeed_version", "allowed_params", "DS_NAMES", "SUPPORTED_DEEPSPEED"]
