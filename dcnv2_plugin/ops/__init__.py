"""The compiled operators and their modules. Needs torch only (no detectron2)."""

from .deform_conv import ModulatedDeformConv2d, deform_conv2d
from .deform_roi_pool import DeformRoIPool, deform_roi_pool

__all__ = ["deform_conv2d", "ModulatedDeformConv2d", "deform_roi_pool", "DeformRoIPool"]
