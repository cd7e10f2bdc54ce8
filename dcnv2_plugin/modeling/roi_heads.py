"""ROI heads whose poolers may be (modulated) deformable RoI pooling.

Registered in detectron2's ROI_HEADS_REGISTRY as `DCNv2ROIHeads`: detectron2's
`StandardROIHeads` whose box, mask and keypoint heads accept, besides
detectron2's pooler types, "DeformRoIPool" (DCNv1) and "ModulatedDeformRoIPool"
(DCNv2) in MODEL.ROI_BOX_HEAD / ROI_MASK_HEAD / ROI_KEYPOINT_HEAD.POOLER_TYPE.
The Cascade R-CNN and C4 heads (`cascade_roi_heads`, `res5_roi_heads`) build
their poolers with the helpers here.
"""

from typing import Callable, Dict

from detectron2.layers import ShapeSpec
from detectron2.modeling import ROI_HEADS_REGISTRY, StandardROIHeads
from detectron2.modeling.poolers import ROIPooler

from .config_checks import check_deformable_pooler_types, check_mimic_architecture
from .poolers import DEFORMABLE_POOLER_TYPES, DeformableROIPooler, check_pooler_type

# The heads that pool with POOLER_TYPE, by their config key.
ALL_POOLING_HEADS = ("ROI_BOX_HEAD", "ROI_MASK_HEAD", "ROI_KEYPOINT_HEAD")


def with_regular_pooler(cfg, head_key: str):
    """A copy of `cfg` whose MODEL.<head_key> pools with RoIAlignV2: detectron2
    builds a head for it with the pooled shape a deformable pooler has too."""
    regular_cfg = cfg.clone()
    regular_cfg.defrost()
    regular_cfg.MODEL[head_key].POOLER_TYPE = "ROIAlignV2"
    return regular_cfg


def head_pooler(cfg, head_key: str, input_shape: Dict[str, ShapeSpec]) -> ROIPooler:
    """The pooler MODEL.<head_key> asks for, on MODEL.ROI_HEADS.IN_FEATURES:
    detectron2's `ROIPooler` for its own types, a `DeformableROIPooler` (with a
    new offset branch) for this project's."""
    head_cfg = cfg.MODEL[head_key]
    pooler_type = head_cfg.POOLER_TYPE
    check_pooler_type(pooler_type, f"MODEL.{head_key}.POOLER_TYPE")
    in_features = cfg.MODEL.ROI_HEADS.IN_FEATURES
    scales = [1.0 / input_shape[f].stride for f in in_features]
    if pooler_type not in DEFORMABLE_POOLER_TYPES:
        return ROIPooler(head_cfg.POOLER_RESOLUTION, scales, head_cfg.POOLER_SAMPLING_RATIO, pooler_type)
    deform_pool = cfg.MODEL.DCNV2.DEFORM_POOL
    return DeformableROIPooler(
        output_size=head_cfg.POOLER_RESOLUTION,
        scales=scales,
        sampling_ratio=head_cfg.POOLER_SAMPLING_RATIO,
        in_channels=input_shape[in_features[0]].channels,
        modulated=DEFORMABLE_POOLER_TYPES[pooler_type],
        fc_dim=deform_pool.FC_DIM,
        gamma=deform_pool.GAMMA,
        branch_channels=deform_pool.BRANCH_CHANNELS,
    )


def init_head_with_pooler(init_head: Callable, cfg, input_shape, head_key: str, pooler_key: str) -> dict:
    """Runs detectron2's `init_head`, then swaps in a deformable pooler if the
    head's POOLER_TYPE asks for one."""
    pooler_type = cfg.MODEL[head_key].POOLER_TYPE
    if pooler_type not in DEFORMABLE_POOLER_TYPES:
        # detectron2 lets the mask and keypoint heads take whole feature maps
        # (no pooler) when their type is empty; the box head always needs one.
        if pooler_type or head_key == "ROI_BOX_HEAD":
            check_pooler_type(pooler_type, f"MODEL.{head_key}.POOLER_TYPE")
        return init_head(cfg, input_shape)
    ret = init_head(with_regular_pooler(cfg, head_key), input_shape)
    if pooler_key in ret:  # else the head is off (e.g. MODEL.MASK_ON is False)
        ret[pooler_key] = head_pooler(cfg, head_key, input_shape)
    return ret


class DeformableMaskAndKeypointPoolers:
    """Mixed into detectron2's `StandardROIHeads` and its subclasses: the
    mask and keypoint heads' poolers may be deformable, and the config is
    checked first. The box head is each class's own."""

    # The heads whose POOLER_TYPE may be deformable (read by
    # config_checks.check_deformable_pooler_types).
    deformable_pooler_heads = ALL_POOLING_HEADS

    @classmethod
    def from_config(cls, cfg, input_shape):
        check_mimic_architecture(cfg)
        check_deformable_pooler_types(cfg, cls)
        return super().from_config(cfg, input_shape)

    @classmethod
    def _init_mask_head(cls, cfg, input_shape):
        return init_head_with_pooler(super()._init_mask_head, cfg, input_shape, "ROI_MASK_HEAD", "mask_pooler")

    @classmethod
    def _init_keypoint_head(cls, cfg, input_shape):
        return init_head_with_pooler(
            super()._init_keypoint_head, cfg, input_shape, "ROI_KEYPOINT_HEAD", "keypoint_pooler"
        )


@ROI_HEADS_REGISTRY.register()
class DCNv2ROIHeads(DeformableMaskAndKeypointPoolers, StandardROIHeads):
    """`StandardROIHeads` with (modulated) deformable RoI pooling available to
    its box, mask and keypoint heads; see the module docstring."""

    @classmethod
    def _init_box_head(cls, cfg, input_shape):
        return init_head_with_pooler(super()._init_box_head, cfg, input_shape, "ROI_BOX_HEAD", "box_pooler")
