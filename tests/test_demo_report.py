"""The demo's table from known run folders: what summarize reads from each
run's metrics.json and config.yaml, and how it aggregates the seeds."""

import json

import pytest
from detectron2.modeling import build_model

from dcnv2_demo import DEMO_MODELS
from dcnv2_demo.models import demo_config
from dcnv2_demo.report import Run, summarize
from dcnv2_plugin.config import load_config

# Per model, per seed 0 / 1 / 2: what COCOEvaluator logged (distinct numbers
# per task and metric, so that a mix-up shows), the iteration times and the
# inference time. Binary fractions whose means are exact floats.
NAN = float("nan")  # COCOEvaluator's AP of a task without predictions
EVALUATIONS = {
    "regular": [
        {"bbox/AP": 21.0, "bbox/AP50": 40.0, "bbox/AP75": 20.0, "segm/AP": 18.0, "segm/AP50": 35.0, "segm/AP75": 16.0},
        {"bbox/AP": 25.5, "bbox/AP50": 44.5, "bbox/AP75": 27.5, "segm/AP": 19.5, "segm/AP50": 36.5, "segm/AP75": 17.5},
        {"bbox/AP": 22.5, "bbox/AP50": 43.0, "bbox/AP75": 24.5, "segm/AP": 21.0, "segm/AP50": 38.0, "segm/AP75": 19.0},
    ],
    "dcnv2": [
        {"bbox/AP": 30.0, "bbox/AP50": 50.0, "bbox/AP75": 31.0, "segm/AP": 26.0, "segm/AP50": 45.0, "segm/AP75": 27.0},
        {"bbox/AP": 28.0, "bbox/AP50": 49.0, "bbox/AP75": 30.0, "segm/AP": 24.0, "segm/AP50": 43.0, "segm/AP75": 25.0},
        {"bbox/AP": 29.0, "bbox/AP50": 48.0, "bbox/AP75": NAN, "segm/AP": 25.0, "segm/AP50": 44.0, "segm/AP75": 26.0},
    ],
}  # fmt: skip
# Medians 0.375 / 0.25 / 0.5 and 0.875 / 0.75 / 0.625.
ITERATION_TIMES = {
    "regular": [[0.5, 0.25, 0.375], [0.125, 0.625, 0.25], [0.5, 0.625, 0.25]],
    "dcnv2": [[1.0, 0.75], [0.5, 1.0], [0.5, 0.75]],
}
INFERENCE_SECONDS = {"regular": [0.0625, 0.03125, 0.09375], "dcnv2": [0.125, 0.25, 0.1875]}


def write_run_folder(folder, config_dump, evaluation, iteration_times, inference_seconds):
    """A run folder as detectron2 leaves it: config.yaml, and metrics.json with
    one line per logged iteration and the evaluation hook's line after the
    last one."""
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(config_dump)
    lines = [{"iteration": i, "time": t, "total_loss": 1.0 / (i + 1)} for i, t in enumerate(iteration_times)]
    # An earlier evaluation, which the table must not use.
    lines.insert(1, {"iteration": 0, **{key: 0.0 for key in evaluation}, "inference/seconds_per_image": 9.0})
    lines.append(
        {"iteration": len(iteration_times) - 1, **evaluation, "inference/seconds_per_image": inference_seconds}
    )
    (folder / "metrics.json").write_text("\n".join(json.dumps(line) for line in lines) + "\n")


@pytest.fixture(scope="module")
def summary(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    configs = {name: load_config(demo_config(name)).dump() for name in EVALUATIONS}
    runs = []
    for seed in range(3):  # interleaved, as the demo lists them
        for name in EVALUATIONS:
            run = Run(DEMO_MODELS[name], seed, root / f"{name}_seed{seed}")
            write_run_folder(
                run.output_dir,
                configs[name],
                EVALUATIONS[name][seed],
                ITERATION_TIMES[name][seed],
                INFERENCE_SECONDS[name][seed],
            )
            runs.append(run)
    return summarize(runs)


def test_one_entry_per_model_in_run_order_with_its_runs_by_seed(summary):
    assert [(entry["name"], entry["title"]) for entry in summary] == [
        ("regular", DEMO_MODELS["regular"].title),
        ("dcnv2", DEMO_MODELS["dcnv2"].title),
    ]
    for entry in summary:
        assert [run["seed"] for run in entry["runs"]] == [0, 1, 2]


def test_each_run_reads_its_last_evaluation_with_box_and_mask_mapped(summary):
    regular_seed1 = summary[0]["runs"][1]
    assert regular_seed1 == {
        "seed": 1,
        "box_AP": 25.5, "box_AP50": 44.5, "box_AP75": 27.5,
        "mask_AP": 19.5, "mask_AP50": 36.5, "mask_AP75": 17.5,
        "parameters": regular_seed1["parameters"],  # see the test below
        "train_seconds_per_iter": 0.25,  # the median iteration time
        "inference_seconds_per_image": 0.03125,
    }  # fmt: skip
    assert summary[1]["runs"][2]["box_AP75"] is None  # NaN: nothing to score


def test_means_and_half_ranges_across_the_seeds(summary):
    regular, dcnv2 = summary

    def aggregate(mean, half_range):
        return {"mean": mean, "half_range": half_range}

    assert {key: value for key, value in regular.items() if key not in ("name", "title", "runs", "parameters")} == {
        "box_AP": aggregate(23.0, 2.25),
        "box_AP50": aggregate(42.5, 2.25),
        "box_AP75": aggregate(24.0, 3.75),
        "mask_AP": aggregate(19.5, 1.5),
        "mask_AP50": aggregate(36.5, 1.5),
        "mask_AP75": aggregate(17.5, 1.5),
        "train_seconds_per_iter": aggregate(0.375, 0.125),
        "inference_seconds_per_image": aggregate(0.0625, 0.03125),
    }
    assert {key: value for key, value in dcnv2.items() if key not in ("name", "title", "runs", "parameters")} == {
        "box_AP": aggregate(29.0, 1.0),
        "box_AP50": aggregate(49.0, 1.0),
        "box_AP75": aggregate(None, None),  # one seed had nothing to score
        "mask_AP": aggregate(25.0, 1.0),
        "mask_AP50": aggregate(44.0, 1.0),
        "mask_AP75": aggregate(26.0, 1.0),
        "train_seconds_per_iter": aggregate(0.75, 0.125),
        "inference_seconds_per_image": aggregate(0.1875, 0.0625),
    }


def test_parameters_are_those_of_the_model_each_run_trained(summary):
    for entry in summary:
        count = sum(p.numel() for p in build_model(load_config(demo_config(entry["name"]))).parameters())
        assert entry["parameters"] == {"mean": count, "half_range": 0}
    assert summary[1]["parameters"]["mean"] > summary[0]["parameters"]["mean"]
