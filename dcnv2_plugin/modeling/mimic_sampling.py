"""The RoIs that R-CNN feature mimicking learns from, and their image crops
(DCNv2 paper, Sec. 3.3)."""

from typing import List

import torch
from detectron2.modeling.poolers import convert_boxes_to_pooler_format
from detectron2.structures import Boxes, Instances
from torchvision.ops import roi_align

# MODEL.DCNV2.MIMIC.REGIONS: which training RoIs are mimicked (paper, Table 3).
MIMIC_REGIONS = ("foreground", "background", "both")


def mimic_region_mask(gt_classes: torch.Tensor, num_classes: int, regions: str) -> torch.Tensor:
    """Which RoIs, by their `gt_classes` (objects 0 .. num_classes - 1,
    background = num_classes, ignored = -1), belong to `regions`. Ignored
    RoIs never do."""
    foreground = (gt_classes >= 0) & (gt_classes < num_classes)
    background = gt_classes == num_classes
    masks = {"foreground": foreground, "background": background, "both": foreground | background}
    if regions not in masks:
        raise ValueError(f"MODEL.DCNV2.MIMIC.REGIONS must be one of {', '.join(MIMIC_REGIONS)}; got {regions!r}")
    return masks[regions]


def sample_mimic_rois(
    proposals: List[Instances], num_classes: int, max_per_image: int, regions: str = "foreground"
) -> List[Instances]:
    """Up to `max_per_image` RoIs per image, drawn at random from those of
    `regions` among the RoIs the ROI heads sampled for training.

    The paper mimics on foreground RoIs only (its Table 3: "FG Only" beats
    "FG & BG" and "BG Only"). A foreground RoI is a proposal matched to a
    ground-truth box with IoU >= the ROI heads' foreground threshold; its
    `gt_classes` is then the class of that box, which the R-CNN branch's
    classifier learns; a background RoI's is the background class.

    Args:
        proposals: per image, the ROI heads' training RoIs, with fields
            `proposal_boxes` and `gt_classes` (background = `num_classes`,
            ignored = -1).
        regions: "foreground", "background" or "both" (see MIMIC_REGIONS).
    """
    chosen = [rois[mimic_region_mask(rois.gt_classes, num_classes, regions)] for rois in proposals]
    return [rois[torch.randperm(len(rois), device=rois.gt_classes.device)[:max_per_image]] for rois in chosen]


def sample_positive_rois(proposals: List[Instances], num_classes: int, max_per_image: int) -> List[Instances]:
    """`sample_mimic_rois` on the foreground RoIs: the paper's setting."""
    return sample_mimic_rois(proposals, num_classes, max_per_image, "foreground")


def crop_and_resize(images: torch.Tensor, boxes: List[Boxes], size: int) -> torch.Tensor:
    """Cuts each box out of its image and resizes it to `size` x `size`, all
    boxes in one RoIAlign call.

    Args:
        images: [N, C, H, W] batched images, in the coordinates of `boxes`.
        boxes: N `Boxes` (x1, y1, x2, y2), the i-th for the i-th image.
    Returns:
        [K, C, size, size], K the total number of boxes, in the order of `boxes`.

    `aligned=True` treats a box as continuous coordinates, so the crop covers
    exactly the box. The adaptive sampling ratio averages ceil(box side / size)
    samples per output pixel and side: a box larger than `size` is shrunk with
    area averaging rather than aliased, a smaller one is upsampled bilinearly.
    """
    rois = convert_boxes_to_pooler_format(boxes)
    return roi_align(images, rois, output_size=size, spatial_scale=1.0, sampling_ratio=0, aligned=True)
