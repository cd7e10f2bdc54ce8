"""Stand-in for `detectron2._C`, detectron2's compiled ops, where they were not built.

Two detectron2 modules import `detectron2._C` at module level
(`detectron2.layers.deform_conv` and `detectron2.evaluation.fast_eval_api`), so
without it `detectron2.layers`, `detectron2.modeling` and `detectron2.evaluation`
fail at import, although Faster/Mask R-CNN never call into it (their RoIAlign
and NMS run on torchvision). This module lets them import; every op it is
asked for raises `MissingDetectron2Op`, naming the op, what needs it and how
to get it.

It is used two ways, always from this one file:
- `make` (tools/install_detectron2.sh) installs it as `detectron2/_C.py` into
  a detectron2 built without its compiled ops, so any import order works;
- `import dcnv2_plugin` loads it as `detectron2._C` when that is missing and
  nothing provided it yet.

It needs nothing but the standard library: it must load before (and without)
the rest of dcnv2_plugin.
"""

import warnings

# Lets dcnv2_plugin (and anyone) tell this stand-in from the real extension.
DCNV2_STAND_IN = True

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
    """A detectron2 op was called, but detectron2 was installed without its compiled ops."""


# detectron2.utils.collect_env calls these to describe the build.
def get_compiler_version():
    return "not built (detectron2 was installed without its compiled ops)"


def get_cuda_version():
    return "not built"


def has_cuda():
    return False


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)

    def missing(*args, **kwargs):
        raise MissingDetectron2Op(
            f"detectron2._C.{name} is unavailable: this detectron2 was installed without its "
            f"compiled ops, so {UNAVAILABLE} cannot run. To get them, {HOW_TO_GET}."
        )

    missing.__name__ = name
    return missing


warnings.warn(
    f"detectron2 was installed without its compiled ops (detectron2._C): {UNAVAILABLE} are "
    f"unavailable; COCO evaluation falls back to pycocotools. To get them, {HOW_TO_GET}.",
    stacklevel=2,
)
