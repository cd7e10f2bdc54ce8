#!/usr/bin/env python
"""Draw where a trained detector's deformable layers look, as in the DCNv1/DCNv2 papers.

For each image it saves two PNGs:
  <name>_sampling.png  the sampling points of units in the last deformable
                       layer, followed back through the deformable layers
                       before it (3 layers of 3x3: 729 points), coloured by
                       the product of their modulation (DCNv2);
  <name>_roi_bins.png  the bins of the box head's (deformable) RoI pooling
                       for the detected objects, moved by their predicted
                       offsets and coloured by their modulation.
The units are the centers of the detected objects (and any --unit). A model
with regular convs or pooling gets the regular grids, for comparison.

    python tools/visualize.py --config-file CONFIG --weights model_final.pth \\
        --dataset dcnv2_shapes_val --num-images 4 --output pictures/
    python tools/visualize.py --config-file CONFIG --weights W --input a.jpg b.jpg --output pictures/
"""

import argparse
from pathlib import Path

from detectron2.data import DatasetCatalog

from dcnv2_plugin.data import register_shapes_dataset
from dcnv2_plugin.visualization.pictures import class_names, load_detector, save_detector_pictures


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, help="a config file or a packaged config's name")
    parser.add_argument("--weights", required=True, help="checkpoint of the model the config describes")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", nargs="+", type=Path, help="image files")
    source.add_argument("--dataset", help="a registered dataset to take images from, e.g. dcnv2_shapes_val")
    parser.add_argument("--num-images", type=int, default=4, help="images taken from --dataset")
    parser.add_argument("--output", type=Path, required=True, help="folder for the PNGs")
    parser.add_argument("--layers", type=int, default=3, help="stacked deformable layers to follow back")
    parser.add_argument("--max-objects", type=int, default=3, help="detections drawn per image")
    parser.add_argument("--score-threshold", type=float, default=0.5)
    parser.add_argument(
        "--unit",
        nargs=2,
        type=float,
        action="append",
        default=[],
        metavar=("X", "Y"),
        help="also draw the unit at this image point (repeatable)",
    )
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, KEY VALUE pairs")
    return parser.parse_args(argv)


def image_sources(args):
    """(name, path) of every image to draw."""
    if args.input:
        return [(path.stem, path) for path in args.input]
    records = DatasetCatalog.get(args.dataset)[: args.num_images]
    return [(f"{args.dataset}_{record['image_id']}", Path(record["file_name"])) for record in records]


def main(argv=None):
    args = parse_args(argv)
    cfg, model = load_detector(args.config_file, args.weights, args.opts)
    register_shapes_dataset()  # names only; a split is generated when first loaded
    names = class_names(cfg)
    for name, path in image_sources(args):
        for target in save_detector_pictures(
            cfg,
            model,
            path,
            args.output,
            name,
            layers=args.layers,
            max_objects=args.max_objects,
            score_threshold=args.score_threshold,
            units=args.unit,
            names=names,
        ):
            print(f"wrote {target}")


if __name__ == "__main__":
    main()
