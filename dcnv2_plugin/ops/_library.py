"""Loads the compiled operators and registers their autograd and fake kernels.

The schemas live in csrc/ (TORCH_LIBRARY(dcnv2, ...)); the kernels for each
device are registered there too. What is registered here from Python is what
the dispatcher needs on top: the backward formulas (each a call of the
matching `_backward` operator) and the fake kernels that tell torch.compile
and FakeTensor the output shapes without running anything.
"""

import torch

try:
    from dcnv2_plugin import _C  # noqa: F401  (loading it registers torch.ops.dcnv2.*)
except ImportError as e:  # pragma: no cover - exercised only on a broken install
    raise ImportError(
        "dcnv2_plugin's compiled extension (dcnv2_plugin._C) is not built or does not "
        "load: run `make ext` in the repository (or `python setup.py build_ext --inplace`). "
        f"Cause: {e}"
    ) from e

from ._checks import conv_output_size  # noqa: E402

_ops = torch.ops.dcnv2


# ---------------------------------------------------------------- deform_conv2d
@torch.library.register_fake("dcnv2::deform_conv2d")
def _deform_conv2d_fake(
    input, weight, offset, mask, bias, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, groups, offset_groups
):
    out_h = conv_output_size(input.shape[2], pad_h, dilation_h, weight.shape[2], stride_h)
    out_w = conv_output_size(input.shape[3], pad_w, dilation_w, weight.shape[3], stride_w)
    return input.new_empty((input.shape[0], weight.shape[0], out_h, out_w))


@torch.library.register_fake("dcnv2::_deform_conv2d_backward")
def _deform_conv2d_backward_fake(
    grad,
    input,
    weight,
    offset,
    mask,
    bias,
    stride_h,
    stride_w,
    pad_h,
    pad_w,
    dilation_h,
    dilation_w,
    groups,
    offset_groups,
):
    grad_mask = torch.empty_like(mask) if mask is not None else input.new_empty((0,))
    return (
        torch.empty_like(input),
        torch.empty_like(weight),
        torch.empty_like(offset),
        grad_mask,
        input.new_empty((weight.shape[0],)),
    )


def _deform_conv2d_setup_context(ctx, inputs, output):
    input, weight, offset, mask, bias = inputs[:5]
    ctx.save_for_backward(input, weight, offset, mask, bias)
    ctx.conv_args = inputs[5:]


def _deform_conv2d_backward(ctx, grad):
    input, weight, offset, mask, bias = ctx.saved_tensors
    grad_input, grad_weight, grad_offset, grad_mask, grad_bias = _ops._deform_conv2d_backward(
        grad, input, weight, offset, mask, bias, *ctx.conv_args
    )
    return (
        grad_input,
        grad_weight,
        grad_offset,
        grad_mask if mask is not None else None,
        grad_bias if bias is not None else None,
    ) + (None,) * len(ctx.conv_args)


torch.library.register_autograd(
    "dcnv2::deform_conv2d", _deform_conv2d_backward, setup_context=_deform_conv2d_setup_context
)


# -------------------------------------------------------------- deform_roi_pool
@torch.library.register_fake("dcnv2::deform_roi_pool")
def _deform_roi_pool_fake(input, rois, offset, mask, pooled_height, pooled_width, spatial_scale, sampling_ratio, gamma):
    return input.new_empty((rois.shape[0], input.shape[1], pooled_height, pooled_width))


@torch.library.register_fake("dcnv2::_deform_roi_pool_backward")
def _deform_roi_pool_backward_fake(
    grad, input, rois, offset, mask, pooled_height, pooled_width, spatial_scale, sampling_ratio, gamma
):
    empty = input.new_empty((0,))
    return (
        torch.empty_like(input),
        torch.empty_like(offset) if offset is not None else empty,
        torch.empty_like(mask) if mask is not None else empty,
    )


def _deform_roi_pool_setup_context(ctx, inputs, output):
    input, rois, offset, mask = inputs[:4]
    ctx.save_for_backward(input, rois, offset, mask)
    ctx.pool_args = inputs[4:]


def _deform_roi_pool_backward(ctx, grad):
    input, rois, offset, mask = ctx.saved_tensors
    grad_input, grad_offset, grad_mask = _ops._deform_roi_pool_backward(grad, input, rois, offset, mask, *ctx.pool_args)
    return (
        grad_input,
        None,  # RoI coordinates get no gradient, as in RoIAlign
        grad_offset if offset is not None else None,
        grad_mask if mask is not None else None,
    ) + (None,) * len(ctx.pool_args)


torch.library.register_autograd(
    "dcnv2::deform_roi_pool", _deform_roi_pool_backward, setup_context=_deform_roi_pool_setup_context
)
