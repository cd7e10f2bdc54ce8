"""ROI heads whose poolers may be (modulated) deformable RoI pooling.

Registered in detectron2's ROI_HEADS_REGISTRY as `DCNv2ROIHeads`. Besides
detectron2's pooler types, MODEL.ROI_BOX_HEAD.POOLER_TYPE and
MODEL.ROI_MASK_HEAD.POOLER_TYPE accept "DeformRoIPool" (DCNv1) and
"ModulatedDeformRoIPool" (DCNv2); everything else is `StandardROIHeads`.
"""

from detectron2.modeling import ROI_HEADS_REGISTRY, StandardROIHeads

from .config_checks import check_mimic_architecture
from .poolers import DEFORMABLE_POOLER_TYPES, DeformableROIPooler, check_pooler_type


def _init_head_with_pooler(init_head, cfg, input_shape, head_key: str, pooler_key: str) -> dict:
    """Runs detectron2's `init_head`, then swaps in a deformable pooler if the
    head's POOLER_TYPE asks for one."""
    head_cfg = cfg.MODEL[head_key]
    pooler_type = head_cfg.POOLER_TYPE
    # detectron2 lets the mask head take whole feature maps (no pooler) when
    # its type is empty; the box head always needs a pooler.
    if pooler_type or head_key == "ROI_BOX_HEAD":
        check_pooler_type(pooler_type, f"MODEL.{head_key}.POOLER_TYPE")
    if pooler_type not in DEFORMABLE_POOLER_TYPES:
        return init_head(cfg, input_shape)

    # The head detectron2 builds for an RoIAlignV2 pooler takes the same
    # pooled shape; only the pooler is replaced.
    regular_cfg = cfg.clone()
    regular_cfg.defrost()
    regular_cfg.MODEL[head_key].POOLER_TYPE = "ROIAlignV2"
    ret = init_head(regular_cfg, input_shape)
    if pooler_key not in ret:  # the head is off (e.g. MODEL.MASK_ON is False)
        return ret
    in_features = cfg.MODEL.ROI_HEADS.IN_FEATURES
    ret[pooler_key] = DeformableROIPooler(
        output_size=head_cfg.POOLER_RESOLUTION,
        scales=[1.0 / input_shape[f].stride for f in in_features],
        sampling_ratio=head_cfg.POOLER_SAMPLING_RATIO,
        in_channels=input_shape[in_features[0]].channels,
        modulated=DEFORMABLE_POOLER_TYPES[pooler_type],
        fc_dim=cfg.MODEL.DCNV2.DEFORM_POOL.FC_DIM,
        gamma=cfg.MODEL.DCNV2.DEFORM_POOL.GAMMA,
    )
    return ret


@ROI_HEADS_REGISTRY.register()
class DCNv2ROIHeads(StandardROIHeads):
    """`StandardROIHeads` with (modulated) deformable RoI pooling available to
    its box and mask heads; see the module docstring."""

    @classmethod
    def from_config(cls, cfg, input_shape):
        check_mimic_architecture(cfg)
        return super().from_config(cfg, input_shape)

    @classmethod
    def _init_box_head(cls, cfg, input_shape):
        return _init_head_with_pooler(super()._init_box_head, cfg, input_shape, "ROI_BOX_HEAD", "box_pooler")

    @classmethod
    def _init_mask_head(cls, cfg, input_shape):
        return _init_head_with_pooler(super()._init_mask_head, cfg, input_shape, "ROI_MASK_HEAD", "mask_pooler")
