"""Backbones registered in detectron2's BACKBONE_REGISTRY."""

from .deformable_blocks import DeformBasicBlock, DeformBottleneckBlock
from .fpn import build_dcnv2_resnet_fpn_backbone
from .resnet import build_dcnv2_resnet_backbone
from .spatial_transformer import SpatialTransformer

__all__ = [
    "build_dcnv2_resnet_backbone",
    "build_dcnv2_resnet_fpn_backbone",
    "DeformBottleneckBlock",
    "DeformBasicBlock",
    "SpatialTransformer",
]
