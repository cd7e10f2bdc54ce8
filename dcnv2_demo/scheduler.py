"""Runs demo trainings in processes of their own, several side by side, and
reports their progress from the metrics detectron2 writes."""

import multiprocessing
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Tuple

from .report import Run, read_metrics
from .training import RunSpec, train_and_evaluate_logged


def log(message: str) -> None:
    print(f"[demo] {message}", flush=True)


def minutes(seconds: float) -> str:
    return f"{int(seconds // 60)}m{seconds % 60:04.1f}s"


def default_jobs() -> int:
    """Runs side by side: two on a machine with two cores or more. One
    single-threaded run per core keeps both cores busy through detectron2's
    Python-side work, which more threads per run would not speed up."""
    return max(1, min(2, os.cpu_count() or 1))


@dataclass
class _ActiveRun:
    label: str
    run: Run
    spec: RunSpec
    process: multiprocessing.Process
    console_log: Path
    iters: int
    start: float


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no console log)"


def _progress(active: _ActiveRun) -> str:
    """The run's last logged iteration (detectron2 writes metrics.json every
    20 iterations), its loss and the time per iteration so far."""
    try:
        lines = [m for m in read_metrics(active.run.output_dir) if "total_loss" in m]
    except (OSError, ValueError):
        lines = []
    elapsed = minutes(time.perf_counter() - active.start)
    if not lines:
        return f"{active.label}: starting ({elapsed})"
    last = lines[-1]
    return (
        f"{active.label}: iter {last['iteration'] + 1}/{active.iters}, total_loss {last['total_loss']:.3f}, "
        f"{last.get('time', float('nan')):.2f} s/iter ({elapsed})"
    )


def _start(label: str, run: Run, spec: RunSpec, iters: int) -> _ActiveRun:
    # A fresh process per model: no state (registries, RNGs, threads, memory)
    # leaks from one model's training into the next one's measurements.
    console_log = run.output_dir / "console.log"
    process = multiprocessing.get_context("spawn").Process(
        target=train_and_evaluate_logged, args=(spec, console_log), name=label
    )
    process.start()
    log(f"{label}: started, log in {console_log}")
    return _ActiveRun(label, run, spec, process, console_log, iters, time.perf_counter())


def _finish(active: _ActiveRun) -> None:
    active.process.join()
    if active.process.exitcode != 0:
        print(_tail(active.console_log), file=sys.stderr, flush=True)
        raise RuntimeError(
            f"training {Path(active.spec.config_file).name} failed (exit code {active.process.exitcode}); "
            f"the end of its log is above, all of it in {active.console_log}"
        )
    log(f"{active.label}: done in {minutes(time.perf_counter() - active.start)}")


def run_all(queue: List[Tuple[str, Run, RunSpec]], jobs: int, iters: int, progress_seconds: float) -> None:
    """Runs the queue, `jobs` at a time, in order; reports progress every
    `progress_seconds`. A failed run stops the others."""
    queue = list(queue)
    active: List[_ActiveRun] = []
    last_report = time.perf_counter()
    try:
        while queue or active:
            while queue and len(active) < jobs:
                active.append(_start(*queue.pop(0), iters))
            for finished in [a for a in active if not a.process.is_alive()]:
                active.remove(finished)
                _finish(finished)
            if active and time.perf_counter() - last_report >= progress_seconds:
                last_report = time.perf_counter()
                for a in active:
                    log(_progress(a))
            time.sleep(0.5)
    finally:
        for a in active:  # only after a failure
            a.process.terminate()
            a.process.join()
