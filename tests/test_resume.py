"""Exact resume: a training run killed with SIGKILL right after a checkpoint,
then resumed with --resume, ends as the uninterrupted run does: the same
weights and optimizer state bit for bit, and the same metrics.json."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from helpers import ROOT, read_metrics, tiny_training_opts, write_tiny_coco

CONFIG = "demo/dcnv2.yaml"  # modulated deformable convs and pooling, random flips, gradient clipping
MAX_ITER = 24
CHECKPOINT_ITERATION = 19  # the first checkpoint, at an iteration where metrics.json gets a line too
# Timings differ between any two runs.
UNTIMED = ("time", "data_time", "eta_seconds", "rank_data_time")

# Trains with train_net's command line; with a kill iteration, each training
# process kills itself (SIGKILL) right after the checkpoint hook of that
# iteration, before the metrics of the iteration are written; with several
# processes only after all of them got there, since only the first one writes
# checkpoints and the launcher stops it as soon as another one dies. A script
# file, not `python -c`: the processes that --num-gpus starts import it again.
TRAIN = """
import os, signal, sys
from detectron2.data.datasets import register_coco_instances
from detectron2.engine import HookBase, hooks
from detectron2.utils import comm
from dcnv2_plugin.engine import Trainer, run

register_coco_instances({dataset!r}, {{}}, {json_file!r}, {image_dir!r})
kill_iteration = {kill_iteration}

class KillAfterCheckpoint(HookBase):
    def after_step(self):
        if self.trainer.iter == kill_iteration:
            comm.synchronize()
            os.kill(os.getpid(), signal.SIGKILL)

build_hooks = Trainer.build_hooks

def build_hooks_with_kill(self):
    hook_list = build_hooks(self)
    checkpointer = (hooks.PeriodicCheckpointer, hooks.EvalHook)  # EvalHook: where other processes have none
    position = next(i for i, h in enumerate(hook_list) if isinstance(h, checkpointer))
    hook_list.insert(position + 1, KillAfterCheckpoint())
    return hook_list

Trainer.build_hooks = build_hooks_with_kill

if __name__ == "__main__":
    run(sys.argv[1:])
"""


@pytest.fixture(scope="module")
def tiny_coco(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny_coco_resume")
    json_file = write_tiny_coco(directory, num_images=5)
    return {"dataset": "dcnv2_tiny_coco_resume", "json_file": str(json_file), "image_dir": str(directory)}


def train(tiny_coco, output_dir, *, resume=False, kill_iteration=-1, processes=1):
    opts = tiny_training_opts(tiny_coco["dataset"], output_dir) + [
        "SOLVER.MAX_ITER",
        str(MAX_ITER),
        "SOLVER.CHECKPOINT_PERIOD",
        str(CHECKPOINT_ITERATION + 1),
        "SOLVER.WARMUP_ITERS",
        "5",
        "SOLVER.STEPS",
        "(21,)",
        "SOLVER.BASE_LR",
        "0.01",
        # A worker process maps (reads and augments) the images, as in the demo.
        "DATALOADER.NUM_WORKERS",
        "1",
        "DATASETS.TEST",
        "()",
    ]
    argv = ["--config-file", CONFIG, "--num-gpus", str(processes), *(["--resume"] if resume else []), *opts]
    script = output_dir.parent / f"train_{output_dir.name}.py"
    script.write_text(TRAIN.format(kill_iteration=kill_iteration, **tiny_coco))
    python_path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": python_path}
    return subprocess.run(
        [sys.executable, str(script), *argv], capture_output=True, text=True, timeout=900, env=environment
    )


def final_state(output_dir):
    checkpoint = torch.load(output_dir / "model_final.pth", weights_only=True)
    return checkpoint["model"], checkpoint["trainer"]["_trainer"]["optimizer"]["state"]


def untimed_metrics(output_dir):
    return [{k: v for k, v in line.items() if k not in UNTIMED} for line in read_metrics(output_dir)]


def check_resumes_exactly(tiny_coco, tmp_path, processes):
    uninterrupted = train(tiny_coco, tmp_path / "uninterrupted", processes=processes)
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-4000:]

    interrupted_dir = tmp_path / "interrupted"
    killed = train(tiny_coco, interrupted_dir, kill_iteration=CHECKPOINT_ITERATION, processes=processes)
    # One process is killed itself; several are each killed, and their launcher fails.
    assert killed.returncode == (-signal.SIGKILL if processes == 1 else 1), killed.stderr[-4000:]
    assert (interrupted_dir / "last_checkpoint").read_text() == f"model_{CHECKPOINT_ITERATION:07d}.pth"
    assert not (interrupted_dir / "model_final.pth").exists()
    resumed = train(tiny_coco, interrupted_dir, resume=True, processes=processes)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert f"Starting training from iteration {CHECKPOINT_ITERATION + 1}" in resumed.stdout + resumed.stderr

    weights, momentum = final_state(tmp_path / "uninterrupted")
    resumed_weights, resumed_momentum = final_state(interrupted_dir)
    assert list(resumed_weights) == list(weights)
    different = [name for name in weights if not torch.equal(weights[name], resumed_weights[name])]
    assert not different, f"{len(different)} of {len(weights)} tensors differ, e.g. {different[:5]}"
    assert resumed_momentum.keys() == momentum.keys()
    assert all(torch.equal(momentum[k]["momentum_buffer"], resumed_momentum[k]["momentum_buffer"]) for k in momentum)

    expected = untimed_metrics(tmp_path / "uninterrupted")
    assert [line["iteration"] for line in expected] == [CHECKPOINT_ITERATION, MAX_ITER - 1]
    assert untimed_metrics(interrupted_dir) == expected, json.dumps(
        {"expected": expected, "resumed": untimed_metrics(interrupted_dir)}, indent=1
    )


def test_a_run_killed_after_a_checkpoint_resumes_exactly(tiny_coco, tmp_path):
    check_resumes_exactly(tiny_coco, tmp_path, processes=1)


@pytest.mark.slow
def test_a_data_parallel_run_on_two_cpu_processes_resumes_exactly(tiny_coco, tmp_path):
    check_resumes_exactly(tiny_coco, tmp_path, processes=2)
