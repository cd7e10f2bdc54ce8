"""The demo's outputs: the comparison table (Markdown and JSON) and the loss plot.

Each run folder holds what detectron2 wrote: config.yaml, and metrics.json
with the losses, the iteration times and the evaluation results. A model's
row aggregates its runs, one per seed.
"""

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from detectron2.modeling import build_model
from matplotlib.figure import Figure

from dcnv2_plugin.config import load_config

from .models import DemoModel

# COCOEvaluator's task names, as the table labels them.
TASKS = {"bbox": "box", "segm": "mask"}
AP_METRICS = ("AP", "AP50", "AP75")


@dataclass(frozen=True)
class Run:
    model: DemoModel
    seed: int
    output_dir: Path


def read_metrics(output_dir: Path) -> List[Dict]:
    """The lines of detectron2's metrics.json: one dict per logged iteration."""
    path = Path(output_dir) / "metrics.json"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train_seconds_per_iter(metrics: Sequence[Dict]) -> float:
    """The median of detectron2's iteration times (its IterationTimer leaves
    out the first iterations, which pay one-off costs)."""
    times = [m["time"] for m in metrics if "time" in m]
    if not times:
        raise ValueError("metrics.json has no iteration times: train at least 3 iterations")
    return statistics.median(times)


def evaluation_results(metrics: Sequence[Dict]) -> Dict[str, float]:
    """The last evaluation's flattened results ("bbox/AP", ...,
    "inference/seconds_per_image"), which the trainer's evaluation hook logs
    with the iteration it ran after."""
    evaluations = [m for m in metrics if "inference/seconds_per_image" in m]
    if not evaluations:
        raise ValueError("metrics.json has no evaluation results: did the run finish?")
    return evaluations[-1]


def count_parameters(config_file: Path) -> int:
    """Parameters of the model a config describes (mimicking's classifier, used
    only in training, included)."""
    return sum(p.numel() for p in build_model(load_config(str(config_file))).parameters())


def _finite_or_none(value: float) -> Optional[float]:
    # COCOEvaluator reports NaN for a task without predictions; JSON has no NaN.
    return value if math.isfinite(value) else None


def run_measurements(run: Run) -> Dict[str, Optional[float]]:
    """One run's numbers: APs as "<box|mask>_<metric>", timings, parameters."""
    metrics = read_metrics(run.output_dir)
    results = evaluation_results(metrics)
    measurements = {"seed": run.seed}
    for task, label in TASKS.items():
        for metric in AP_METRICS:
            if f"{task}/{metric}" in results:
                measurements[f"{label}_{metric}"] = _finite_or_none(results[f"{task}/{metric}"])
    # The config detectron2 saved in the run folder: what was trained.
    measurements["parameters"] = count_parameters(run.output_dir / "config.yaml")
    measurements["train_seconds_per_iter"] = train_seconds_per_iter(metrics)
    measurements["inference_seconds_per_image"] = results["inference/seconds_per_image"]
    return measurements


def _aggregate(values: List[Optional[float]]) -> Dict[str, Optional[float]]:
    # A missing value (no detections to score) makes the aggregate missing too.
    if any(value is None for value in values):
        return {"mean": None, "half_range": None}
    return {"mean": statistics.fmean(values), "half_range": (max(values) - min(values)) / 2}


def summarize(runs: Sequence[Run]) -> List[Dict]:
    """One entry per model, in run order: its runs' numbers and their mean and
    half range (the spread across seeds)."""
    by_model: Dict[str, List[Run]] = {}
    for run in runs:
        by_model.setdefault(run.model.name, []).append(run)
    summary = []
    for model_runs in by_model.values():
        per_seed = [run_measurements(run) for run in model_runs]
        keys = [key for key in per_seed[0] if key != "seed"]
        summary.append(
            {
                "name": model_runs[0].model.name,
                "title": model_runs[0].model.title,
                "runs": per_seed,
                **{key: _aggregate([m.get(key) for m in per_seed]) for key in keys},
            }
        )
    return summary


def _cell(aggregate: Dict[str, Optional[float]], scale: float, digits: int) -> str:
    if aggregate["mean"] is None:
        return "n/a"
    text = f"{aggregate['mean'] * scale:.{digits}f}"
    if aggregate["half_range"]:
        text += f" ± {aggregate['half_range'] * scale:.{digits}f}"
    return text


def _seed_ap(run: Dict) -> str:
    ap = run.get("box_AP")
    return f"{run['seed']}: " + ("n/a" if ap is None else f"{ap:.1f}")


def markdown_table(summary: Sequence[Dict]) -> str:
    """The table: APs in percent, parameters in millions, times in seconds
    per training iteration and milliseconds per test image. With several
    seeds a cell reads "mean ± half the range", and a last column lists each
    seed's box AP."""
    ap_columns = [
        f"{label}_{metric}"
        for label in TASKS.values()
        for metric in AP_METRICS
        if any(f"{label}_{metric}" in row for row in summary)
    ]
    columns = [(key, key.replace("_", " "), 1.0, 1) for key in ap_columns] + [
        ("parameters", "params (M)", 1e-6, 2),
        ("train_seconds_per_iter", "train s/iter", 1.0, 2),
        ("inference_seconds_per_image", "inference ms/image", 1e3, 0),
    ]
    lines = [
        "| model | " + " | ".join(header for _, header, _, _ in columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    per_seed = any(len(row.get("runs", ())) > 1 for row in summary)
    if per_seed:
        lines[0] += " box AP per seed |"
        lines[1] += "---|"
    for row in summary:
        cells = [_cell(row[key], scale, digits) if key in row else "n/a" for key, _, scale, digits in columns]
        if per_seed:
            cells.append(" / ".join(_seed_ap(run) for run in row.get("runs", ())))
        lines.append(f"| {row['title']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _detection_loss(metrics_line: Dict) -> float:
    # Mimicking adds its own losses to total_loss; without them all models'
    # losses are the same Mask R-CNN terms and can be compared.
    return sum(value for key, value in metrics_line.items() if key.startswith("loss_") and "mimic" not in key)


def plot_losses(runs: Sequence[Run], path: Path) -> None:
    """Total loss and detection loss (without mimicking's terms) against the
    iteration, one line per run (one color per model)."""
    figure = Figure(figsize=(11, 4.2))
    total_axes, detection_axes = figure.subplots(1, 2)
    colors = {}
    for run in runs:
        lines = [m for m in read_metrics(run.output_dir) if "total_loss" in m]
        iterations = [m["iteration"] + 1 for m in lines]
        first_of_model = run.model.name not in colors
        color = colors.setdefault(run.model.name, f"C{len(colors)}")
        label = run.model.title if first_of_model else None  # one legend entry per model
        total_axes.plot(iterations, [m["total_loss"] for m in lines], ".-", color=color, label=label)
        detection_axes.plot(iterations, [_detection_loss(m) for m in lines], ".-", color=color)
    for axes, title in ((total_axes, "total loss"), (detection_axes, "detection losses (without mimicking's)")):
        axes.set_title(title)
        axes.set_xlabel("iteration")
        axes.grid(alpha=0.3)
    total_axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def start_note(details: Dict) -> str:
    """The sentence under the table on where every model started."""
    start = details["start"]
    aps = ", ".join(
        f"{label} AP {start[f'{label}_AP']:.1f}" for label in TASKS.values() if start.get(f"{label}_AP") is not None
    )
    return (
        f"Every model starts from the shared start, the regular detector after {details['start_iterations']} "
        f"iterations ({aps or 'no AP'}), and trains {details['iterations']} iterations more; "
        f"{details['runs_at_once']} run(s) at a time, {details['torch_threads_per_run']} torch thread(s) each. "
        f"Wall time {_minutes(details['wall_seconds'])} on {details['cpu_count']} cores "
        f"(load average {' '.join(f'{x:g}' for x in details['load_average_at_start'])} at the start).\n"
    )


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min {seconds % 60:.0f} s"


def sectioned_tables(summary: Sequence[Dict], sections: Dict[str, Sequence[str]]) -> str:
    """One table per section (a heading and the names of its models, in
    order); a model may appear in several."""
    by_name = {row["name"]: row for row in summary}
    parts = []
    for heading, names in sections.items():
        rows = [by_name[name] for name in names if name in by_name]
        if rows:
            parts.append(f"### {heading}\n\n" + markdown_table(rows))
    return "\n".join(parts)


def write_report(
    summary: Sequence[Dict], details: Dict, output: Path, sections: Optional[Dict[str, Sequence[str]]] = None
) -> Dict[str, Path]:
    """Writes results.md and results.json into `output`; returns their paths.
    With `sections`, results.md has a table per section (see sectioned_tables)."""
    paths = {"markdown": output / "results.md", "json": output / "results.json"}
    tables = sectioned_tables(summary, sections) if sections else markdown_table(summary)
    paths["markdown"].write_text(tables + "\n" + start_note(details))
    paths["json"].write_text(json.dumps({**details, "models": list(summary)}, indent=2, allow_nan=False))
    return paths
