"""The sampling-location pictures against the operators: a one-hot input at
each pixel shows where an operator samples, and the drawn points must be
there. A drawn point (y, x) predicts the response to a one-hot at pixel
(i, j): its bilinear weight there, max(0, 1 - |y - i|) * max(0, 1 - |x - j|),
times the drawn modulation."""

import numpy as np
import pytest
import torch
from detectron2.modeling import build_model

from dcnv2_plugin.config import load_config
from dcnv2_plugin.ops import deform_conv2d, deform_roi_pool
from dcnv2_plugin.visualization import (
    DeformableConvGeometry,
    compose_sampling_points,
    record_inference,
    roi_bin_centers,
    roi_pooling_bins,
)


def bilinear_weights(points, height, width):
    """[N, H, W]: the bilinear weight of each (y, x) point on every pixel."""
    points = torch.as_tensor(np.asarray(points), dtype=torch.float64)
    rows = torch.arange(height, dtype=torch.float64).view(1, -1, 1)
    columns = torch.arange(width, dtype=torch.float64).view(1, 1, -1)
    wy = (1 - (points[:, 0].view(-1, 1, 1) - rows).abs()).clamp(min=0)
    wx = (1 - (points[:, 1].view(-1, 1, 1) - columns).abs()).clamp(min=0)
    return wy * wx


def one_hot_images(height, width):
    """[H * W, 1, H, W]: image n is one at pixel n (row-major), zero elsewhere."""
    return torch.eye(height * width, dtype=torch.float64).view(-1, 1, height, width)


def conv_responses(offset, mask, height, width, stride, padding, dilation):
    """[K, out_h, out_w, H, W]: the output at each unit, kernel point k alone
    (weight one-hot at k), to a one-hot input at each pixel. offset and mask
    are one image's ([2K, out_h, out_w], [K, out_h, out_w] or None)."""
    points = offset.shape[0] // 2
    weight = torch.eye(points, dtype=torch.float64).view(points, 1, 3, 3)  # output channel k: kernel point k
    images = one_hot_images(height, width)
    n = len(images)
    out = deform_conv2d(
        images,
        offset.double().expand(n, -1, -1, -1),
        weight,
        stride=stride,
        padding=padding,
        dilation=dilation,
        mask=None if mask is None else mask.double().expand(n, -1, -1, -1),
    )
    return out.permute(1, 2, 3, 0).reshape(points, *out.shape[2:], height, width)


def assert_drawn_points_match_conv_responses(geometry, responses, map_stride):
    """Every unit's drawn points (image coordinates; map_stride pixels per
    unit of the conv's input) against the operator's responses."""
    _, out_h, out_w, height, width = responses.shape
    # Most sampling points read the map (a test of points outside it would prove little).
    assert responses.flatten(3).sum(3).ne(0).double().mean() > 0.5
    for unit in np.ndindex(out_h, out_w):
        points, weights = compose_sampling_points([geometry], unit)
        expected = bilinear_weights(points / map_stride, height, width) * torch.from_numpy(weights).view(-1, 1, 1)
        torch.testing.assert_close(responses[:, unit[0], unit[1]], expected, rtol=0, atol=1e-12, msg=str(unit))


@pytest.mark.parametrize("modulated", [True, False], ids=["mdconv", "dconv"])
def test_drawn_conv_sampling_points_are_where_the_operator_samples(modulated):
    height, width, stride, padding, dilation, input_stride = 12, 14, 2, 1, 2, 4
    out_h, out_w = (height + 2 - 5) // 2 + 1, (width + 2 - 5) // 2 + 1
    g = torch.Generator().manual_seed(0)
    offset = torch.randn(18, out_h, out_w, generator=g, dtype=torch.float64) * 1.5  # some points leave the map
    mask = torch.rand(9, out_h, out_w, generator=g, dtype=torch.float64) if modulated else None
    responses = conv_responses(offset, mask, height, width, stride, padding, dilation)
    geometry = DeformableConvGeometry(
        offset.numpy(),
        None if mask is None else mask.numpy(),
        (3, 3),
        (stride, stride),
        (padding, padding),
        (dilation, dilation),
        input_stride,
    )
    assert_drawn_points_match_conv_responses(geometry, responses, input_stride)


def roi_pool_responses(boxes, offset, mask, height, width, spatial_scale, gamma):
    """[R, ph, pw, H, W]: each bin's output, pooling one sample per bin
    (sampling_ratio 1: the bin's center, which the picture draws), to a
    one-hot input at each pixel."""
    images = one_hot_images(height, width)
    n, num_boxes = len(images), len(boxes)
    # Every box on every image: RoI (box b, image i) is row b * n + i.
    image_index = torch.arange(n, dtype=torch.float64).repeat(num_boxes).view(-1, 1)
    rois = torch.cat([image_index, boxes.double().repeat_interleave(n, 0)], 1)
    out = deform_roi_pool(
        images,
        rois,
        offset.double().repeat_interleave(n, 0),
        None if mask is None else mask.double().repeat_interleave(n, 0),
        output_size=tuple(offset.shape[2:]),
        spatial_scale=spatial_scale,
        sampling_ratio=1,
        gamma=gamma,
    )
    return out.view(num_boxes, height, width, *offset.shape[2:]).permute(0, 3, 4, 1, 2)


def assert_drawn_bins_match_roi_pool_responses(shifted, modulation, responses, spatial_scale):
    """Drawn bin centers (image pixel indices) and modulation against the
    operator's responses on a map of `spatial_scale`."""
    height, width = responses.shape[-2:]
    # Image pixel indices to the map's: pixel edges scale, centers sit half a pixel in.
    centers = (shifted + 0.5) * spatial_scale - 0.5
    # RoIAlign clamps samples within a pixel of the border onto it; the bilinear weights below assume none is there.
    assert centers.min() >= 0 and (centers.reshape(-1, 2).max(0) <= [height - 1, width - 1]).all()
    expected = bilinear_weights(centers.reshape(-1, 2), height, width)
    if modulation is not None:
        expected = expected * torch.from_numpy(modulation).reshape(-1, 1, 1)
    torch.testing.assert_close(responses.reshape(-1, height, width), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("modulated", [True, False], ids=["mdpool", "dpool"])
@pytest.mark.parametrize("spatial_scale", [1.0, 0.5])
def test_drawn_roi_bin_centers_are_where_the_operator_samples(spatial_scale, modulated):
    height, width, gamma, output_size = 12, 14, 0.1, (3, 4)
    # Boxes in the map's middle, in image coordinates (edges scale by spatial_scale).
    boxes = torch.tensor([[3.0, 3.0, 11.0, 9.0], [5.0, 2.0, 9.0, 10.0]], dtype=torch.float64) / spatial_scale
    g = torch.Generator().manual_seed(0)
    offset = torch.randn(2, 2, *output_size, generator=g, dtype=torch.float64)
    mask = torch.rand(2, 1, *output_size, generator=g, dtype=torch.float64) if modulated else None
    regular, shifted = roi_bin_centers(boxes.numpy(), offset.numpy(), gamma)
    assert np.abs(shifted - regular).max() > 1  # the offsets move bins by pixels
    responses = roi_pool_responses(boxes, offset, mask, height, width, spatial_scale, gamma)
    modulation = None if mask is None else mask[:, 0].numpy()
    assert_drawn_bins_match_roi_pool_responses(shifted, modulation, responses, spatial_scale)


# ------------------------------------------------------------ on a detector
@pytest.fixture(scope="module")
def detector():
    """A small DCNv2 detector whose offset layers have moved from zero: the
    convs' offsets (about a unit, varying over the map) and modulation, the
    pooling's offsets (bins move by pixels)."""
    cfg = load_config(
        "COCO-Detection/faster_rcnn_R_50_FPN_mdconv_c3-c5_mdpool.yaml",
        [
            "MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "",
            "MODEL.RESNETS.STEM_OUT_CHANNELS", 16, "MODEL.RESNETS.RES2_OUT_CHANNELS", 64,
            "MODEL.RESNETS.WIDTH_PER_GROUP", 16, "MODEL.FPN.OUT_CHANNELS", 32,
            "MODEL.ROI_BOX_HEAD.FC_DIM", 64, "MODEL.DCNV2.DEFORM_POOL.FC_DIM", 32,
            "INPUT.MIN_SIZE_TEST", 64, "INPUT.MAX_SIZE_TEST", 96,
        ],
    )  # fmt: skip
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("conv2_offset.weight", "offset_predictor.predictor.weight")):
                param.normal_(0.0, 1e-4)
            elif name.endswith(("conv2_offset.bias", "offset_predictor.predictor.bias")):
                param.normal_(0.0, 1.0)
    image = torch.rand(3, 64, 96, generator=torch.Generator().manual_seed(1)) * 255
    return cfg, model, image


@pytest.mark.parametrize("block_name", ["bottom_up.res3.0", "bottom_up.res4.5"])
def test_recorded_conv_points_are_where_the_operator_samples_the_conv_input(detector, block_name):
    _, model, image = detector
    conv = model.backbone.get_submodule(block_name).conv2
    called = {}
    handle = conv.register_forward_hook(lambda module, inputs, output: called.update(inputs=inputs))
    try:
        record = record_inference(model, image)
    finally:
        handle.remove()
    (recorded,) = [c for c in record.convs if c.block_name == block_name]
    x, offset, mask = (t[0].detach() for t in called["inputs"])  # the first (only) image
    # The input's pixels per unit, from the sizes the conv was called with.
    map_stride = record.padded_size[0] / x.shape[-2]
    responses = conv_responses(offset, mask, *x.shape[-2:], conv.stride, conv.padding, conv.dilation)
    assert_drawn_points_match_conv_responses(recorded.geometry, responses, map_stride)


def test_recorded_roi_bins_are_where_the_operator_samples(detector):
    cfg, model, image = detector
    record = record_inference(model, image)
    boxes = torch.tensor([[16.0, 14.0, 48.0, 50.0], [40.0, 20.0, 80.0, 44.0]])
    predicted = {}
    branch = model.roi_heads.box_pooler.offset_predictor
    handle = branch.register_forward_hook(lambda module, inputs, output: predicted.update(output=output))
    try:
        bins = roi_pooling_bins(model.roi_heads, record.features, boxes, cfg.MODEL.DCNV2.DEFORM_POOL.GAMMA)
    finally:
        handle.remove()
    offset, mask = predicted["output"]
    assert np.abs(bins.shifted - bins.regular).max() > 1  # bins moved by pixels
    # The operator on the branch's own offsets, on a map of stride 4.
    height, width = record.padded_size[0] // 4, record.padded_size[1] // 4
    responses = roi_pool_responses(boxes, offset, mask, height, width, 1 / 4, cfg.MODEL.DCNV2.DEFORM_POOL.GAMMA)
    assert_drawn_bins_match_roi_pool_responses(bins.shifted, bins.modulation, responses, 1 / 4)
