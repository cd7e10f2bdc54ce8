"""Which registered splits the demo trains and evaluates on.

The full demo uses the embedded dataset's default splits. The quick demo
(a smoke test of the pipeline) registers a handful of images of its own under
another name, so it never generates the full splits.
"""

from dataclasses import dataclass

from dcnv2_plugin.data import SplitSpec, register_shapes_dataset

QUICK_NAME_PREFIX = "dcnv2_demo_quick"
QUICK_SPLITS = {"train": SplitSpec(num_images=8, seed=0), "val": SplitSpec(num_images=4, seed=1)}


@dataclass(frozen=True)
class DemoDatasets:
    train: str
    val: str


def register_demo_datasets(quick: bool) -> DemoDatasets:
    """Registers the splits (cheap: images are generated on first use) and names them.

    Runs in every process that needs the names, since catalogs are per process.
    """
    names = (
        register_shapes_dataset(name_prefix=QUICK_NAME_PREFIX, splits=QUICK_SPLITS)
        if quick
        else register_shapes_dataset()
    )
    return DemoDatasets(train=names["train"], val=names["val"])
