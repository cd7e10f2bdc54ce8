"""The models the demo compares, each a packaged config in configs/demo/."""

from dataclasses import dataclass
from typing import Dict

from dcnv2_plugin.model_zoo import get_config_file


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


def demo_config(name: str) -> str:
    """The packaged demo config `name` (e.g. "dcnv2" or "Base-Demo")."""
    return get_config_file(f"demo/{name}.yaml")
