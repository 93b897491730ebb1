"""DeepSpeed integration: optimizers selected by name in the JSON config.

``import vrgd_ds`` calls :func:`register` when DeepSpeed is installed. After it, a config
``"optimizer": {"type": "VRLAMB", "params": {...}}`` builds this package's optimizer through
DeepSpeed's own fallback for names it does not know (``getattr(torch.optim, type)``), and
ZeRO accepts it; an instance or callable passed as ``deepspeed.initialize(optimizer=...)``
takes the same route. Names: VRSGD, VRMomentum, VRAdam, VRAdamW, VRLAMB, VRLARS, and the
plain NVLAMB (our LAMB; "Lamb"/"LAMB" is DeepSpeed's CUDA kernel) and LARS.

Layout of this package:

- :mod:`.seam`: the only module that names DeepSpeed internals (patches, attributes,
  checkpoint files); everything else takes its plain snapshots.
- :mod:`.routes`: which engine settings are supported or refused, decided at initialize.
- :mod:`.adapter`: what is attached to a supported engine.
- :mod:`.zero_layout`, :mod:`.zero_moments`, :mod:`.stage0_moments`:
  whole-layer statistics across ZeRO partitions and the squared gradients.
- :mod:`.telemetry`, :mod:`.checkpoint`, :mod:`.launching`.

With a DeepSpeed version other than the tested one, ``import vrgd_ds`` warns and does not
patch DeepSpeed; selecting a vrgd-ds optimizer type in a config then fails with the version
message.
"""

from __future__ import annotations

import inspect
import warnings

from ..optim import LAMB, LARS, VR_OPTIMIZERS
from . import seam

DS_NAMES = {**VR_OPTIMIZERS, "NVLAMB": LAMB, "LARS": LARS}
PYTHON_ONLY_PARAMS = ("moments", "foreach", "compile")  # set by the adapter, not by JSON
_state = {"registered": False, "refused": None}


def register() -> bool:
    """Make the optimizers selectable by name in DeepSpeed configs (idempotent). Returns
    False (after a warning) when the installed DeepSpeed is not a tested version."""
    if _state["registered"]:
        return True
    import deepspeed

    problem = seam.version_problem(deepspeed.__version__)
    if problem is not None:
        _state["refused"] = problem
        warnings.warn(problem + "; vrgd-ds did not register with DeepSpeed", stacklevel=2)
        seam.register_names({name: _refusing(name, problem) for name in DS_NAMES})
        return False
    from .adapter import attach_to_engine

    seam.install(on_configured=attach_to_engine, check_config=_check_before_wrapper)
    seam.register_names(DS_NAMES)
    _state["registered"] = True
    return True


def unregister() -> None:
    """Undo :func:`register`: every DeepSpeed patch and the names in torch.optim."""
    seam.unregister_patches()
    seam.unregister_names(DS_NAMES)
    _state["registered"] = False


def registration_problem() -> str | None:
    """Why vrgd-ds did not register with the installed DeepSpeed (None if it did or was not asked)."""
    return _state["refused"]


def _refusing(name: str, problem: str):
    def refuse(*_args, **_kwargs):
        raise RuntimeError(f"optimizer type {name!r}: {problem}")

    return refuse


def allowed_params(cls) -> list[str]:
    """The config "params" keys an optimizer class accepts."""
    sig = inspect.signature(cls.__init__)
    return [n for n, p in sig.parameters.items()
            if n not in ("self", "params", "group_defaults", *PYTHON_ONLY_PARAMS) and p.kind is not p.VAR_KEYWORD]


def check_params(name: str, params: dict) -> None:
    """Refuse unknown keys and values of the wrong type, naming the key."""
    cls = DS_NAMES[name]
    allowed = allowed_params(cls)
    sig = inspect.signature(cls.__init__).parameters
    for key, value in params.items():
        if key in PYTHON_ONLY_PARAMS:
            raise ValueError(f"optimizer {name!r}: params key {key!r} is a Python-side option that the "
                             "DeepSpeed adapter sets itself; remove it from the config")
        if key not in allowed:
            raise ValueError(f"optimizer {name!r}: unknown params key {key!r}; allowed: {', '.join(allowed)}")
        _check_type(name, key, value, sig[key].default)


def _check_type(name: str, key: str, value, default) -> None:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, bool):
        ok, want = isinstance(value, bool), "true or false"
    elif isinstance(default, (int, float)):
        ok, want = number, "a number"
    elif isinstance(default, tuple):
        ok = isinstance(value, (list, tuple)) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
        want = "a list of numbers"
    elif isinstance(default, str):
        ok, want = isinstance(value, str), "a string"
    else:
        return
    if not ok:
        raise ValueError(f"optimizer {name!r}: params key {key!r} must be {want}, got {value!r}")


def _check_before_wrapper(engine, client_optimizer) -> None:
    from ..optim.base import BaseOptimizer
    from .routes import refuse_before_wrapper

    name, params = seam.config_optimizer_params(engine)
    if client_optimizer is None and name in DS_NAMES:
        check_params(name, params)
    elif isinstance(client_optimizer, BaseOptimizer):
        name = type(client_optimizer).__name__
    else:
        return
    refuse_before_wrapper(name, *seam.precision_before_wrapper(engine))


__all__ = ["register", "unregister", "registration_problem", "allowed_params", "check_params", "DS_NAMES"]
