"""The models the demo compares, each a packaged config in configs/demo/."""

from dataclasses import dataclass
from typing import Dict, Tuple

from dcnv2_plugin.model_zoo import get_config_file


@dataclass(frozen=True)
class DemoModel:
    name: str  # the config's file stem and the run folder's name
    title: str  # the row's label in the table and the plot
    # Training time per iteration relative to the regular model (measured by
    # `make demo DEMO_ARGS="--ablation --seed 0 1 2"` and `--seed 0 1 2` on
    # an idle 2-core CPU, means over three seeds): the demo starts the
    # longest runs first, so that runs side by side finish close together.
    relative_cost: float = 1.0


DEMO_MODELS: Dict[str, DemoModel] = {
    model.name: model
    for model in (
        DemoModel("regular", "regular (RoIAlign)"),
        DemoModel("stn", "STN @res3", relative_cost=1.05),
        DemoModel("dcnv1", "DCNv1 (dconv c3-c5 + dpool)", relative_cost=1.05),
        DemoModel("dcnv2", "DCNv2 (mdconv c3-c5 + mdpool)", relative_cost=1.15),
        DemoModel("dcnv2_mimic", "DCNv2 + mimicking", relative_cost=1.85),
    )
}

# tools/demo.py --ablation: the rows of the paper's Table 1 (deformable
# modules, added one at a time) and Table 3 (which RoIs are mimicked), all
# from the same shared start. Models of the demo's table are reused.
ABLATION_MODELS: Dict[str, DemoModel] = {
    model.name: model
    for model in (
        DemoModel("dconv_c5", "dconv @c5", relative_cost=1.0),
        DemoModel("dconv_c3-c5", "dconv @c3-c5", relative_cost=1.1),
        DemoModel("dcnv2_mimic_bg", "DCNv2 + mimicking BG only", relative_cost=1.75),
        DemoModel("dcnv2_mimic_fgbg", "DCNv2 + mimicking FG & BG", relative_cost=1.75),
    )
}
ALL_MODELS: Dict[str, DemoModel] = {**DEMO_MODELS, **ABLATION_MODELS}
ABLATION_TABLES: Dict[str, Tuple[str, ...]] = {
    "The paper's Table 1, deformable modules (its Mask R-CNN box AP on COCO: 36.6, 40.2, 42.2, 42.4, 43.1)": (
        "regular",
        "dconv_c5",
        "dconv_c3-c5",
        "dcnv1",
        "dcnv2",
    ),
    "The paper's Table 3, mimicked regions (its Mask R-CNN box AP on COCO: 43.1, 44.3, 43.3, 43.4)": (
        "dcnv2",
        "dcnv2_mimic",
        "dcnv2_mimic_bg",
        "dcnv2_mimic_fgbg",
    ),
}
ABLATION_ROWS: Tuple[str, ...] = tuple(dict.fromkeys(name for rows in ABLATION_TABLES.values() for name in rows))


def demo_config(name: str) -> str:
    """The packaged demo config `name` (e.g. "dcnv2" or "Base-Demo")."""
    return get_config_file(f"demo/{name}.yaml")
