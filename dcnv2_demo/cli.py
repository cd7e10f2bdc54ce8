"""The demo's command line (tools/demo.py)."""

import argparse
from pathlib import Path

from .models import ABLATION_ROWS, ALL_MODELS, DEMO_MODELS
from .pipeline import DemoOptions, run_demo
from .scheduler import default_jobs

DESCRIPTION = """Train, evaluate and compare the DCNv2 ablation's models on a CPU (about 16 minutes on 2 idle cores).

Trains small Mask R-CNNs (configs/demo/) on the embedded shapes dataset with
train_net.py, as the paper does on COCO: first the regular detector (the
shared start, standing in for pretrained weights; trained once and reused),
then from it regular, STN, DCNv1, DCNv2 and DCNv2 with feature mimicking,
two side by side on a 2-core machine. Evaluates each with COCOEvaluator and
writes into --output: results.md and
results.json (AP, AP50, AP75 of boxes and masks, parameters, training time
per iteration, inference time per image), losses.png, and pictures/ (the
DCNv2 model's sampling locations, drawn by tools/visualize.py).

    python tools/demo.py --output output/demo
    python tools/demo.py --output output/demo --models regular dcnv2 --seed 0 1
    python tools/demo.py --output /tmp/demo --quick    # a smoke test of the pipeline
    python tools/demo.py --output output/ablation --ablation --seed 0 1 2
"""


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, required=True, help="folder for the runs and the results")
    parser.add_argument(
        "--models",
        nargs="+",
        choices=list(ALL_MODELS),
        help=f"models to train (default: the demo's, {', '.join(DEMO_MODELS)}; or --ablation's)",
    )
    parser.add_argument(
        "--ablation",
        action="store_true",
        help="train the rows of the paper's Table 1 (deformable modules) and Table 3 (mimicked regions) "
        f"from the same shared start: {', '.join(ABLATION_ROWS)}; results.md has a table for each",
    )
    parser.add_argument(
        "--seed",
        nargs="+",
        type=int,
        default=[0],
        dest="seeds",
        metavar="SEED",
        help="one run per model and seed; with several, the table shows the spread",
    )
    parser.add_argument(
        "--iters", type=int, help="training iterations per compared model (default: configs/demo/Base-Demo.yaml's)"
    )
    parser.add_argument(
        "--start-iters", type=int, help="training iterations of the shared start (default: configs/demo/start.yaml's)"
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=default_jobs(),
        help="runs trained side by side, the cores shared among them (default: %(default)s)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        help="torch threads per run (default: 1, so that results do not depend on the machine; see the README)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a few iterations on a handful of images: checks the pipeline, measures nothing",
    )
    args = parser.parse_args(argv)
    if args.models is None:
        args.models = list(ABLATION_ROWS if args.ablation else DEMO_MODELS)
    for name in ("iters", "start_iters"):
        if getattr(args, name) is not None and getattr(args, name) < 3:
            parser.error(
                f"--{name.replace('_', '-')} must be at least 3 (detectron2 times iterations from the third on)"
            )
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be at least 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    options = DemoOptions(
        output=args.output,
        models=args.models,
        seeds=args.seeds,
        iters=args.iters,
        start_iters=args.start_iters,
        quick=args.quick,
        jobs=args.jobs,
        threads=args.threads,
        ablation=args.ablation,
    )
    return run_demo(options)
