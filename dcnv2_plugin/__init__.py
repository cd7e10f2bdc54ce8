"""Deformable ConvNets v2 for Detectron2.

- `import dcnv2_plugin` registers the plugin's components in detectron2's
  registries (backbones, ROI heads, the mimicking meta-architecture) and
  exposes `add_dcnv2_config`; it does nothing else (no datasets, no data).
- `import dcnv2_plugin.ops` gives the operators and their modules. They need
  torch only: without detectron2 installed, importing this package registers
  nothing and the operators still work.
"""

import importlib.util

__version__ = "0.1.0"

HAS_DETECTRON2 = importlib.util.find_spec("detectron2") is not None

if HAS_DETECTRON2:
    from . import _detectron2_compat

    _detectron2_compat.install()

    from . import modeling  # noqa: E402,F401  (its decorators register the components)
    from .config import add_dcnv2_config  # noqa: E402

    __all__ = ["add_dcnv2_config", "HAS_DETECTRON2", "__version__"]
else:
    __all__ = ["HAS_DETECTRON2", "__version__"]

    def __getattr__(name):
        if name in ("add_dcnv2_config", "modeling", "config", "engine", "data"):
            raise ImportError(
                f"dcnv2_plugin.{name} needs detectron2, which is not installed; the operators "
                "(dcnv2_plugin.ops) work with torch alone. See the README for how to install detectron2."
            )
        raise AttributeError(f"module 'dcnv2_plugin' has no attribute {name!r}")
