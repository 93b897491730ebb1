"""VR optimizers (GSNR transform + base update) and the LAMB and LARS bases."""

from .lamb import LAMB
from .lars import LARS
from .layout import LayerLayout, Segment
from .vr import VRAdam, VRAdamW, VRLAMB, VRLARS, VRMomentum, VRSGD, GSNRTransform

VR_OPTIMIZERS = {
    "VRSGD": VRSGD,
    "VRMomentum": VRMomentum,
    "VRAdam": VRAdam,
    "VRAdamW": VRAdamW,
    "VRLAMB": VRLAMB,
    "VRLARS": VRLARS,
}

__all__ = ["LAMB", "LARS", "LayerLayout", "Segment", "GSNRTransform", "VR_OPTIMIZERS",
           *VR_OPTIMIZERS]
