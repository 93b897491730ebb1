"""vrgd-ds: GSNR-based variance-reduced optimizers (VRGD) for large-batch training."""

from .moments import MicroStepMoments
from .optim import LAMB, LARS, VRAdam, VRAdamW, VRLAMB, VRLARS, VRMomentum, VRSGD

__version__ = "0.1.0"

__all__ = ["LAMB", "LARS", "VRSGD", "VRMomentum", "VRAdam", "VRAdamW", "VRLAMB", "VRLARS",
           "MicroStepMoments", "__version__"]
