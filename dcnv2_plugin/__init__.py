"""Deformable ConvNets v2 for Detectron2.

Importing this package makes detectron2 importable even without its compiled
ops (see `_detectron2_compat`), registers the deformable backbones, poolers
and ROI heads in detectron2's registries, and exposes `add_dcnv2_config`.
"""

from . import _detectron2_compat

_detectron2_compat.install()

from . import (
    data,  # noqa: E402  (registers the embedded dataset's names)
    modeling,  # noqa: E402
    ops,  # noqa: E402
)
from .config import add_dcnv2_config  # noqa: E402
