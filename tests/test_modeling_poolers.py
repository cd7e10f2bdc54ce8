"""Deformable RoI pooling as a detectron2 pooler, and the ROI heads' pooler types."""

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_roi_heads
from detectron2.modeling.poolers import ROIPooler, assign_boxes_to_levels
from detectron2.structures import Boxes
from helpers import DEVICES

import dcnv2_plugin
from dcnv2_plugin.modeling.poolers import DeformableROIPooler

CHANNELS = 8
OUTPUT_SIZE = 7
FPN_SCALES = [1 / 4, 1 / 8, 1 / 16, 1 / 32]
IMAGE_HEIGHT, IMAGE_WIDTH = 512, 768
# Sizes from ~35 to ~580 pixels, so that FPN assigns boxes to each of p2-p5.
BOXES = [
    torch.tensor([[20.0, 30.0, 60.0, 60.0], [100.0, 50.0, 230.0, 170.0], [40.0, 40.0, 300.0, 280.0]]),
    torch.tensor([[30.0, 20.0, 740.0, 490.0], [400.0, 300.0, 450.0, 380.0], [300.0, 100.0, 700.0, 400.0]]),
]


def feature_maps(scales, device="cpu"):
    generator = torch.Generator().manual_seed(0)
    shapes = [(len(BOXES), CHANNELS, int(IMAGE_HEIGHT * s), int(IMAGE_WIDTH * s)) for s in scales]
    return [torch.randn(shape, generator=generator, dtype=torch.float64).to(device) for shape in shapes]


def box_lists(boxes=BOXES, device="cpu"):
    return [Boxes(b.to(device)) for b in boxes]


def deformable_pooler(scales, modulated, device="cpu"):
    torch.manual_seed(0)
    pooler = DeformableROIPooler(
        OUTPUT_SIZE, scales, sampling_ratio=0, in_channels=CHANNELS, modulated=modulated, fc_dim=16, gamma=0.1
    )
    return pooler.to(device, torch.float64)


def roi_align_v2_pooler(scales):
    return ROIPooler(OUTPUT_SIZE, scales, sampling_ratio=0, pooler_type="ROIAlignV2")


def test_the_test_boxes_cover_every_fpn_level():
    levels = assign_boxes_to_levels(box_lists(), 2, 5, 224, 4)
    assert sorted(set(levels.tolist())) == [0, 1, 2, 3]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scales", [FPN_SCALES, [1 / 16]], ids=["fpn", "single-level"])
@pytest.mark.parametrize("modulated, initial_scale", [(True, 0.5), (False, 1.0)], ids=["mdpool", "dpool"])
def test_initial_deformable_pooling_is_roi_align_v2_times_the_initial_modulation(
    scales, modulated, initial_scale, device
):
    x = feature_maps(scales, device)
    expected = roi_align_v2_pooler(scales)(x, box_lists(device=device))
    actual = deformable_pooler(scales, modulated, device)(x, box_lists(device=device))
    torch.testing.assert_close(actual, initial_scale * expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scales", [FPN_SCALES, [1 / 16]], ids=["fpn", "single-level"])
def test_a_constant_offset_pools_the_translated_box(scales, device):
    """Offsetting every bin by (dx, dy) * gamma * (RoI width, height) is
    RoIAlignV2 of the box translated by that much (same size, hence same
    level and sampling), times the modulation."""
    dx, dy, gamma = 0.3, -0.2, 0.1
    pooler = deformable_pooler(scales, modulated=True, device=device)
    bins = OUTPUT_SIZE * OUTPUT_SIZE
    with torch.no_grad():
        bias = pooler.offset_predictor.predictor.bias
        bias[:bins] = dx  # offsets are [2, ph, pw]: all dx, then all dy
        bias[bins : 2 * bins] = dy
        bias[2 * bins :] = 0.0  # modulation sigmoid(0) = 0.5
    translated = []
    for boxes in BOXES:
        width, height = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        shift = torch.stack([gamma * dx * width, gamma * dy * height] * 2, dim=1)
        translated.append(boxes + shift)

    x = feature_maps(scales, device)
    expected = 0.5 * roi_align_v2_pooler(scales)(x, box_lists(translated, device))
    # detectron2's Boxes are float32, so the translated corners are rounded
    # to ~1e-5 pixels; a wrong shift would differ by ~0.1.
    torch.testing.assert_close(pooler(x, box_lists(device=device)), expected, rtol=0, atol=1e-5)


def test_offset_branch_gradients_at_initialization():
    """The predictor starts at zero: it gets a gradient, the fc layers before it
    get exactly zero until it has moved (why the detector tests perturb it)."""
    pooler = deformable_pooler(FPN_SCALES, modulated=True)
    x = [t.requires_grad_() for t in feature_maps(FPN_SCALES)]
    (pooler(x, box_lists()) ** 2).sum().backward()
    branch = pooler.offset_predictor
    assert branch.predictor.weight.grad.abs().sum() > 0
    assert branch.predictor.bias.grad.abs().sum() > 0
    for layer in (branch.fc1, branch.fc2):
        assert not layer.weight.grad.any() and not layer.bias.grad.any()
    assert all(t.grad.abs().sum() > 0 for t in x)


def test_no_boxes_give_an_empty_result():
    pooler = deformable_pooler(FPN_SCALES, modulated=True)
    empty = [Boxes(torch.zeros(0, 4, dtype=torch.float64)) for _ in BOXES]
    out = pooler(feature_maps(FPN_SCALES), empty)
    assert out.shape == (0, CHANNELS, OUTPUT_SIZE, OUTPUT_SIZE)


def roi_heads(*overrides):
    cfg = get_cfg()
    dcnv2_plugin.add_dcnv2_config(cfg)
    cfg.merge_from_list(
        [
            "MODEL.ROI_HEADS.NAME",
            "DCNv2ROIHeads",
            "MODEL.ROI_HEADS.IN_FEATURES",
            ["p2", "p3", "p4", "p5"],
            "MODEL.ROI_BOX_HEAD.NAME",
            "FastRCNNConvFCHead",
            "MODEL.ROI_BOX_HEAD.NUM_FC",
            2,
            "MODEL.ROI_BOX_HEAD.FC_DIM",
            32,
            "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION",
            7,
            "MODEL.ROI_MASK_HEAD.CONV_DIM",
            8,
            "MODEL.DCNV2.DEFORM_POOL.FC_DIM",
            16,
            "MODEL.MASK_ON",
            True,
        ]
        + list(overrides)
    )
    shapes = {f"p{level}": ShapeSpec(channels=CHANNELS, stride=2**level) for level in range(2, 6)}
    return build_roi_heads(cfg, shapes)


@pytest.mark.parametrize("pooler_type", ["ROIAlign", "ROIAlignV2", "ROIPool"])
def test_detectron2_pooler_types_build_detectron2_poolers(pooler_type):
    heads = roi_heads("MODEL.ROI_BOX_HEAD.POOLER_TYPE", pooler_type, "MODEL.ROI_MASK_HEAD.POOLER_TYPE", pooler_type)
    assert type(heads.box_pooler) is ROIPooler and type(heads.mask_pooler) is ROIPooler


@pytest.mark.parametrize(
    "box_type, mask_type",
    [("ModulatedDeformRoIPool", "ROIAlignV2"), ("DeformRoIPool", "ModulatedDeformRoIPool")],
)
def test_deformable_pooler_types_build_deformable_poolers(box_type, mask_type):
    heads = roi_heads("MODEL.ROI_BOX_HEAD.POOLER_TYPE", box_type, "MODEL.ROI_MASK_HEAD.POOLER_TYPE", mask_type)
    for pooler, pooler_type, resolution in [(heads.box_pooler, box_type, 7), (heads.mask_pooler, mask_type, 14)]:
        if pooler_type == "ROIAlignV2":
            assert type(pooler) is ROIPooler
            continue
        assert isinstance(pooler, DeformableROIPooler)
        assert pooler.output_size == (resolution, resolution)
        assert pooler.offset_predictor.modulated == (pooler_type == "ModulatedDeformRoIPool")
        assert [p.spatial_scale for p in pooler.level_poolers] == FPN_SCALES
    # The box head is detectron2's, sized for the pooled shape.
    assert heads.box_head.fc1.in_features == CHANNELS * 7 * 7


@pytest.mark.parametrize("head", ["ROI_BOX_HEAD", "ROI_MASK_HEAD"])
def test_unknown_pooler_type_lists_the_valid_ones(head):
    with pytest.raises(ValueError) as error:
        roi_heads(f"MODEL.{head}.POOLER_TYPE", "DeformablePSRoIPool")
    message = str(error.value)
    assert f"MODEL.{head}.POOLER_TYPE" in message and "'DeformablePSRoIPool'" in message
    for valid in ("ROIAlign", "ROIAlignV2", "ROIPool", "ROIAlignRotated", "DeformRoIPool", "ModulatedDeformRoIPool"):
        assert valid in message
