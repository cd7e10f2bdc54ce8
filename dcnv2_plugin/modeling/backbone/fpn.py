"""FPN on the DCNv2 ResNet. detectron2's FPN builder calls its own ResNet
builder directly, so the FPN needs a builder of its own."""

from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool

from .resnet import build_dcnv2_resnet_backbone


@BACKBONE_REGISTRY.register()
def build_dcnv2_resnet_fpn_backbone(cfg, input_shape: ShapeSpec) -> FPN:
    """detectron2's `build_resnet_fpn_backbone` with `build_dcnv2_resnet_backbone`
    as the bottom-up network (same MODEL.FPN keys)."""
    return FPN(
        bottom_up=build_dcnv2_resnet_backbone(cfg, input_shape),
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelMaxPool(),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )
