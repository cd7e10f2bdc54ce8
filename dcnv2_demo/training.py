"""One demo run (one model, one seed), meant to run in a process of its own:
trains with the Trainer of train_net.py (dcnv2_plugin.engine), which then evaluates with its
COCOEvaluator; the demo also times the model's forward pass on each test
image."""

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Tuple

import torch
from torch import nn

from dcnv2_plugin.engine import Trainer, parse_args, setup

from .datasets import register_demo_datasets

# In a run's folder, the key of its config and inputs, written last: a folder
# with it holds a finished run that a later demo can reuse.
KEY_FILE = "run.key"


@dataclass(frozen=True)
class RunSpec:
    config_file: str  # a path or a packaged config's name
    output_dir: Path
    opts: Tuple[str, ...]  # KEY VALUE config overrides, after the config file
    quick: bool  # which datasets the opts name (see datasets.py)
    threads: int = 1  # torch threads of this run
    key: str = ""  # written to KEY_FILE once the run has trained and evaluated (pipeline.run_key)


class InferenceTimer(nn.Module):
    """Wraps a model and records how long each forward call takes."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.seconds_per_call: List[float] = []

    def forward(self, batched_inputs):
        start = time.perf_counter()
        outputs = self.model(batched_inputs)
        self.seconds_per_call.append((time.perf_counter() - start) / len(batched_inputs))
        return outputs

    def seconds_per_image(self) -> float:
        # The first call pays one-off costs (allocations, lazy init), as in
        # detectron2's own timing, which skips its warm-up iterations.
        timed = self.seconds_per_call[1:] or self.seconds_per_call
        return sum(timed) / len(timed)


class TimedTrainer(Trainer):
    """The Trainer whose evaluation (run by its hook after the last
    iteration) also reports the inference time per image."""

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        timer = InferenceTimer(model)
        results = super().test(cfg, timer, evaluators)
        # The trainer's evaluation hook writes these to metrics.json too.
        return {**results, "inference": {"seconds_per_image": timer.seconds_per_image()}}


def train_and_evaluate(run: RunSpec) -> None:
    """Trains and evaluates one model. The evaluation results, the inference
    time among them, land in the run's metrics.json with the losses."""
    torch.set_num_threads(run.threads)
    register_demo_datasets(run.quick)
    cfg = setup(parse_args(["--config-file", str(run.config_file), *run.opts]))
    trainer = TimedTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    if run.key:
        (Path(run.output_dir) / KEY_FILE).write_text(run.key)


def stop_with_parent(parent_pid: int) -> None:
    """Makes this process end when the process with `parent_pid` (its parent)
    does, however that one ends: a demo stopped with Ctrl-C, `kill` or
    SIGKILL would otherwise leave its runs training on, unseen (Linux; a
    no-op elsewhere)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() != parent_pid:  # it ended before the call above
        os._exit(1)


def train_and_evaluate_logged(run: RunSpec, console_log: Path, parent_pid: int) -> None:
    """train_and_evaluate with everything the process prints (Python and
    native code alike) going to `console_log`: runs side by side would
    otherwise interleave their logs on the terminal. Ends with the demo
    process, `parent_pid`."""
    stop_with_parent(parent_pid)
    console_log.parent.mkdir(parents=True, exist_ok=True)
    with open(console_log, "w") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        sys.stdout = os.fdopen(1, "w", buffering=1)
        sys.stderr = os.fdopen(2, "w", buffering=1)
        train_and_evaluate(run)
