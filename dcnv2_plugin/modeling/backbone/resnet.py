"""A ResNet builder that reads detectron2's deformable-ResNet keys and runs the
deformable convs on this project's operators.

Registered in detectron2's BACKBONE_REGISTRY as `build_dcnv2_resnet_backbone`.
It reads the same keys as detectron2's `build_resnet_backbone`, including
MODEL.RESNETS.DEFORM_ON_PER_STAGE / DEFORM_MODULATED / DEFORM_NUM_GROUPS,
and differs in that
  - its deformable convs run on CPU and GPU (detectron2's are CUDA-only),
  - ResNet-18/34 stages can be deformable too (detectron2 refuses that),
  - MODEL.DCNV2.STN can insert a spatial transformer before one stage.
"""

from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone.resnet import BasicBlock, BasicStem, BottleneckBlock, ResNet

from .deformable_blocks import DeformBasicBlock, DeformBottleneckBlock
from .spatial_transformer import insert_spatial_transformer

_BLOCKS_PER_STAGE = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3], 50: [3, 4, 6, 3], 101: [3, 4, 23, 3], 152: [3, 8, 36, 3]}


def check_resnet_config(cfg) -> None:
    """Raises an error naming the MODEL.RESNETS key (or the missing MODEL.DCNV2
    keys) that this project's ResNet stages cannot be built with."""
    if "DCNV2" not in cfg.MODEL:
        raise KeyError("cfg has no MODEL.DCNV2: call dcnv2_plugin.add_dcnv2_config(cfg) before merging a config file")
    resnets = cfg.MODEL.RESNETS
    if resnets.DEPTH not in _BLOCKS_PER_STAGE:
        raise ValueError(f"MODEL.RESNETS.DEPTH must be one of {sorted(_BLOCKS_PER_STAGE)}, got {resnets.DEPTH}")
    if resnets.RES5_DILATION not in (1, 2):
        raise ValueError(f"MODEL.RESNETS.RES5_DILATION must be 1 or 2, got {resnets.RES5_DILATION}")
    if len(resnets.DEFORM_ON_PER_STAGE) != 4:
        raise ValueError(
            "MODEL.RESNETS.DEFORM_ON_PER_STAGE needs one entry per stage res2..res5, got "
            f"{list(resnets.DEFORM_ON_PER_STAGE)}"
        )
    if resnets.DEPTH in (18, 34):
        needed = {"RES2_OUT_CHANNELS": 64, "RES5_DILATION": 1, "NUM_GROUPS": 1}
        wrong = [
            f"MODEL.RESNETS.{key}={value} (got {resnets[key]})"
            for key, value in needed.items()
            if resnets[key] != value
        ]
        if wrong:
            raise ValueError(f"ResNet-{resnets.DEPTH} (basic blocks) needs " + ", ".join(wrong))


def make_resnet_stage(
    cfg, stage_index: int, in_channels: int, out_channels: int, bottleneck_channels: int, *, dilation: int
):
    """The blocks of stage res{stage_index + 2}, with the block class for its
    depth and deformability (MODEL.RESNETS.DEFORM_ON_PER_STAGE[stage_index]).

    Also builds the res5 of C4 models, which sits in their ROI heads."""
    resnets = cfg.MODEL.RESNETS
    num_blocks = _BLOCKS_PER_STAGE[resnets.DEPTH][stage_index]
    # res2 keeps the stem's stride; a dilated res5 keeps res4's (DC5).
    first_stride = 1 if stage_index == 0 or dilation == 2 else 2
    deformable = resnets.DEFORM_ON_PER_STAGE[stage_index]
    kwargs = {
        "num_blocks": num_blocks,
        "stride_per_block": [first_stride] + [1] * (num_blocks - 1),
        "in_channels": in_channels,
        "out_channels": out_channels,
        "norm": resnets.NORM,
    }
    if resnets.DEPTH in (18, 34):
        block_class = DeformBasicBlock if deformable else BasicBlock
    else:
        block_class = DeformBottleneckBlock if deformable else BottleneckBlock
        kwargs.update(
            bottleneck_channels=bottleneck_channels,
            stride_in_1x1=resnets.STRIDE_IN_1X1,
            dilation=dilation,
            num_groups=resnets.NUM_GROUPS,
        )
    if deformable:
        kwargs.update(deform_modulated=resnets.DEFORM_MODULATED, deform_num_groups=resnets.DEFORM_NUM_GROUPS)
    return ResNet.make_stage(block_class, **kwargs)


@BACKBONE_REGISTRY.register()
def build_dcnv2_resnet_backbone(cfg, input_shape: ShapeSpec) -> ResNet:
    """A detectron2 `ResNet` whose stages in MODEL.RESNETS.DEFORM_ON_PER_STAGE
    have (modulated) deformable 3x3 convs; see the module docstring."""
    check_resnet_config(cfg)
    resnets = cfg.MODEL.RESNETS
    stem = BasicStem(in_channels=input_shape.channels, out_channels=resnets.STEM_OUT_CHANNELS, norm=resnets.NORM)

    in_channels = resnets.STEM_OUT_CHANNELS
    out_channels = resnets.RES2_OUT_CHANNELS
    bottleneck_channels = resnets.NUM_GROUPS * resnets.WIDTH_PER_GROUP
    stages = []
    # All four, as detectron2's builder, so that a regular model starts from
    # the same values for the same seed: `ResNet` drops the stages after the
    # last one in OUT_FEATURES (a C4 backbone ends at res4; its ROI heads
    # build their own res5).
    for stage_index in range(4):
        dilation = resnets.RES5_DILATION if stage_index == 3 else 1
        stages.append(
            make_resnet_stage(cfg, stage_index, in_channels, out_channels, bottleneck_channels, dilation=dilation)
        )
        in_channels = out_channels
        out_channels *= 2
        bottleneck_channels *= 2
    resnet = ResNet(stem, stages, out_features=resnets.OUT_FEATURES, freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT)

    stn = cfg.MODEL.DCNV2.STN
    if stn.ENABLED:
        insert_spatial_transformer(resnet, stn.STAGE, stn.HIDDEN_DIM)
    return resnet
