"""detectron2 with or without its compiled ops: the plugin imports in either
order, and a missing detectron2 op fails with an error that says what is
missing and how to get it. Each case runs in a fresh interpreter."""

import subprocess
import sys

import pytest

from dcnv2_plugin import _detectron2_compat

needs_missing_ops = pytest.mark.skipif(
    _detectron2_compat.has_compiled_ops(), reason="detectron2 here has its compiled ops"
)


def run_python(code):
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.parametrize(
    "imports",
    [
        "import dcnv2_plugin; import detectron2.modeling, detectron2.layers, detectron2.evaluation",
        "import detectron2, detectron2.config; import dcnv2_plugin; import detectron2.modeling, detectron2.evaluation",
    ],
    ids=["plugin-first", "detectron2-first"],
)
def test_plugin_imports_before_or_after_detectron2(imports):
    run_python(
        imports + "; from detectron2.modeling import BACKBONE_REGISTRY; "
        "assert 'build_dcnv2_resnet_fpn_backbone' in BACKBONE_REGISTRY"
    )


@needs_missing_ops
def test_missing_op_says_what_is_missing_and_how_to_get_it():
    result = run_python(
        "import dcnv2_plugin\n"
        "from detectron2 import _C\n"
        "try:\n"
        "    _C.COCOevalAccumulate(None, None)\n"
        "except RuntimeError as e:\n"
        "    print(e)\n"
        "else:\n"
        "    raise SystemExit('no error')\n"
    )
    message = result.stdout
    assert "COCOevalAccumulate is unavailable" in message
    assert "fast COCO evaluation" in message and "install detectron2 from its source" in message
    assert "compiled ops" in result.stderr  # the import-time warning


@needs_missing_ops
def test_environment_summary_reports_the_missing_build():
    # detectron2's default_setup prints collect_env_info(); it must not crash.
    result = run_python(
        "import dcnv2_plugin\nfrom detectron2.utils.collect_env import collect_env_info\nprint(collect_env_info())"
    )
    assert "not built" in result.stdout


@needs_missing_ops
def test_fast_coco_evaluation_is_reported_unavailable():
    assert not _detectron2_compat.has_compiled_ops()
    import detectron2._C

    assert getattr(detectron2._C, "dcnv2_stand_in", False)
    with pytest.raises(_detectron2_compat.MissingDetectron2Op, match="InstanceAnnotation is unavailable"):
        detectron2._C.InstanceAnnotation(0, 0.0, 0.0, False, False)
