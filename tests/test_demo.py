"""The CPU demo: its configs, its table, and a quick run of the whole pipeline."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from detectron2.modeling import build_model
from helpers import ROOT
from PIL import Image

from dcnv2_demo import DEMO_MODELS
from dcnv2_demo.cli import main as demo_main
from dcnv2_demo.cli import parse_args
from dcnv2_demo.models import ABLATION_ROWS, ABLATION_TABLES, ALL_MODELS
from dcnv2_demo.pipeline import schedule_opts
from dcnv2_demo.report import Run, markdown_table, sectioned_tables
from dcnv2_demo.scheduler import REFERENCE_SECONDS_PER_ITER, run_all, run_environment, slowness_note
from dcnv2_demo.training import RunSpec
from dcnv2_plugin.config import load_config

CONFIG_DIR = ROOT / "configs" / "demo"

# What each model changes in the regular model's config: nothing else may
# differ, or the comparison would not isolate the deformable modules.
DCN_KEYS = {"MODEL.RESNETS.DEFORM_ON_PER_STAGE", "MODEL.RESNETS.DEFORM_MODULATED", "MODEL.ROI_BOX_HEAD.POOLER_TYPE"}
MIMIC_KEYS = {
    "MODEL.META_ARCHITECTURE",
    "MODEL.DCNV2.MIMIC.ENABLED",
    "MODEL.DCNV2.MIMIC.NUM_POS_ROIS",
    "MODEL.DCNV2.MIMIC.CROP_SIZE",
    "MODEL.DCNV2.MIMIC.CROP_BN",
}
ALLOWED_CHANGES = {
    "regular": set(),
    "stn": {"MODEL.DCNV2.STN.ENABLED", "MODEL.DCNV2.STN.HIDDEN_DIM"},
    "dcnv1": DCN_KEYS - {"MODEL.RESNETS.DEFORM_MODULATED"},  # unmodulated is detectron2's default
    "dcnv2": DCN_KEYS,
    "dcnv2_mimic": DCN_KEYS | MIMIC_KEYS,
    # --ablation's further rows (the paper's Tables 1 and 3).
    "dconv_c5": {"MODEL.RESNETS.DEFORM_ON_PER_STAGE"},
    "dconv_c3-c5": {"MODEL.RESNETS.DEFORM_ON_PER_STAGE"},
    "dcnv2_mimic_bg": DCN_KEYS | MIMIC_KEYS | {"MODEL.DCNV2.MIMIC.REGIONS"},
    "dcnv2_mimic_fgbg": DCN_KEYS | MIMIC_KEYS | {"MODEL.DCNV2.MIMIC.REGIONS"},
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
    assert set(ALLOWED_CHANGES) == set(ALL_MODELS)
    for name in ALL_MODELS:
        assert (CONFIG_DIR / f"{name}.yaml").is_file()


@pytest.mark.parametrize("name", [name for name in ALL_MODELS if name != "regular"])
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


def test_the_ablation_rows_are_the_papers_settings():
    def setting(name):
        cfg = load_config(CONFIG_DIR / f"{name}.yaml")
        mimic = cfg.MODEL.DCNV2.MIMIC
        return (
            tuple(cfg.MODEL.RESNETS.DEFORM_ON_PER_STAGE),
            cfg.MODEL.RESNETS.DEFORM_MODULATED,
            cfg.MODEL.ROI_BOX_HEAD.POOLER_TYPE,
            mimic.REGIONS if mimic.ENABLED else None,
        )

    c3_c5, none = (False, True, True, True), (False,) * 4
    table1, table3 = ABLATION_TABLES.values()
    assert [setting(name) for name in table1] == [
        (none, False, "ROIAlignV2", None),
        ((False, False, False, True), False, "ROIAlignV2", None),
        (c3_c5, False, "ROIAlignV2", None),
        (c3_c5, False, "DeformRoIPool", None),
        (c3_c5, True, "ModulatedDeformRoIPool", None),
    ]
    assert [setting(name)[3] for name in table3] == [None, "foreground", "background", "both"]
    assert all(setting(name)[:3] == (c3_c5, True, "ModulatedDeformRoIPool") for name in table3)


def test_ablation_option_trains_the_rows_of_both_tables_once():
    args = parse_args(["--output", "out", "--ablation"])
    assert args.ablation and args.models == list(ABLATION_ROWS)
    assert set(ABLATION_ROWS) == {name for rows in ABLATION_TABLES.values() for name in rows}
    assert len(ABLATION_ROWS) == 8  # DCNv2 ends Table 1 and starts Table 3
    assert parse_args(["--output", "out"]).models == list(DEMO_MODELS)


def test_iters_override_keeps_the_schedule_in_proportion():
    base = load_config(CONFIG_DIR / "Base-Demo.yaml").SOLVER
    assert (base.MAX_ITER, tuple(base.STEPS), base.WARMUP_ITERS) == (500, (400,), 50)
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


def test_ablation_report_has_a_table_per_paper_table_with_each_seeds_box_ap():
    def aggregate(values):
        return {"mean": sum(values) / len(values), "half_range": (max(values) - min(values)) / 2}

    summary = [
        {
            "name": name,
            "title": ALL_MODELS[name].title,
            "runs": [{"seed": seed, "box_AP": 20.0 + i + seed} for seed in (0, 1, 2)],
            "box_AP": aggregate([20.0 + i + seed for seed in (0, 1, 2)]),
        }
        for i, name in enumerate(ABLATION_ROWS)
    ]
    text = sectioned_tables(summary, ABLATION_TABLES)
    headings = [line for line in text.splitlines() if line.startswith("### ")]
    assert headings == [f"### {heading}" for heading in ABLATION_TABLES]
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| model")]
    expected = [ALL_MODELS[name].title for rows in ABLATION_TABLES.values() for name in rows]
    assert [row.split(" | ")[0][2:] for row in rows] == expected
    dcnv2 = ABLATION_ROWS.index("dcnv2")
    assert (
        rows[4]
        == rows[5]
        == (
            f"| {ALL_MODELS['dcnv2'].title} | {21 + dcnv2:.1f} ± 1.0 | n/a | n/a | n/a | "
            f"0: {20 + dcnv2:.1f} / 1: {21 + dcnv2:.1f} / 2: {22 + dcnv2:.1f} |"
        )
    )


def test_progress_warns_about_a_run_much_slower_than_expected():
    expected = REFERENCE_SECONDS_PER_ITER
    assert slowness_note(expected, expected) == ""
    assert slowness_note(2.9 * expected, expected) == ""
    note = slowness_note(30 * expected, expected)
    assert "30x slower" in note and f"~{expected:.2f} s/iter" in note and "load average" in note
    assert slowness_note(float("nan"), expected) == ""


def test_runs_wait_passively_unless_the_user_chose_otherwise(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    with run_environment({"OMP_WAIT_POLICY": "PASSIVE"}):
        assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    assert "OMP_WAIT_POLICY" not in os.environ
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    with run_environment({"OMP_WAIT_POLICY": "PASSIVE"}):
        assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"


def assert_png(path: Path):
    with Image.open(path) as image:
        assert image.format == "PNG" and min(image.size) > 100


@pytest.fixture(scope="module")
def quick_datasets(tmp_path_factory):
    """One folder for the quick splits of every demo run in this process: the
    dataset catalog, per process, keeps the folder they were registered from."""
    return str(tmp_path_factory.mktemp("quick_datasets"))


def test_quick_demo_writes_the_table_the_json_and_the_pictures(tmp_path, monkeypatch, capsys, quick_datasets):
    monkeypatch.setenv("DCNV2_DATASETS", quick_datasets)
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

    # A second demo in the same folder reuses the shared start and the
    # finished runs with the same config, and trains what differs.
    regular_weights = output / "runs" / "regular_seed0" / "model_final.pth"
    mtimes = {path: path.stat().st_mtime_ns for path in (Path(start_weights), regular_weights)}
    capsys.readouterr()
    again = demo_main(["--output", str(output), "--quick", "--models", "regular", "--seed", "0", "1"])
    out = capsys.readouterr().out
    assert "reusing the shared start" in out
    assert "reusing 1 finished run(s)" in out and "regular_seed0" in out
    assert "training 1 runs" in out
    assert {path: path.stat().st_mtime_ns for path in mtimes} == mtimes
    (regular_again,) = again["models"]
    assert [run["seed"] for run in regular_again["runs"]] == [0, 1]
    assert regular_again["runs"][0] == regular["runs"][0]
    # Other torch threads train the run again (its weights would differ), in
    # a fresh folder: detectron2 appends to an existing metrics.json.
    demo_main(["--output", str(output), "--quick", "--models", "regular", "--threads", "2"])
    assert "training 1 runs" in capsys.readouterr().out
    assert regular_weights.stat().st_mtime_ns != mtimes[regular_weights]
    metrics = [json.loads(line) for line in (regular_weights.parent / "metrics.json").read_text().splitlines()]
    assert [m["iteration"] for m in metrics if "total_loss" in m] == sorted(
        {m["iteration"] for m in metrics if "total_loss" in m}
    )


@pytest.mark.slow
def test_quick_ablation_writes_a_table_per_paper_table(tmp_path, monkeypatch, quick_datasets):
    monkeypatch.setenv("DCNV2_DATASETS", quick_datasets)
    output = tmp_path / "ablation"
    returned = demo_main(["--output", str(output), "--quick", "--ablation", "--jobs", "2"])
    assert [model["name"] for model in returned["models"]] == list(ABLATION_ROWS)
    text = (output / "results.md").read_text()
    for heading, names in ABLATION_TABLES.items():
        section = text.split(f"### {heading}\n\n", 1)[1].split("\n\n", 1)[0].splitlines()
        assert [line.split(" | ")[0][2:] for line in section[2:]] == [ALL_MODELS[name].title for name in names]
    assert "Wall time" in text.splitlines()[-1] and returned["wall_seconds"] > 0


ORPHAN_CHECK = """
import multiprocessing, os, pathlib, sys, time
from dcnv2_demo.training import stop_with_parent

def child(parent_pid, ready):
    stop_with_parent(parent_pid)
    pathlib.Path(ready).write_text("ready")
    time.sleep(300)

if __name__ == "__main__":
    process = multiprocessing.get_context("spawn").Process(target=child, args=(os.getpid(), sys.argv[1]))
    process.start()
    print(process.pid, flush=True)
    time.sleep(300)
"""


def _running(pid):
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status  # a zombie has ended


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_a_run_ends_when_the_demo_process_is_killed(tmp_path):
    script, ready = tmp_path / "demo_like.py", tmp_path / "ready"
    script.write_text(ORPHAN_CHECK)
    python_path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    parent = subprocess.Popen(
        [sys.executable, str(script), str(ready)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": python_path},
    )
    child_pid = None
    try:
        child_pid = int(parent.stdout.readline())
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert time.monotonic() < deadline and parent.poll() is None, "the child never got ready"
            time.sleep(0.2)
        parent.kill()  # SIGKILL: the demo process gets no chance to stop its runs itself
        parent.wait()
        deadline = time.monotonic() + 20
        while _running(child_pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _running(child_pid), "the run outlived the killed demo process"
    finally:
        parent.kill()
        if child_pid is not None and _running(child_pid):
            os.kill(child_pid, signal.SIGKILL)
