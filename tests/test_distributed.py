"""Data-parallel training on CPU processes (gloo), as `train_net.py --num-gpus N`
starts it with MODEL.DEVICE cpu, on one machine and on two simulated on one."""

import json
import math
import os
import socket
import subprocess
import sys

import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import build_model
from helpers import ROOT, train_checking_replicas

from dcnv2_demo.datasets import QUICK_NAME_PREFIX, register_demo_datasets
from dcnv2_plugin.config import load_config
from dcnv2_plugin.engine import launch, run
from dcnv2_plugin.engine.launch import available_cores

pytestmark = pytest.mark.skipif(available_cores() < 2, reason="needs two cores for two processes")


@pytest.fixture(scope="module")
def quick_splits(tmp_path_factory):
    """The quick demo splits, generated here once rather than by both processes
    (which find them through $DCNV2_DATASETS)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DCNV2_DATASETS", str(tmp_path_factory.mktemp("datasets")))
        # An earlier test in this process may have registered them elsewhere.
        for name in [name for name in DatasetCatalog.list() if name.startswith(QUICK_NAME_PREFIX)]:
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        datasets = register_demo_datasets(quick=True)
        DatasetCatalog.get(datasets.train)
        DatasetCatalog.get(datasets.val)
        yield datasets
        for name in (datasets.train, datasets.val):
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)


def command_line(datasets, output_dir, *launch_args):
    return [
        "--config-file", "demo/dcnv2_mimic.yaml", *launch_args,
        "DATASETS.TRAIN", f"('{datasets.train}',)", "DATASETS.TEST", f"('{datasets.val}',)",
        "SOLVER.IMS_PER_BATCH", "4", "SOLVER.MAX_ITER", "3", "SOLVER.WARMUP_ITERS", "1", "SOLVER.STEPS", "()",
        "DATALOADER.NUM_WORKERS", "0", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", "OUTPUT_DIR", str(output_dir),
    ]  # fmt: skip


def assert_trained_in_lockstep(output_dir, world_size, num_val_images):
    report = json.loads((output_dir / "replicas.json").read_text())
    assert report["world_size"] == world_size
    num_parameters = len(list(build_model(load_config("demo/dcnv2_mimic.yaml")).parameters()))
    assert [step["iteration"] for step in report["steps"]] == [0, 1, 2]
    for step in report["steps"]:
        assert step["ranks"] == world_size and step["parameters"] == num_parameters
        assert step["identical"], f"parameters differ across processes after iteration {step['iteration']}"
        assert {"loss_mimic", "loss_mimic_cls", "loss_cls"} <= set(step["losses"])
        assert all(math.isfinite(loss) for loss in step["losses"].values()), step["losses"]
    # Evaluation ran on every process and was gathered on rank 0: its results
    # cover all validation images, not only rank 0's share.
    assert math.isfinite(report["test"]["bbox"]["AP"])
    predictions = json.loads((output_dir / "inference" / "coco_instances_results.json").read_text())
    assert len({p["image_id"] for p in predictions}) == num_val_images


def test_two_cpu_processes_train_in_lockstep(quick_splits, tmp_path):
    output_dir = tmp_path / "run"
    run(command_line(quick_splits, output_dir, "--num-gpus", "2"), main_func=train_checking_replicas)
    assert_trained_in_lockstep(output_dir, 2, len(DatasetCatalog.get(quick_splits.val)))


@pytest.mark.slow
def test_two_machines_simulated_on_one(quick_splits, tmp_path):
    output_dir = tmp_path / "run"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"tcp://127.0.0.1:{sock.getsockname()[1]}"
    code = "import sys\nfrom helpers import train_checking_replicas\nfrom dcnv2_plugin.engine import run\n"
    code += "run(sys.argv[1:], main_func=train_checking_replicas)\n"
    machines = [
        subprocess.Popen(
            [sys.executable, "-c", code]
            + command_line(
                quick_splits,
                output_dir,
                "--num-gpus",
                "1",
                "--num-machines",
                "2",
                "--machine-rank",
                str(rank),
                "--dist-url",
                url,
            ),  # fmt: skip
            cwd=ROOT,
            # Both "machines" share this one's cores: one thread each.
            env={**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}", "OMP_NUM_THREADS": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    for rank, machine in enumerate(machines):
        output, _ = machine.communicate(timeout=600)
        assert machine.returncode == 0, f"machine {rank}:\n{output[-4000:]}"
    assert_trained_in_lockstep(output_dir, 2, len(DatasetCatalog.get(quick_splits.val)))


def _fail(*args):
    raise AssertionError("must not start")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"processes_per_machine": 64, "device": "cpu"}, "only .* core\\(s\\) are available: use --num-gpus"),
        ({"processes_per_machine": 1, "device": "cuda"}, "no CUDA GPU: set MODEL.DEVICE cpu"),
        ({"processes_per_machine": 1, "device": "cpu", "num_machines": 2, "dist_url": "auto"}, "--dist-url auto"),
        ({"processes_per_machine": 0, "device": "cpu"}, "must be at least 1"),
    ],
)
def test_a_launch_that_cannot_work_says_what_to_change(kwargs, match):
    if kwargs["device"] == "cuda" and __import__("torch").cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ValueError, match=match):
        launch(_fail, **kwargs)
