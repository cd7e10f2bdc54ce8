"""Deformable RoI pooling in the C4, Cascade R-CNN and keypoint ROI heads, and
the refusal of deformable pooler types where a head cannot honour them."""

import math
from unittest import mock

import pytest
import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_roi_heads
from detectron2.modeling.backbone.resnet import BottleneckBlock
from detectron2.modeling.poolers import ROIPooler
from detectron2.modeling.roi_heads import CascadeROIHeads, Res5ROIHeads
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage
from helpers import CONFIG_DIR, parameters_without_gradient, perturb_zero_initialized_weights
from test_modeling import (
    C4_DPOOL_CONFIG,
    CASCADE_MDPOOL_CONFIG,
    KEYPOINT_MDPOOL_CONFIG,
    ZERO_INITIALIZED_OUTPUTS,
    build_tiny_model,
    tiny_cfg,
    train_one_step,
    training_batch,
)

from dcnv2_plugin.modeling import DCNv2CascadeROIHeads, DCNv2Res5ROIHeads, DeformBottleneckBlock, check_config
from dcnv2_plugin.modeling.poolers import DeformableROIPooler

C4_REGULAR_CONFIG = CONFIG_DIR / "COCO-Detection" / "faster_rcnn_R_50_C4_regular.yaml"
CASCADE_REGULAR_CONFIG = CONFIG_DIR / "COCO-InstanceSegmentation" / "cascade_mask_rcnn_R_50_FPN_regular.yaml"

IMAGE_HEIGHT, IMAGE_WIDTH = 128, 192
BOXES = torch.tensor([[10.0, 12.0, 50.0, 40.0], [30.0, 20.0, 180.0, 120.0], [60.0, 5.0, 100.0, 100.0]])


def random_features(input_shape, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return {
        name: torch.randn(
            1, shape.channels, IMAGE_HEIGHT // shape.stride, IMAGE_WIDTH // shape.stride, generator=generator
        )
        for name, shape in input_shape.items()
    }


def proposals(boxes=BOXES):
    instances = Instances((IMAGE_HEIGHT, IMAGE_WIDTH))
    instances.proposal_boxes = Boxes(boxes.clone())
    instances.objectness_logits = torch.zeros(len(boxes))
    return [instances]


def ground_truth():
    (image,) = training_batch()
    return [image["instances"]]


# ------------------------------------------------------------ initial pooling
@pytest.mark.parametrize(
    "config_file, poolers, resolution, initial_scale",
    [
        (C4_DPOOL_CONFIG, ["pooler"], 14, 1.0),
        (CASCADE_MDPOOL_CONFIG, ["box_pooler.0", "box_pooler.1", "box_pooler.2"], 7, 0.5),
        (KEYPOINT_MDPOOL_CONFIG, ["box_pooler", "keypoint_pooler"], None, 0.5),
    ],
    ids=["c4-dpool", "cascade-mdpool", "keypoint-mdpool"],
)
def test_each_deformable_pooler_starts_as_roi_align_v2(config_file, poolers, resolution, initial_scale):
    """With the offset branch's zero-initialized output, every deformable
    pooler of the ROI heads (one per cascade stage) pools as RoIAlignV2, times
    sigmoid(0) = 0.5 when modulated."""
    model = build_tiny_model(config_file)
    found = {name: m for name, m in model.roi_heads.named_modules() if isinstance(m, DeformableROIPooler)}
    assert sorted(found) == poolers
    features = random_features(model.backbone.output_shape())
    in_features = [features[f] for f in model.roi_heads.in_features]
    boxes = [Boxes(BOXES)]
    for name, pooler in found.items():
        if resolution is not None:
            assert pooler.output_size == (resolution, resolution), name
        branch = pooler.offset_predictor
        if config_file == C4_DPOOL_CONFIG:  # MODEL.DCNV2.DEFORM_POOL.BRANCH_CHANNELS 64
            assert branch.channel_reduction.out_channels == 64
            assert branch.fc1.in_features == 64 * 14 * 14
        else:
            assert branch.channel_reduction is None, name
        scales = [p.spatial_scale for p in pooler.level_poolers]
        expected = ROIPooler(pooler.output_size, scales, sampling_ratio=0, pooler_type="ROIAlignV2")(in_features, boxes)
        with torch.no_grad():
            actual = pooler(in_features, boxes)
        torch.testing.assert_close(actual, initial_scale * expected, rtol=1e-5, atol=1e-5, msg=name)


# ------------------------------------------------------------------------ C4
@pytest.mark.parametrize("deformable, modulated", [(False, False), (True, False), (True, True)])
def test_c4_res5_head_blocks_follow_deform_on_per_stage(deformable, modulated):
    model = build_tiny_model(
        C4_REGULAR_CONFIG,
        "MODEL.RESNETS.DEFORM_ON_PER_STAGE",
        [False, False, False, deformable],
        "MODEL.RESNETS.DEFORM_MODULATED",
        modulated,
    )
    # The backbone ends at res4; res5 is the ROI heads'.
    assert model.backbone.stage_names == ("res2", "res3", "res4")
    assert len(model.roi_heads.res5) == 3
    for block in model.roi_heads.res5:
        if deformable:
            assert isinstance(block, DeformBottleneckBlock) and block.deform_modulated == modulated
        else:
            assert type(block) is BottleneckBlock


def test_c4_regular_config_builds_detectron2s_c4_model():
    """Regular convs and pooling: detectron2's C4 Faster R-CNN, parameter for
    parameter, from the same seed (both backbone builders draw the values of
    a res5 that `ResNet` then drops)."""
    ours = build_tiny_model(C4_REGULAR_CONFIG)
    theirs = build_tiny_model(
        C4_REGULAR_CONFIG, "MODEL.BACKBONE.NAME", "build_resnet_backbone", "MODEL.ROI_HEADS.NAME", "Res5ROIHeads"
    )
    assert type(theirs.roi_heads) is Res5ROIHeads
    ours_state, theirs_state = ours.state_dict(), theirs.state_dict()
    assert ours_state.keys() == theirs_state.keys()
    for key in ours_state:
        assert torch.equal(ours_state[key], theirs_state[key]), key


def test_c4_heads_with_roi_align_are_detectron2s_res5_roi_heads():
    """Same parameters, same outputs: a checkpoint of detectron2's C4 heads loads
    and gives its results."""
    cfg = tiny_cfg(C4_REGULAR_CONFIG)
    input_shape = {"res4": ShapeSpec(channels=256, stride=16)}
    cfg.MODEL.ROI_HEADS.NAME = "Res5ROIHeads"
    torch.manual_seed(0)
    theirs = build_roi_heads(cfg, input_shape)
    cfg.MODEL.ROI_HEADS.NAME = "DCNv2Res5ROIHeads"
    ours = build_roi_heads(cfg, input_shape)
    assert type(theirs) is Res5ROIHeads and type(ours) is DCNv2Res5ROIHeads
    ours.load_state_dict(theirs.state_dict(), strict=True)

    features = random_features(input_shape)
    with torch.no_grad():
        (expected,), _ = theirs.eval()(None, features, proposals())
        (actual,), _ = ours.eval()(None, features, proposals())
    assert len(expected) > 0
    torch.testing.assert_close(actual.pred_boxes.tensor, expected.pred_boxes.tensor, rtol=0, atol=0)
    torch.testing.assert_close(actual.scores, expected.scores, rtol=0, atol=0)


def test_c4_mask_rcnn_with_modulated_pooling_trains():
    """The mask head reads the res5 features of the deformable pooler's crops."""
    model = build_tiny_model(
        C4_DPOOL_CONFIG, "MODEL.MASK_ON", True, "MODEL.ROI_BOX_HEAD.POOLER_TYPE", "ModulatedDeformRoIPool"
    )
    assert model.roi_heads.pooler.offset_predictor.modulated
    perturb_zero_initialized_weights(model, ZERO_INITIALIZED_OUTPUTS)
    losses = train_one_step(model)
    assert "loss_mask" in losses and all(math.isfinite(v.item()) for v in losses.values())
    assert parameters_without_gradient(model) == []


# ------------------------------------------------------------------- Cascade
def cascade_heads(config_file, name, *overrides, seed=0):
    cfg = tiny_cfg(config_file, "MODEL.ROI_HEADS.NAME", name, *overrides)
    input_shape = {f"p{level}": ShapeSpec(channels=32, stride=2**level) for level in range(2, 6)}
    torch.manual_seed(seed)
    return build_roi_heads(cfg, input_shape), input_shape


def test_cascade_heads_with_roi_align_are_detectron2s_cascade_roi_heads():
    """With a regular pooler per stage, the same parameters give the same
    detections, losses and feature gradients as detectron2's CascadeROIHeads."""
    theirs, input_shape = cascade_heads(CASCADE_REGULAR_CONFIG, "CascadeROIHeads")
    ours, _ = cascade_heads(CASCADE_REGULAR_CONFIG, "DCNv2CascadeROIHeads", seed=1)
    assert type(theirs) is CascadeROIHeads and type(ours) is DCNv2CascadeROIHeads
    assert len(ours.box_pooler) == 3 and all(type(p) is ROIPooler for p in ours.box_pooler)
    ours.load_state_dict(theirs.state_dict(), strict=True)

    def train(heads):
        features = {name: t.requires_grad_() for name, t in random_features(input_shape).items()}
        torch.manual_seed(0)  # the RoI sampling
        with EventStorage():
            _, losses = heads.train()(None, features, proposals(), ground_truth())
        sum(losses.values()).backward()
        return losses, {name: t.grad for name, t in features.items()}

    (their_losses, their_grads), (our_losses, our_grads) = train(theirs), train(ours)
    assert their_losses.keys() == our_losses.keys()
    for key in their_losses:
        torch.testing.assert_close(our_losses[key], their_losses[key], rtol=1e-6, atol=1e-7, msg=key)
    for key in their_grads:
        torch.testing.assert_close(our_grads[key], their_grads[key], rtol=1e-5, atol=1e-7, msg=key)

    features = random_features(input_shape)
    with torch.no_grad():
        (expected,), _ = theirs.eval()(None, features, proposals())
        (actual,), _ = ours.eval()(None, features, proposals())
    assert len(expected) > 0
    torch.testing.assert_close(actual.pred_boxes.tensor, expected.pred_boxes.tensor, rtol=0, atol=0)
    torch.testing.assert_close(actual.scores, expected.scores, rtol=0, atol=0)


def test_cascade_stage_gives_its_offset_branch_its_full_loss_gradient():
    """Like detectron2, a stage passes 1/stages of its loss's gradient to the
    shared feature maps; its own offset branch, like its box head, gets all
    of it."""
    heads, input_shape = cascade_heads(CASCADE_MDPOOL_CONFIG, "DCNv2CascadeROIHeads")
    perturb_zero_initialized_weights(heads, ZERO_INITIALIZED_OUTPUTS)
    heads.train()
    stage = 1
    branch = heads.box_pooler[stage].offset_predictor

    def gradients(run_stage):
        heads.zero_grad()
        features = [t.requires_grad_() for t in random_features(input_shape).values()]
        scores, deltas = run_stage(features)
        (scores.square().sum() + deltas.square().sum()).backward()
        return [t.grad for t in features], [p.grad.clone() for p in branch.parameters()]

    def unscaled(features):
        pooled = heads.box_pooler[stage](features, [p.proposal_boxes for p in proposals()])
        return heads.box_predictor[stage](heads.box_head[stage](pooled))

    feature_grads, branch_grads = gradients(lambda features: heads._run_stage(features, proposals(), stage))
    full_feature_grads, full_branch_grads = gradients(unscaled)
    for actual, full in zip(branch_grads, full_branch_grads):
        assert full.abs().sum() > 0
        torch.testing.assert_close(actual, full)
    assert any(full.abs().sum() > 0 for full in full_feature_grads)
    for actual, full in zip(feature_grads, full_feature_grads):
        torch.testing.assert_close(actual, full / 3)


def test_cascade_training_returns_the_final_stages_labelled_rois():
    heads, input_shape = cascade_heads(CASCADE_MDPOOL_CONFIG, "DCNv2CascadeROIHeads")
    stage_rois = {}
    run_stage = DCNv2CascadeROIHeads._run_stage

    def recording_run_stage(self, features, proposals, stage):
        stage_rois[stage] = proposals
        return run_stage(self, features, proposals, stage)

    with mock.patch.object(DCNv2CascadeROIHeads, "_run_stage", recording_run_stage), EventStorage():
        rois, _ = heads.train()(None, random_features(input_shape), proposals(), ground_truth())
    assert sorted(stage_rois) == [0, 1, 2]
    assert rois is stage_rois[2] and rois is not stage_rois[0]
    assert rois[0].has("gt_classes") and rois[0].has("gt_boxes")
    assert heads._final_stage_rois is None  # not kept past the step


def test_cascade_without_class_agnostic_regression_names_the_key():
    with pytest.raises(ValueError, match="MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG to True"):
        cascade_heads(CASCADE_MDPOOL_CONFIG, "DCNv2CascadeROIHeads", "MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG", False)


# ---------------------------------------------------- pooler types refused
ALL_DEFORMABLE_HEADS = "DCNv2ROIHeads, DCNv2CascadeROIHeads, DCNv2Res5ROIHeads"
FPN_DEFORMABLE_HEADS = "DCNv2ROIHeads, DCNv2CascadeROIHeads"


@pytest.mark.parametrize(
    "config_file, overrides, key, able",
    [
        (C4_DPOOL_CONFIG, ["MODEL.ROI_HEADS.NAME", "Res5ROIHeads"], "ROI_BOX_HEAD", ALL_DEFORMABLE_HEADS),
        (
            CASCADE_MDPOOL_CONFIG,
            ["MODEL.ROI_HEADS.NAME", "StandardROIHeads"],
            "ROI_BOX_HEAD",
            ALL_DEFORMABLE_HEADS,
        ),
        (
            CASCADE_MDPOOL_CONFIG,
            ["MODEL.ROI_HEADS.NAME", "CascadeROIHeads", "MODEL.ROI_MASK_HEAD.POOLER_TYPE", "DeformRoIPool"],
            "ROI_BOX_HEAD",
            ALL_DEFORMABLE_HEADS,
        ),
        (
            CASCADE_REGULAR_CONFIG,
            ["MODEL.ROI_HEADS.NAME", "StandardROIHeads", "MODEL.ROI_MASK_HEAD.POOLER_TYPE", "DeformRoIPool"],
            "ROI_MASK_HEAD",
            FPN_DEFORMABLE_HEADS,
        ),
        (
            KEYPOINT_MDPOOL_CONFIG,
            ["MODEL.ROI_HEADS.NAME", "StandardROIHeads", "MODEL.ROI_BOX_HEAD.POOLER_TYPE", "ROIAlignV2"],
            "ROI_KEYPOINT_HEAD",
            FPN_DEFORMABLE_HEADS,
        ),
        (
            C4_DPOOL_CONFIG,
            ["MODEL.MASK_ON", True, "MODEL.ROI_MASK_HEAD.POOLER_TYPE", "ModulatedDeformRoIPool"],
            "ROI_MASK_HEAD",
            FPN_DEFORMABLE_HEADS,
        ),
    ],
    ids=["res5", "standard", "cascade", "standard-mask", "standard-keypoint", "dcnv2-res5-mask"],
)
def test_deformable_pooler_type_a_head_cannot_honour_is_refused_before_building(config_file, overrides, key, able):
    cfg = tiny_cfg(config_file, *overrides)
    with pytest.raises(ValueError) as error:
        check_config(cfg)  # what train_net's setup runs before building
    message = str(error.value)
    head = cfg.MODEL.ROI_HEADS.NAME
    assert f"MODEL.{key}.POOLER_TYPE is '{cfg.MODEL[key].POOLER_TYPE}'" in message
    assert f"MODEL.ROI_HEADS.NAME '{head}'" in message
    assert f"ROI heads that can: {able}." in message
    if head == "DCNv2Res5ROIHeads":
        assert "pools deformably only with MODEL.ROI_BOX_HEAD.POOLER_TYPE" in message
        # This project's heads refuse it when built without the engine too.
        with pytest.raises(ValueError, match=f"MODEL.{key}.POOLER_TYPE"):
            build_tiny_model(config_file, *overrides)


def test_pooler_types_of_heads_that_are_off_are_not_checked():
    # detectron2 builds no mask head without MODEL.MASK_ON, so its pooler type is never read.
    cfg = tiny_cfg(
        CASCADE_REGULAR_CONFIG,
        "MODEL.ROI_HEADS.NAME",
        "StandardROIHeads",
        "MODEL.MASK_ON",
        False,
        "MODEL.ROI_MASK_HEAD.POOLER_TYPE",
        "DeformRoIPool",
    )
    check_config(cfg)
