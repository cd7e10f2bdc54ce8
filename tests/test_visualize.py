"""Sampling-point geometry of the visualization, and its hooks on real models."""

import importlib.util
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from detectron2.modeling import build_model

from dcnv2_plugin.config import load_config
from dcnv2_plugin.data import DEFAULT_PARAMS, SplitSpec
from dcnv2_plugin.data.generate import draw_image
from dcnv2_plugin.visualization import (
    DeformableConvGeometry,
    compose_sampling_points,
    last_layers,
    record_inference,
    roi_bin_centers,
    roi_pooling_bins,
    sampling_points_at,
)
from dcnv2_plugin.visualization.geometry import bilinear

REPO = Path(__file__).resolve().parents[1]


def conv(out_size=(10, 12), offset=None, mask=None, stride=1, padding=1, dilation=1, input_stride=8):
    """A 3x3 deformable conv's geometry; zero offsets unless given."""
    if offset is None:
        offset = np.zeros((18,) + out_size)
    return DeformableConvGeometry(
        offset, mask, (3, 3), (stride, stride), (padding, padding), (dilation, dilation), input_stride
    )


def regular_grid(center, step):
    """3x3 (y, x) grid around center, row-major like the kernel points."""
    ys, xs = np.meshgrid(center[0] + step * np.arange(-1, 2), center[1] + step * np.arange(-1, 2), indexing="ij")
    return np.stack([ys.ravel(), xs.ravel()], 1).astype(np.float64)


# ------------------------------------------------------------------ geometry


def test_zero_offsets_give_the_regular_dilated_grid():
    points, weights = compose_sampling_points([conv(padding=2, dilation=2, input_stride=8)], (3, 4))
    np.testing.assert_allclose(points, 8 * regular_grid((3, 4), 2))
    np.testing.assert_array_equal(weights, np.ones(9))


def test_constant_offset_shifts_every_point():
    offset = np.zeros((18, 10, 12))
    offset[0::2] = 1.5  # dy of every kernel point
    offset[1::2] = -0.5  # dx
    points, _ = compose_sampling_points([conv(offset=offset, input_stride=8)], (3, 4))
    np.testing.assert_allclose(points, 8 * (regular_grid((3, 4), 1) + [1.5, -0.5]))


def test_offsets_are_interleaved_dy_dx_per_kernel_point():
    offset = np.zeros((18, 10, 12))
    offset[2 * 5] = 2.0  # dy of kernel point 5: row 1, column 2
    offset[2 * 7 + 1] = -1.0  # dx of kernel point 7: row 2, column 1
    points, _ = compose_sampling_points([conv(offset=offset, input_stride=1)], (3, 4))
    expected = regular_grid((3, 4), 1)
    expected[5] += [2.0, 0.0]
    expected[7] += [0.0, -1.0]
    np.testing.assert_allclose(points, expected)


def test_three_layers_give_729_points_weighted_by_the_modulation_product():
    layers = [conv(mask=np.full((9, 10, 12), m), input_stride=32) for m in (0.5, 0.6, 0.7)]
    points, weights = compose_sampling_points(layers, (5, 6))
    assert points.shape == (729, 2)
    np.testing.assert_allclose(weights, np.full(729, 0.5 * 0.6 * 0.7))
    # Three stacked 3x3 grids reach 3 units each way; every position of that
    # 7x7 window is hit, the center most often (7 paths per axis).
    units = points / 32 - [5, 6]
    positions, counts = np.unique(units, axis=0, return_counts=True)
    assert len(positions) == 49 and units.min() == -3 and units.max() == 3
    assert counts[np.all(positions == 0, axis=1)][0] == 7 * 7


@pytest.mark.parametrize(
    "first, second",
    [
        # stride 2 in the first deformable conv itself
        (dict(stride=2, input_stride=16), dict(input_stride=32)),
        # stride 2 in a 1x1 conv between them (detectron2's STRIDE_IN_1X1)
        (dict(input_stride=16), dict(input_stride=32)),
    ],
)
def test_strides_between_layers_map_points_to_the_same_image_positions(first, second):
    points, _ = compose_sampling_points([conv(**first), conv(**second)], (2, 2))
    assert points.shape == (81, 2)
    # Unit 2 at stride 32 samples stride-32 positions 1..3, which sample
    # stride-16 positions 2q-1 .. 2q+1: image rows 16 .. 112.
    np.testing.assert_array_equal(np.unique(points[:, 0]), 16 * np.arange(1, 8))
    np.testing.assert_array_equal(np.unique(points[:, 1]), 16 * np.arange(1, 8))


def test_offsets_of_earlier_layers_are_interpolated_at_fractional_points():
    # The last layer moves its points by half a unit; the first layer's
    # offsets grow linearly along x, so the points in between read halfway values.
    last_offset = np.zeros((18, 10, 12))
    last_offset[1::2] = 0.5
    x = np.arange(12, dtype=np.float64)
    first_offset = np.zeros((18, 10, 12))
    first_offset[1::2] = 0.1 * x
    first, last = conv(offset=first_offset, input_stride=1), conv(offset=last_offset, input_stride=1)
    points, _ = compose_sampling_points([first, last], (4, 5))
    # Path through kernel point 4 (the center) of both layers: x = 5 + 0.5, then + 0.1 * 5.5.
    assert points[4 * 9 + 4, 1] == pytest.approx(5.5 + 0.55)


def test_bilinear_reproduces_linear_fields_and_clamps_at_the_border():
    ys, xs = np.mgrid[0:5, 0:7].astype(np.float64)
    field = np.stack([2 * ys + 3 * xs + 1, -xs])
    points = np.array([[0.0, 0.0], [1.25, 3.5], [3.9, 5.1], [4.0, 6.0]])
    expected = np.stack([2 * points[:, 0] + 3 * points[:, 1] + 1, -points[:, 1]], 1)
    np.testing.assert_allclose(bilinear(field, points), expected)
    np.testing.assert_allclose(bilinear(field, np.array([[-3.0, 20.0]])), [[3 * 6 + 1, -6]])


def test_nearest_unit_of_an_image_point():
    layers = [conv(stride=2, input_stride=16), conv(out_size=(4, 4), input_stride=32)]
    unit, points, _ = sampling_points_at(layers, (70.0, 500.0))  # x beyond the map: clamped to the last unit
    np.testing.assert_array_equal(unit, [64.0, 96.0])
    assert points.shape == (81, 2)


def test_wrong_offset_shape_is_a_clear_error():
    with pytest.raises(ValueError, match=r"offset must be \[2 \* 3 \* 3"):
        conv(offset=np.zeros((9, 10, 12)))


def test_roi_bins_move_by_gamma_times_offset_times_box_size():
    boxes = np.array([[10.0, 20.0, 24.0, 27.0]])  # 14 wide, 7 high
    offset = np.zeros((1, 2, 7, 7))
    regular, shifted = roi_bin_centers(boxes, offset, gamma=0.1)
    np.testing.assert_allclose(regular[0, 0, :, 1], 10 + 2 * np.arange(7) + 1 - 0.5)
    np.testing.assert_allclose(regular[0, :, 0, 0], 20 + np.arange(7) + 0.5 - 0.5)
    np.testing.assert_array_equal(shifted, regular)
    offset[:, 0], offset[:, 1] = 1.0, -2.0  # (dx, dy)
    _, shifted = roi_bin_centers(boxes, offset, gamma=0.1)
    np.testing.assert_allclose(shifted - regular, np.broadcast_to([-0.1 * 2 * 7, 0.1 * 1 * 14], regular.shape))


# ------------------------------------------------- hooks on the project's models


def build(config: str):
    cfg = load_config(
        f"COCO-Detection/{config}",
        ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64"],
    )
    torch.manual_seed(0)
    return cfg, build_model(cfg).eval()


@pytest.fixture(scope="module")
def dcnv2_model():
    return build("faster_rcnn_R_50_FPN_mdconv_c3-c5_mdpool.yaml")


def test_hooks_record_every_block_conv_with_its_strides(dcnv2_model):
    _, model = dcnv2_model
    record = record_inference(model, torch.rand(3, 64, 96) * 255)
    assert record.padded_size == (64, 96)
    names = [conv.block_name for conv in record.convs]
    assert len(names) == 3 + 4 + 6 + 3 and names[-1] == "bottom_up.res5.2"
    assert [conv.deformable for conv in record.convs] == [False] * 3 + [True] * 13
    # detectron2 strides in the 1x1 conv: each stage's conv2 reads its own stride.
    assert [conv.geometry.input_stride for conv in record.convs] == [4] * 3 + [8] * 4 + [16] * 6 + [32] * 3


def test_fresh_dcnv2_model_samples_the_regular_grid_at_half_modulation(dcnv2_model):
    """Offset convs start at zero (offsets 0, modulation sigmoid(0) = 0.5),
    so the recorded layers compose to the regular 3-layer grid."""
    _, model = dcnv2_model
    record = record_inference(model, torch.rand(3, 64, 96) * 255)
    layers = [conv.geometry for conv in last_layers(record.convs, 3)]
    points, weights = compose_sampling_points(layers, (1, 2))
    regular = [conv(out_size=(2, 3), input_stride=32) for _ in range(3)]
    np.testing.assert_allclose(points, compose_sampling_points(regular, (1, 2))[0], atol=1e-6)
    np.testing.assert_allclose(weights, np.full(729, 0.125))


def test_roi_bins_of_a_fresh_modulated_pooler(dcnv2_model):
    cfg, model = dcnv2_model
    record = record_inference(model, torch.rand(3, 64, 96) * 255)
    boxes = torch.tensor([[4.0, 8.0, 40.0, 50.0], [30.0, 2.0, 90.0, 20.0]])
    bins = roi_pooling_bins(model.roi_heads, record.features, boxes, cfg.MODEL.DCNV2.DEFORM_POOL.GAMMA)
    assert bins.deformable and bins.regular.shape == (2, 7, 7, 2)
    np.testing.assert_allclose(bins.shifted, bins.regular, atol=1e-6)
    np.testing.assert_allclose(bins.modulation, np.full((2, 7, 7), 0.5))


def test_regular_model_gives_regular_layers_and_bins():
    cfg, model = build("faster_rcnn_R_50_FPN_regular.yaml")
    record = record_inference(model, torch.rand(3, 64, 64) * 255)
    stack = last_layers(record.convs, 3)
    assert [conv.block_name for conv in stack] == ["bottom_up.res5.0", "bottom_up.res5.1", "bottom_up.res5.2"]
    assert not any(conv.deformable for conv in stack)
    bins = roi_pooling_bins(model.roi_heads, record.features, torch.tensor([[4.0, 8.0, 40.0, 50.0]]), 0.1)
    assert not bins.deformable and bins.modulation is None
    np.testing.assert_array_equal(bins.shifted, bins.regular)


def test_command_line_writes_both_pictures(dcnv2_model, tmp_path):
    cfg, model = dcnv2_model
    weights = tmp_path / "model.pth"
    torch.save({"model": model.state_dict()}, weights)
    image, _ = draw_image(DEFAULT_PARAMS, SplitSpec(1, seed=0), 0)
    image_path = tmp_path / "shapes.png"
    cv2.imwrite(str(image_path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))

    spec = importlib.util.spec_from_file_location("visualize", REPO / "tools" / "visualize.py")
    visualize = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(visualize)
    visualize.main(
        [
            "--config-file",
            str(REPO / "configs" / "COCO-Detection" / "faster_rcnn_R_50_FPN_mdconv_c3-c5_mdpool.yaml"),
            "--weights",
            str(weights),
            "--input",
            str(image_path),
            "--output",
            str(tmp_path / "pictures"),
            "--unit",
            "20",
            "30",
            "MODEL.DEVICE",
            "cpu",
            "INPUT.MIN_SIZE_TEST",
            "64",
            "INPUT.MAX_SIZE_TEST",
            "64",
        ]
    )
    for kind in ("sampling", "roi_bins"):
        picture = cv2.imread(str(tmp_path / "pictures" / f"shapes_{kind}.png"))
        assert picture is not None and picture.shape[0] > 100


def test_roi_bins_of_heads_without_one_box_pooler_are_refused_by_name():
    from torch import nn

    from dcnv2_plugin.visualization.capture import roi_pooling_bins

    class Res5LikeHeads(nn.Module):  # detectron2's Res5ROIHeads pools with `pooler`
        pooler = nn.Identity()

    with pytest.raises(NotImplementedError, match="Res5LikeHeads has none"):
        roi_pooling_bins(Res5LikeHeads(), {"res4": torch.zeros(1, 1, 4, 4)}, torch.zeros(1, 4), 0.1)
