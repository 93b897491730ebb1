"""Where sum g and sum g^2 come from outside DeepSpeed."""

from .microstep import MicroStepMoments

__all__ = ["MicroStepMoments"]
