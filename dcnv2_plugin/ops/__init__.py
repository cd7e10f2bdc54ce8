"""The compiled operators and their modules. Needs torch only (no detectron2)."""

from .deform_conv import DeformConv2d, DeformConv2dPack, OffsetConv2d, deform_conv2d, split_offset_mask
from .deform_roi_pool import DeformRoIPool, deform_roi_pool
from .geometry_predictor import GeometryPredictor

__all__ = [
    "deform_conv2d",
    "DeformConv2d",
    "DeformConv2dPack",
    "OffsetConv2d",
    "split_offset_mask",
    "deform_roi_pool",
    "DeformRoIPool",
    "GeometryPredictor",
]
