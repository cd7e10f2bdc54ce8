"""The CPU demo: its configs, its table, and a quick run of the whole pipeline."""

import json
import math
from pathlib import Path

import pytest
from detectron2.modeling import build_model
from helpers import ROOT
from PIL import Image

from dcnv2_demo import DEMO_MODELS
from dcnv2_demo.cli import main as demo_main
from dcnv2_demo.pipeline import schedule_opts
from dcnv2_demo.report import Run, markdown_table
from dcnv2_demo.scheduler import run_all
from dcnv2_demo.training import RunSpec
from dcnv2_plugin.config import load_config

CONFIG_DIR = ROOT / "configs" / "demo"

# What each model changes in the regular model's config: nothing else may
# differ, or the comparison would not isolate the deformable modules.
DCN_KEYS = {"MODEL.RESNETS.DEFORM_ON_PER_STAGE", "MODEL.RESNETS.DEFORM_MODULATED", "MODEL.ROI_BOX_HEAD.POOLER_TYPE"}
ALLOWED_CHANGES = {
    "regular": set(),
    "stn": {"MODEL.DCNV2.STN.ENABLED", "MODEL.DCNV2.STN.HIDDEN_DIM"},
    "dcnv1": DCN_KEYS - {"MODEL.RESNETS.DEFORM_MODULATED"},  # unmodulated is detectron2's default
    "dcnv2": DCN_KEYS,
    "dcnv2_mimic": DCN_KEYS
    | {
        "MODEL.META_ARCHITECTURE",
        "MODEL.DCNV2.MIMIC.ENABLED",
        "MODEL.DCNV2.MIMIC.NUM_POS_ROIS",
        "MODEL.DCNV2.MIMIC.CROP_SIZE",
    },
}


def flatten(node, prefix=""):
    flat = {}
    for key, value in node.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def test_every_demo_model_has_a_config_and_an_allowed_list():
    assert set(ALLOWED_CHANGES) == set(DEMO_MODELS)
    for name in DEMO_MODELS:
        assert (CONFIG_DIR / f"{name}.yaml").is_file()


@pytest.mark.parametrize("name", [name for name in DEMO_MODELS if name != "regular"])
def test_configs_differ_from_the_regular_one_only_in_their_modules(name):
    regular = flatten(load_config(CONFIG_DIR / "regular.yaml"))
    model = flatten(load_config(CONFIG_DIR / f"{name}.yaml"))
    changed = {key for key in regular if regular[key] != model[key]}
    assert changed == ALLOWED_CHANGES[name]


def test_the_demo_models_have_the_ablations_modules():
    def module_types(name):
        return {type(m).__name__ for m in build_model(load_config(CONFIG_DIR / f"{name}.yaml")).modules()}

    regular = module_types("regular")
    assert {"BasicStem", "BottleneckBlock", "ROIPooler"} <= regular
    assert not regular & {"DeformBottleneckBlock", "DeformableROIPooler", "SpatialTransformer"}
    assert "SpatialTransformer" in module_types("stn")
    for name in ("dcnv1", "dcnv2", "dcnv2_mimic"):
        assert {"DeformBottleneckBlock", "DeformableROIPooler"} <= module_types(name)
    assert "RCNNFeatureMimicking" in module_types("dcnv2_mimic")


def test_iters_override_keeps_the_schedule_in_proportion():
    base = load_config(CONFIG_DIR / "Base-Demo.yaml").SOLVER
    assert (base.MAX_ITER, tuple(base.STEPS), base.WARMUP_ITERS) == (1000, (800,), 100)
    assert schedule_opts("demo/dcnv2.yaml", 20) == [
        "SOLVER.MAX_ITER", "20", "SOLVER.STEPS", "(16,)", "SOLVER.WARMUP_ITERS", "2",
    ]  # fmt: skip


def test_the_shared_start_is_the_regular_model_with_its_own_schedule():
    regular = flatten(load_config(CONFIG_DIR / "regular.yaml"))
    start = flatten(load_config(CONFIG_DIR / "start.yaml"))
    assert {key for key in regular if regular[key] != start[key]} == {
        "SOLVER.MAX_ITER", "SOLVER.STEPS", "SOLVER.WARMUP_ITERS",
    }  # fmt: skip


def test_a_failed_run_stops_the_demo_with_the_end_of_its_log(tmp_path, capsys):
    run = Run(DEMO_MODELS["regular"], 0, tmp_path / "run")
    spec = RunSpec("demo/regular.yaml", run.output_dir, ("MODEL.NO_SUCH_KEY", "1"), True)
    with pytest.raises(RuntimeError, match="training regular.yaml failed"):
        run_all([("regular", run, spec)], jobs=2, iters=4, progress_seconds=60)
    assert "NO_SUCH_KEY" in capsys.readouterr().err


def test_table_shows_mean_and_half_range_across_seeds():
    def aggregate(mean, half_range):
        return {"mean": mean, "half_range": half_range}

    summary = [{
        "title": "DCNv2",
        "box_AP": aggregate(30.0, 2.0), "box_AP50": aggregate(50.0, 0.0), "box_AP75": aggregate(None, None),
        "parameters": aggregate(2_634_786, 0.0),
        "train_seconds_per_iter": aggregate(0.612, 0.01),
        "inference_seconds_per_image": aggregate(0.0421, 0.0),
    }]  # fmt: skip
    header, rule, row = markdown_table(summary).splitlines()
    assert header == "| model | box AP | box AP50 | box AP75 | params (M) | train s/iter | inference ms/image |"
    assert rule == "|---|---:|---:|---:|---:|---:|---:|"
    assert row == "| DCNv2 | 30.0 ± 2.0 | 50.0 | n/a | 2.63 | 0.61 ± 0.01 | 42 |"


def assert_png(path: Path):
    with Image.open(path) as image:
        assert image.format == "PNG" and min(image.size) > 100


def test_quick_demo_writes_the_table_the_json_and_the_pictures(tmp_path, monkeypatch, capsys):
    # The quick splits are generated under the test's own folder.
    monkeypatch.setenv("DCNV2_DATASETS", str(tmp_path / "datasets"))
    output = tmp_path / "demo"
    models = ["regular", "dcnv2"]
    returned = demo_main(["--output", str(output), "--quick", "--models", *models, "--jobs", "2"])

    written = json.loads((output / "results.json").read_text())
    assert written == returned
    assert written["iterations"] == 4 and written["start_iterations"] == 4 and written["seeds"] == [0]
    assert written["runs_at_once"] == 2
    assert [model["name"] for model in written["models"]] == models
    measured = [f"{task}_{metric}" for task in ("box", "mask") for metric in ("AP", "AP50", "AP75")]
    measured += ["parameters", "train_seconds_per_iter", "inference_seconds_per_image"]
    assert set(written["start"]) == {"seed", *measured}
    for model in written["models"]:
        (run,) = model["runs"]
        assert set(run) == {"seed", *measured}
        for key in measured:
            assert math.isfinite(run[key]) and run[key] >= 0, (model["name"], key, run[key])
            assert model[key] == {"mean": run[key], "half_range": 0.0}
        assert run["train_seconds_per_iter"] > 0 and run["inference_seconds_per_image"] > 0
    regular, dcnv2 = written["models"]
    assert dcnv2["parameters"]["mean"] > regular["parameters"]["mean"]  # offset convs and pooling branch
    # Both models were initialized from the shared start.
    start_weights = str(output / "runs" / "start" / "model_final.pth")
    for name in models:
        assert load_config(output / "runs" / f"{name}_seed0" / "config.yaml").MODEL.WEIGHTS == start_weights

    table = (output / "results.md").read_text().splitlines()
    assert table[0].startswith("| model | box AP | box AP50 | box AP75 | mask AP |")
    assert [line.split(" | ")[0] for line in table[2:4]] == [f"| {DEMO_MODELS[name].title}" for name in models]
    assert table[-1].startswith("Every model starts from the shared start, the regular detector after 4 iterations")

    assert_png(output / "losses.png")
    # Two validation images, two pictures each.
    for kind in ("sampling", "roi_bins"):
        pictures = sorted((output / "pictures").glob(f"*_{kind}.png"))
        assert len(pictures) == 2
        for picture in pictures:
            assert_png(picture)
    # The effective spatial support of both models, for the conv5 and the 2fc node.
    for kind in ("conv5", "2fc"):
        (picture,) = (output / "pictures").glob(f"*_support_{kind}.png")
        assert_png(picture)

    # A second demo in the same folder reuses the shared start.
    start_mtime = Path(start_weights).stat().st_mtime_ns
    capsys.readouterr()
    demo_main(["--output", str(output), "--quick", "--models", "regular"])
    assert "reusing the shared start" in capsys.readouterr().out
    assert Path(start_weights).stat().st_mtime_ns == start_mtime
