"""What each import does, in a fresh interpreter each: the operators without
detectron2, the plugin in any import order with detectron2 (with or without
its compiled ops), and nothing else loaded or registered on the way."""

import pytest
from helpers import run_python

from dcnv2_plugin import _detectron2_compat

HAS_COMPILED_OPS = _detectron2_compat.has_compiled_ops()

# `None` in sys.modules makes a module unimportable, and find_spec() report
# it missing: as if it were not installed.
HIDE = "import sys\nfor name in {names!r}:\n    sys.modules[name] = None\n"

REGISTERED = (
    "from detectron2.modeling import BACKBONE_REGISTRY, META_ARCH_REGISTRY, ROI_HEADS_REGISTRY\n"
    "assert 'build_dcnv2_resnet_fpn_backbone' in BACKBONE_REGISTRY\n"
    "assert 'DCNv2ROIHeads' in ROI_HEADS_REGISTRY and 'MimicRCNN' in META_ARCH_REGISTRY\n"
)

OPERATORS_RUN = """
import torch
from dcnv2_plugin.ops import DeformConv2d, DeformConv2dPack, DeformRoIPool, deform_conv2d, deform_roi_pool
x = torch.randn(2, 4, 8, 8, requires_grad=True)
layer = DeformConv2dPack(4, 6, 3, padding=1)
layer(x).sum().backward()
assert x.grad.abs().sum() > 0 and layer.conv_offset.weight.grad is not None
rois = torch.tensor([[0, 1.0, 1.0, 6.0, 7.0], [1, 0.0, 2.0, 5.0, 5.0]])
pooled = DeformRoIPool(3, spatial_scale=1.0)(x, rois, torch.zeros(2, 2, 3, 3), torch.ones(2, 1, 3, 3))
assert pooled.shape == (2, 4, 3, 3)
"""


def test_operators_need_torch_only():
    code = HIDE.format(names=("detectron2", "cv2", "pycocotools", "fvcore")) + OPERATORS_RUN
    code += """
import dcnv2_plugin
assert not dcnv2_plugin.HAS_DETECTRON2
try:
    dcnv2_plugin.add_dcnv2_config
except ImportError as e:
    assert "needs detectron2" in str(e) and "dcnv2_plugin.ops" in str(e), e
else:
    raise SystemExit("add_dcnv2_config without detectron2 gave no error")
loaded = sorted(m for m in sys.modules if sys.modules[m] is not None and m.split(".")[0] in
                ("detectron2", "cv2", "pycocotools", "fvcore", "matplotlib"))
assert not loaded, loaded
"""
    run_python(code)


ORDERS = {
    "plugin-first": "import dcnv2_plugin\nimport detectron2.modeling, detectron2.evaluation\n"
    "from detectron2.engine import DefaultTrainer\n",
    "detectron2-first": "from detectron2.engine import DefaultTrainer\nimport detectron2.modeling\n"
    "import detectron2.evaluation, detectron2.layers\nimport dcnv2_plugin\n",
    "evaluation-then-ops": "import detectron2.evaluation\nimport dcnv2_plugin.ops\n",
    "ops-only": "import dcnv2_plugin.ops\n",
}


@pytest.mark.parametrize("order", ORDERS)
def test_any_import_order_registers_the_components(order):
    result = run_python(ORDERS[order] + REGISTERED + OPERATORS_RUN)
    assert ("compiled ops" in result.stderr) == (not HAS_COMPILED_OPS)  # detectron2's missing ops are reported


def test_import_registers_components_and_nothing_else():
    code = """
import sys
import dcnv2_plugin
from detectron2.data import DatasetCatalog
assert not [name for name in DatasetCatalog.list() if name.startswith("dcnv2")], DatasetCatalog.list()
loaded = [m for m in ("dcnv2_plugin.data", "dcnv2_plugin.visualization", "dcnv2_plugin.engine", "dcnv2_demo",
                      "matplotlib") if m in sys.modules]
assert not loaded, loaded
"""
    run_python(code + REGISTERED)


@pytest.mark.skipif(HAS_COMPILED_OPS, reason="detectron2 here has its compiled ops")
def test_a_detectron2_without_any_stand_in_imports_after_the_plugin():
    """A detectron2 that lacks its compiled ops and the stand-in `make`
    installs: `import dcnv2_plugin` first puts the stand-in in place."""
    hide = HIDE.format(names=("detectron2._C",))
    failing = run_python(hide + "import detectron2.modeling\n", check=False)
    assert failing.returncode != 0 and "detectron2._C" in failing.stderr  # the case the stand-in is for
    run_python(hide + ORDERS["plugin-first"] + REGISTERED + "assert sys.modules['detectron2._C'].DCNV2_STAND_IN\n")


@pytest.mark.skipif(HAS_COMPILED_OPS, reason="detectron2 here has its compiled ops")
def test_missing_op_says_what_is_missing_and_how_to_get_it():
    result = run_python(
        "from detectron2 import _C\n"
        "try:\n"
        "    _C.COCOevalAccumulate(None, None)\n"
        "except RuntimeError as e:\n"
        "    print(type(e).__name__, e)\n"
        "else:\n"
        "    raise SystemExit('no error')\n"
    )
    message = result.stdout
    assert message.startswith("MissingDetectron2Op detectron2._C.COCOevalAccumulate is unavailable")
    assert "fast COCO evaluation" in message and "install detectron2 from its source" in message
    assert "compiled ops" in result.stderr  # the import-time warning


@pytest.mark.skipif(HAS_COMPILED_OPS, reason="detectron2 here has its compiled ops")
def test_environment_summary_reports_the_missing_build():
    # detectron2's default_setup prints collect_env_info(); it must not crash.
    result = run_python("from detectron2.utils.collect_env import collect_env_info\nprint(collect_env_info())")
    assert "not built" in result.stdout


def test_has_compiled_ops_tells_the_stand_in_from_the_extension():
    import detectron2._C

    assert HAS_COMPILED_OPS == (not getattr(detectron2._C, "DCNV2_STAND_IN", False))
