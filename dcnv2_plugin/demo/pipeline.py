"""The demo end to end: prepare the data, train and evaluate each model in a
process of its own, then write the table, the loss plot and the pictures."""
import multiprocessing
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.data import DatasetCatalog

from .datasets import DemoDatasets, register_demo_datasets
from .models import DEMO_MODELS, load_config
from .report import Run, markdown_table, plot_losses, summarize, write_report
from .training import RunSpec, train_and_evaluate

# The quick demo checks that the pipeline runs, not what it measures.
QUICK_ITERS = 4  # detectron2 times iterations from the third on
QUICK_IMAGES_PER_BATCH = 2
PICTURE_MODEL = "dcnv2"
PICTURE_IMAGES = 2


@dataclass(frozen=True)
class DemoOptions:
    output: Path
    models: Sequence[str] = tuple(DEMO_MODELS)
    seeds: Sequence[int] = (0,)
    iters: Optional[int] = None  # default: the configs' SOLVER.MAX_ITER (QUICK_ITERS when quick)
    quick: bool = False


@dataclass(frozen=True)
class DemoPaths:
    """Where the checkout keeps what the demo runs."""

    config_dir: Path  # configs/demo
    train_net: Path
    visualize: Path  # tools/visualize.py


def _log(message: str) -> None:
    print(f"[demo] {message}", flush=True)


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)}m{seconds % 60:04.1f}s"


def schedule_opts(config_file: Path, iters: int) -> List[str]:
    """SOLVER overrides for `iters` iterations that keep the config's schedule
    in proportion: warm-up and learning-rate steps at the same fractions."""
    cfg = load_config(config_file)
    scale = iters / cfg.SOLVER.MAX_ITER
    steps = tuple(max(1, round(step * scale)) for step in cfg.SOLVER.STEPS)
    return [
        "SOLVER.MAX_ITER", str(iters),
        "SOLVER.STEPS", str(steps),
        "SOLVER.WARMUP_ITERS", str(max(1, round(cfg.SOLVER.WARMUP_ITERS * scale))),
    ]  # fmt: skip


def quick_opts(datasets: DemoDatasets) -> List[str]:
    return [
        "DATASETS.TRAIN", f"('{datasets.train}',)",
        "DATASETS.TEST", f"('{datasets.val}',)",
        "SOLVER.IMS_PER_BATCH", str(QUICK_IMAGES_PER_BATCH),
        "DATALOADER.NUM_WORKERS", "0",
        # A barely trained model's scores are low: keep its detections so
        # that COCO evaluation has predictions to score.
        "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0",
    ]  # fmt: skip


def _prepare_datasets(datasets: DemoDatasets) -> List[Dict]:
    """Generates the splits here, once, rather than inside the first model's
    run; returns the validation records."""
    _log(f"preparing the datasets {datasets.train} and {datasets.val} (generated on first use, then cached)")
    DatasetCatalog.get(datasets.train)
    return DatasetCatalog.get(datasets.val)


def _run_in_subprocess(run: RunSpec) -> None:
    # A fresh process per model: no state (registries, RNGs, threads, memory)
    # leaks from one model's training into the next one's measurements.
    process = multiprocessing.get_context("spawn").Process(target=train_and_evaluate, args=(run,))
    process.start()
    process.join()
    if process.exitcode != 0:
        raise RuntimeError(
            f"training {run.config_file.name} failed (exit code {process.exitcode}); "
            f"see the traceback above and {run.output_dir / 'log.txt'}"
        )


def _object_centers(record: Dict) -> List[Tuple[float, float]]:
    """(x, y) pixel index of each annotated box's center (boxes are XYWH_ABS,
    with pixel edges as coordinates)."""
    return [(x + w / 2 - 0.5, y + h / 2 - 0.5) for x, y, w, h in (a["bbox"] for a in record["annotations"])]


def _draw_pictures(paths: DemoPaths, run: Run, val_records: Sequence[Dict], output: Path) -> None:
    """tools/visualize.py on a few validation images, with the units at the
    objects' annotated centers: after a few minutes of training the detector's
    scores are low, and the sampling around the objects is what to look at."""
    records = val_records[:PICTURE_IMAGES]
    _log(f"drawing the sampling locations of {run.model.title} on {len(records)} validation images")
    for record in records:
        units = [value for x, y in _object_centers(record) for value in ("--unit", f"{x:g}", f"{y:g}")]
        subprocess.run(
            [sys.executable, str(paths.visualize),
             "--config-file", str(run.output_dir / "config.yaml"),
             "--weights", str(run.output_dir / "model_final.pth"),
             "--input", record["file_name"],
             "--output", str(output),
             *units],
            check=True,
        )  # fmt: skip


def _iterations(options: DemoOptions, config_dir: Path) -> int:
    if options.iters:
        return options.iters
    if options.quick:
        return QUICK_ITERS
    # Every demo config inherits its schedule from Base-Demo.yaml.
    return load_config(config_dir / "Base-Demo.yaml").SOLVER.MAX_ITER


def run_demo(options: DemoOptions, paths: DemoPaths) -> Dict:
    """Runs the demo; returns what results.json holds."""
    unknown = [name for name in options.models if name not in DEMO_MODELS]
    if unknown:
        raise ValueError(f"unknown demo models {unknown}; known: {', '.join(DEMO_MODELS)}")
    start = time.perf_counter()
    load_at_start = os.getloadavg()
    output = Path(options.output)
    output.mkdir(parents=True, exist_ok=True)
    datasets = register_demo_datasets(options.quick)
    val_records = _prepare_datasets(datasets)
    iters = _iterations(options, paths.config_dir)
    runs = []
    jobs = [(DEMO_MODELS[name], seed) for name in options.models for seed in options.seeds]
    for index, (model, seed) in enumerate(jobs, start=1):
        config_file = paths.config_dir / f"{model.name}.yaml"
        run = Run(model, seed, output / "runs" / f"{model.name}_seed{seed}")
        opts = ["SEED", str(seed), "OUTPUT_DIR", str(run.output_dir)]
        opts += schedule_opts(config_file, iters)
        opts += quick_opts(datasets) if options.quick else []
        _log(f"({index}/{len(jobs)}) {model.title}, seed {seed}: training and evaluating in {run.output_dir}")
        run_start = time.perf_counter()
        _run_in_subprocess(RunSpec(config_file, run.output_dir, tuple(opts), options.quick, paths.train_net))
        _log(f"({index}/{len(jobs)}) {model.title}, seed {seed}: done in {_minutes(time.perf_counter() - run_start)}")
        runs.append(run)

    summary = summarize(runs)
    plot_losses(runs, output / "losses.png")
    picture_runs = [run for run in runs if run.model.name == PICTURE_MODEL]
    if picture_runs:
        _draw_pictures(paths, picture_runs[0], val_records, output / "pictures")
    else:
        _log(f"no pictures: the sampling locations are drawn for the {PICTURE_MODEL} model, which was not trained")

    wall_seconds = time.perf_counter() - start
    details = {
        "train_dataset": datasets.train,
        "test_dataset": datasets.val,
        "seeds": list(options.seeds),
        "iterations": iters,
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": [round(load, 2) for load in load_at_start],
        "wall_seconds": round(wall_seconds, 1),
    }
    report_paths = write_report(summary, details, output)
    print("\n" + markdown_table(summary))
    _log(f"finished in {_minutes(wall_seconds)}; outputs in {output}: {report_paths['markdown'].name}, "
         f"{report_paths['json'].name}, losses.png" + (", pictures/" if picture_runs else ""))
    return {**details, "models": summary}
