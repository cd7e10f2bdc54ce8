"""The RoIs that R-CNN feature mimicking learns from, and their image crops
(DCNv2 paper, Sec. 3.3)."""

from typing import List

import torch
from detectron2.modeling.poolers import convert_boxes_to_pooler_format
from detectron2.modeling.roi_heads import select_foreground_proposals
from detectron2.structures import Boxes, Instances
from torchvision.ops import roi_align


def sample_positive_rois(proposals: List[Instances], num_classes: int, max_per_image: int) -> List[Instances]:
    """Up to `max_per_image` RoIs per image, drawn at random from the positives
    among the RoIs the ROI heads sampled for training.

    The paper mimics on foreground RoIs only (its Table 3: "FG Only" beats
    "FG & BG"). A positive is a proposal matched to a ground-truth box with
    IoU >= the ROI heads' foreground threshold; its `gt_classes` is then the
    class of that box, which the R-CNN branch's classifier learns.

    Args:
        proposals: per image, the ROI heads' training RoIs, with fields
            `proposal_boxes` and `gt_classes` (background = `num_classes`,
            ignored = -1).
    """
    foreground, _ = select_foreground_proposals(proposals, bg_label=num_classes)
    return [rois[torch.randperm(len(rois), device=rois.gt_classes.device)[:max_per_image]] for rois in foreground]


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
