"""The demo end to end, in the paper's two steps:

1. The shared start. DCNv2 adds its deformable layers to a pretrained
   network (ImageNet weights) and fine-tunes; the demo has no pretrained
   weights, so it first trains the regular detector on the embedded dataset.
   Trained once, then reused while its config and data stay the same.
2. Every compared model starts from it (deformable layers at zero offsets,
   that is, as regular layers) and trains further; several models train side
   by side, each in a process of its own.

Then the table, the loss plot and the pictures.
"""

import hashlib
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from detectron2.data import DatasetCatalog, MetadataCatalog

from dcnv2_plugin.config import load_config
from dcnv2_plugin.visualization.pictures import load_detector, save_detector_pictures
from dcnv2_plugin.visualization.spatial_support import record_node, save_spatial_support_pictures

from .datasets import DemoDatasets, register_demo_datasets
from .models import ABLATION_TABLES, ALL_MODELS, DEMO_MODELS, DemoModel, demo_config
from .report import Run, plot_losses, run_measurements, summarize, write_report
from .scheduler import default_jobs, log, minutes, run_all
from .training import KEY_FILE, RunSpec

# The quick demo checks that the pipeline runs, not what it measures.
QUICK_ITERS = 4  # detectron2 times iterations from the third on
QUICK_IMAGES_PER_BATCH = 2
PICTURE_MODEL = "dcnv2"
PICTURE_IMAGES = 2
START = DemoModel("start", "shared start (regular)")
START_CONFIG = "start"
# One torch thread per run, whatever the machine: the CPU backward's float
# summation order changes with the thread count, so the results then do not
# depend on the number of cores; and a single-threaded run cannot stall on a
# thread that waits for a core another program holds (a two-thread run of the
# shared start ran 30x slower beside one busy process).
THREADS_PER_RUN = 1


@dataclass(frozen=True)
class DemoOptions:
    output: Path
    models: Sequence[str] = tuple(DEMO_MODELS)
    seeds: Sequence[int] = (0,)
    iters: Optional[int] = None  # per compared model; default: Base-Demo.yaml's (QUICK_ITERS when quick)
    start_iters: Optional[int] = None  # of the shared start; default: start.yaml's (QUICK_ITERS when quick)
    quick: bool = False
    jobs: int = field(default_factory=default_jobs)  # runs trained side by side
    threads: Optional[int] = None  # torch threads per run; default: THREADS_PER_RUN
    ablation: bool = False  # results.md in the tables of the paper's Table 1 and Table 3
    progress_seconds: float = 30.0

    def __post_init__(self):
        if self.jobs < 1:
            raise ValueError(f"jobs must be at least 1, got {self.jobs}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be at least 1, got {self.threads}")


def schedule_opts(config_file: str, iters: int) -> List[str]:
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
    log(f"preparing the datasets {datasets.train} and {datasets.val} (generated on first use, then cached)")
    DatasetCatalog.get(datasets.train)
    return DatasetCatalog.get(datasets.val)


def _threads(options: DemoOptions) -> int:
    """Torch threads per run: --threads, else THREADS_PER_RUN."""
    return options.threads or THREADS_PER_RUN


def _iterations(requested: Optional[int], quick: bool, config_file: str) -> int:
    if requested:
        return requested
    return QUICK_ITERS if quick else load_config(config_file).SOLVER.MAX_ITER


def run_key(config_file: str, opts: Sequence[str], datasets: DemoDatasets, threads: int, start: str = "") -> str:
    """What decides a run's weights: its full config, the files of its
    datasets (whose paths carry the generator's fingerprint), its torch
    threads (the CPU backward's summation order depends on them) and, for a
    compared model, the key of the shared start it begins from."""
    cfg = load_config(config_file, opts)
    files = [MetadataCatalog.get(name).get("json_file") for name in (datasets.train, datasets.val)]
    text = "\n".join([cfg.dump(), *files, f"threads {threads}", f"start {start}"])
    return hashlib.sha256(text.encode()).hexdigest()


def finished_key(output_dir: Path) -> str:
    """The key of the finished run in `output_dir` ('' if none): training.py
    writes it after the run's training and evaluation ended."""
    key_file = output_dir / KEY_FILE
    finished = all((output_dir / name).is_file() for name in ("model_final.pth", "metrics.json", KEY_FILE))
    return key_file.read_text() if finished else ""


def _train_start(options: DemoOptions, datasets: DemoDatasets, output: Path) -> Tuple[Run, int]:
    """Trains the shared start, or reuses the one a previous demo trained with
    the same config and data; returns it and its iterations."""
    config_file = demo_config(START_CONFIG)
    iters = _iterations(options.start_iters, options.quick, config_file)
    run = Run(START, 0, output / "runs" / "start")
    opts = ["SEED", "0", "OUTPUT_DIR", str(run.output_dir)] + schedule_opts(config_file, iters)
    opts += quick_opts(datasets) if options.quick else []
    threads = _threads(options)
    key = run_key(config_file, opts, datasets, threads)
    if finished_key(run.output_dir) == key:
        log(
            f"step 1/2: reusing the shared start in {run.output_dir}, trained by an earlier demo with the same "
            "config, data and threads (delete that folder to train it again)"
        )
        return run, iters
    shutil.rmtree(run.output_dir, ignore_errors=True)  # another config's, or unfinished
    spec = RunSpec(config_file, run.output_dir, tuple(opts), options.quick, threads, key)
    log(
        f"step 1/2: training the shared start, the regular detector, for {iters} iterations "
        f"with {threads} torch thread(s)"
    )
    run_all([(START.title, run, spec)], 1, iters, options.progress_seconds)
    return run, iters


def _object_centers(record: Dict) -> List[Tuple[float, float]]:
    """(x, y) pixel index of each annotated box's center (boxes are XYWH_ABS,
    with pixel edges as coordinates)."""
    return [(x + w / 2 - 0.5, y + h / 2 - 0.5) for x, y, w, h in (a["bbox"] for a in record["annotations"])]


def _draw_pictures(run: Run, val_records: Sequence[Dict], output: Path) -> None:
    """The sampling-location pictures (as tools/visualize.py draws them) of a
    few validation images: the units at the objects' annotated centers, and
    the RoI bins of the detections."""
    records = val_records[:PICTURE_IMAGES]
    log(f"drawing the sampling locations of {run.model.title} on {len(records)} validation images")
    cfg, model = load_detector(str(run.output_dir / "config.yaml"), run.output_dir / "model_final.pth")
    for record in records:
        image = Path(record["file_name"])
        for path in save_detector_pictures(cfg, model, image, output, image.stem, units=_object_centers(record)):
            log(f"wrote {path}")


def _draw_spatial_support(runs: Sequence[Run], val_records: Sequence[Dict], output: Path) -> None:
    """The effective spatial support (as tools/spatial_support.py draws it) of
    every model's first run, side by side: the conv5 unit at the first
    validation object's center and the 2fc node of its box."""
    first = {}
    for run in runs:
        first.setdefault(run.model.name, run)
    first_runs = list(first.values())
    if not first_runs or not val_records[0]["annotations"]:
        return
    log(f"drawing the effective spatial support of {len(first_runs)} model(s) on a validation object")
    detectors = [
        (run.model.title, *load_detector(str(run.output_dir / "config.yaml"), run.output_dir / "model_final.pth"))
        for run in first_runs
    ]
    image, center, box = record_node(val_records[0])
    for path in save_spatial_support_pictures(detectors, image, output, image.stem, center, box):
        log(f"wrote {path}")


def run_demo(options: DemoOptions) -> Dict:
    """Runs the demo; returns what results.json holds."""
    unknown = [name for name in options.models if name not in ALL_MODELS]
    if unknown:
        raise ValueError(f"unknown demo models {unknown}; known: {', '.join(ALL_MODELS)}")
    start = time.perf_counter()
    load_at_start = os.getloadavg()
    output = Path(options.output)
    output.mkdir(parents=True, exist_ok=True)
    datasets = register_demo_datasets(options.quick)
    val_records = _prepare_datasets(datasets)
    start_run, start_iters = _train_start(options, datasets, output)

    iters = _iterations(options.iters, options.quick, demo_config("Base-Demo"))
    runs, queue, reused = [], [], []
    threads = _threads(options)
    start_key = finished_key(start_run.output_dir)
    for model in (ALL_MODELS[name] for name in options.models):
        for seed in options.seeds:
            config_file = demo_config(model.name)
            run = Run(model, seed, output / "runs" / f"{model.name}_seed{seed}")
            opts = ["SEED", str(seed), "OUTPUT_DIR", str(run.output_dir),
                    "MODEL.WEIGHTS", str(start_run.output_dir / "model_final.pth")]  # fmt: skip
            opts += schedule_opts(config_file, iters)
            opts += quick_opts(datasets) if options.quick else []
            runs.append(run)
            key = run_key(config_file, opts, datasets, threads, start_key)
            if finished_key(run.output_dir) == key:
                reused.append(run.output_dir.name)
                continue
            # Another config's or an unfinished run: detectron2 would append to its metrics.json.
            shutil.rmtree(run.output_dir, ignore_errors=True)
            spec = RunSpec(config_file, run.output_dir, tuple(opts), options.quick, threads, key)
            queue.append((f"{model.title}, seed {seed}", run, spec))
    if reused:
        log(
            f"step 2/2: reusing {len(reused)} finished run(s) of an earlier demo with the same config, data, "
            f"threads and shared start: {', '.join(reused)} (delete a run's folder to train it again)"
        )
    # The longest runs first: side by side, the last ones then end together.
    queue.sort(key=lambda item: -item[1].model.relative_cost)
    log(
        f"step 2/2: training {len(queue)} runs of {iters} iterations from the shared start, {options.jobs} at a "
        f"time with {threads} torch thread(s) each; progress every {options.progress_seconds:g} s"
    )
    run_all(queue, options.jobs, iters, options.progress_seconds)

    summary = summarize(runs)
    plot_losses(runs, output / "losses.png")
    picture_runs = [run for run in runs if run.model.name == PICTURE_MODEL]
    if picture_runs:
        _draw_pictures(picture_runs[0], val_records, output / "pictures")
    else:
        log(f"no pictures: the sampling locations are drawn for the {PICTURE_MODEL} model, which was not trained")
    _draw_spatial_support(runs, val_records, output / "pictures")

    wall_seconds = time.perf_counter() - start
    details = {
        "train_dataset": datasets.train,
        "test_dataset": datasets.val,
        "seeds": list(options.seeds),
        "start_iterations": start_iters,
        "start": run_measurements(start_run),
        "iterations": iters,
        "runs_at_once": options.jobs,
        "cpu_count": os.cpu_count() or 1,
        "torch_threads_per_run": threads,
        "load_average_at_start": [round(load, 2) for load in load_at_start],
        "wall_seconds": round(wall_seconds, 1),
    }
    report_paths = write_report(summary, details, output, ABLATION_TABLES if options.ablation else None)
    print("\n" + report_paths["markdown"].read_text())
    log(
        f"finished in {minutes(wall_seconds)}; outputs in {output}: {report_paths['markdown'].name}, "
        f"{report_paths['json'].name}, losses.png" + (", pictures/" if picture_runs else "")
    )
    return {**details, "models": summary}
