"""Checks of a whole config, for mistakes that detectron2 would silently
ignore or report as someone else's error. `train_net.py` (the engine's
`setup`) runs them before anything is built; each raises a ValueError naming
the keys at fault and what to change, or, where the setting can be meant,
logs a warning that says what it does."""

import logging

from detectron2.modeling import META_ARCH_REGISTRY

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


CONFIG_CHECKS = (check_mimic_architecture, check_frozen_deformable_stages)


def check_config(cfg) -> None:
    """Runs every check of CONFIG_CHECKS on `cfg`."""
    for check in CONFIG_CHECKS:
        check(cfg)
