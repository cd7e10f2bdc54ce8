"""detectron2 with or without its compiled ops (`detectron2._C`).

detectron2 built from a source archive without its C++ sources (the package
index's snapshot, which `make` installs where upstream cannot be reached)
lacks `detectron2._C`. The stand-in `_missing_detectron2_ops` then takes its
place: `make` installs it into such a detectron2, so any import order works;
`install()` loads it at `import dcnv2_plugin` for a detectron2 that lacks
both. With a full detectron2 install nothing is changed.
"""

import importlib.util
import sys
from pathlib import Path

_MODULE = "detectron2._C"
STAND_IN_FILE = Path(__file__).with_name("_missing_detectron2_ops.py")


def _load_compiled_ops():
    """detectron2._C as it imports now (the real extension or the stand-in), or None."""
    if _MODULE in sys.modules:
        return sys.modules[_MODULE]
    try:
        return importlib.import_module(_MODULE)
    except ImportError:
        return None


def has_compiled_ops() -> bool:
    """True when detectron2's own C++/CUDA extension is installed and loads."""
    ops = _load_compiled_ops()
    return ops is not None and not getattr(ops, "DCNV2_STAND_IN", False)


def install() -> None:
    """Puts the stand-in in place of a missing detectron2._C (for this process)."""
    if _load_compiled_ops() is not None:
        return
    import detectron2

    spec = importlib.util.spec_from_file_location(_MODULE, STAND_IN_FILE)
    stand_in = importlib.util.module_from_spec(spec)
    sys.modules[_MODULE] = stand_in
    spec.loader.exec_module(stand_in)
    detectron2._C = stand_in
