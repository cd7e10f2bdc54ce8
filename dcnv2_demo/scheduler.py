"""Runs demo trainings in processes of their own, several side by side, and
reports their progress from the metrics detectron2 writes.

The demo shares the machine with whatever else runs on it. A run with more
torch threads than it has cores to itself stalls: each parallel region waits
for its slowest thread, and a thread that another process has displaced
holds up the others (measured on 2 cores with one other busy process: a
2-thread run took 5 s per iteration instead of 0.16). So runs use one
torch thread unless told otherwise (see pipeline.THREADS_PER_RUN), and
their OpenMP threads wait passively (they sleep instead of spinning on a
core another run could use).
"""

import contextlib
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

from .report import Run, read_metrics
from .training import RunSpec, train_and_evaluate_logged


def log(message: str) -> None:
    print(f"[demo] {message}", flush=True)


def minutes(seconds: float) -> str:
    return f"{int(seconds // 60)}m{seconds % 60:04.1f}s"


# Training seconds per iteration of the regular model, one torch thread, two
# runs side by side on an idle 2-core machine (AMD EPYC), as measured by the
# demo's own three-seed table (December 2026 build): the yardstick of the
# progress lines' slowness warning, scaled by each model's relative cost.
REFERENCE_SECONDS_PER_ITER = 0.31
# A run this many times slower than the yardstick gets a warning.
SLOW_FACTOR = 3.0
# The environment of every run: OpenMP threads sleep while they wait.
RUN_ENVIRONMENT = {"OMP_WAIT_POLICY": "PASSIVE"}


def slowness_note(seconds_per_iter: float, expected: float, factor: float = SLOW_FACTOR) -> str:
    """'' for a run at a normal speed; for one `factor` times slower than
    `expected` or more, a warning for its progress line."""
    if not expected > 0 or not seconds_per_iter >= factor * expected:
        return ""
    return (
        f" -- {seconds_per_iter / expected:.0f}x slower than the ~{expected:.2f} s/iter expected on an idle 2-core "
        "machine: are other processes using the cores? (load average "
        + " ".join(f"{load:.1f}" for load in os.getloadavg())
        + ")"
    )


@contextlib.contextmanager
def run_environment(variables: Dict[str, str]) -> Iterator[None]:
    """Within the block, os.environ has `variables` where the user has not
    set them (a spawned process inherits it); restored after."""
    added = {key: value for key, value in variables.items() if key not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


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
    seconds_per_iter = last.get("time", float("nan"))
    expected = REFERENCE_SECONDS_PER_ITER * active.run.model.relative_cost
    return (
        f"{active.label}: iter {last['iteration'] + 1}/{active.iters}, total_loss {last['total_loss']:.3f}, "
        f"{seconds_per_iter:.2f} s/iter ({elapsed})"
        + ("" if active.spec.quick else slowness_note(seconds_per_iter, expected))
    )


def _start(label: str, run: Run, spec: RunSpec, iters: int) -> _ActiveRun:
    # A fresh process per model: no state (registries, RNGs, threads, memory)
    # leaks from one model's training into the next one's measurements.
    console_log = run.output_dir / "console.log"
    process = multiprocessing.get_context("spawn").Process(
        target=train_and_evaluate_logged, args=(spec, console_log, os.getpid()), name=label
    )
    with run_environment(RUN_ENVIRONMENT):
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
