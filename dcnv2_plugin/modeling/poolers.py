"""(Modulated) deformable RoI pooling as a detectron2 `ROIPooler`.

detectron2's `ROIPooler` knows only its own pooler types; `DeformableROIPooler`
subclasses it and adds "DeformRoIPool" (DCNv1 dpool) and
"ModulatedDeformRoIPool" (DCNv2 mdpool).
"""

from typing import List, Optional, Tuple

import fvcore.nn.weight_init as weight_init
import torch
import torch.nn.functional as F
from detectron2.layers import nonzero_tuple
from detectron2.modeling.poolers import ROIPooler, assign_boxes_to_levels, convert_boxes_to_pooler_format
from detectron2.structures import Boxes
from torch import nn

from ..ops import DeformRoIPool, GeometryPredictor

DETECTRON2_POOLER_TYPES = ("ROIAlign", "ROIAlignV2", "ROIPool", "ROIAlignRotated")
# Each deformable pooler type, and whether it is modulated.
DEFORMABLE_POOLER_TYPES = {"DeformRoIPool": False, "ModulatedDeformRoIPool": True}


def check_pooler_type(pooler_type: str, config_key: str) -> None:
    """Raise a ValueError naming the valid types if `pooler_type` is none of them."""
    valid = DETECTRON2_POOLER_TYPES + tuple(DEFORMABLE_POOLER_TYPES)
    if pooler_type not in valid:
        raise ValueError(f"Unknown pooler type {pooler_type!r} in {config_key}; valid types: {', '.join(valid)}")


class RoIOffsetPredictor(GeometryPredictor):
    """The sibling branch of deformable RoI pooling (DCNv2, Sec. 3.2): from the
    RoIAlign features of a RoI, two fc layers and a last fc predict per bin the
    normalized offset (dx, dy) and, when modulated, a modulation scalar.

    The last fc starts at zero, so pooling starts as RoIAlign (times
    sigmoid(0) = 0.5 when modulated). DCNv1's dpool used a single fc; the same
    two-hidden-layer branch serves both here, so that the DCNv1/DCNv2 pooling
    settings differ only in the modulation. With `branch_channels` > 0, a 1x1
    conv and a ReLU first reduce the features to that many channels.
    """

    def __init__(
        self, in_channels: int, output_size: Tuple[int, int], fc_dim: int, modulated: bool, branch_channels: int = 0
    ):
        super().__init__()
        self.output_size = output_size
        self.modulated = modulated
        num_bins = output_size[0] * output_size[1]
        # fc1 takes the whole pooled map: for wide maps (C4 pools 1024 channels
        # at 14x14, 200k values per RoI) a 1x1 conv first narrows it.
        self.channel_reduction = None
        if branch_channels:
            self.channel_reduction = nn.Conv2d(in_channels, branch_channels, kernel_size=1)
            weight_init.c2_msra_fill(self.channel_reduction)
            in_channels = branch_channels
        self.fc1 = nn.Linear(in_channels * num_bins, fc_dim)
        self.fc2 = nn.Linear(fc_dim, fc_dim)
        self.predictor = nn.Linear(fc_dim, (3 if modulated else 2) * num_bins)
        for layer in (self.fc1, self.fc2):
            weight_init.c2_xavier_fill(layer)
        nn.init.zeros_(self.predictor.weight)
        nn.init.zeros_(self.predictor.bias)

    def forward(self, roi_features: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        if self.channel_reduction is not None:
            roi_features = F.relu(self.channel_reduction(roi_features))
        hidden = F.relu(self.fc2(F.relu(self.fc1(roi_features.flatten(1)))))
        out = self.predictor(hidden)
        ph, pw = self.output_size
        offset = out[:, : 2 * ph * pw].reshape(-1, 2, ph, pw)
        mask = out[:, 2 * ph * pw :].reshape(-1, 1, ph, pw).sigmoid() if self.modulated else None
        return offset, mask


class DeformableROIPooler(ROIPooler):
    """A `ROIPooler` whose pooling is (modulated) deformable RoI pooling.

    detectron2's RoIAlignV2 pooling (the parent class, on the same levels and
    level assignment) gives the features the offset branch reads; the offsets
    and mask then drive deformable pooling on each RoI's level (DCNv2, Eq. 2).

    With FPN, one offset branch is shared by all levels: the box head reading
    the pooled features is shared across levels too, and the offsets are
    normalized by the RoI size, so they do not depend on the level's scale.
    """

    def __init__(
        self,
        output_size,
        scales: List[float],
        sampling_ratio: int,
        *,
        in_channels: int,
        modulated: bool,
        fc_dim: int,
        gamma: float,
        branch_channels: int = 0,
        canonical_box_size: int = 224,
        canonical_level: int = 4,
    ):
        super().__init__(
            output_size,
            scales,
            sampling_ratio,
            "ROIAlignV2",
            canonical_box_size=canonical_box_size,
            canonical_level=canonical_level,
        )
        # Without offsets this project's pooling is RoIAlignV2, with a faster
        # CPU backward than torchvision's roi_align: it serves both the
        # offset branch's plain pooling (the parent's level_poolers) and the
        # deformable pooling.
        self.level_poolers = nn.ModuleList(
            DeformRoIPool(self.output_size, spatial_scale=scale, sampling_ratio=sampling_ratio, gamma=gamma)
            for scale in scales
        )
        self.offset_predictor = RoIOffsetPredictor(in_channels, self.output_size, fc_dim, modulated, branch_channels)

    def forward(self, x: List[torch.Tensor], box_lists: List[Boxes]) -> torch.Tensor:
        if len(x) != len(self.level_poolers) or len(box_lists) != x[0].shape[0]:
            raise ValueError(
                f"DeformableROIPooler takes {len(self.level_poolers)} feature maps and one box list per image; "
                f"got {len(x)} maps and {len(box_lists)} box lists for a batch of {x[0].shape[0]}"
            )
        if not box_lists:
            return x[0].new_zeros((0, x[0].shape[1]) + tuple(self.output_size))
        return self.pool(x, convert_boxes_to_pooler_format(box_lists))

    def pool(self, x: List[torch.Tensor], rois: torch.Tensor) -> torch.Tensor:
        """`forward` from RoIs in pooler format ([K, 5]: batch index, x1, y1,
        x2, y2), as torch.export traces it for a data-dependent K."""
        regular = pool_by_level(self, x, rois)
        if regular.shape[0] == 0:  # no RoI: nothing for the offset branch
            return regular
        offset, mask = self.offset_predictor(regular)
        return pool_by_level(self, x, rois, offset, mask)


def pool_by_level(pooler: ROIPooler, x: List[torch.Tensor], rois: torch.Tensor, *per_roi) -> torch.Tensor:
    """What `ROIPooler.forward` does after converting its box lists: each RoI
    ([K, 5] pooler format) pooled on its level by that level's pooler, which
    also gets the `per_roi` tensors (or None) of the RoIs it pools."""
    if len(pooler.level_poolers) == 1:
        return pooler.level_poolers[0](x[0], rois, *per_roi)
    levels = assign_boxes_to_levels(
        [Boxes(rois[:, 1:])], pooler.min_level, pooler.max_level, pooler.canonical_box_size, pooler.canonical_level
    )
    output = x[0].new_zeros((rois.shape[0], x[0].shape[1]) + tuple(pooler.output_size))
    for level, level_pooler in enumerate(pooler.level_poolers):
        inds = nonzero_tuple(levels == level)[0]
        selected = [None if t is None else t[inds] for t in per_roi]
        output.index_put_((inds,), level_pooler(x[level], rois[inds], *selected))
    return output


def pool_rois(pooler: ROIPooler, x: List[torch.Tensor], rois: torch.Tensor) -> torch.Tensor:
    """`pooler(x, box_lists)` from RoIs already in pooler format, for
    detectron2's `ROIPooler` and `DeformableROIPooler` alike."""
    if isinstance(pooler, DeformableROIPooler):
        return pooler.pool(x, rois)
    return pool_by_level(pooler, x, rois)
