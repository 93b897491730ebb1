"""Where sum g and sum g^2 come from outside DeepSpeed."""

from .ddp import DDPMoments
from .microstep import MicroStepMoments

__all__ = ["DDPMoments", "MicroStepMoments"]
