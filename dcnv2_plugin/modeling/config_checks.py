"""Checks of a whole config, for mistakes that detectron2 would silently
ignore or report as someone else's error. `train_net.py` (the engine's
`setup`) runs them before anything is built; each raises a ValueError naming
the keys at fault and what to change."""

from detectron2.modeling import META_ARCH_REGISTRY


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


CONFIG_CHECKS = (check_mimic_architecture,)


def check_config(cfg) -> None:
    """Runs every check of CONFIG_CHECKS on `cfg`."""
    for check in CONFIG_CHECKS:
        check(cfg)
