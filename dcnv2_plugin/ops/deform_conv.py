"""Modulated deformable convolution (DCNv2, Eq. 1 of the paper):

    y(p) = sum_k w_k * x(p + p_k + dp_k) * dm_k

`deform_conv2d` takes the same arguments, layouts and semantics as
`torchvision.ops.deform_conv2d`; with mask=None it is DCNv1.
"""

import math
from typing import Optional, Tuple, Union

import torch
from torch import nn

from . import _library
from ._checks import check_floating, check_rank, check_same_dtype_device, conv_output_size, pair
from .geometry_predictor import GeometryPredictor

IntPair = Union[int, Tuple[int, int]]


def deform_conv2d(
    input: torch.Tensor,
    offset: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Deformable convolution, DCNv2 when `mask` is given, DCNv1 otherwise.

    Args:
        input: [B, C_in, H, W].
        offset: [B, 2 * offset_groups * kh * kw, H_out, W_out], interleaved
            (dy, dx) per kernel point; the number of offset groups is read from
            its channel count.
        weight: [C_out, C_in / groups, kh, kw]; groups is read from its shape.
        bias: [C_out] or None.
        mask: [B, offset_groups * kh * kw, H_out, W_out] modulation scalars, or None.
    Returns:
        [B, C_out, H_out, W_out].
    """
    check_rank("input", input, 4, "[batch, in_channels, height, width]")
    check_rank("weight", weight, 4, "[out_channels, in_channels / groups, kh, kw]")
    check_rank("offset", offset, 4, "[batch, 2 * offset_groups * kh * kw, out_h, out_w]")
    if mask is not None:
        check_rank("mask", mask, 4, "[batch, offset_groups * kh * kw, out_h, out_w]")
    if bias is not None:
        check_rank("bias", bias, 1, "[out_channels]")
    check_floating("input", input)
    check_same_dtype_device("input", input, weight=weight, offset=offset, mask=mask, bias=bias)

    stride_h, stride_w = pair("stride", stride)
    pad_h, pad_w = pair("padding", padding)
    dil_h, dil_w = pair("dilation", dilation)
    if stride_h < 1 or stride_w < 1:
        raise ValueError(f"stride must be positive, got {(stride_h, stride_w)}")
    if dil_h < 1 or dil_w < 1:
        raise ValueError(f"dilation must be positive, got {(dil_h, dil_w)}")
    if pad_h < 0 or pad_w < 0:
        raise ValueError(f"padding must be non-negative, got {(pad_h, pad_w)}")

    batch, in_channels, height, width = input.shape
    out_channels, channels_per_group, kh, kw = weight.shape
    if channels_per_group == 0 or in_channels % channels_per_group != 0:
        raise ValueError(
            f"weight expects {channels_per_group} input channels per group, which does not "
            f"divide input's {in_channels} channels"
        )
    groups = in_channels // channels_per_group
    if out_channels % groups != 0:
        raise ValueError(f"weight's {out_channels} output channels are not divisible by groups={groups}")
    if offset.shape[1] == 0 or offset.shape[1] % (2 * kh * kw) != 0:
        raise ValueError(
            f"offset must have 2 * offset_groups * kh * kw channels (a multiple of {2 * kh * kw} "
            f"for a {kh}x{kw} kernel), got {offset.shape[1]}"
        )
    offset_groups = offset.shape[1] // (2 * kh * kw)
    if in_channels % offset_groups != 0:
        raise ValueError(
            f"offset implies {offset_groups} offset groups, which does not divide input's {in_channels} channels"
        )
    out_h = conv_output_size(height, pad_h, dil_h, kh, stride_h)
    out_w = conv_output_size(width, pad_w, dil_w, kw, stride_w)
    if out_h <= 0 or out_w <= 0:
        raise ValueError(
            f"the output would be empty ({out_h}x{out_w}): input {height}x{width} is too small "
            f"for a {kh}x{kw} kernel with padding {(pad_h, pad_w)} and dilation {(dil_h, dil_w)}"
        )
    if offset.shape[0] != batch or tuple(offset.shape[2:]) != (out_h, out_w):
        raise ValueError(
            f"offset must have shape [{batch}, {offset.shape[1]}, {out_h}, {out_w}] "
            f"(batch and output size), got {tuple(offset.shape)}"
        )
    if mask is not None and tuple(mask.shape) != (batch, offset_groups * kh * kw, out_h, out_w):
        raise ValueError(
            f"mask must have shape [{batch}, {offset_groups * kh * kw}, {out_h}, {out_w}] "
            f"(offset_groups * kh * kw channels), got {tuple(mask.shape)}"
        )
    if bias is not None and bias.shape[0] != out_channels:
        raise ValueError(f"bias must have {out_channels} elements, got {bias.shape[0]}")

    return _library._ops.deform_conv2d(
        input,
        weight,
        offset,
        mask,
        bias,
        stride_h,
        stride_w,
        pad_h,
        pad_w,
        dil_h,
        dil_w,
        groups,
        offset_groups,
    )


class OffsetConv2d(GeometryPredictor, nn.Conv2d):
    """The conv that predicts a deformable conv's offsets (and modulation
    logits) from the same input, with the deformable conv's kernel, stride,
    padding and dilation.

    It starts at zero (DCNv2, Sec. 3.1): zero offsets, and modulation
    sigmoid(0) = 0.5, so a deformable layer starts as the regular one.
    """

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


def split_offset_mask(
    offset_mask: torch.Tensor, kernel_points: int, offset_groups: int, modulated: bool
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Splits an `OffsetConv2d` output into `deform_conv2d`'s offset and mask.

    The first 2 * offset_groups * kernel_points channels are the offsets, read
    as interleaved (dy, dx) pairs; the rest, when modulated, the modulation
    logits, which go through a sigmoid. This is the layout of detectron2's
    deformable ResNet blocks and of mmcv's modulated conv, so their
    checkpoints mean the same here.
    """
    num_offsets = 2 * offset_groups * kernel_points
    offset = offset_mask[:, :num_offsets]
    mask = offset_mask[:, num_offsets:].sigmoid() if modulated else None
    return offset, mask


class DeformConv2d(nn.Module):
    """Deformable convolution with its offsets (and mask) given in `forward`,
    as torchvision's `DeformConv2d`: DCNv2 with a mask, DCNv1 without.

    The weight is initialized as `nn.Conv2d` initializes its own.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntPair,
        stride: IntPair = 1,
        padding: IntPair = 0,
        dilation: IntPair = 1,
        groups: int = 1,
        bias: bool = True,
    ):
        super().__init__()
        if groups < 1 or in_channels % groups or out_channels % groups:
            raise ValueError(
                f"in_channels={in_channels} and out_channels={out_channels} must be divisible by groups={groups}"
            )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = pair("kernel_size", kernel_size)
        self.stride = pair("stride", stride)
        self.padding = pair("padding", padding)
        self.dilation = pair("dilation", dilation)
        self.groups = groups
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, *self.kernel_size))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight[0].numel()
            bound = 1 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, input: torch.Tensor, offset: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return deform_conv2d(input, offset, self.weight, self.bias, self.stride, self.padding, self.dilation, mask)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, bias={self.bias is not None}"
        )


class DeformConv2dPack(DeformConv2d):
    """A `DeformConv2d` that owns the `OffsetConv2d` predicting its offsets
    (and modulation, when `modulated`) from its input, as mmcv's
    `ModulatedDeformConv2dPack` (`modulated=True`, DCNv2, the default) and
    `DeformConv2dPack` (`modulated=False`, DCNv1) do.

    At initialization the offsets are zero: the layer is a regular conv, with
    its output scaled by sigmoid(0) = 0.5 when modulated.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntPair,
        stride: IntPair = 1,
        padding: IntPair = 0,
        dilation: IntPair = 1,
        groups: int = 1,
        offset_groups: int = 1,
        bias: bool = True,
        modulated: bool = True,
    ):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias)
        if offset_groups < 1 or in_channels % offset_groups:
            raise ValueError(f"in_channels={in_channels} must be divisible by offset_groups={offset_groups}")
        self.offset_groups = offset_groups
        self.modulated = modulated
        kernel_points = self.kernel_size[0] * self.kernel_size[1]
        self.conv_offset = OffsetConv2d(
            in_channels,
            offset_groups * (3 if modulated else 2) * kernel_points,
            self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
        )

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        kernel_points = self.kernel_size[0] * self.kernel_size[1]
        offset, mask = split_offset_mask(self.conv_offset(input), kernel_points, self.offset_groups, self.modulated)
        return super().forward(input, offset, mask)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, offset_groups={self.offset_groups}, modulated={self.modulated}"
