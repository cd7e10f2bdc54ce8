"""ONNX export of models that use the dcnv2 operators, through torch's dynamo
ONNX exporter (`torch.onnx.export(..., dynamo=True)`).

Both operators translate to standard ONNX operators only (no custom domain),
so any runtime that implements those runs the exported model:

- `dcnv2::deform_conv2d` -> `DeformConv` (opset 19). The ONNX operator has
  torchvision's layouts, which are this project's: offsets as (dy, dx)
  pairs per kernel point and offset group, a mask per kernel point (DCNv2)
  or none (DCNv1).
- `dcnv2::deform_roi_pool` -> one `RoiAlign` over the bins of all RoIs
  (aligned: coordinate_transformation_mode "half_pixel"). Each bin k of a
  RoI is a RoI of its own with a 1x1 output, moved by dp_k = gamma *
  offset_k * (roi width, roi height) (DCNv2, Eq. 2), then scaled by its
  mask. A 1x1 RoIAlign averages ceil(bin size) samples per side when
  sampling_ratio is 0: exactly the adaptive rule of this project's kernel,
  so adaptive sampling exports too.

torch 2.14's exporter has no public global registry of translations:
`export_onnx` passes `onnx_translation_table()` as `custom_translation_table`;
pass it yourself when calling `torch.onnx.export` directly.
"""

from typing import Optional

import torch

try:
    import onnx_ir as ir
    from onnxscript import INT64
    from onnxscript import opset19 as op
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "ONNX export needs onnx, onnxscript and onnxruntime: install the plugin's `export` extra "
        "(pip install -e '.[export]'; the versions are pinned in requirements-export.txt). "
        f"Cause: {e}"
    ) from e

from .. import ops  # noqa: F401  (registers torch.ops.dcnv2.*)

# DeformConv entered the standard domain in opset 19.
MIN_OPSET = 19
# ONNX Runtime computes a 1x1 RoIAlign's adaptive grid as ceil(bin size), the
# size taken from the bin's corners after rounding to float. For a bin size
# within rounding of an integer that could give one sample more or fewer per
# side than PyTorch (its bins are the RoI size / bins, unrounded). Such bin
# sizes are moved this many ulps of the bin's coordinates away from the
# integer, to the side whose count PyTorch takes (in float32, a shift of
# about 2e-4 pixel at coordinate 256).
_GRID_GUARD_ULPS = 8.0


def deform_conv2d(
    input,
    weight,
    offset,
    mask,
    bias,
    stride_h: int,
    stride_w: int,
    pad_h: int,
    pad_w: int,
    dilation_h: int,
    dilation_w: int,
    groups: int,
    offset_groups: int,
):
    """`dcnv2::deform_conv2d` as ONNX `DeformConv`."""
    return op.DeformConv(
        input,
        weight,
        offset,
        bias,
        mask,
        dilations=(dilation_h, dilation_w),
        strides=(stride_h, stride_w),
        pads=(pad_h, pad_w, pad_h, pad_w),
        group=groups,
        offset_group=offset_groups,
    )


def deform_roi_pool(
    input,
    rois,
    offset,
    mask,
    pooled_height: int,
    pooled_width: int,
    spatial_scale: float,
    sampling_ratio: int,
    gamma: float,
):
    """`dcnv2::deform_roi_pool` as one ONNX `RoiAlign` over all bins."""
    ph, pw = pooled_height, pooled_width

    def const(value: float):
        # In the RoIs' dtype: a float32 constant cast to float64 would lose
        # digits of gamma or of the scale.
        return op.Constant(value=ir.tensor(value, dtype=rois.dtype))

    def column(t, i):
        return op.Slice(t, [i], [i + 1], [1])

    # The RoI in feature coordinates, aligned (x * scale - 0.5), as the kernel has it.
    corners = op.Sub(op.Mul(op.Slice(rois, [1], [5], [1]), const(spatial_scale)), const(0.5))
    x1, y1 = column(corners, 0), column(corners, 1)  # [K, 1]
    roi_w, roi_h = op.Sub(column(corners, 2), x1), op.Sub(column(corners, 3), y1)
    bin_w = op.Unsqueeze(op.Div(roi_w, const(float(pw))), [2])  # [K, 1, 1]
    bin_h = op.Unsqueeze(op.Div(roi_h, const(float(ph))), [2])

    # Each bin's top-left corner [K, ph, pw]: the regular grid of RoIAlign,
    # shifted by gamma * offset * roi size.
    bins_shape = op.Concat(op.Shape(rois, start=0, end=1), op.Constant(value_ints=[ph, pw]), axis=0)
    rows = op.CastLike(op.Reshape(op.Range(0, ph, 1), op.Constant(value_ints=[1, ph, 1])), rois)
    cols = op.CastLike(op.Reshape(op.Range(0, pw, 1), op.Constant(value_ints=[1, 1, pw])), rois)
    bin_x = op.Expand(op.Add(op.Unsqueeze(x1, [2]), op.Mul(cols, bin_w)), bins_shape)
    bin_y = op.Expand(op.Add(op.Unsqueeze(y1, [2]), op.Mul(rows, bin_h)), bins_shape)
    if offset is not None:
        offset_x = op.Squeeze(op.Slice(offset, [0], [1], [1]), [1])
        offset_y = op.Squeeze(op.Slice(offset, [1], [2], [1]), [1])
        bin_x = op.Add(bin_x, op.Mul(op.Mul(offset_x, const(gamma)), op.Unsqueeze(roi_w, [2])))
        bin_y = op.Add(bin_y, op.Mul(op.Mul(offset_y, const(gamma)), op.Unsqueeze(roi_h, [2])))

    if sampling_ratio <= 0:
        # The kernel takes no sample in an empty or inverted RoI.
        bin_w, bin_h = op.Max(bin_w, const(0.0)), op.Max(bin_h, const(0.0))
        eps = 2.0**-52 if rois.dtype == ir.DataType.DOUBLE else 2.0**-23
        bin_w = _away_from_integers(bin_w, _guard_margin(bin_x, bin_w, eps, const), const)
        bin_h = _away_from_integers(bin_h, _guard_margin(bin_y, bin_h, eps, const), const)

    # RoiAlign's half_pixel mode subtracts 0.5 from the corners: add it here.
    x_start, y_start = op.Add(bin_x, const(0.5)), op.Add(bin_y, const(0.5))
    boxes = op.Concat(
        *(op.Unsqueeze(c, [3]) for c in (x_start, y_start, op.Add(x_start, bin_w), op.Add(y_start, bin_h))),
        axis=3,
    )
    batch_index = op.Expand(op.Unsqueeze(op.Cast(column(rois, 0), to=INT64.dtype), [2]), bins_shape)
    pooled = op.RoiAlign(
        input,
        op.Reshape(boxes, op.Constant(value_ints=[-1, 4])),
        op.Reshape(batch_index, op.Constant(value_ints=[-1])),
        coordinate_transformation_mode="half_pixel",
        mode="avg",
        output_height=1,
        output_width=1,
        sampling_ratio=max(sampling_ratio, 0),
        spatial_scale=1.0,
    )  # [K * ph * pw, C, 1, 1]
    out_shape = op.Concat(op.Constant(value_ints=[-1, ph, pw]), op.Shape(input, start=1, end=2), axis=0)
    out = op.Transpose(op.Reshape(pooled, out_shape), perm=[0, 3, 1, 2])
    return out if mask is None else op.Mul(out, mask)


def _guard_margin(start, size, eps: float, const):
    """_GRID_GUARD_ULPS ulps (`eps` the dtype's relative one) of a bin's
    coordinates (start, start + size)."""
    return op.Mul(op.Add(op.Abs(start), op.Add(size, const(1.0))), const(_GRID_GUARD_ULPS * eps))


def _away_from_integers(size, margin, const):
    """`size` (>= 0) moved so that ceil() of anything within `margin` of it
    is ceil(size): a size within `margin` above an integer n goes to n +
    margin, one within `margin` below n (or at n) to n - margin; 0 stays."""
    one = const(1.0)
    ceiling = op.Ceil(size)
    above_floor = op.Sub(size, op.Sub(ceiling, one))  # in (0, 1]
    size = op.Where(op.Less(above_floor, margin), op.Add(op.Sub(ceiling, one), margin), size)
    below_ceiling = op.And(op.Greater(above_floor, op.Sub(one, margin)), op.Greater(ceiling, const(0.0)))
    return op.Where(below_ceiling, op.Sub(ceiling, margin), size)


def onnx_translation_table() -> dict:
    """The dcnv2 operators' ONNX translations, for
    `torch.onnx.export(..., dynamo=True, custom_translation_table=...)`."""
    return {
        torch.ops.dcnv2.deform_conv2d.default: deform_conv2d,
        torch.ops.dcnv2.deform_roi_pool.default: deform_roi_pool,
    }


def export_onnx(
    model: torch.nn.Module,
    args: tuple,
    path: Optional[str] = None,
    *,
    opset_version: int = 20,
    custom_translation_table: Optional[dict] = None,
    **kwargs,
) -> "torch.onnx.ONNXProgram":
    """`torch.onnx.export(model, args, path, dynamo=True, ...)` with the
    dcnv2 operators' translations (plus `custom_translation_table`, which
    takes precedence). Other keyword arguments go to `torch.onnx.export`.
    Returns the `ONNXProgram` (its `model_proto` is the ONNX model)."""
    if opset_version < MIN_OPSET:
        raise ValueError(
            f"opset_version={opset_version}: the dcnv2 operators export to ONNX DeformConv, which needs "
            f"opset_version >= {MIN_OPSET}"
        )
    table = {**onnx_translation_table(), **(custom_translation_table or {})}
    kwargs.setdefault("verbose", False)
    return torch.onnx.export(
        model,
        args,
        path,
        dynamo=True,
        opset_version=opset_version,
        custom_translation_table=table,
        **kwargs,
    )
