"""The embedded dataset: shapes under strong geometric variation, in COCO format.

Nothing is registered at import. `register_shapes_dataset()` registers the
default splits as `dcnv2_shapes_train` and `dcnv2_shapes_val` (cheap: images
are generated the first time a split is loaded), and
`register_embedded_datasets(cfg)` does that when a config names them, as
`train_net.py` does. Real datasets are registered the usual detectron2 way
and work alongside.
"""

from .params import DEFAULT_PARAMS, DEFAULT_SPLITS, ShapesParams, SplitSpec
from .register import DEFAULT_NAME_PREFIX, register_embedded_datasets, register_shapes_dataset
from .shapes import CLASS_NAMES

__all__ = [
    "CLASS_NAMES",
    "DEFAULT_NAME_PREFIX",
    "DEFAULT_PARAMS",
    "DEFAULT_SPLITS",
    "ShapesParams",
    "SplitSpec",
    "register_embedded_datasets",
    "register_shapes_dataset",
]
