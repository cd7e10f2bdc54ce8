"""Whole detectors built from the shipped configs, on CPU, shrunk by overrides."""

import math

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model
from detectron2.solver import build_optimizer as detectron2_build_optimizer
from detectron2.structures import BitMasks, Boxes, Instances, Keypoints
from detectron2.utils.events import EventStorage
from helpers import CONFIG_DIR, DEVICES, parameters_without_gradient, perturb_zero_initialized_weights

import dcnv2_plugin  # noqa: F401  (registers the components)
from dcnv2_plugin.config import load_config
from dcnv2_plugin.modeling import build_optimizer
from dcnv2_plugin.modeling.optimizer import clip_each_grad_norm_
from dcnv2_plugin.ops import GeometryPredictor

# This project's COCO detector configs (the mimicking and demo configs are
# tested with their code, the bases through their leaves).
ABLATION_CONFIGS = sorted(
    p for p in CONFIG_DIR.glob("COCO-*/*.yaml") if "mimic" not in p.name and not p.name.startswith("Base-")
)
CONFIG_IDS = [p.name for p in ABLATION_CONFIGS]
# The paper's ablation rows: R-50-FPN Faster and Mask R-CNN with StandardROIHeads.
FPN_CONFIGS = [p for p in ABLATION_CONFIGS if p.name.startswith(("faster_rcnn_R_50_FPN", "mask_rcnn_R_50_FPN"))]
MDCONV_MASK_CONFIG = CONFIG_DIR / "COCO-InstanceSegmentation" / "mask_rcnn_R_50_FPN_mdconv_c3-c5_mdpool.yaml"
C4_DPOOL_CONFIG = CONFIG_DIR / "COCO-Detection" / "faster_rcnn_R_50_C4_dconv_c5_dpool.yaml"
CASCADE_MDPOOL_CONFIG = CONFIG_DIR / "COCO-InstanceSegmentation" / "cascade_mask_rcnn_R_50_FPN_mdconv_c3-c5_mdpool.yaml"
KEYPOINT_MDPOOL_CONFIG = CONFIG_DIR / "COCO-Keypoints" / "keypoint_rcnn_R_50_FPN_mdconv_c3-c5_mdpool.yaml"

IMAGE_HEIGHT, IMAGE_WIDTH = 64, 96
TINY_OVERRIDES = [
    "MODEL.DEVICE",
    "cpu",
    # Trained from scratch here: BN, since FrozenBN (the default, for
    # ImageNet-initialized training) diverges without pretrained weights.
    "MODEL.RESNETS.NORM",
    "BN",
    # Narrower layers (same layer names) keep the CPU time small.
    "MODEL.RESNETS.STEM_OUT_CHANNELS",
    16,
    "MODEL.RESNETS.RES2_OUT_CHANNELS",
    64,
    "MODEL.RESNETS.WIDTH_PER_GROUP",
    16,
    "MODEL.FPN.OUT_CHANNELS",
    32,
    "MODEL.ROI_MASK_HEAD.CONV_DIM",
    32,
    # All anchors of the small image in the RPN loss, so every FPN level (p2-p6)
    # gets a gradient.
    "MODEL.RPN.BATCH_SIZE_PER_IMAGE",
    4096,
    "MODEL.RPN.PRE_NMS_TOPK_TRAIN",
    200,
    "MODEL.RPN.POST_NMS_TOPK_TRAIN",
    32,
    "MODEL.RPN.PRE_NMS_TOPK_TEST",
    200,
    "MODEL.RPN.POST_NMS_TOPK_TEST",
    32,
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE",
    16,
    "MODEL.ROI_BOX_HEAD.FC_DIM",
    64,
    "MODEL.DCNV2.DEFORM_POOL.FC_DIM",
    32,
    # An untrained model's scores are ~1/81; keep its detections.
    "MODEL.ROI_HEADS.SCORE_THRESH_TEST",
    0.0,
]


def tiny_cfg(config_file, *overrides):
    return load_config(config_file, TINY_OVERRIDES + list(overrides))


def build_tiny_model(config_file, *overrides, seed=0):
    torch.manual_seed(seed)
    return build_model(tiny_cfg(config_file, *overrides))


def training_batch(num_classes=80, num_keypoints=0):
    """One image with two objects: boxes, classes below `num_classes`, masks,
    and with `num_keypoints`, that many visible keypoints each."""
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(3, IMAGE_HEIGHT, IMAGE_WIDTH, generator=generator) * 255
    boxes = torch.tensor([[8.0, 6.0, 60.0, 50.0], [50.0, 20.0, 90.0, 60.0]])
    instances = Instances((IMAGE_HEIGHT, IMAGE_WIDTH))
    instances.gt_boxes = Boxes(boxes)
    instances.gt_classes = torch.tensor([3, 7]) % num_classes
    masks = torch.zeros(len(boxes), IMAGE_HEIGHT, IMAGE_WIDTH, dtype=torch.bool)
    for mask, (x1, y1, x2, y2) in zip(masks, boxes.int().tolist()):
        mask[y1:y2, x1:x2] = True
    instances.gt_masks = BitMasks(masks)
    if num_keypoints:
        # Points spread inside each box, all visible (v = 2).
        fractions = torch.rand(len(boxes), num_keypoints, 2, generator=generator) * 0.8 + 0.1
        xy = boxes[:, None, :2] + fractions * (boxes[:, None, 2:] - boxes[:, None, :2])
        instances.gt_keypoints = Keypoints(torch.cat([xy, torch.full_like(xy[..., :1], 2.0)], dim=2))
    return [{"image": image, "instances": instances, "height": IMAGE_HEIGHT, "width": IMAGE_WIDTH}]


def model_training_batch(model):
    """`training_batch` with the classes and keypoints of `model`'s ROI heads."""
    roi_heads = model.roi_heads
    num_keypoints = roi_heads.keypoint_head.num_keypoints if getattr(roi_heads, "keypoint_on", False) else 0
    return training_batch(roi_heads.num_classes, num_keypoints)


# The zero-initialized output layers of the RoI offset branch and of the
# spatial transformer's localization net. (The backbone's zero-initialized
# `conv2_offset` is left at zero: nothing comes before it, and it must get a
# gradient as it is.)
ZERO_INITIALIZED_OUTPUTS = ("offset_predictor.predictor.weight", "localization.theta.weight")


def train_one_step(model):
    model.train()
    with EventStorage():
        losses = model(model_training_batch(model))
    sum(losses.values()).backward()
    return losses


@pytest.mark.parametrize("config_file", ABLATION_CONFIGS, ids=CONFIG_IDS)
def test_training_step_has_finite_losses_and_reaches_every_parameter(config_file):
    model = build_tiny_model(config_file)
    perturb_zero_initialized_weights(model, ZERO_INITIALIZED_OUTPUTS)
    losses = train_one_step(model)

    assert "loss_mask" in losses if model.roi_heads.mask_on else "loss_mask" not in losses
    assert ("loss_keypoint" in losses) == ("keypoint" in config_file.name)
    for name, loss in losses.items():
        assert math.isfinite(loss.item()), name
    assert parameters_without_gradient(model) == []
    names = [name for name, _ in model.named_parameters()]
    assert any("conv2_offset" in n for n in names) == ("dconv" in config_file.name)
    assert any("offset_predictor" in n for n in names) == ("pool" in config_file.name)


def calibrate_batch_norms(model):
    """BatchNorm statistics measured on the training batch. The initial ones
    (mean 0, variance 1) normalize nothing: in eval mode an untrained model's
    activations then grow stage by stage, and C4's res5 head turns them into
    box deltas that leave no box inside the small image."""
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # a plain average over the calibration batches
    with EventStorage(), torch.no_grad():
        model.train()(model_training_batch(model))
    return model.eval()


def detectron2_regular_detector(config_file, ours):
    """detectron2's own detector for `config_file` without this project's
    modules (its ResNet-FPN, StandardROIHeads, RoIAlignV2), holding `ours`'s
    weights scaled so that it computes what `ours` does at initialization:
    zero offsets make a deformable conv the regular one, and the modulation
    sigmoid(0) = 0.5 halves a modulated conv's output (its weight, here) and
    a modulated pooler's (the box head's first fc, which reads it)."""
    cfg = tiny_cfg(config_file)
    theirs = build_model(
        tiny_cfg(
            config_file,
            "MODEL.BACKBONE.NAME", "build_resnet_fpn_backbone",
            "MODEL.RESNETS.DEFORM_ON_PER_STAGE", [False] * 4,
            "MODEL.ROI_HEADS.NAME", "StandardROIHeads",
            "MODEL.ROI_BOX_HEAD.POOLER_TYPE", "ROIAlignV2",
        )
    )  # fmt: skip
    state = ours.state_dict()
    incompatible = theirs.load_state_dict(state, strict=False)
    assert incompatible.missing_keys == []
    assert all("conv2_offset" in key or "offset_predictor" in key for key in incompatible.unexpected_keys)
    with torch.no_grad():
        if cfg.MODEL.RESNETS.DEFORM_MODULATED:
            for key in state:
                if key.replace(".conv2.weight", ".conv2_offset.weight") in state and key.endswith(".conv2.weight"):
                    theirs.state_dict()[key].mul_(0.5)
        if cfg.MODEL.ROI_BOX_HEAD.POOLER_TYPE == "ModulatedDeformRoIPool":
            theirs.roi_heads.box_head.fc1.weight.mul_(0.5)
    return theirs


def head_outputs(model, features, boxes):
    """The box head's class scores and box deltas for `boxes`, and the mask
    head's mask logits when there is one."""
    heads = model.roi_heads
    box_features = heads.box_pooler([features[f] for f in heads.box_in_features], boxes)
    outputs = list(heads.box_predictor(heads.box_head(box_features)))
    if heads.mask_on:
        outputs.append(heads.mask_head.layers(heads.mask_pooler([features[f] for f in heads.mask_in_features], boxes)))
    return outputs


@pytest.mark.parametrize("config_file", ABLATION_CONFIGS, ids=CONFIG_IDS)
def test_inference_returns_instances(config_file):
    model = calibrate_batch_norms(build_tiny_model(config_file))
    batch = model_training_batch(model)
    del batch[0]["instances"]
    with torch.no_grad():
        (output,) = model(batch)
    instances = output["instances"]
    assert isinstance(instances, Instances)
    assert instances.image_size == (IMAGE_HEIGHT, IMAGE_WIDTH)
    assert len(instances) > 0
    assert instances.pred_boxes.tensor.shape == (len(instances), 4)
    assert instances.scores.shape == instances.pred_classes.shape == (len(instances),)
    if model.roi_heads.mask_on:
        assert instances.pred_masks.shape == (len(instances), IMAGE_HEIGHT, IMAGE_WIDTH)
    else:
        assert not instances.has("pred_masks")
    if "keypoint" in config_file.name:
        assert instances.pred_keypoints.shape == (len(instances), model.roi_heads.keypoint_head.num_keypoints, 3)
    else:
        assert not instances.has("pred_keypoints")


@pytest.mark.parametrize("config_file", FPN_CONFIGS, ids=[p.name for p in FPN_CONFIGS])
def test_inference_at_initialization_computes_detectron2s_regular_detector(config_file):
    ours = build_tiny_model(config_file).eval()
    theirs = detectron2_regular_detector(config_file, ours).eval()
    batch = training_batch()
    del batch[0]["instances"]
    with torch.no_grad():
        # The same values in float64 (detectron2's box decoding and NMS
        # need float32, so the RoIs are given): backbone features, then the
        # heads' outputs on the same RoIs.
        ours, theirs = ours.double(), theirs.double()
        images = ours.preprocess_image(batch)
        features, expected_features = ours.backbone(images.tensor), theirs.backbone(images.tensor)
        for name, expected in expected_features.items():
            torch.testing.assert_close(features[name], expected, rtol=1e-9, atol=1e-9 * expected.abs().max().item())
        generator = torch.Generator().manual_seed(3)
        corners = torch.rand(40, 2, 2, generator=generator, dtype=torch.float64) * torch.tensor(
            [IMAGE_WIDTH, IMAGE_HEIGHT], dtype=torch.float64
        )
        boxes = [Boxes(torch.cat([corners.min(1).values, corners.max(1).values], 1))]
        for name, actual, expected in zip(
            ["scores", "box deltas", "mask logits"],
            head_outputs(ours, features, boxes),
            head_outputs(theirs, expected_features, boxes),
        ):
            torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-9, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize(
    "config_file, overrides",
    [
        (MDCONV_MASK_CONFIG, ["MODEL.DCNV2.STN.ENABLED", True]),
        (C4_DPOOL_CONFIG, ["MODEL.MASK_ON", True]),
        (CASCADE_MDPOOL_CONFIG, []),
        (KEYPOINT_MDPOOL_CONFIG, []),
    ],
    ids=["fpn-mask-stn", "c4-mask", "cascade-mask", "keypoint"],
)
def test_checkpoint_round_trip_is_bit_exact(tmp_path, config_file, overrides):
    model = build_tiny_model(config_file, *overrides, seed=0)
    # Change every floating tensor (parameters and BN statistics) away from its
    # initialization, so a tensor that failed to load could not match by chance.
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(torch.rand(tensor.shape, generator=generator))
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("checkpoint")

    restored = build_tiny_model(config_file, *overrides, seed=1)
    DetectionCheckpointer(restored).load(str(tmp_path / "checkpoint.pth"))
    saved, loaded = model.state_dict(), restored.state_dict()
    assert saved.keys() == loaded.keys()
    for key in saved:
        assert torch.equal(saved[key], loaded[key]), key


def test_optimizer_scales_the_learning_rate_of_geometry_predictors_only():
    cfg = tiny_cfg(
        MDCONV_MASK_CONFIG,
        "MODEL.DCNV2.STN.ENABLED",
        True,
        "MODEL.DCNV2.OFFSET_LR_FACTOR",
        0.25,
        "SOLVER.BASE_LR",
        0.02,
        "SOLVER.BIAS_LR_FACTOR",
        2.0,
    )
    torch.manual_seed(0)
    model = build_model(cfg)
    optimizer = build_optimizer(cfg, model)

    lr_of = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert len(lr_of) == sum(len(group["params"]) for group in optimizer.param_groups) == len(trainable)
    geometry_prefixes = ("conv2_offset", "box_pooler.offset_predictor", "spatial_transformer.localization")
    for name, param in trainable.items():
        lr = 0.02 * (2.0 if name.endswith("bias") else 1.0)
        if any(prefix in name for prefix in geometry_prefixes):
            lr *= 0.25
        assert lr_of[id(param)] == pytest.approx(lr), name
    assert sum(any(prefix in n for prefix in geometry_prefixes) for n in trainable) == sum(
        len(list(m.parameters())) for m in model.modules() if isinstance(m, GeometryPredictor)
    )


def _parameters_with_gradients(scales, seed=0):
    generator = torch.Generator().manual_seed(seed)
    shapes = [(3, 4), (7,), (16, 8, 3, 3), (1,), (5, 5), (2, 2)]
    params = []
    for shape, scale in zip(shapes, scales):
        param = torch.nn.Parameter(torch.randn(shape, generator=generator))
        param.grad = torch.randn(shape, generator=generator) * scale
        params.append(param)
    params[-1].grad = None  # a parameter without a gradient is skipped
    return params


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf])
def test_per_parameter_norm_clipping_equals_detectron2s_to_the_bit(norm_type):
    scales = [1e-3, 0.1, 10.0, 1.0, 1e3, 1.0]
    clipped = _parameters_with_gradients(scales)
    expected = _parameters_with_gradients(scales)
    clip_each_grad_norm_(clipped, 0.5, norm_type)
    for param in expected:  # what detectron2's CLIP_TYPE "norm" does, one parameter at a time
        torch.nn.utils.clip_grad_norm_(param, 0.5, norm_type)
    for actual, wanted in zip(clipped, expected):
        if wanted.grad is None:
            assert actual.grad is None
        else:
            assert torch.equal(actual.grad, wanted.grad)
    assert torch.linalg.vector_norm(clipped[4].grad, norm_type) == pytest.approx(0.5, rel=1e-5)  # was clipped
    assert torch.equal(clipped[0].grad, _parameters_with_gradients(scales)[0].grad)  # small: left alone


@pytest.mark.parametrize("clip_type", ["norm", "value"])
def test_optimizer_steps_as_detectron2s_with_gradient_clipping(clip_type):
    overrides = ["SOLVER.CLIP_GRADIENTS.ENABLED", True, "SOLVER.CLIP_GRADIENTS.CLIP_TYPE", clip_type]
    overrides += ["SOLVER.CLIP_GRADIENTS.CLIP_VALUE", 0.05, "MODEL.DCNV2.OFFSET_LR_FACTOR", 1.0]
    cfg = load_config(MDCONV_MASK_CONFIG, overrides)
    models = []
    for build in (build_optimizer, detectron2_build_optimizer):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
        optimizer = build(cfg, model)
        assert type(optimizer).__name__ == "SGDWithGradientClip"
        for step in range(3):
            inputs = torch.randn(32, 8, generator=torch.Generator().manual_seed(step)) * 10
            optimizer.zero_grad()
            model(inputs).square().sum().backward()
            optimizer.step()
        models.append(model)
    for ours, theirs in zip(models[0].parameters(), models[1].parameters()):
        assert torch.equal(ours, theirs)


def test_spatial_transformer_trains_with_the_detector():
    model = build_tiny_model(MDCONV_MASK_CONFIG, "MODEL.DCNV2.STN.ENABLED", True, "MODEL.DCNV2.STN.HIDDEN_DIM", 16)
    assert "backbone.bottom_up.res3.spatial_transformer.localization.theta.weight" in model.state_dict()
    perturb_zero_initialized_weights(model, ZERO_INITIALIZED_OUTPUTS)
    train_one_step(model)
    assert parameters_without_gradient(model) == []


@pytest.mark.parametrize("device", DEVICES)
def test_single_feature_map_dc5_detector_trains_and_infers(device):
    model = build_tiny_model(
        MDCONV_MASK_CONFIG,
        "MODEL.DEVICE",
        device,
        "MODEL.BACKBONE.NAME",
        "build_dcnv2_resnet_backbone",
        "MODEL.RESNETS.OUT_FEATURES",
        ["res5"],
        "MODEL.RESNETS.RES5_DILATION",
        2,
        "MODEL.RPN.IN_FEATURES",
        ["res5"],
        "MODEL.ANCHOR_GENERATOR.SIZES",
        [[32, 64, 128]],
        "MODEL.ROI_HEADS.IN_FEATURES",
        ["res5"],
        "MODEL.ROI_MASK_HEAD.POOLER_TYPE",
        "ModulatedDeformRoIPool",
    )
    assert len(model.roi_heads.box_pooler.level_poolers) == 1
    perturb_zero_initialized_weights(model, ZERO_INITIALIZED_OUTPUTS)
    losses = train_one_step(model)
    assert all(math.isfinite(loss.item()) for loss in losses.values())
    assert parameters_without_gradient(model) == []

    batch = training_batch()
    del batch[0]["instances"]
    with torch.no_grad():
        (output,) = model.eval()(batch)
    assert len(output["instances"]) > 0
    assert output["instances"].pred_masks.shape[1:] == (IMAGE_HEIGHT, IMAGE_WIDTH)


# detectron2's own Base-RCNN-FPN.yaml and Misc/mask_rcnn_R_50_FPN_1x_dconv_c3-c5.yaml
# (not installed with its package), copied verbatim except for the _BASE_ path.
DETECTRON2_BASE_RCNN_FPN = """
MODEL:
  META_ARCHITECTURE: "GeneralizedRCNN"
  BACKBONE:
    NAME: "build_resnet_fpn_backbone"
  RESNETS:
    OUT_FEATURES: ["res2", "res3", "res4", "res5"]
  FPN:
    IN_FEATURES: ["res2", "res3", "res4", "res5"]
  ANCHOR_GENERATOR:
    SIZES: [[32], [64], [128], [256], [512]]  # One size for each in feature map
    ASPECT_RATIOS: [[0.5, 1.0, 2.0]]  # Three aspect ratios (same for all in feature maps)
  RPN:
    IN_FEATURES: ["p2", "p3", "p4", "p5", "p6"]
    PRE_NMS_TOPK_TRAIN: 2000  # Per FPN level
    PRE_NMS_TOPK_TEST: 1000  # Per FPN level
    POST_NMS_TOPK_TRAIN: 1000
    POST_NMS_TOPK_TEST: 1000
  ROI_HEADS:
    NAME: "StandardROIHeads"
    IN_FEATURES: ["p2", "p3", "p4", "p5"]
  ROI_BOX_HEAD:
    NAME: "FastRCNNConvFCHead"
    NUM_FC: 2
    POOLER_RESOLUTION: 7
  ROI_MASK_HEAD:
    NAME: "MaskRCNNConvUpsampleHead"
    NUM_CONV: 4
    POOLER_RESOLUTION: 14
DATASETS:
  TRAIN: ("coco_2017_train",)
  TEST: ("coco_2017_val",)
SOLVER:
  IMS_PER_BATCH: 16
  BASE_LR: 0.02
  STEPS: (60000, 80000)
  MAX_ITER: 90000
INPUT:
  MIN_SIZE_TRAIN: (640, 672, 704, 736, 768, 800)
VERSION: 2
"""
DETECTRON2_DCONV_C3_C5 = """
_BASE_: "Base-RCNN-FPN.yaml"
MODEL:
  WEIGHTS: "detectron2://ImageNetPretrained/MSRA/R-50.pkl"
  MASK_ON: True
  RESNETS:
    DEPTH: 50
    DEFORM_ON_PER_STAGE: [False, True, True, True] # on Res3,Res4,Res5
    DEFORM_MODULATED: False
"""


@pytest.mark.parametrize("modulated", [False, True], ids=["dconv", "mdconv"])
def test_detectron2_deformable_config_runs_with_only_the_backbone_name_changed(tmp_path, modulated):
    (tmp_path / "Base-RCNN-FPN.yaml").write_text(DETECTRON2_BASE_RCNN_FPN)
    (tmp_path / "dconv.yaml").write_text(DETECTRON2_DCONV_C3_C5)
    overrides = ["MODEL.RESNETS.DEFORM_MODULATED", modulated]
    torch.manual_seed(0)
    theirs = build_model(tiny_cfg(tmp_path / "dconv.yaml", *overrides))  # constructs without detectron2._C
    ours = build_tiny_model(
        tmp_path / "dconv.yaml", *overrides, "MODEL.BACKBONE.NAME", "build_dcnv2_resnet_fpn_backbone"
    )

    # Their whole detector's checkpoint loads into ours, key for key.
    incompatible = ours.load_state_dict(theirs.state_dict(), strict=True)
    assert not incompatible.missing_keys and not incompatible.unexpected_keys
    perturb_zero_initialized_weights(ours, ZERO_INITIALIZED_OUTPUTS)
    losses = train_one_step(ours)
    assert set(losses) == {"loss_cls", "loss_box_reg", "loss_mask", "loss_rpn_cls", "loss_rpn_loc"}
    assert all(math.isfinite(loss.item()) for loss in losses.values())
