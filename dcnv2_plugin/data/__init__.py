"""The embedded dataset: shapes under strong geometric variation, in COCO format.

Importing this package registers `dcnv2_shapes_train` and `dcnv2_shapes_val`
in detectron2's catalogs; their images are generated on first use (see
`register`). Real datasets are registered the usual detectron2 way and work
alongside.
"""

from .generate import default_root, ensure_split
from .params import DEFAULT_PARAMS, DEFAULT_SPLITS, ShapesParams, SplitSpec
from .register import DEFAULT_NAME_PREFIX, register_shapes_dataset
from .shapes import CLASS_NAMES

DEFAULT_DATASET_NAMES = register_shapes_dataset()

__all__ = [
    "CLASS_NAMES",
    "DEFAULT_DATASET_NAMES",
    "DEFAULT_NAME_PREFIX",
    "DEFAULT_PARAMS",
    "DEFAULT_SPLITS",
    "ShapesParams",
    "SplitSpec",
    "default_root",
    "ensure_split",
    "register_shapes_dataset",
]
