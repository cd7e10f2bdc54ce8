"""A demo run is deterministic for a given seed (the README's claim): the
same short training of the DCNv2 demo model, twice, each in a process of its
own as the demo runs them, gives the same weights, losses and evaluation."""

import json

import pytest
import torch
from helpers import ROOT, run_python

TRAIN = """
from pathlib import Path
from dcnv2_demo.datasets import register_demo_datasets
from dcnv2_demo.models import demo_config
from dcnv2_demo.pipeline import quick_opts, schedule_opts
from dcnv2_demo.training import RunSpec, train_and_evaluate

output = Path({output!r})
config = demo_config("dcnv2")
opts = ["SEED", "0", "OUTPUT_DIR", str(output), "MODEL.WEIGHTS", ""]
opts += schedule_opts(config, 4) + quick_opts(register_demo_datasets(quick=True))
train_and_evaluate(RunSpec(config, output, tuple(opts), quick=True, threads=2))
"""


def deterministic_metrics(output_dir):
    """metrics.json without what depends on the machine's speed (times, and
    NaN, the AP of a class without detections, as a string that compares)."""
    lines = [json.loads(line) for line in (output_dir / "metrics.json").read_text().splitlines() if line]
    timings = ("time", "eta_seconds", "seconds_per_image")
    return [
        {key: value if value == value else "nan" for key, value in line.items() if not key.endswith(timings)}
        for line in lines
    ]


@pytest.mark.slow
def test_two_runs_with_one_seed_give_identical_results(tmp_path):
    env = {"DCNV2_DATASETS": str(tmp_path / "datasets")}
    runs = [tmp_path / "first", tmp_path / "second"]
    for output in runs:
        run_python(TRAIN.format(output=str(output)), cwd=ROOT, env=env)

    first, second = (deterministic_metrics(output) for output in runs)
    assert first == second
    assert any("bbox/AP" in line for line in first) and any("total_loss" in line for line in first)
    weights = [torch.load(output / "model_final.pth", map_location="cpu")["model"] for output in runs]
    assert weights[0].keys() == weights[1].keys()
    for name in weights[0]:
        assert torch.equal(weights[0][name], weights[1][name]), name
