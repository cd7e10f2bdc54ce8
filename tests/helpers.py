"""Helpers shared by the tests."""

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "configs"

# The mark of a test that needs a CUDA GPU: skipped without one, and
# selected by `pytest -m cuda` (conftest.py adds that marker to every test
# carrying this one; `make gpu-check` runs them).
NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# CPU always; CUDA variants are collected everywhere and skipped without a GPU.
DEVICES = ["cpu", pytest.param("cuda", marks=NEEDS_CUDA)]


def run_python(
    code: str,
    *,
    cwd: Optional[Path] = None,
    env: Optional[Dict[str, str]] = None,
    check: bool = True,
    timeout: float = 600,
) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter of this environment. With `check`, a
    non-zero exit fails the test with the end of its stderr."""
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env={**os.environ, **(env or {})},
    )
    if check:
        assert result.returncode == 0, result.stderr[-4000:]
    return result


def parameters_without_gradient(model: torch.nn.Module):
    return [
        name
        for name, param in model.named_parameters()
        if param.requires_grad and (param.grad is None or not param.grad.any())
    ]


def perturb_zero_initialized_weights(model: torch.nn.Module, names: Sequence[str]) -> None:
    """Layers that start at zero (a RoI offset branch's output fc, a spatial
    transformer's last fc) give exactly zero gradient to the layers before
    them at step 0. A tiny perturbation of the parameters whose names end with
    one of `names` stands in for the first update, so one step can reach
    every parameter."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(tuple(names)):
                assert not param.any(), name
                param.copy_(torch.randn(param.shape, generator=generator) * 1e-3)


TINY_COCO_SIZE = (64, 96)  # height, width


def write_tiny_coco(directory: Path, num_images: int = 3) -> Path:
    """Noise images with one or two filled rectangles each, as COCO json with
    boxes and polygon masks, in two categories. Returns the json's path."""
    height, width = TINY_COCO_SIZE
    rng = np.random.default_rng(0)
    images, annotations = [], []
    for image_id in range(1, num_images + 1):
        pixels = rng.integers(0, 80, size=(height, width, 3), dtype=np.uint8)
        for category_id in range(1, 1 + (image_id % 2) + 1):
            x, y = int(rng.integers(0, 40)), int(rng.integers(0, 20))
            w, h = int(rng.integers(20, 50)), int(rng.integers(16, 40))
            pixels[y : y + h, x : x + w] = 120 * category_id
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category_id,
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                    "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]],
                }
            )
        file_name = f"{image_id}.png"
        Image.fromarray(pixels).save(directory / file_name)
        images.append({"id": image_id, "file_name": file_name, "height": height, "width": width})
    categories = [{"id": 1, "name": "dark"}, {"id": 2, "name": "bright"}]
    json_file = directory / "instances.json"
    json_file.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return json_file


def tiny_training_opts(dataset: str, output_dir: Path) -> list:
    """KEY VALUE overrides that train a COCO config for 3 iterations on the
    CPU on the tiny dataset `dataset` (registered by the caller), then
    evaluate it there."""
    height, width = TINY_COCO_SIZE
    opts = {
        "MODEL.DEVICE": "cpu",
        "MODEL.WEIGHTS": "",
        # From scratch: BN (FrozenBN, the default for ImageNet-initialized
        # training, diverges), narrow layers and few RoIs for CPU speed.
        "MODEL.RESNETS.NORM": "BN",
        "MODEL.RESNETS.STEM_OUT_CHANNELS": "16",
        "MODEL.RESNETS.RES2_OUT_CHANNELS": "64",
        "MODEL.RESNETS.WIDTH_PER_GROUP": "16",
        "MODEL.FPN.OUT_CHANNELS": "32",
        "MODEL.ROI_MASK_HEAD.CONV_DIM": "32",
        "MODEL.ROI_BOX_HEAD.FC_DIM": "64",
        "MODEL.DCNV2.DEFORM_POOL.FC_DIM": "32",
        "MODEL.ROI_HEADS.NUM_CLASSES": "2",
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE": "16",
        "MODEL.RPN.BATCH_SIZE_PER_IMAGE": "64",
        "MODEL.RPN.POST_NMS_TOPK_TRAIN": "32",
        "MODEL.RPN.POST_NMS_TOPK_TEST": "32",
        # An untrained model's scores are low; keep its detections so that
        # COCO evaluation has predictions to score.
        "MODEL.ROI_HEADS.SCORE_THRESH_TEST": "0.0",
        "DATASETS.TRAIN": f"('{dataset}',)",
        "DATASETS.TEST": f"('{dataset}',)",
        "INPUT.MIN_SIZE_TRAIN": f"({height},)",
        "INPUT.MAX_SIZE_TRAIN": str(width),
        "INPUT.MIN_SIZE_TEST": str(height),
        "INPUT.MAX_SIZE_TEST": str(width),
        "DATALOADER.NUM_WORKERS": "0",
        "SOLVER.IMS_PER_BATCH": "2",
        "SOLVER.BASE_LR": "0.001",
        "SOLVER.MAX_ITER": "3",
        "SOLVER.STEPS": "()",
        "SOLVER.CHECKPOINT_PERIOD": "1000",
        "OUTPUT_DIR": str(output_dir),
    }
    return [item for pair in opts.items() for item in pair]


def read_metrics(output_dir: Path):
    """The lines of detectron2's metrics.json."""
    return [json.loads(line) for line in (Path(output_dir) / "metrics.json").read_text().splitlines() if line]


def train_checking_replicas(args):
    """`dcnv2_plugin.engine.main` for the multi-process tests: trains on the
    quick demo splits with a hook that compares every parameter across the
    processes after each step; rank 0 writes what it saw to
    OUTPUT_DIR/replicas.json. Module-level, so that spawned processes can
    unpickle it."""
    import hashlib

    from detectron2.engine import HookBase
    from detectron2.utils import comm

    from dcnv2_demo.datasets import register_demo_datasets
    from dcnv2_plugin.engine import Trainer, setup

    register_demo_datasets(quick=True)
    cfg = setup(args)
    steps = []

    class CompareReplicas(HookBase):
        def after_step(self):
            model = self.trainer.model
            model = getattr(model, "module", model)  # inside DistributedDataParallel
            digests = {
                name: hashlib.sha256(param.detach().cpu().numpy().tobytes()).hexdigest()
                for name, param in model.named_parameters()
            }
            every_rank = comm.all_gather(digests)
            losses = {k: v.latest() for k, v in self.trainer.storage.histories().items() if "loss" in k}
            steps.append(
                {
                    "iteration": self.trainer.iter,
                    "identical": all(d == every_rank[0] for d in every_rank),
                    "ranks": len(every_rank),
                    "parameters": len(digests),
                    "losses": losses,
                }
            )

    trainer = Trainer(cfg)
    trainer.register_hooks([CompareReplicas()])
    trainer.resume_or_load(resume=False)
    trainer.train()
    if comm.is_main_process():
        # What the trainer's evaluation hook got after the last iteration.
        results = trainer._last_eval_results
        report = {"world_size": comm.get_world_size(), "steps": steps, "test": results}
        (Path(cfg.OUTPUT_DIR) / "replicas.json").write_text(json.dumps(report))


def onnx_session(exported, threads: int = 1):
    """An ONNX Runtime CPU session for an exported model (a
    `torch.onnx.ONNXProgram` or its ModelProto), after onnx.checker (with
    shape inference) accepts it."""
    import onnx

    from dcnv2_plugin.export.runtime import inference_session

    model = getattr(exported, "model_proto", exported)
    onnx.checker.check_model(model, full_check=True)
    return inference_session(model.SerializeToString(), threads=threads)


def record_max_abs_diff(record_property, what: str, diff: float) -> None:
    """Records an exported model's max abs difference from PyTorch; the
    test run lists them at its end (conftest.py)."""
    record_property("max_abs_diff", (what, diff))


def draw_geometry(model: torch.nn.Module, conv_std: float, pool_std: float = 0.01) -> None:
    """Random weights for the layers that predict where to sample (zero at
    initialization): offset convs, and the RoI offset branch's last fc."""
    from dcnv2_plugin.modeling.poolers import RoIOffsetPredictor
    from dcnv2_plugin.ops import OffsetConv2d

    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, OffsetConv2d):
                module.weight.copy_(torch.randn(module.weight.shape, generator=g) * conv_std)
            elif isinstance(module, RoIOffsetPredictor):
                weight = module.predictor.weight
                weight.copy_(torch.randn(weight.shape, generator=g) * pool_std)
