"""detectron2's `DefaultTrainer`, with COCO evaluation that works without
detectron2's compiled ops, the offset learning-rate factor, and data-parallel
training on CPU processes as well as GPUs."""

import contextlib
import logging
import os

import detectron2.engine.defaults as detectron2_defaults
from detectron2.engine import DefaultTrainer
from detectron2.evaluation import COCOEvaluator

from .._detectron2_compat import has_compiled_ops
from ..modeling import build_optimizer

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def _cpu_data_parallel(device: str):
    """detectron2's `create_ddp_model` gives DistributedDataParallel the
    process's GPU (`device_ids`), which it refuses for a model on the CPU:
    while the trainer is built, a CPU model is wrapped without one."""
    if not device.startswith("cpu"):
        yield
        return
    create_ddp_model = detectron2_defaults.create_ddp_model

    def create_cpu_ddp_model(model, **kwargs):
        return create_ddp_model(model, **{"device_ids": None, **kwargs})

    detectron2_defaults.create_ddp_model = create_cpu_ddp_model
    try:
        yield
    finally:
        detectron2_defaults.create_ddp_model = create_ddp_model


class Trainer(DefaultTrainer):
    """detectron2's trainer with this project's optimizer and COCO evaluation."""

    def __init__(self, cfg):
        with _cpu_data_parallel(cfg.MODEL.DEVICE):
            super().__init__(cfg)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        # detectron2's fast COCO evaluation needs its compiled ops.
        use_fast_impl = has_compiled_ops()
        if use_fast_impl:
            logger.info("COCO evaluation with detectron2's fast implementation")
        else:
            logger.info("COCO evaluation with pycocotools (detectron2's compiled ops are missing)")
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference")
        return COCOEvaluator(dataset_name, output_dir=output_folder, use_fast_impl=use_fast_impl)

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)
