"""The operators' ONNX translations: exported with torch's dynamo exporter,
checked by onnx.checker, run in ONNX Runtime on the CPU and compared with
PyTorch over many configurations (the max abs differences are listed at the
end of the test run)."""

import numpy as np
import pytest
import torch
from helpers import onnx_session, record_max_abs_diff

pytest.importorskip("onnxscript", reason="needs the export extra (onnx, onnxscript, onnxruntime)")
pytest.importorskip("onnxruntime", reason="needs the export extra (onnx, onnxscript, onnxruntime)")

from dcnv2_plugin.export.onnx_export import MIN_OPSET, export_onnx  # noqa: E402
from dcnv2_plugin.export.runtime import run  # noqa: E402
from dcnv2_plugin.ops import deform_conv2d, deform_roi_pool  # noqa: E402
from dcnv2_plugin.ops._checks import conv_output_size, pair  # noqa: E402

# in, out channels, kernel, stride, padding, dilation, groups, offset groups, bias, mask
CONV_CONFIGS = [
    (4, 6, (3, 3), 1, 1, 1, 1, 1, True, True),  # DCNv2, the backbone's 3x3
    (4, 6, (3, 3), 1, 1, 1, 1, 1, True, False),  # DCNv1
    (4, 6, (3, 3), 2, 1, 1, 1, 1, False, True),  # stride 2, no bias
    (8, 6, (3, 3), 1, 2, 2, 2, 4, True, True),  # dilation, groups, offset groups
    (6, 4, (1, 3), (1, 2), (0, 1), 1, 1, 2, True, False),  # non-square kernel, stride and padding
    (4, 4, (2, 3), 1, 0, (2, 1), 4, 1, True, True),  # depthwise, even kernel side, no padding
    (3, 5, (5, 5), 3, 2, 1, 1, 3, True, True),  # large kernel, offset group per channel
]


class ManyDeformConvs(torch.nn.Module):
    """One deformable conv per configuration, each on its own inputs, so
    that one export covers them all."""

    def __init__(self, configs, dtype):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.configs = configs
        self.weights = torch.nn.ParameterList()
        self.biases = torch.nn.ParameterList()
        for c_in, c_out, kernel, _, _, _, groups, _, _, _ in configs:
            self.weights.append(torch.nn.Parameter(torch.randn(c_out, c_in // groups, *kernel, generator=g).to(dtype)))
            self.biases.append(torch.nn.Parameter(torch.randn(c_out, generator=g).to(dtype)))

    def forward(self, *inputs):
        outputs = []
        for i, (_, _, _, stride, padding, dilation, _, _, use_bias, use_mask) in enumerate(self.configs):
            x, offset, mask = inputs[3 * i : 3 * i + 3]
            bias = self.biases[i] if use_bias else None
            outputs.append(
                deform_conv2d(x, offset, self.weights[i], bias, stride, padding, dilation, mask if use_mask else None)
            )
        return tuple(outputs)


def conv_inputs(configs, dtype, batch=2, height=9, width=11):
    g = torch.Generator().manual_seed(1)
    inputs = []
    for c_in, _, (kh, kw), stride, padding, dilation, _, offset_groups, _, _ in configs:
        (sh, sw), (ph, pw), (dh, dw) = pair("stride", stride), pair("padding", padding), pair("dilation", dilation)
        out_h, out_w = conv_output_size(height, ph, dh, kh, sh), conv_output_size(width, pw, dw, kw, sw)
        points = offset_groups * kh * kw
        inputs += [
            torch.randn(batch, c_in, height, width, generator=g),
            # Offsets of several pixels: samples fall between pixels and off the map.
            torch.randn(batch, 2 * points, out_h, out_w, generator=g) * 3,
            torch.rand(batch, points, out_h, out_w, generator=g),
        ]
    return tuple(t.to(dtype) for t in inputs)


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_deform_conv2d_exports_to_deform_conv(dtype, atol, record_property):
    model = ManyDeformConvs(CONV_CONFIGS, dtype).eval()
    inputs = conv_inputs(CONV_CONFIGS, dtype)
    program = export_onnx(model, inputs)
    assert {n.op_type for n in program.model_proto.graph.node} == {"DeformConv"}
    assert all(o.domain in ("", "ai.onnx") for o in program.model_proto.opset_import)
    session = onnx_session(program)
    with torch.no_grad():
        expected = model(*inputs)
    outputs = run(session, *(t.numpy() for t in inputs))
    diffs = [float(np.abs(out - ref.numpy()).max()) for out, ref in zip(outputs, expected)]
    record_max_abs_diff(record_property, f"deform_conv2d {dtype}, {len(CONV_CONFIGS)} configs", max(diffs))
    for config, diff in zip(CONV_CONFIGS, diffs):
        assert diff <= atol, f"config {config}: max abs diff {diff}"


# (batch index, x1, y1, x2, y2) in image coordinates, for spatial scale 1/2
# on a 12x14 map (24x28 image).
ROIS = [
    [0, 2.4, 4.6, 17.0, 18.2],  # ordinary
    [1, 0.0, 0.0, 28.0, 24.0],  # the whole image
    [0, 10.0, 10.0, 10.0, 10.0],  # zero size
    [1, -12.0, -8.0, 8.0, 60.0],  # partly outside
    [0, 80.0, 100.0, 120.0, 140.0],  # wholly outside
    [1, 18.0, 6.0, 4.0, 16.0],  # inverted (x2 < x1)
    [0, 6.6, 1.4, 7.8, 34.4],  # thin
    # Bins of integer size (14 and 28 pixels on the map over 7 bins, and
    # 2 over 2): where ONNX Runtime's ceil() of a rounded bin size could
    # differ from PyTorch's without the translation's guard.
    [0, 1.0, 1.0, 29.0, 15.0],
    [1, 4.0, 2.0, 60.0, 58.0],
    [1, 3.0, 5.0, 7.0, 9.0],
]
# output size, spatial scale, sampling ratio, gamma, offset, mask
POOL_CONFIGS = [
    ((7, 7), 0.5, 0, 0.1, True, True),  # mdpool as in the detector: adaptive sampling
    ((7, 7), 0.5, 2, 0.1, True, True),
    ((7, 7), 0.5, 0, 0.1, True, False),  # dpool (DCNv1)
    ((7, 7), 0.5, 0, 0.1, False, False),  # RoIAlignV2
    ((3, 5), 0.5, 1, 0.3, True, True),
    ((2, 2), 0.5, 3, 1.0, True, True),
    ((4, 3), 0.25, 0, 0.05, True, True),
    ((1, 1), 1.0, 0, 0.1, True, False),
]


class ManyDeformRoIPools(torch.nn.Module):
    def __init__(self, configs):
        super().__init__()
        self.configs = configs

    def forward(self, x, rois, *per_config):
        outputs = []
        for i, (size, scale, ratio, gamma, use_offset, use_mask) in enumerate(self.configs):
            offset, mask = per_config[2 * i : 2 * i + 2]
            outputs.append(
                deform_roi_pool(
                    x,
                    rois,
                    offset if use_offset else None,
                    mask if use_mask else None,
                    output_size=size,
                    spatial_scale=scale,
                    sampling_ratio=ratio,
                    gamma=gamma,
                )
            )
        return tuple(outputs)


def pool_inputs(configs, dtype, num_rois):
    g = torch.Generator().manual_seed(2)
    per_config = []
    for size, *_ in configs:
        per_config += [torch.randn(num_rois, 2, *size, generator=g), torch.rand(num_rois, 1, *size, generator=g)]
    x = torch.randn(2, 5, 12, 14, generator=g)
    rois = torch.tensor(ROIS[:num_rois])
    return tuple(t.to(dtype) for t in (x, rois, *per_config))


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-4), (torch.float64, 1e-10)])
def test_deform_roi_pool_exports_to_roi_align(dtype, atol, record_property):
    """Exported with a dynamic number of RoIs, run with all of them and with
    fewer; adaptive sampling included."""
    model = ManyDeformRoIPools(POOL_CONFIGS).eval()
    inputs = pool_inputs(POOL_CONFIGS, dtype, len(ROIS))
    rois_dim = torch.export.Dim("num_rois")
    dynamic_shapes = (None, {0: rois_dim}, ({0: rois_dim},) * (2 * len(POOL_CONFIGS)))  # x, rois, *per_config
    program = export_onnx(model, inputs, dynamic_shapes=dynamic_shapes)
    standard_ops = {n.op_type for n in program.model_proto.graph.node}
    assert "RoiAlign" in standard_ops and all(o.domain in ("", "ai.onnx") for o in program.model_proto.opset_import)
    session = onnx_session(program)
    for num_rois in (len(ROIS), 4):
        inputs = pool_inputs(POOL_CONFIGS, dtype, num_rois)
        expected = model(*inputs)
        outputs = run(session, *(t.numpy() for t in inputs))
        diffs = [float(np.abs(out - ref.numpy()).max()) for out, ref in zip(outputs, expected)]
        name = f"deform_roi_pool {dtype}, {len(POOL_CONFIGS)} configs, {num_rois} RoIs"
        record_max_abs_diff(record_property, name, max(diffs))
        for config, diff in zip(POOL_CONFIGS, diffs):
            assert diff <= atol, f"config {config}, {num_rois} RoIs: max abs diff {diff}"


def test_opset_below_deform_conv_is_refused():
    conv = ManyDeformConvs(CONV_CONFIGS[:1], torch.float32)
    with pytest.raises(ValueError, match=f"opset_version >= {MIN_OPSET}"):
        export_onnx(conv, conv_inputs(CONV_CONFIGS[:1], torch.float32), opset_version=18)
