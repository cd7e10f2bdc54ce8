"""The deformable ResNet backbones: initial behaviour, detectron2 compatibility,
the spatial transformer."""

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_backbone
from detectron2.modeling.backbone.resnet import DeformBottleneckBlock as Detectron2DeformBottleneckBlock
from detectron2.modeling.backbone.resnet import build_resnet_backbone
from helpers import DEVICES
from torch import nn

import dcnv2_plugin
from dcnv2_plugin.modeling.backbone import DeformBottleneckBlock

ALL_STAGES = ["res2", "res3", "res4", "res5"]


def resnet_cfg(*overrides):
    cfg = get_cfg()
    dcnv2_plugin.add_dcnv2_config(cfg)
    cfg.merge_from_list(
        [
            "MODEL.BACKBONE.NAME",
            "build_dcnv2_resnet_backbone",
            "MODEL.BACKBONE.FREEZE_AT",
            0,
            "MODEL.RESNETS.OUT_FEATURES",
            ALL_STAGES,
            "MODEL.RESNETS.NORM",
            "BN",
            # Narrow layers (same structure and names) keep float64 fast.
            "MODEL.RESNETS.STEM_OUT_CHANNELS",
            16,
            "MODEL.RESNETS.RES2_OUT_CHANNELS",
            64,
            "MODEL.RESNETS.WIDTH_PER_GROUP",
            16,
        ]
        + list(overrides)
    )
    return cfg


def build(cfg, seed=0):
    torch.manual_seed(seed)
    return build_backbone(cfg)


def randomize_batch_norms(model, seed=0):
    """Non-trivial BN statistics and affine parameters, so that the test can
    tell a scaled conv output apart from a scaled block output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                shape = module.running_mean.shape
                module.running_mean.copy_(torch.randn(shape, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(shape, generator=generator) + 0.5)
                module.weight.copy_(torch.rand(shape, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(shape, generator=generator) * 0.1)


class ScaledConv(nn.Module):
    """A regular block's conv2 whose conv output (before its norm) is scaled."""

    def __init__(self, conv, scale):
        super().__init__()
        self.conv, self.scale = conv, scale

    def forward(self, x):
        c = self.conv
        return c.norm(self.scale * F.conv2d(x, c.weight, c.bias, c.stride, c.padding, c.dilation, c.groups))


INIT_CASES = {
    # id: (overrides, stages with deformable blocks)
    "R50-mdconv-c3-c5": (["MODEL.RESNETS.DEFORM_ON_PER_STAGE", [False, True, True, True]], [1, 2, 3]),
    "R50-dconv-c5-dilated": (
        ["MODEL.RESNETS.DEFORM_ON_PER_STAGE", [False, False, False, True], "MODEL.RESNETS.RES5_DILATION", 2],
        [3],
    ),
    "X50-mdconv-2-offset-groups": (
        [
            "MODEL.RESNETS.DEFORM_ON_PER_STAGE",
            [True, True, True, True],
            "MODEL.RESNETS.NUM_GROUPS",
            4,
            "MODEL.RESNETS.WIDTH_PER_GROUP",
            4,
            "MODEL.RESNETS.DEFORM_NUM_GROUPS",
            2,
        ],
        [0, 1, 2, 3],
    ),
    "R18-mdconv-c3-c5": (
        ["MODEL.RESNETS.DEPTH", 18, "MODEL.RESNETS.DEFORM_ON_PER_STAGE", [False, True, True, True]],
        [1, 2, 3],
    ),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(INIT_CASES))
@pytest.mark.parametrize("modulated", [True, False], ids=["modulated", "unmodulated"])
def test_initial_backbone_is_the_regular_one_with_deformable_conv_outputs_scaled(case, modulated, device):
    """At initialization the offsets are 0 and the modulation sigmoid(0) = 0.5
    (DCNv2, Sec. 3.2): each deformable 3x3 conv is the regular conv with its
    output halved (modulated) or unchanged (DCNv1)."""
    overrides, deformable_stages = INIT_CASES[case]
    regular_overrides = list(overrides)
    regular_overrides[regular_overrides.index("MODEL.RESNETS.DEFORM_ON_PER_STAGE") + 1] = [False] * 4
    regular = build(resnet_cfg(*regular_overrides))
    deformable = build(resnet_cfg(*overrides, "MODEL.RESNETS.DEFORM_MODULATED", modulated), seed=1)
    randomize_batch_norms(regular)

    incompatible = deformable.load_state_dict(regular.state_dict(), strict=False)
    assert not incompatible.unexpected_keys
    assert incompatible.missing_keys and all(".conv2_offset." in k for k in incompatible.missing_keys)
    for stage_index in deformable_stages:
        for block in regular.stages[stage_index]:
            block.conv2 = ScaledConv(block.conv2, 0.5 if modulated else 1.0)
    regular.to(device, torch.float64).eval()
    deformable.to(device, torch.float64).eval()

    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(device)
    with torch.no_grad():
        expected, actual = regular(x), deformable(x)
    for name in ALL_STAGES:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("modulated", [True, False], ids=["modulated", "unmodulated"])
@pytest.mark.parametrize("deform_num_groups", [1, 2])
def test_detectron2_deformable_resnet_state_dict_loads_strictly(modulated, deform_num_groups):
    overrides = [
        "MODEL.RESNETS.DEFORM_ON_PER_STAGE",
        [False, True, True, True],
        "MODEL.RESNETS.DEFORM_MODULATED",
        modulated,
        "MODEL.RESNETS.DEFORM_NUM_GROUPS",
        deform_num_groups,
    ]
    # detectron2's own builder constructs without detectron2._C (only its forward needs it).
    theirs = build_resnet_backbone(resnet_cfg(*overrides), ShapeSpec(channels=3))
    ours = build(resnet_cfg(*overrides))
    theirs_shapes = {k: v.shape for k, v in theirs.state_dict().items()}
    assert {k: v.shape for k, v in ours.state_dict().items()} == theirs_shapes
    assert any(k.endswith("conv2_offset.weight") for k in theirs_shapes)
    ours.load_state_dict(theirs.state_dict(), strict=True)


class TorchvisionDeformConv(nn.Module):
    """Stands in for detectron2's (Modulated)DeformConv, whose forward needs
    detectron2._C: the same computation with torchvision's operator."""

    def __init__(self, d2_conv):
        super().__init__()
        self.d2_conv = d2_conv

    def forward(self, x, offset, mask=None):
        c = self.d2_conv
        out = torchvision.ops.deform_conv2d(x, offset, c.weight, c.bias, c.stride, c.padding, c.dilation, mask)
        return c.norm(out)


@pytest.mark.parametrize("modulated", [True, False], ids=["modulated", "unmodulated"])
def test_block_matches_detectron2_deform_bottleneck_block_with_learned_offsets(modulated):
    """With detectron2's weights, including a non-zero `conv2_offset`, our
    block computes what detectron2's block computes: same offset/mask split
    of `conv2_offset`'s output, same sigmoid, same kernel semantics."""
    kwargs = dict(
        bottleneck_channels=16,
        stride=2,
        num_groups=2,
        norm="BN",
        dilation=2,
        deform_modulated=modulated,
        deform_num_groups=2,
    )
    torch.manual_seed(0)
    theirs = Detectron2DeformBottleneckBlock(8, 32, **kwargs)
    with torch.no_grad():
        theirs.conv2_offset.weight.normal_(std=0.3)
        theirs.conv2_offset.bias.normal_(std=0.5)
    randomize_batch_norms(theirs)
    ours = DeformBottleneckBlock(8, 32, **kwargs)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    theirs_with_torchvision = copy.deepcopy(theirs)
    theirs_with_torchvision.conv2 = TorchvisionDeformConv(theirs_with_torchvision.conv2)
    ours.double().eval()
    theirs_with_torchvision.double().eval()

    x = torch.randn(2, 8, 13, 17, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs_with_torchvision(x), rtol=1e-9, atol=1e-9)


def test_resnet18_stages_can_be_deformable_where_detectron2_refuses():
    cfg = resnet_cfg("MODEL.RESNETS.DEPTH", 18, "MODEL.RESNETS.DEFORM_ON_PER_STAGE", [False, True, True, True])
    with pytest.raises(AssertionError, match="unsupported for R18/R34"):
        build_resnet_backbone(cfg, ShapeSpec(channels=3))
    backbone = build(cfg)
    names = [n for n, _ in backbone.named_parameters()]
    assert sum(n.endswith("conv2_offset.weight") for n in names) == 6  # 2 blocks in each of res3-res5
    out = backbone(torch.randn(1, 3, 64, 96))
    sum(v.sum() for v in out.values()).backward()
    assert all(p.grad is not None for p in backbone.parameters())


def test_basic_block_config_errors_name_the_key():
    with pytest.raises(ValueError, match=r"MODEL.RESNETS.RES5_DILATION=1 \(got 2\)"):
        build(resnet_cfg("MODEL.RESNETS.DEPTH", 34, "MODEL.RESNETS.RES5_DILATION", 2))


def stn_cfg(*overrides):
    return resnet_cfg("MODEL.DCNV2.STN.ENABLED", True, "MODEL.DCNV2.STN.HIDDEN_DIM", 8, *overrides)


@pytest.mark.parametrize("stage", ["res2", "res4"])
def test_spatial_transformer_starts_as_the_identity_and_keeps_block_names(stage):
    plain = build(resnet_cfg())
    warped = build(stn_cfg("MODEL.DCNV2.STN.STAGE", stage), seed=1)
    stn_keys = {k for k in warped.state_dict() if k.startswith(f"{stage}.spatial_transformer.")}
    assert stn_keys and set(warped.state_dict()) - stn_keys == set(plain.state_dict())

    randomize_batch_norms(plain)
    warped.load_state_dict(plain.state_dict(), strict=False)
    plain.double().eval()
    warped.double().eval()
    x = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.no_grad():
        expected, actual = plain(x), warped(x)
    for name in ALL_STAGES:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-9, atol=1e-9)


def test_spatial_transformer_warps_once_trained():
    warped = build(stn_cfg()).eval()
    stn = warped.res3.spatial_transformer
    features = torch.randn(1, stn.in_channels, 16, 24)
    with torch.no_grad():
        stn.localization.theta.bias.copy_(torch.tensor([1.0, 0.0, 0.5, 0.0, 1.0, 0.0]))  # shift by 1/4 of the width
        shifted = stn(features)
    # x_in = x_out + 0.5 in normalized coordinates: 24 columns span 2, so 6 columns.
    torch.testing.assert_close(shifted[..., :18], features[..., 6:])
    assert shifted[..., 18:].abs().max() < features.abs().max()  # zero padding leaks into the last columns


def test_spatial_transformer_stage_errors():
    with pytest.raises(ValueError, match="FREEZE_AT"):
        build(stn_cfg("MODEL.DCNV2.STN.STAGE", "res2", "MODEL.BACKBONE.FREEZE_AT", 2))
    with pytest.raises(ValueError, match="'res6' is not a stage"):
        build(stn_cfg("MODEL.DCNV2.STN.STAGE", "res6"))
