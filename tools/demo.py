#!/usr/bin/env python
"""Train, evaluate and compare the DCNv2 ablation's models on a CPU, in minutes.

Trains small Mask R-CNNs (configs/demo/) on the embedded shapes dataset with
train_net.py: regular, STN, DCNv1, DCNv2 and DCNv2 with feature mimicking.
Evaluates each with COCOEvaluator and writes into --output: results.md and
results.json (AP, AP50, AP75 of boxes and masks, parameters, training time
per iteration, inference time per image), losses.png, and pictures/ (the
DCNv2 model's sampling locations, drawn by tools/visualize.py).

    python tools/demo.py --output output/demo
    python tools/demo.py --output output/demo --models regular dcnv2 --seed 0 1
    python tools/demo.py --output /tmp/demo --quick    # a smoke test of the pipeline
"""
import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Runs from a checkout without installing the package.
sys.path.insert(0, str(ROOT))

import dcnv2_plugin  # noqa: E402,F401  (registers the models)
from dcnv2_plugin.demo import DEMO_MODELS, DemoOptions, DemoPaths, run_demo  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, required=True, help="folder for the runs and the results")
    parser.add_argument("--models", nargs="+", choices=list(DEMO_MODELS), default=list(DEMO_MODELS),
                        help="models to train (default: all)")
    parser.add_argument("--seed", nargs="+", type=int, default=[0], dest="seeds", metavar="SEED",
                        help="one run per model and seed; with several, the table shows the spread")
    parser.add_argument("--iters", type=int, help="training iterations per model (default: the configs')")
    parser.add_argument("--quick", action="store_true",
                        help="a few iterations on a handful of images: checks the pipeline, measures nothing")
    args = parser.parse_args(argv)
    if args.iters is not None and args.iters < 3:
        parser.error("--iters must be at least 3 (detectron2 times iterations from the third on)")
    return args


def main(argv=None):
    args = parse_args(argv)
    paths = DemoPaths(
        config_dir=ROOT / "configs" / "demo",
        train_net=ROOT / "train_net.py",
        visualize=ROOT / "tools" / "visualize.py",
    )
    options = DemoOptions(output=args.output, models=args.models, seeds=args.seeds, iters=args.iters, quick=args.quick)
    return run_demo(options, paths)


if __name__ == "__main__":
    main()
