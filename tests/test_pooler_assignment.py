"""DeformableROIPooler keeps RoIs, levels and offsets together: with a trained
(random) offset branch, every RoI's output is that of the operator called on
the RoI alone, on its own image and FPN level, with the offsets and
modulation the branch predicts from that RoI's own RoIAlign features."""

import math

import pytest
import torch
import torchvision
from detectron2.structures import Boxes

from dcnv2_plugin.modeling.poolers import DeformableROIPooler
from dcnv2_plugin.ops import deform_roi_pool

CHANNELS = 4
OUTPUT_SIZE = 7
GAMMA = 0.1
FPN_SCALES = [1 / 4, 1 / 8, 1 / 16, 1 / 32]
IMAGE_HEIGHT, IMAGE_WIDTH = 512, 768
# Levels interleaved within and across images, so that grouping the RoIs by
# level reorders them.
BOXES = [
    [[30.0, 20.0, 740.0, 490.0], [20.0, 30.0, 60.0, 60.0], [100.0, 50.0, 230.0, 170.0], [300.0, 100.0, 700.0, 400.0]],
    [[400.0, 300.0, 450.0, 380.0], [40.0, 40.0, 300.0, 280.0], [10.0, 10.0, 760.0, 500.0], [500.0, 50.0, 640.0, 160.0]],
]


def fpn_level(box):
    """FPN paper, Eq. 1, with detectron2's canonical box (224, level 4):
    index into FPN_SCALES (p2..p5)."""
    x1, y1, x2, y2 = box
    level = math.floor(4 + math.log2(math.sqrt((x2 - x1) * (y2 - y1)) / 224))
    return min(max(level, 2), 5) - 2


def test_the_boxes_cover_every_level_out_of_order():
    levels = [fpn_level(box) for boxes in BOXES for box in boxes]
    assert sorted(set(levels)) == [0, 1, 2, 3] and levels != sorted(levels)


def feature_maps(scales):
    generator = torch.Generator().manual_seed(0)
    shapes = [(len(BOXES), CHANNELS, int(IMAGE_HEIGHT * s), int(IMAGE_WIDTH * s)) for s in scales]
    return [torch.randn(shape, generator=generator, dtype=torch.float64).requires_grad_() for shape in shapes]


def trained_pooler(scales, modulated):
    """A pooler whose offset branch predicts offsets of about a bin or more and
    modulation spread over (0, 1), different for every RoI and bin."""
    torch.manual_seed(0)
    pooler = DeformableROIPooler(
        OUTPUT_SIZE, scales, sampling_ratio=0, in_channels=CHANNELS, modulated=modulated, fc_dim=16, gamma=GAMMA
    ).double()
    with torch.no_grad():
        pooler.offset_predictor.predictor.weight.normal_(0.0, 0.5)
        pooler.offset_predictor.predictor.bias.normal_(0.0, 1.0)
    return pooler


def pooled_one_by_one(pooler, x, scales):
    """The operator on each RoI alone: its image, its level, its own offsets."""
    outputs = []
    for image, boxes in enumerate(BOXES):
        for box in boxes:
            level = fpn_level(box) if len(scales) > 1 else 0
            feature = x[level][image : image + 1]
            roi = torch.tensor([[0.0, *box]], dtype=torch.float64)
            regular = torchvision.ops.roi_align(
                feature, roi, OUTPUT_SIZE, spatial_scale=scales[level], sampling_ratio=0, aligned=True
            )
            offset, mask = pooler.offset_predictor(regular)
            outputs.append(
                deform_roi_pool(
                    feature, roi, offset, mask, output_size=OUTPUT_SIZE, spatial_scale=scales[level], gamma=GAMMA
                )
            )
    return torch.cat(outputs)


@pytest.mark.parametrize("scales", [FPN_SCALES, [1 / 16]], ids=["fpn", "single-level"])
@pytest.mark.parametrize("modulated", [True, False], ids=["mdpool", "dpool"])
def test_every_roi_is_pooled_on_its_level_with_its_own_offsets(scales, modulated):
    pooler = trained_pooler(scales, modulated)
    x = feature_maps(scales)
    box_lists = [Boxes(torch.tensor(boxes, dtype=torch.float64)) for boxes in BOXES]
    ours = pooler(x, box_lists)
    expected = pooled_one_by_one(pooler, x, scales)

    offset, mask = pooler.offset_predictor(ours.new_zeros(1, CHANNELS, OUTPUT_SIZE, OUTPUT_SIZE) + 1)
    assert offset.abs().max() > 1 and (mask is None or mask.std() > 0.1)  # far from the initial branch
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)

    # Gradients reach each level's map and the branch as in the one-by-one calls.
    grad = torch.randn(ours.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    params = [*x, *pooler.offset_predictor.parameters()]
    for a, b in zip(torch.autograd.grad(ours, params, grad), torch.autograd.grad(expected, params, grad)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
