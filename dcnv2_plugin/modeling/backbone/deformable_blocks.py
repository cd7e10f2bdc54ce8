"""ResNet blocks whose 3x3 conv `conv2` is deformable (DCNv1) or modulated
deformable (DCNv2, Eq. 1), running on this project's operator.

Parameter names and the layout of the offset conv's output are those of
detectron2's `DeformBottleneckBlock` (`conv2_offset`, `conv2.weight`,
`conv2.norm.*`), so checkpoints of detectron2's deformable ResNets load.
"""

import math

import torch
import torch.nn.functional as F
from detectron2.modeling.backbone.resnet import BasicBlock, BottleneckBlock

from ...ops import OffsetConv2d, split_offset_mask
from ..layers import DeformConv


class _DeformableConv2:
    """Turns the `conv2` a regular block built into a deformable conv with a
    sibling `conv2_offset` (mixed into detectron2's block classes)."""

    def _make_conv2_deformable(self, deform_modulated: bool, deform_num_groups: int) -> None:
        regular = self.conv2
        kernel_points = regular.kernel_size[0] * regular.kernel_size[1]
        # Per kernel point and offset group: (dy, dx), plus a modulation scalar.
        outputs_per_point = 3 if deform_modulated else 2
        self.deform_modulated = deform_modulated
        self.deform_num_groups = deform_num_groups
        self.conv2_offset = OffsetConv2d(
            regular.in_channels,
            outputs_per_point * kernel_points * deform_num_groups,
            kernel_size=regular.kernel_size,
            stride=regular.stride,
            padding=regular.padding,
            dilation=regular.dilation,
        )
        self.conv2 = DeformConv(
            regular.in_channels,
            regular.out_channels,
            kernel_size=regular.kernel_size,
            stride=regular.stride,
            padding=regular.padding,
            dilation=regular.dilation,
            groups=regular.groups,
            norm=regular.norm,
        )
        # Same initialization as the regular conv (detectron2's c2_msra_fill).
        self.conv2.weight = regular.weight

    def _forward_conv2(self, x: torch.Tensor) -> torch.Tensor:
        offset, mask = split_offset_mask(
            self.conv2_offset(x), math.prod(self.conv2.kernel_size), self.deform_num_groups, self.deform_modulated
        )
        return self.conv2(x, offset, mask)


class DeformBottleneckBlock(_DeformableConv2, BottleneckBlock):
    """detectron2's `BottleneckBlock` with a deformable 3x3 conv; a drop-in
    for detectron2's `DeformBottleneckBlock` (same arguments and names)."""

    def __init__(self, in_channels, out_channels, *, deform_modulated=False, deform_num_groups=1, **kwargs):
        super().__init__(in_channels, out_channels, **kwargs)
        self._make_conv2_deformable(deform_modulated, deform_num_groups)

    def forward(self, x):
        out = F.relu_(self.conv1(x))
        out = F.relu_(self._forward_conv2(out))
        out = self.conv3(out)
        shortcut = x if self.shortcut is None else self.shortcut(x)
        return F.relu_(out + shortcut)


class DeformBasicBlock(_DeformableConv2, BasicBlock):
    """detectron2's `BasicBlock` (ResNet-18/34) with its second 3x3 conv
    deformable. detectron2 has no such block; the second conv is chosen
    because it has stride 1 and the name (`conv2`) of the bottleneck's
    deformable conv."""

    def __init__(self, in_channels, out_channels, *, deform_modulated=False, deform_num_groups=1, **kwargs):
        super().__init__(in_channels, out_channels, **kwargs)
        self._make_conv2_deformable(deform_modulated, deform_num_groups)

    def forward(self, x):
        out = F.relu_(self.conv1(x))
        out = self._forward_conv2(out)
        shortcut = x if self.shortcut is None else self.shortcut(x)
        return F.relu_(out + shortcut)
