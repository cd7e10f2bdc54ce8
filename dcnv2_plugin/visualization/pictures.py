"""The two pictures of one image for a trained detector: where its last
deformable convs sample, and where its RoI pooling's bins go."""

from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch
from detectron2.data import MetadataCatalog
from detectron2.data import transforms as T
from detectron2.data.detection_utils import convert_image_to_rgb, read_image
from detectron2.modeling import build_model

from ..config import load_config
from ..engine.checkpoint import VerifiedCheckpointer
from .capture import last_layers, record_inference, roi_pooling_bins
from .draw import roi_bins_figure, sampling_figure
from .geometry import sampling_points_at

PICTURE_KINDS = ("sampling", "roi_bins")


def load_detector(config_file: str, weights: str, opts: Sequence[str] = ()):
    """(cfg, model in eval mode) of a trained detector, on the CPU when the
    config asks for a GPU that is not there."""
    cfg = load_config(config_file, opts)
    cfg.MODEL.WEIGHTS = str(weights)
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        print("No CUDA device: running on the CPU")
        cfg.MODEL.DEVICE = "cpu"
    cfg.freeze()
    model = build_model(cfg)
    VerifiedCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    return cfg, model.eval()


def class_names(cfg) -> Optional[List[str]]:
    for dataset in cfg.DATASETS.TEST:
        names = MetadataCatalog.get(dataset).get("thing_classes")
        if names:
            return names
    return None


def _units(boxes, labels, extra_points, scale, image_shape):
    """(image (y, x), label) of each unit to draw: the detections' centers, then extra (x, y) points."""
    # Box centers from pixel edges to pixel indices.
    units = [(((y1 + y2) / 2 - 0.5, (x1 + x2) / 2 - 0.5), label) for (x1, y1, x2, y2), label in zip(boxes, labels)]
    units += [((y * scale[0], x * scale[1]), f"unit ({x:g}, {y:g})") for x, y in extra_points]
    return units or [(((image_shape[0] - 1) / 2, (image_shape[1] - 1) / 2), "image center (nothing detected)")]


def draw_detector_pictures(
    cfg,
    model,
    image_path: Path,
    *,
    layers: int = 3,
    max_objects: int = 3,
    score_threshold: float = 0.5,
    units: Sequence[Tuple[float, float]] = (),
    names: Optional[Sequence[str]] = None,
):
    """Both figures for one image, drawn over the network's (resized) input:
    the sampling points of units at the detections' centers (and at the
    original image's (x, y) `units`), followed back through the last `layers`
    3x3 convs; and the box head's RoI pooling bins of the detections."""
    original = read_image(str(image_path), format=cfg.INPUT.FORMAT)
    resize = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST).get_transform(original)
    image = resize.apply_image(original)
    record = record_inference(model, torch.as_tensor(image.astype("float32").transpose(2, 0, 1)))
    rgb = convert_image_to_rgb(image, cfg.INPUT.FORMAT)

    instances = record.instances[record.instances.scores >= score_threshold][:max_objects]
    boxes = instances.pred_boxes.tensor
    labels = [
        f"{names[c] if names else c} {score:.2f}"
        for c, score in zip(instances.pred_classes.tolist(), instances.scores.tolist())
    ]
    scale = (image.shape[0] / original.shape[0], image.shape[1] / original.shape[1])

    stack = last_layers(record.convs, layers)
    geometries = [conv.geometry for conv in stack]
    panels = []
    for target, label in _units(boxes.tolist(), labels, units, scale, image.shape):
        unit, points, weights = sampling_points_at(geometries, target)
        panels.append((unit, points, weights, f"{label}: {len(points)} points"))
    modulated = all(layer.mask is not None for layer in geometries)
    sampling = sampling_figure(rgb, panels, "modulation product" if modulated else None)
    kind = "deformable" if stack[0].deformable else "regular"
    sampling.suptitle(f"{image_path.name}: {kind} convs {', '.join(conv.block_name for conv in stack)}", fontsize=9)

    bins = roi_pooling_bins(model.roi_heads, record.features, boxes, cfg.MODEL.DCNV2.DEFORM_POOL.GAMMA)
    pooling = f"{'deformable' if bins.deformable else 'regular'} RoI pooling ({cfg.MODEL.ROI_BOX_HEAD.POOLER_TYPE})"
    if not labels:
        pooling += f", nothing detected with score >= {score_threshold}"
    bins_figure = roi_bins_figure(
        rgb, boxes.numpy(), labels, bins.regular, bins.shifted, bins.modulation, f"{image_path.name}: {pooling}"
    )
    return sampling, bins_figure


def save_detector_pictures(cfg, model, image_path: Path, output: Path, name: str, **options) -> List[Path]:
    """`draw_detector_pictures`, saved as output/<name>_sampling.png and
    output/<name>_roi_bins.png; returns their paths."""
    output.mkdir(parents=True, exist_ok=True)
    paths = []
    for kind, figure in zip(PICTURE_KINDS, draw_detector_pictures(cfg, model, Path(image_path), **options)):
        path = output / f"{name}_{kind}.png"
        figure.savefig(path, dpi=150, bbox_inches="tight")
        paths.append(path)
    return paths
