"""Layers shared by the deformable backbone blocks and heads."""

from typing import Optional

import torch
from detectron2.layers import Conv2d
from torch import nn
from torch.nn.modules.utils import _pair

from ..ops import deform_conv2d


class GeometryPredictor(nn.Module):
    """Marks a layer that predicts where to sample (offsets, modulation, an
    affine warp). The optimizer trains the parameters of such layers at
    MODEL.DCNV2.OFFSET_LR_FACTOR times the base learning rate."""


class OffsetConv2d(GeometryPredictor, Conv2d):
    """The conv predicting a deformable conv's offsets (and modulation).

    A plain detectron2 `Conv2d` (same parameter names, so detectron2's
    `conv2_offset` weights load) that starts at zero (DCNv2, Sec. 3.2): zero
    offsets, and modulation sigmoid(0) = 0.5.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        nn.init.zeros_(self.weight)
        nn.init.zeros_(self.bias)


class DeformConv(nn.Module):
    """A deformable conv (DCNv2, Eq. 1) that takes its offsets and mask as
    inputs, with an optional norm after it.

    Its attributes (`weight`, `bias`, `norm`) match detectron2's
    `DeformConv`/`ModulatedDeformConv`, so their state dicts load, but it runs
    on this project's operator, on CPU and GPU.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = False,
        norm: Optional[nn.Module] = None,
    ):
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"in_channels={in_channels} and out_channels={out_channels} must be divisible by groups={groups}"
            )
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.padding = _pair(padding)
        self.dilation = _pair(dilation)
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, *self.kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.norm = norm
        nn.init.kaiming_normal_(self.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor, offset: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = deform_conv2d(x, offset, self.weight, self.bias, self.stride, self.padding, self.dilation, mask)
        if self.norm is not None:
            x = self.norm(x)
        return x

    def extra_repr(self) -> str:
        out_channels, in_per_group = self.weight.shape[:2]
        return (
            f"out_channels={out_channels}, in_channels_per_group={in_per_group}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, bias={self.bias is not None}"
        )
