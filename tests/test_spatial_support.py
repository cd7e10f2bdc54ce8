"""Effective spatial support: effective receptive field, effective sampling
locations and error-bounded saliency regions, on small hand-built layers
with known answers, then on the demo's detectors and the command line."""

import importlib.util
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import BoxMode
from torch import nn

from dcnv2_plugin.config import load_config
from dcnv2_plugin.data import DEFAULT_PARAMS, SplitSpec
from dcnv2_plugin.data.generate import draw_image
from dcnv2_plugin.ops import deform_conv2d
from dcnv2_plugin.visualization.spatial_support import box_support, conv5_support, measure_objects, summarize_objects
from dcnv2_plugin.visualization.support import (
    effective_receptive_field,
    relative_error,
    saliency_region,
    sampled_value_gradient,
    sampling_locations,
)
from tests.helpers import draw_geometry

REPO = Path(__file__).resolve().parents[1]


def linear_conv_stack():
    """Three 3x3 convs (the middle one with stride 2), positive weights, no
    nonlinearity: every path from a pixel in the receptive field adds."""
    torch.manual_seed(0)
    stack = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False),
        nn.Conv2d(4, 5, 3, stride=2, padding=1, bias=False),
        nn.Conv2d(5, 2, 3, padding=1, bias=False),
    ).double()
    with torch.no_grad():
        for conv in stack:
            conv.weight.uniform_(0.1, 1.0)
    return stack


def unit_response(network, unit):
    def response(images, masks):
        return network(images if masks is None else images * masks)[:, :, unit[0], unit[1]]

    return response


def test_effective_receptive_field_of_linear_convs_is_their_analytic_receptive_field():
    image = torch.rand(3, 16, 20, dtype=torch.float64)
    field = effective_receptive_field(unit_response(linear_conv_stack(), (3, 4)), image)
    # Unit u of the last conv reads u-1..u+1 of the stride-2 map, whose unit v
    # reads 2v-1..2v+1 of the first conv's output, which reads one more each way.
    inside = torch.zeros(16, 20, dtype=torch.bool)
    inside[2 * 2 - 1 - 1 : 2 * 4 + 1 + 1 + 1, 2 * 3 - 1 - 1 : 2 * 5 + 1 + 1 + 1] = True
    assert inside.sum() == 9 * 9
    assert torch.all(field[inside] > 0)
    assert torch.all(field[~inside] == 0)


def splat(gradient, locations, size):
    """Distributes the gradients of sampled values [G, C/G, K, H, W] to the
    input map [C, size] with the bilinear weights of their (y, x) locations
    [G, K, H, W, 2]: what the chain rule gives d node / d input."""
    groups, channels_per_group = gradient.shape[:2]
    result = torch.zeros((groups, channels_per_group) + size, dtype=gradient.dtype)
    y, x = locations[..., 0].reshape(groups, -1), locations[..., 1].reshape(groups, -1)
    values = gradient.reshape(groups, channels_per_group, -1)
    y0, x0 = y.floor().long(), x.floor().long()
    for dy in (0, 1):
        for dx in (0, 1):
            row, column = y0 + dy, x0 + dx
            weight = (1 - (y - row).abs()) * (1 - (x - column).abs())
            # Corners outside the map read zeros: nothing flows to them.
            inside = (row >= 0) & (row < size[0]) & (column >= 0) & (column < size[1])
            for g in range(groups):
                flat = result[g].reshape(channels_per_group, -1)
                index = (row[g] * size[1] + column[g])[inside[g]]
                flat.index_add_(1, index, (values[g] * weight[g])[:, inside[g]])
    return result.reshape((-1,) + size)


def known_deformable_conv(channels=4, out_channels=3, groups=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(1, channels, 9, 10, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(out_channels, channels, 3, 3, generator=g, dtype=torch.float64)
    # Fractional offsets of less than half a pixel: an interior unit's points stay inside the map.
    offset = (torch.rand(1, 2 * groups * 9, 9, 10, generator=g, dtype=torch.float64) - 0.5) * 0.9
    mask = torch.rand(1, groups * 9, 9, 10, generator=g, dtype=torch.float64)
    return x, weight, offset, mask


def test_effective_sampling_locations_of_one_unit_are_its_sampled_points_weighted_by_the_modulation():
    x, _, offset, mask = known_deformable_conv(channels=1, out_channels=1, groups=1)
    weight = torch.ones(1, 1, 3, 3, dtype=torch.float64)
    y = deform_conv2d(x, offset, weight, padding=(1, 1), mask=mask)
    unit = (4, 6)
    (grad_output,) = torch.autograd.grad(y[0, :, unit[0], unit[1]].sum(), y)
    gradient = sampled_value_gradient(weight, grad_output[0], mask[0], offset_groups=1)
    locations = sampling_locations(offset[0], (3, 3), (1, 1), (1, 1), (1, 1))
    # DCNv2 Eq. 1: kernel point k = (i, j) of unit p samples p - 1 + (i, j) + (dy_k, dx_k).
    for k in range(9):
        expected = torch.tensor([unit[0] - 1 + k // 3, unit[1] - 1 + k % 3]) + offset[0, 2 * k : 2 * k + 2, 4, 6]
        torch.testing.assert_close(locations[0, k, unit[0], unit[1]], expected)
    # Weighted by the modulation; every other unit's points by zero.
    torch.testing.assert_close(gradient[0, 0, :, unit[0], unit[1]], mask[0, :, unit[0], unit[1]])
    assert gradient.abs().sum() == pytest.approx(mask[0, :, unit[0], unit[1]].sum().item())
    # Spread with the bilinear weights of the points, they are the operator's input gradient.
    (grad_input,) = torch.autograd.grad(y[0, :, unit[0], unit[1]].sum(), x)
    torch.testing.assert_close(splat(gradient, locations, (9, 10)), grad_input[0])


@pytest.mark.parametrize("modulated", [True, False])
def test_sampled_value_gradients_spread_bilinearly_give_the_input_gradient(modulated):
    """Several channels, offset groups and units: the gradients of the sampled
    values, spread with the bilinear weights of the sampled points, equal the
    operator's own gradient with respect to its input."""
    x, weight, offset, mask = known_deformable_conv()
    mask = mask if modulated else None
    y = deform_conv2d(x, offset, weight, padding=(1, 1), mask=mask)
    node = y[0, 0, 3, 4] + 2 * y[0, :, 5, 5].sum() - y[0, 2, 4, 6]
    grad_output, grad_input = torch.autograd.grad(node, [y, x])
    gradient = sampled_value_gradient(weight, grad_output[0], None if mask is None else mask[0], offset_groups=2)
    locations = sampling_locations(offset[0], (3, 3), (1, 1), (1, 1), (1, 1))
    torch.testing.assert_close(splat(gradient, locations, (9, 10)), grad_input[0])


def test_saliency_region_meets_its_bound_and_its_complement_does_not():
    response = unit_response(linear_conv_stack(), (3, 4))
    image = torch.rand(3, 16, 20, dtype=torch.float64) + 0.5
    field = effective_receptive_field(response, image)
    region = saliency_region(response, image, field, epsilon=0.1)
    mask = torch.as_tensor(region.mask, dtype=torch.float64)[None, None]
    reference = response(image[None], None)[0]
    kept = relative_error(reference, response(image[None], mask)).item()
    rest = relative_error(reference, response(image[None], 1 - mask)).item()
    assert kept < 0.1 <= rest
    assert region.error == pytest.approx(kept) and region.complement_error == pytest.approx(rest)
    assert 0 < region.mask.sum() < 9 * 9  # within the receptive field, not all of it
    # Here every pixel adds to the response, so the error falls as the region
    # grows: one pixel less (the lowest in priority) breaks the bound.
    smaller = region.mask.copy()
    order = np.argsort(-field.numpy().ravel(), kind="stable")
    smaller.ravel()[order[region.mask.sum() - 1]] = False
    smaller_mask = torch.as_tensor(smaller, dtype=torch.float64)[None, None]
    assert relative_error(reference, response(image[None], smaller_mask)).item() >= 0.1


# ------------------------------------------------------------ on the demo's detectors


def demo_model(name: str):
    """A demo detector with random weights and offsets, whose BatchNorm
    statistics are those of random images: with the initial ones (mean 0,
    variance 1) activations grow block after block and most ReLUs are off."""
    cfg = load_config(f"demo/{name}.yaml", ["MODEL.WEIGHTS", ""])
    torch.manual_seed(0)
    model = build_model(cfg)
    draw_geometry(model, conv_std=0.01, pool_std=0.01)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = None  # a plain average over the batches below
            module.reset_running_stats()
    with torch.no_grad():
        model.backbone((torch.rand(4, 3, 128, 128) * 255 - model.pixel_mean) / model.pixel_std)
    return cfg, model.eval()


@pytest.fixture(scope="module")
def shapes_image():
    image, _ = draw_image(DEFAULT_PARAMS, SplitSpec(1, seed=0), 0)
    return image


def test_detector_nodes_on_a_random_dcnv2_model(shapes_image):
    cfg, model = demo_model("dcnv2")
    image = torch.as_tensor(shapes_image[:, :, ::-1].astype("float32").transpose(2, 0, 1).copy())
    conv5 = conv5_support(model, image, (60.0, 70.0))
    assert conv5.unit == (64, 64)
    assert conv5.locations.description == "3 deformable convs, res5.0 to res5.2"
    # Each layer's weights sum to 1.
    assert conv5.locations.weights.sum() == pytest.approx(3.0)
    assert conv5.receptive_field.shape == (128, 128) and conv5.saliency.error < 0.1
    assert np.any(conv5.locations.points % 32 != 0)  # offsets move the points off the grid
    # A regular model's points are on res5's stride-32 grid, reaching one unit
    # beyond the map (padding); a unit at the corner weighs nothing beyond 3 units.
    _, regular = demo_model("regular")
    corner = conv5_support(regular, image, (0.0, 0.0))
    points = corner.locations.points
    assert np.all(points % 32 == 0) and points.min() == -32 and points.max() <= 3 * 32
    roi = box_support(model, image, [30.0, 40.0, 90.0, 100.0], cfg.MODEL.DCNV2.DEFORM_POOL.GAMMA)
    assert roi.locations.points.shape == (49, 2) and roi.locations.weights.sum() == pytest.approx(1.0)
    assert roi.saliency.error < 0.1 <= roi.saliency.complement_error


def test_command_line_draws_and_measures(tmp_path, shapes_image):
    runs = []
    for name in ("regular", "dcnv2"):
        cfg, model = demo_model(name)
        run = tmp_path / name
        run.mkdir()
        torch.save({"model": model.state_dict()}, run / "model_final.pth")
        (run / "config.yaml").write_text(cfg.dump())
        runs.append(str(run))
    image_path = tmp_path / "shapes.png"
    cv2.imwrite(str(image_path), cv2.cvtColor(shapes_image, cv2.COLOR_RGB2BGR))

    # The measurement on this image's annotated objects.
    _, annotations = draw_image(DEFAULT_PARAMS, SplitSpec(1, seed=0), 0)
    record = {"file_name": str(image_path), "height": 128, "width": 128, "annotations": annotations[:2]}
    for annotation in record["annotations"]:
        annotation["bbox_mode"] = BoxMode.XYWH_ABS
    cfg, model = demo_model("dcnv2")
    rows = measure_objects(cfg, model, [record])
    assert len(rows) == 2
    for row, annotation in zip(rows, annotations):
        assert row["object_area"] == pytest.approx(annotation["area"] / 128**2)
        assert all(0 <= value <= 1 for value in row.values())
    summary = summarize_objects(rows)
    mean = (rows[0]["2fc_erf_inside"] + rows[1]["2fc_erf_inside"]) / 2
    assert summary["2fc_erf_inside"]["mean"] == pytest.approx(mean)

    spec = importlib.util.spec_from_file_location("spatial_support", REPO / "tools" / "spatial_support.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    tool.main(
        ["draw", "--run", *runs, "--input", str(image_path), "--unit", "70", "60", "--box", "30", "40", "90", "100"]
        + ["--output", str(tmp_path / "pictures"), "--palette"]
    )
    for kind in ("conv5", "2fc"):
        picture = cv2.imread(str(tmp_path / "pictures" / f"shapes_support_{kind}.png"))
        assert picture is not None and picture.shape[0] > 200
