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
import sys
from pathlib import Path

# Runs from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from detectron2.config import get_cfg  # noqa: E402
from detectron2.data import DatasetCatalog, MetadataCatalog  # noqa: E402
from detectron2.data import transforms as T  # noqa: E402
from detectron2.data.detection_utils import convert_image_to_rgb, read_image  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402

import dcnv2_plugin  # noqa: E402  (registers the models)
import dcnv2_plugin.data  # noqa: E402,F401  (registers the embedded dataset's names)
from dcnv2_plugin.visualization import (  # noqa: E402
    last_layers,
    record_inference,
    roi_bins_figure,
    roi_pooling_bins,
    sampling_figure,
    sampling_points_at,
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True)
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


def setup(args):
    cfg = get_cfg()
    dcnv2_plugin.add_dcnv2_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.MODEL.WEIGHTS = args.weights
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        print("No CUDA device: running on the CPU")
        cfg.MODEL.DEVICE = "cpu"
    cfg.freeze()
    return cfg


def image_sources(args):
    """(name, path) of every image to draw."""
    if args.input:
        return [(path.stem, path) for path in args.input]
    records = DatasetCatalog.get(args.dataset)[: args.num_images]
    return [(f"{args.dataset}_{record['image_id']}", Path(record["file_name"])) for record in records]


def class_names(cfg):
    for dataset in cfg.DATASETS.TEST:
        names = MetadataCatalog.get(dataset).get("thing_classes")
        if names:
            return names
    return None


def _units(boxes, labels, extra_points, scale, image_shape):
    """(image (y, x), label) of each unit to draw: the detections' centers, then --unit points."""
    # Box centers from pixel edges to pixel indices.
    units = [(((y1 + y2) / 2 - 0.5, (x1 + x2) / 2 - 0.5), label) for (x1, y1, x2, y2), label in zip(boxes, labels)]
    units += [((y * scale[0], x * scale[1]), f"unit ({x:g}, {y:g})") for x, y in extra_points]
    return units or [(((image_shape[0] - 1) / 2, (image_shape[1] - 1) / 2), "image center (nothing detected)")]


def draw_image(cfg, model, path: Path, args, names):
    """Both figures for one image, drawn over the network's (resized) input."""
    original = read_image(str(path), format=cfg.INPUT.FORMAT)
    resize = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST).get_transform(original)
    image = resize.apply_image(original)
    record = record_inference(model, torch.as_tensor(image.astype("float32").transpose(2, 0, 1)))
    rgb = convert_image_to_rgb(image, cfg.INPUT.FORMAT)

    instances = record.instances[record.instances.scores >= args.score_threshold][: args.max_objects]
    boxes = instances.pred_boxes.tensor
    labels = [
        f"{names[c] if names else c} {score:.2f}"
        for c, score in zip(instances.pred_classes.tolist(), instances.scores.tolist())
    ]
    scale = (image.shape[0] / original.shape[0], image.shape[1] / original.shape[1])

    stack = last_layers(record.convs, args.layers)
    layers = [conv.geometry for conv in stack]
    panels = []
    for target, label in _units(boxes.tolist(), labels, args.unit, scale, image.shape):
        unit, points, weights = sampling_points_at(layers, target)
        panels.append((unit, points, weights, f"{label}: {len(points)} points"))
    modulated = all(layer.mask is not None for layer in layers)
    sampling = sampling_figure(rgb, panels, "modulation product" if modulated else None)
    kind = "deformable" if stack[0].deformable else "regular"
    sampling.suptitle(f"{path.name}: {kind} convs {', '.join(conv.block_name for conv in stack)}", fontsize=9)

    bins = roi_pooling_bins(model.roi_heads, record.features, boxes, cfg.MODEL.DCNV2.DEFORM_POOL.GAMMA)
    pooling = f"{'deformable' if bins.deformable else 'regular'} RoI pooling ({cfg.MODEL.ROI_BOX_HEAD.POOLER_TYPE})"
    if not labels:
        pooling += f", nothing detected with score >= {args.score_threshold}"
    bins_figure = roi_bins_figure(
        rgb, boxes.numpy(), labels, bins.regular, bins.shifted, bins.modulation, f"{path.name}: {pooling}"
    )
    return sampling, bins_figure


def main(argv=None):
    args = parse_args(argv)
    cfg = setup(args)
    model = build_model(cfg)
    DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    model.eval()
    names = class_names(cfg)
    args.output.mkdir(parents=True, exist_ok=True)
    for name, path in image_sources(args):
        for kind, figure in zip(("sampling", "roi_bins"), draw_image(cfg, model, path, args, names)):
            target = args.output / f"{name}_{kind}.png"
            figure.savefig(target, dpi=150, bbox_inches="tight")
            print(f"wrote {target}")


if __name__ == "__main__":
    main()
