"""The package as a user installs it: a wheel built from this checkout,
installed into a folder of its own, used from another directory with its
packaged configs and its command."""

import json
import math
import subprocess
import sys
import zipfile

import pytest
from helpers import ROOT, run_python

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(site folder, wheel path): the wheel built and installed with pip."""
    wheels = tmp_path_factory.mktemp("wheels")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), "."],
        cwd=ROOT,
        check=True,
    )
    (wheel,) = wheels.glob("dcnv2_plugin-*.whl")
    site = tmp_path_factory.mktemp("site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)], check=True
    )
    return site, wheel


def test_wheel_holds_the_library_and_its_configs_only(installed):
    _, wheel = installed
    names = zipfile.ZipFile(wheel).namelist()
    assert any(name.startswith("dcnv2_plugin/_C") and name.endswith(".so") for name in names)
    assert "dcnv2_plugin/configs/COCO-Detection/faster_rcnn_R_50_FPN_mdconv_c3-c5_mdpool.yaml" in names
    assert "dcnv2_plugin/configs/demo/dcnv2.yaml" in names
    assert not [name for name in names if name.startswith(("tests/", "dcnv2_demo/", "tools/", "benchmarks/"))]


def test_installed_package_trains_and_evaluates_from_another_directory(installed, tmp_path):
    site, _ = installed
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {"PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}
    # The installed copy, not this checkout, is the one imported.
    where = run_python("import dcnv2_plugin.ops, dcnv2_plugin; print(dcnv2_plugin.__file__)", cwd=elsewhere, env=env)
    assert where.stdout.strip().startswith(str(site))

    # The installed command with a packaged config, on the embedded dataset.
    command = [str(site / "bin" / "dcnv2-train-net"), "--config-file", "demo/dcnv2.yaml"]
    opts = ["SOLVER.MAX_ITER", "3", "SOLVER.WARMUP_ITERS", "1", "SOLVER.STEPS", "()", "OUTPUT_DIR", "out"]
    result = subprocess.run(
        command + opts, cwd=elsewhere, env={**__import__("os").environ, **env}, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = [json.loads(line) for line in (elsewhere / "out" / "metrics.json").read_text().splitlines()]
    evaluation = [m for m in metrics if "bbox/AP" in m]
    assert evaluation and math.isfinite(evaluation[-1]["bbox/AP"]) and math.isfinite(evaluation[-1]["segm/AP"])
    assert (elsewhere / "out" / "model_final.pth").is_file()
