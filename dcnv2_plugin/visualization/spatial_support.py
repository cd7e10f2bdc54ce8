"""The DCNv2 talk's effective spatial support of a detector's node: effective
sampling (or bin) locations, effective receptive field and error-bounded
saliency region, for a conv5 node or a per-RoI 2fc node; and how much of it
falls on an annotated object. `tools/spatial_support.py` is the command line."""

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from detectron2.data import transforms as T
from detectron2.data.detection_utils import convert_image_to_rgb, read_image
from detectron2.structures import BoxMode
from PIL import Image
from pycocotools import mask as mask_util
from torch import nn

from .draw import spatial_support_figure
from .nodes import BoxHeadNode, Conv5Node, EffectiveLocations, effective_bin_locations, effective_sampling_locations
from .support import DEFAULT_EPSILON, SaliencyRegion, effective_receptive_field, saliency_region

NODE_KINDS = ("conv5", "2fc")


@dataclass
class SpatialSupport:
    node: str  # what the node is, for titles
    locations: EffectiveLocations
    receptive_field: np.ndarray  # [H, W]
    saliency: SaliencyRegion
    unit: Optional[Tuple[float, float]] = None  # the conv5 unit's image (y, x)
    box: Optional[np.ndarray] = None  # the 2fc node's box (x1, y1, x2, y2)


def conv5_support(
    model: nn.Module, image: torch.Tensor, image_yx, *, layers: int = 3, epsilon: float = DEFAULT_EPSILON
) -> SpatialSupport:
    """The three analyses for the res5 unit nearest to an image point (y, x) of image [3, H, W]."""
    node = Conv5Node(model, image_yx, tuple(image.shape[-2:]))
    field = effective_receptive_field(node, image)
    return SpatialSupport(
        f"conv5 unit {node.unit}",
        effective_sampling_locations(node, image, layers),
        field.numpy(),
        saliency_region(node, image, field, epsilon),
        unit=node.image_position,
    )


def box_support(
    model: nn.Module, image: torch.Tensor, box, gamma: float, *, epsilon: float = DEFAULT_EPSILON
) -> SpatialSupport:
    """The three analyses for the 2fc node of the RoI `box` (x1, y1, x2, y2) of image [3, H, W]."""
    node = BoxHeadNode(model, box)
    field = effective_receptive_field(node, image)
    return SpatialSupport(
        "2fc node",
        effective_bin_locations(node, image, gamma),
        field.numpy(),
        saliency_region(node, image, field, epsilon),
        box=node.box.numpy(),
    )


def network_input(cfg, image_path: Path):
    """(image [H, W, 3] in cfg.INPUT.FORMAT, resized as at test time; the resize transform)."""
    original = read_image(str(image_path), format=cfg.INPUT.FORMAT)
    resize = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST).get_transform(original)
    return resize.apply_image(original), resize


def as_tensor(image: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(image.astype("float32").transpose(2, 0, 1).copy())


def record_node(record: Dict, object_index: int = 0):
    """(image path, conv5 node's image (y, x), 2fc node's box (x1, y1, x2,
    y2)) for an annotated object of a dataset record: its box, and the
    unit at the box's center."""
    annotation = record["annotations"][object_index]
    box = BoxMode.convert(list(annotation["bbox"]), annotation["bbox_mode"], BoxMode.XYXY_ABS)
    # Box centers from pixel edges to pixel indices.
    center = ((box[1] + box[3]) / 2 - 0.5, (box[0] + box[2]) / 2 - 0.5)
    return Path(record["file_name"]), center, box


def draw_spatial_support(
    detectors: Sequence[Tuple[str, object, nn.Module]],
    image_path: Path,
    image_yx: Tuple[float, float],
    box: Sequence[float],
    *,
    layers: int = 3,
    epsilon: float = DEFAULT_EPSILON,
):
    """One figure per node kind (conv5, 2fc), a row per detector (title,
    cfg, model), on the same image and node. `image_yx` and `box` are in the
    original image's coordinates; every cfg must resize it alike."""
    rows = {kind: [] for kind in NODE_KINDS}
    for title, cfg, model in detectors:
        image, resize = network_input(cfg, image_path)
        tensor = as_tensor(image)
        yx = resize.apply_coords(np.array([[image_yx[1], image_yx[0]]], np.float64))[0, ::-1]
        resized_box = resize.apply_box(np.asarray([box], np.float64))[0]
        rgb = convert_image_to_rgb(image, cfg.INPUT.FORMAT)
        rows["conv5"].append((title, conv5_support(model, tensor, tuple(yx), layers=layers, epsilon=epsilon)))
        gamma = cfg.MODEL.DCNV2.DEFORM_POOL.GAMMA
        rows["2fc"].append((title, box_support(model, tensor, resized_box, gamma, epsilon=epsilon)))
    return {kind: spatial_support_figure(rgb, rows[kind], f"{Path(image_path).name}") for kind in NODE_KINDS}


def save_spatial_support_pictures(
    detectors,
    image_path: Path,
    output: Path,
    name: str,
    image_yx,
    box,
    *,
    dpi: int = 100,
    palette: bool = False,
    **options,
):
    """`draw_spatial_support`, saved as output/<name>_support_conv5.png and
    output/<name>_support_2fc.png (with `palette`, as 256-colour PNGs, about
    a third of the size); returns their paths."""
    output.mkdir(parents=True, exist_ok=True)
    paths = []
    for kind, figure in draw_spatial_support(detectors, Path(image_path), image_yx, box, **options).items():
        path = output / f"{name}_support_{kind}.png"
        figure.savefig(path, dpi=dpi, bbox_inches="tight")
        if palette:
            with Image.open(path) as picture:
                quantized = picture.convert("RGB").quantize(colors=256)
            quantized.save(path, optimize=True)
        paths.append(path)
    return paths


# ------------------------------------------------------------------ measurement


def object_regions(record: Dict, resize) -> List[Tuple[np.ndarray, np.ndarray]]:
    """(box (x1, y1, x2, y2), mask [H, W] bool, or the box's pixels without a
    mask) of each annotated object of a dataset record, in the resized image."""
    height, width = record["height"], record["width"]
    regions = []
    for annotation in record["annotations"]:
        box = BoxMode.convert(list(annotation["bbox"]), annotation["bbox_mode"], BoxMode.XYXY_ABS)
        segmentation = annotation.get("segmentation")
        if isinstance(segmentation, dict):
            rle = segmentation
            if isinstance(rle.get("counts"), list):
                rle = mask_util.frPyObjects(rle, height, width)
            mask = mask_util.decode(rle).astype(bool)
        elif segmentation:
            mask = mask_util.decode(mask_util.merge(mask_util.frPyObjects(segmentation, height, width))).astype(bool)
        else:
            mask = np.zeros((height, width), bool)
            x1, y1, x2, y2 = np.round(box).astype(int)
            mask[y1:y2, x1:x2] = True
        resized = resize.apply_segmentation(mask.astype(np.uint8)).astype(bool)
        regions.append((resize.apply_box(np.asarray([box], np.float64))[0], resized))
    return regions


def support_inside(node, image: torch.Tensor, region: np.ndarray, epsilon: float) -> Dict[str, float]:
    """The share of a node's effective-receptive-field mass and of its
    saliency region that lies inside `region` [H, W] bool."""
    field = effective_receptive_field(node, image)
    saliency = saliency_region(node, image, field, epsilon).mask
    field = field.numpy()
    return {
        "erf_inside": float(field[region].sum() / max(field.sum(), np.finfo(np.float64).tiny)),
        "saliency_inside": float((saliency & region).sum() / max(saliency.sum(), 1)),
        "saliency_area": float(saliency.mean()),
    }


def measure_objects(
    cfg, model: nn.Module, records: Sequence[Dict], *, epsilon: float = DEFAULT_EPSILON
) -> List[Dict[str, float]]:
    """For each annotated object: the conv5 node at its box center and the
    2fc node of its box (as the RoI), and the share of each node's effective
    receptive field and saliency region that falls inside its mask."""
    results = []
    for record in records:
        image, resize = network_input(cfg, Path(record["file_name"]))
        tensor = as_tensor(image)
        for box, region in object_regions(record, resize):
            # Box centers from pixel edges to pixel indices.
            center = ((box[1] + box[3]) / 2 - 0.5, (box[0] + box[2]) / 2 - 0.5)
            row = {"object_area": float(region.mean())}
            nodes = {"conv5": Conv5Node(model, center, tuple(tensor.shape[-2:])), "2fc": BoxHeadNode(model, box)}
            for kind, node in nodes.items():
                row.update(
                    {f"{kind}_{key}": value for key, value in support_inside(node, tensor, region, epsilon).items()}
                )
            results.append(row)
    return results


def summarize_objects(rows: Sequence[Dict[str, float]]) -> Dict[str, Dict[str, float]]:
    """Mean, standard deviation and quartiles over objects of every measured quantity."""
    summary = {}
    for key in rows[0]:
        values = np.array([row[key] for row in rows])
        q1, median, q3 = np.percentile(values, [25, 50, 75])
        summary[key] = {
            "mean": float(values.mean()),
            "std": float(values.std()),
            "q1": float(q1),
            "median": float(median),
            "q3": float(q3),
        }
    return summary
