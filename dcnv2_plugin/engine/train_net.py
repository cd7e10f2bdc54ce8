"""detectron2's standard training and evaluation command line, for this
project's models; `train_net.py` and the `dcnv2-train-net` command run it.

    train_net.py --config-file COCO-Detection/faster_rcnn_R_50_FPN_mdconv_c3-c5_mdpool.yaml --num-gpus 8
    train_net.py --config-file ... --eval-only MODEL.WEIGHTS model_final.pth
    train_net.py --config-file demo/dcnv2.yaml --num-gpus 2   # two CPU processes (the demo configs run on the CPU)

--config-file takes a path or the name of a packaged config. --num-gpus N
starts N processes per machine: one per GPU, or with MODEL.DEVICE cpu, N CPU
processes (gloo) that share the cores.
"""

import copy
import logging

import detectron2.utils.comm as comm
from detectron2.engine import default_argument_parser, default_setup
from detectron2.evaluation import verify_results
from detectron2.utils.logger import setup_logger

from ..config import load_config
from ..data import register_embedded_datasets
from ..model_zoo import get_config_file
from ..modeling import check_config
from .checkpoint import VerifiedCheckpointer
from .launch import launch
from .trainer import Trainer

logger = logging.getLogger(__name__)


def setup(args):
    """The frozen config of `args` (config file, then KEY VALUE overrides),
    after detectron2's `default_setup` (logging, output folder, seed)."""
    # detectron2's default_setup logs the config file's text: give it the path.
    args = copy.copy(args)
    args.config_file = get_config_file(args.config_file)
    cfg = load_config(args.config_file, args.opts)
    register_embedded_datasets(cfg)
    cfg.freeze()
    default_setup(cfg, args)
    # default_setup logs detectron2 and fvcore; this project's messages go to the same console and log.txt.
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="dcnv2_plugin")
    # After the loggers, so that their warnings reach log.txt too; before anything is built.
    check_config(cfg)
    return cfg


def main(args):
    """Trains (or with --eval-only, evaluates) in this process."""
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        VerifiedCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        results = Trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, results)
        return results
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def parse_args(argv=None):
    return default_argument_parser(epilog=__doc__).parse_args(argv)


def run(argv=None, main_func=main):
    """Parses the command line and runs `main_func(args)` in as many
    processes as it asks for."""
    args = parse_args(argv)
    print("Command Line Args:", args)
    device = load_config(args.config_file, args.opts).MODEL.DEVICE
    return launch(
        main_func,
        args.num_gpus,
        device=device,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )


if __name__ == "__main__":
    run()
