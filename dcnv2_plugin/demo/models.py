"""The models the demo compares, each a config file in configs/demo/."""

from dataclasses import dataclass
from pathlib import Path
from typing import Dict

from detectron2.config import CfgNode, get_cfg

from ..config import add_dcnv2_config


@dataclass(frozen=True)
class DemoModel:
    name: str  # the config's file stem and the run folder's name
    title: str  # the row's label in the table and the plot
    # Training time per iteration relative to the regular model (measured on
    # the demo's CPU): the demo starts the longest runs first, so that runs
    # side by side finish close together.
    relative_cost: float = 1.0


DEMO_MODELS: Dict[str, DemoModel] = {
    model.name: model
    for model in (
        DemoModel("regular", "regular (RoIAlign)"),
        DemoModel("stn", "STN @res3", relative_cost=1.05),
        DemoModel("dcnv1", "DCNv1 (dconv c3-c5 + dpool)", relative_cost=1.15),
        DemoModel("dcnv2", "DCNv2 (mdconv c3-c5 + mdpool)", relative_cost=1.15),
        DemoModel("dcnv2_mimic", "DCNv2 + mimicking", relative_cost=1.8),
    )
}


def load_config(config_file: Path) -> CfgNode:
    """A demo config (or one detectron2 saved from it), with the project's keys."""
    cfg = get_cfg()
    add_dcnv2_config(cfg)
    cfg.merge_from_file(str(config_file))
    return cfg
