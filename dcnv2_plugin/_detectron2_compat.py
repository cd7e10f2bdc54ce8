"""The one place that handles detectron2 installed without its compiled ops.

detectron2's C++/CUDA extension (`detectron2._C`) is missing when it was
built from a source archive without its sources (or the build failed).
Two of its modules import it at module level (`detectron2.layers.deform_conv`
and `detectron2.evaluation.fast_eval_api`), so without it `detectron2.layers`,
`detectron2.modeling` and `detectron2.evaluation` cannot even be imported,
although the Faster/Mask R-CNN path never calls into it (its RoIAlign and NMS
go through torchvision).

`install()` puts a stand-in `detectron2._C` module in `sys.modules` whose
functions raise an error naming what is unavailable and how to get it, and
reports the missing build in detectron2's environment summary. With a full
detectron2 install nothing is changed.
"""

import importlib
import importlib.util
import sys
import types
import warnings

_MODULE = "detectron2._C"

# What needs detectron2's compiled ops, for the error message.
UNAVAILABLE = (
    "detectron2's fast COCO evaluation (COCOEvaluator(use_fast_impl=True)), "
    "its own DeformConv/ModulatedDeformConv layers, and its other C++/CUDA ops"
)
HOW_TO_GET = (
    "install detectron2 from its source repository with its C++/CUDA extension "
    "(pip install 'git+https://github.com/facebookresearch/detectron2.git'); "
    "dcnv2_plugin's own operators and the pycocotools-based evaluation work without it"
)


class MissingDetectron2Op(RuntimeError):
    pass


class _MissingCompiledOps(types.ModuleType):
    """Stand-in for detectron2._C: every op raises MissingDetectron2Op."""

    dcnv2_stand_in = True

    def __init__(self):
        super().__init__(_MODULE, "stand-in for detectron2's missing compiled ops (see dcnv2_plugin)")

    # detectron2.utils.collect_env calls these to describe the build.
    @staticmethod
    def get_compiler_version():
        return "not built (detectron2 was installed without its compiled ops)"

    @staticmethod
    def get_cuda_version():
        return "not built"

    @staticmethod
    def has_cuda():
        return False

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)

        def missing(*args, **kwargs):
            raise MissingDetectron2Op(
                f"detectron2._C.{name} is unavailable: this detectron2 was installed without its "
                f"compiled ops, so {UNAVAILABLE} cannot run. To get them, {HOW_TO_GET}."
            )

        missing.__name__ = name
        return missing


def _real_ops_importable() -> bool:
    if _MODULE in sys.modules:
        return not getattr(sys.modules[_MODULE], "dcnv2_stand_in", False)
    if importlib.util.find_spec("detectron2") is None:
        raise ImportError("dcnv2_plugin needs detectron2; run `make env` or see the README")
    try:
        importlib.import_module(_MODULE)
        return True
    except ImportError:
        return False


def has_compiled_ops() -> bool:
    """True when detectron2's own C++/CUDA extension is installed and loads."""
    return _real_ops_importable()


def install() -> None:
    """Make detectron2 importable whether or not its compiled ops were built."""
    if _real_ops_importable() or _MODULE in sys.modules:
        return
    import detectron2

    stand_in = _MissingCompiledOps()
    sys.modules[_MODULE] = stand_in
    detectron2._C = stand_in
    warnings.warn(
        f"detectron2 was installed without its compiled ops (detectron2._C): {UNAVAILABLE} are "
        f"unavailable; evaluation falls back to pycocotools. To get them, {HOW_TO_GET}.",
        stacklevel=2,
    )
