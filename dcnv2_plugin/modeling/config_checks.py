"""Checks of a whole config, for mistakes that detectron2 would silently
ignore or report as someone else's error. `train_net.py` (the engine's
`setup`) runs them before anything is built; each raises a ValueError naming
the keys at fault and what to change, or, where the setting can be meant,
logs a warning that says what it does."""

import logging

from detectron2.modeling import META_ARCH_REGISTRY, ROI_HEADS_REGISTRY

from .poolers import DEFORMABLE_POOLER_TYPES, DETECTRON2_POOLER_TYPES

logger = logging.getLogger(__name__)


def check_mimic_architecture(cfg) -> None:
    """MODEL.DCNV2.MIMIC.ENABLED takes effect through the MimicRCNN
    meta-architecture only: refuse a config where it would do nothing."""
    if not cfg.MODEL.DCNV2.MIMIC.ENABLED:
        return
    from .mimic import MimicRCNN

    architecture = META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE)
    if not issubclass(architecture, MimicRCNN):
        raise ValueError(
            f"MODEL.DCNV2.MIMIC.ENABLED is True but MODEL.META_ARCHITECTURE is "
            f"'{cfg.MODEL.META_ARCHITECTURE}', which does not run the mimicking branch: "
            "set MODEL.META_ARCHITECTURE to 'MimicRCNN' (see the *_mimic.yaml configs)"
        )


def check_mimic_keys(cfg) -> None:
    """MODEL.DCNV2.MIMIC.REGIONS and CROP_BN name one of their settings."""
    from .mimic import check_mimic_settings

    check_mimic_settings(cfg.MODEL.DCNV2.MIMIC)


def _pooling_heads_in_use(cfg):
    """Config keys of the heads that pool: the box head, and the mask and
    keypoint heads when they are on."""
    heads = ["ROI_BOX_HEAD"]
    if cfg.MODEL.MASK_ON:
        heads.append("ROI_MASK_HEAD")
    if cfg.MODEL.KEYPOINT_ON:
        heads.append("ROI_KEYPOINT_HEAD")
    return heads


def check_deformable_pooler_types(cfg, head_class: type) -> None:
    """Refuse a deformable POOLER_TYPE in a head that the ROI heads class
    `head_class` does not pool deformably: detectron2's own heads would say
    "Unknown pooler type", C4's mask head (which has no pooler) nothing.

    A class lists the heads it can pool deformably, by config key, in its
    `deformable_pooler_heads` attribute."""
    honoured = getattr(head_class, "deformable_pooler_heads", ())
    for head_key in _pooling_heads_in_use(cfg):
        pooler_type = cfg.MODEL[head_key].POOLER_TYPE
        if pooler_type not in DEFORMABLE_POOLER_TYPES or head_key in honoured:
            continue
        able = [name for name, obj in ROI_HEADS_REGISTRY if head_key in getattr(obj, "deformable_pooler_heads", ())]
        if honoured:
            cannot = "pools deformably only with " + ", ".join(f"MODEL.{key}.POOLER_TYPE" for key in honoured)
        else:
            cannot = "has no deformable pooling"
        raise ValueError(
            f"MODEL.{head_key}.POOLER_TYPE is {pooler_type!r}, but MODEL.ROI_HEADS.NAME "
            f"{cfg.MODEL.ROI_HEADS.NAME!r} ({head_class.__module__}.{head_class.__name__}) {cannot}. "
            f"ROI heads that can: {', '.join(able)}. Set MODEL.ROI_HEADS.NAME to one of them, or "
            f"MODEL.{head_key}.POOLER_TYPE to one of {', '.join(DETECTRON2_POOLER_TYPES)}"
        )


def check_roi_heads_support(cfg) -> None:
    """The ROI heads MODEL.ROI_HEADS.NAME builds can do what the config asks
    of them: pool deformably where a POOLER_TYPE says so, and serve R-CNN
    feature mimicking when it is on. (An unknown name is left to detectron2.)"""
    if cfg.MODEL.ROI_HEADS.NAME not in ROI_HEADS_REGISTRY:
        return
    head_class = ROI_HEADS_REGISTRY.get(cfg.MODEL.ROI_HEADS.NAME)
    check_deformable_pooler_types(cfg, head_class)
    if cfg.MODEL.DCNV2.MIMIC.ENABLED:
        from .mimic import check_mimicked_roi_heads

        check_mimicked_roi_heads(head_class)


def check_frozen_deformable_stages(cfg) -> None:
    """MODEL.BACKBONE.FREEZE_AT freezes the stem and the stages res2 to
    res<FREEZE_AT>; a deformable stage among them keeps the offsets (and
    modulation) it is loaded with. That is right for fine-tuning weights whose
    offsets were trained, so this only warns; the trainer refuses to train
    frozen offsets that are still at their zero initialization."""
    freeze_at = cfg.MODEL.BACKBONE.FREEZE_AT
    # DEFORM_ON_PER_STAGE lists res2..res5; FREEZE_AT >= n freezes res<n>.
    stages = enumerate(cfg.MODEL.RESNETS.DEFORM_ON_PER_STAGE, start=2)
    frozen = [stage for stage, deformable in stages if deformable and freeze_at >= stage]
    if frozen:
        logger.warning(
            "MODEL.BACKBONE.FREEZE_AT=%d freezes the deformable stage(s) %s: their offsets and modulation will not "
            "train and stay as loaded from MODEL.WEIGHTS, or zero (regular convs) where the weights have none. "
            "Set MODEL.BACKBONE.FREEZE_AT below %d to train them.",
            freeze_at,
            ", ".join(f"res{stage}" for stage in frozen),
            frozen[0],
        )


CONFIG_CHECKS = (
    check_mimic_architecture,
    check_mimic_keys,
    check_roi_heads_support,
    check_frozen_deformable_stages,
)


def check_config(cfg) -> None:
    """Runs every check of CONFIG_CHECKS on `cfg`."""
    for check in CONFIG_CHECKS:
        check(cfg)
