"""Model components; importing this registers them in detectron2's registries:
backbones `build_dcnv2_resnet_backbone` and `build_dcnv2_resnet_fpn_backbone`,
ROI heads `DCNv2ROIHeads`, `DCNv2CascadeROIHeads` and `DCNv2Res5ROIHeads`,
meta-architecture `MimicRCNN`."""

from .backbone import (
    DeformBasicBlock,
    DeformBottleneckBlock,
    SpatialTransformer,
    build_dcnv2_resnet_backbone,
    build_dcnv2_resnet_fpn_backbone,
)
from .cascade_roi_heads import DCNv2CascadeROIHeads
from .config_checks import check_config
from .mimic import MimicRCNN
from .optimizer import build_optimizer
from .poolers import DeformableROIPooler
from .res5_roi_heads import DCNv2Res5ROIHeads
from .roi_heads import DCNv2ROIHeads

__all__ = [
    "build_dcnv2_resnet_backbone",
    "build_dcnv2_resnet_fpn_backbone",
    "DeformBottleneckBlock",
    "DeformBasicBlock",
    "SpatialTransformer",
    "DeformableROIPooler",
    "DCNv2ROIHeads",
    "DCNv2CascadeROIHeads",
    "DCNv2Res5ROIHeads",
    "MimicRCNN",
    "build_optimizer",
    "check_config",
]
