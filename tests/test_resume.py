"""Exact resume: a training run killed with SIGKILL right after a checkpoint,
then resumed with --resume, ends as the uninterrupted run does: the same
weights and optimizer state bit for bit, and the same metrics.json."""

import json
import signal

import pytest
import torch
from helpers import read_metrics, run_python, tiny_training_opts, write_tiny_coco

CONFIG = "demo/dcnv2.yaml"  # modulated deformable convs and pooling, random flips, gradient clipping
MAX_ITER = 24
CHECKPOINT_ITERATION = 19  # the first checkpoint, at an iteration where metrics.json gets a line too
# Timings differ between any two runs.
UNTIMED = ("time", "data_time", "eta_seconds", "rank_data_time")

# Trains with train_net's command line; with a kill iteration, the process
# kills itself (SIGKILL) right after the checkpoint hook of that iteration,
# before the metrics of the iteration are written.
TRAIN = """
import os, signal, sys
from detectron2.data.datasets import register_coco_instances
from detectron2.engine import HookBase, hooks
from dcnv2_plugin.engine import Trainer, run

register_coco_instances({dataset!r}, {{}}, {json_file!r}, {image_dir!r})
kill_iteration = {kill_iteration}

class KillAfterCheckpoint(HookBase):
    def after_step(self):
        if self.trainer.iter == kill_iteration:
            os.kill(os.getpid(), signal.SIGKILL)

build_hooks = Trainer.build_hooks

def build_hooks_with_kill(self):
    hook_list = build_hooks(self)
    position = next(i for i, h in enumerate(hook_list) if isinstance(h, hooks.PeriodicCheckpointer))
    hook_list.insert(position + 1, KillAfterCheckpoint())
    return hook_list

Trainer.build_hooks = build_hooks_with_kill
run({argv!r})
"""


@pytest.fixture(scope="module")
def tiny_coco(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny_coco_resume")
    json_file = write_tiny_coco(directory, num_images=5)
    return {"dataset": "dcnv2_tiny_coco_resume", "json_file": str(json_file), "image_dir": str(directory)}


def train(tiny_coco, output_dir, *, resume=False, kill_iteration=-1):
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
    argv = ["--config-file", CONFIG, *(["--resume"] if resume else []), *opts]
    code = TRAIN.format(argv=argv, kill_iteration=kill_iteration, **tiny_coco)
    return run_python(code, env={"OMP_NUM_THREADS": "1"}, check=False, timeout=900)


def final_state(output_dir):
    checkpoint = torch.load(output_dir / "model_final.pth", weights_only=True)
    return checkpoint["model"], checkpoint["trainer"]["_trainer"]["optimizer"]["state"]


def untimed_metrics(output_dir):
    return [{k: v for k, v in line.items() if k not in UNTIMED} for line in read_metrics(output_dir)]


def test_a_run_killed_after_a_checkpoint_resumes_exactly(tiny_coco, tmp_path):
    uninterrupted = train(tiny_coco, tmp_path / "uninterrupted")
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-4000:]

    interrupted_dir = tmp_path / "interrupted"
    killed = train(tiny_coco, interrupted_dir, kill_iteration=CHECKPOINT_ITERATION)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-4000:]
    assert (interrupted_dir / "last_checkpoint").read_text() == f"model_{CHECKPOINT_ITERATION:07d}.pth"
    assert not (interrupted_dir / "model_final.pth").exists()
    resumed = train(tiny_coco, interrupted_dir, resume=True)
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
