#!/usr/bin/env python
"""Effective spatial support of detectors, as in the DCNv2 talk: for one node,
its effective sampling (bin) locations, effective receptive field and
error-bounded saliency region, for several models side by side.

draw: two PNGs per image, one row per model:
  <name>_support_conv5.png  a unit of the last layer of conv5 (res5) at --unit
  <name>_support_2fc.png    the 2fc node of the per-RoI head for the RoI --box
measure: over a dataset's annotated objects, the share of each node's
  effective-receptive-field mass and of its saliency region inside the
  object's mask (conv5 node at the object's center, 2fc node of its box).

Models are run folders (config.yaml and model_final.pth, as train_net.py and
tools/demo.py write them) or --model CONFIG WEIGHTS pairs.

    python tools/spatial_support.py draw --run output/demo/runs/{regular,dcnv1,dcnv2}_seed0 \\
        --dataset dcnv2_shapes_val --image-index 0 --object 0 --output pictures/
    python tools/spatial_support.py draw --run RUN1 RUN2 --input a.png --unit 60 70 --box 30 40 90 100 --output out/
    python tools/spatial_support.py measure --run output/demo/runs/{regular,dcnv1,dcnv2}_seed0 \\
        --dataset dcnv2_shapes_val --num-images 50 --json support.json
"""

import argparse
import json
import time
from pathlib import Path

from detectron2.data import DatasetCatalog

from dcnv2_plugin.data import register_shapes_dataset
from dcnv2_plugin.visualization.pictures import load_detector
from dcnv2_plugin.visualization.spatial_support import (
    measure_objects,
    record_node,
    save_spatial_support_pictures,
    summarize_objects,
)
from dcnv2_plugin.visualization.support import DEFAULT_EPSILON

MEASURED = (
    ("conv5_erf_inside", "conv5 ERF inside"),
    ("conv5_saliency_inside", "conv5 saliency inside"),
    ("conv5_saliency_area", "conv5 saliency area"),
    ("2fc_erf_inside", "2fc ERF inside"),
    ("2fc_saliency_inside", "2fc saliency inside"),
    ("2fc_saliency_area", "2fc saliency area"),
    ("object_area", "object area"),
)


def add_model_args(parser):
    parser.add_argument("--run", nargs="+", default=[], type=Path, help="run folders (config.yaml, model_final.pth)")
    parser.add_argument(
        "--model", nargs=2, action="append", default=[], metavar=("CONFIG", "WEIGHTS"), help="repeatable"
    )
    parser.add_argument("--epsilon", type=float, default=DEFAULT_EPSILON, help="the saliency region's bound on L_rec")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    draw = commands.add_parser("draw", help="the three pictures for several models")
    add_model_args(draw)
    source = draw.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", type=Path, help="an image file (then --box is needed)")
    source.add_argument("--dataset", help="a registered dataset, e.g. dcnv2_shapes_val")
    draw.add_argument("--image-index", type=int, default=0, help="the image of --dataset")
    draw.add_argument("--object", type=int, default=0, help="its annotated object giving the unit and the box")
    draw.add_argument("--unit", nargs=2, type=float, metavar=("X", "Y"), help="conv5 node's image point")
    draw.add_argument("--box", nargs=4, type=float, metavar=("X1", "Y1", "X2", "Y2"), help="the 2fc node's RoI")
    draw.add_argument("--layers", type=int, default=3, help="the last deformable (else regular) 3x3 convs to weigh")
    draw.add_argument("--output", type=Path, required=True, help="folder for the PNGs")
    draw.add_argument("--dpi", type=int, default=100, help="the PNGs' resolution")
    draw.add_argument("--palette", action="store_true", help="256-colour PNGs (smaller files)")
    measure = commands.add_parser("measure", help="the share of the support inside the objects")
    add_model_args(measure)
    measure.add_argument("--dataset", default="dcnv2_shapes_val")
    measure.add_argument("--num-images", type=int, default=50, help="the dataset's first images")
    measure.add_argument("--json", type=Path, help="also write every object's numbers here")
    args = parser.parse_args(argv)
    if not args.run and not args.model:
        parser.error("give models with --run or --model")
    return args


def load_models(args):
    """(title, cfg, model) of each model."""
    sources = [(run.name, run / "config.yaml", run / "model_final.pth") for run in args.run]
    sources += [(Path(config).stem, config, weights) for config, weights in args.model]
    return [(title, *load_detector(str(config), weights)) for title, config, weights in sources]


def draw(args, models):
    if args.dataset:
        record = DatasetCatalog.get(args.dataset)[args.image_index]
        image_path, center, box = record_node(record, args.object)
        name = f"{args.dataset}_{record['image_id']}"
    elif args.box:
        image_path, name, box = args.input, args.input.stem, args.box
        # The box's center, from pixel edges to pixel indices.
        center = ((box[1] + box[3]) / 2 - 0.5, (box[0] + box[2]) / 2 - 0.5)
    else:
        raise SystemExit("--input needs --box (the 2fc node's RoI)")
    box = args.box or box
    center = (args.unit[1], args.unit[0]) if args.unit else center
    for path in save_spatial_support_pictures(
        models,
        image_path,
        args.output,
        name,
        center,
        box,
        dpi=args.dpi,
        palette=args.palette,
        layers=args.layers,
        epsilon=args.epsilon,
    ):
        print(f"wrote {path}")


def measure(args, models):
    records = DatasetCatalog.get(args.dataset)[: args.num_images]
    results = {}
    print(f"| model | objects | {' | '.join(label for _, label in MEASURED)} |")
    print("|---|---:|" + "---:|" * len(MEASURED))
    for title, cfg, model in models:
        start = time.perf_counter()
        rows = measure_objects(cfg, model, records, epsilon=args.epsilon)
        summary = summarize_objects(rows)
        results[title] = {"objects": rows, "summary": summary, "seconds": round(time.perf_counter() - start, 1)}
        cells = [f"{summary[key]['mean']:.2f} ± {summary[key]['std']:.2f}" for key, _ in MEASURED]
        print(f"| {title} | {len(rows)} | {' | '.join(cells)} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"epsilon": args.epsilon, "images": len(records), "models": results}))
        print(f"wrote {args.json}")


def main(argv=None):
    args = parse_args(argv)
    register_shapes_dataset()  # names only; a split is generated when first loaded
    models = load_models(args)
    {"draw": draw, "measure": measure}[args.command](args, models)


if __name__ == "__main__":
    main()
