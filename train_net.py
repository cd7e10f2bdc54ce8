#!/usr/bin/env python
"""Train or evaluate a DCNv2 detector with detectron2's standard command line.

    python train_net.py --config-file configs/COCO-Detection/faster_rcnn_R_50_FPN_mdconv_c3-c5_mdpool.yaml
    python train_net.py --config-file ... --eval-only MODEL.WEIGHTS model_final.pth
    python train_net.py --config-file ... MODEL.DEVICE cpu SOLVER.IMS_PER_BATCH 2

The datasets are detectron2's built-in ones (COCO under $DETECTRON2_DATASETS).
"""

import logging
import os

import detectron2.utils.comm as comm
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.engine import DefaultTrainer, default_argument_parser, default_setup, launch
from detectron2.evaluation import COCOEvaluator, verify_results
from detectron2.utils.logger import setup_logger

import dcnv2_plugin  # registers the backbones and ROI heads; must come before detectron2's models
from dcnv2_plugin._detectron2_compat import has_compiled_ops
from dcnv2_plugin.modeling import build_optimizer

logger = logging.getLogger("dcnv2_plugin.train_net")


class Trainer(DefaultTrainer):
    """detectron2's trainer with COCO evaluation and the offset learning-rate factor."""

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        # detectron2's fast COCO evaluation needs its compiled ops.
        use_fast_impl = has_compiled_ops()
        implementation = (
            "detectron2's fast implementation"
            if use_fast_impl
            else "pycocotools (detectron2's compiled ops are missing)"
        )
        logger.info("COCO evaluation with %s", implementation)
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference")
        return COCOEvaluator(dataset_name, output_dir=output_folder, use_fast_impl=use_fast_impl)

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)


def setup(args):
    cfg = get_cfg()
    dcnv2_plugin.add_dcnv2_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.freeze()
    default_setup(cfg, args)
    # default_setup logs detectron2 and fvcore; this project's messages go to the same console and log.txt.
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="dcnv2_plugin")
    return cfg


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        results = Trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, results)
        return results

    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
