"""vrgd-ds: GSNR-based variance-reduced optimizers (VRGD) for large-batch training."""

from .moments import MicroStepMoments
from .optim import LAMB, LARS, VRAdam, VRAdamW, VRLAMB, VRLARS, VRMomentum, VRSGD

__version__ = "0.1.0"

try:  # DeepSpeed is a dependency, but the optimizers work without it
    import deepspeed as _deepspeed  # noqa: F401
except ImportError:  # pragma: no cover
    pass
else:
    from .deepspeed import register as _register_with_deepspeed

    _register_with_deepspeed()  # warns, and patches nothing, for an untested DeepSpeed

__all__ = ["LAMB", "LARS", "VRSGD", "VRMomentum", "VRAdam", "VRAdamW", "VRLAMB", "VRLARS",
           "MicroStepMoments", "__version__"]
