"""Spatial Transformer (Jaderberg et al., 2015) as a global-transform baseline:
DCNv1 discusses STN as the global, parametric counterpart of its local, dense
offsets. One affine warp per image, predicted from the features, is applied
to the input of a ResNet stage."""

from collections import OrderedDict

import torch
import torch.nn.functional as F
from detectron2.layers import CNNBlockBase
from detectron2.modeling.backbone.resnet import ResNet
from torch import nn

from ...ops import GeometryPredictor

# The localization net average-pools to this grid: a global average would lose
# the spatial layout that a translation or rotation has to be read from.
_POOLED_GRID = 4


class AffineLocalization(GeometryPredictor):
    """Predicts a 2x3 affine matrix per image; starts at the identity."""

    def __init__(self, channels: int, hidden_dim: int):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(_POOLED_GRID)
        self.hidden = nn.Linear(channels * _POOLED_GRID * _POOLED_GRID, hidden_dim)
        self.theta = nn.Linear(hidden_dim, 6)
        # Zero weights and an identity bias: the warp is the identity at
        # initialization, as deformable modules start from a regular grid.
        nn.init.zeros_(self.theta.weight)
        with torch.no_grad():
            self.theta.bias.copy_(torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 0.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = F.relu(self.hidden(self.pool(x).flatten(1)))
        return self.theta(hidden).view(-1, 2, 3)


class SpatialTransformer(CNNBlockBase):
    """Warps its input by a learned affine transform (keeps shape, stride 1).

    A `CNNBlockBase` so that it can sit in a ResNet stage (and be frozen with
    it, like any block)."""

    def __init__(self, channels: int, hidden_dim: int):
        super().__init__(channels, channels, stride=1)
        self.localization = AffineLocalization(channels, hidden_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        theta = self.localization(x)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def insert_spatial_transformer(resnet: ResNet, stage_name: str, hidden_dim: int) -> None:
    """Makes a SpatialTransformer the first module of `resnet`'s stage
    `stage_name`, in place.

    The transformer is named `spatial_transformer` inside the stage, so the
    blocks keep their names (`res3.0`, ...) and pretrained weights still load.
    """
    if stage_name not in resnet.stage_names:
        raise ValueError(
            f"MODEL.DCNV2.STN.STAGE={stage_name!r} is not a stage of this ResNet; "
            f"its stages are {list(resnet.stage_names)}"
        )
    index = resnet.stage_names.index(stage_name)
    stage = resnet.stages[index]
    if not any(p.requires_grad for p in stage.parameters()):
        raise ValueError(
            f"MODEL.DCNV2.STN.STAGE={stage_name!r} is frozen by MODEL.BACKBONE.FREEZE_AT, so the "
            "transformer would stay the identity: choose a later stage or lower FREEZE_AT"
        )
    transformer = SpatialTransformer(stage[0].in_channels, hidden_dim)
    warped_stage = nn.Sequential(OrderedDict([("spatial_transformer", transformer), *stage.named_children()]))
    setattr(resnet, stage_name, warped_stage)
    resnet.stages[index] = warped_stage
