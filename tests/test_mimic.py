"""R-CNN feature mimicking (DCNv2 paper, Sec. 3.3): MimicRCNN and its branch."""

import math
from unittest import mock

import pytest
import torch
import torchvision
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances, PolygonMasks
from detectron2.utils.events import EventStorage
from helpers import CONFIG_DIR, perturb_zero_initialized_weights

import dcnv2_plugin  # noqa: F401  (registers MimicRCNN and the DCNv2 components)
from dcnv2_plugin.config import load_config
from dcnv2_plugin.modeling import check_config
from dcnv2_plugin.modeling.mimic import MimicRCNN, RCNNFeatureMimicking, mimic_loss
from dcnv2_plugin.modeling.mimic_sampling import crop_and_resize, sample_mimic_rois, sample_positive_rois

MIMIC_CONFIGS = [
    "COCO-Detection/faster_rcnn_R_50_FPN_mdconv_c3-c5_mdpool_mimic.yaml",
    "COCO-Detection/faster_rcnn_R_50_FPN_regular_mimic.yaml",
    "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_mdconv_c3-c5_mdpool_mimic.yaml",
    "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_regular_mimic.yaml",
    "COCO-InstanceSegmentation/cascade_mask_rcnn_R_50_FPN_mdconv_c3-c5_mdpool_mimic.yaml",
]
CASCADE_MIMIC_CONFIG = MIMIC_CONFIGS[4]
NUM_CLASSES = 3
IMAGE_HEIGHT, IMAGE_WIDTH = 64, 96

# A model small enough for a CPU training step: narrow layers, few RoIs and
# small crops. CROP_SIZE only has to be a multiple of the FPN's 32.
TINY_MODEL = [
    "MODEL.DEVICE",
    "cpu",
    "MODEL.RESNETS.STEM_OUT_CHANNELS",
    16,
    "MODEL.RESNETS.RES2_OUT_CHANNELS",
    32,
    "MODEL.RESNETS.WIDTH_PER_GROUP",
    8,
    "MODEL.FPN.OUT_CHANNELS",
    32,
    "MODEL.ROI_BOX_HEAD.FC_DIM",
    64,
    "MODEL.ROI_MASK_HEAD.CONV_DIM",
    16,
    "MODEL.DCNV2.DEFORM_POOL.FC_DIM",
    32,
    "MODEL.RPN.BATCH_SIZE_PER_IMAGE",
    32,
    "MODEL.RPN.PRE_NMS_TOPK_TRAIN",
    200,
    "MODEL.RPN.POST_NMS_TOPK_TRAIN",
    50,
    "MODEL.RPN.PRE_NMS_TOPK_TEST",
    200,
    "MODEL.RPN.POST_NMS_TOPK_TEST",
    50,
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE",
    16,
    "MODEL.ROI_HEADS.NUM_CLASSES",
    NUM_CLASSES,
    "MODEL.DCNV2.MIMIC.NUM_POS_ROIS",
    2,
    "MODEL.DCNV2.MIMIC.CROP_SIZE",
    64,
]


def tiny_model(name, overrides=()):
    torch.manual_seed(0)
    return build_model(load_config(CONFIG_DIR / name, TINY_MODEL + list(overrides)))


def ground_truth(boxes, classes):
    instances = Instances((IMAGE_HEIGHT, IMAGE_WIDTH))
    instances.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    instances.gt_classes = torch.tensor(classes, dtype=torch.int64)
    instances.gt_masks = PolygonMasks([[[x1, y1, x2, y1, x2, y2, x1, y2]] for x1, y1, x2, y2 in boxes])
    return instances


def training_batch(with_objects=True):
    generator = torch.Generator().manual_seed(1)
    if with_objects:
        boxes, classes = [[4.0, 6.0, 40.0, 50.0], [30.0, 10.0, 90.0, 60.0]], [0, 2]
    else:
        boxes, classes = [], []
    return [
        {
            "image": torch.rand(3, IMAGE_HEIGHT, IMAGE_WIDTH, generator=generator) * 255,
            "instances": ground_truth(boxes, classes),
        }
        for _ in range(2)
    ]


def training_rois(boxes_per_image, classes_per_image, image_size=(IMAGE_HEIGHT, IMAGE_WIDTH)):
    """What the ROI heads hand over in training: sampled RoIs with their labels."""
    rois = []
    for boxes, classes in zip(boxes_per_image, classes_per_image):
        instances = Instances(image_size)
        instances.proposal_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
        instances.gt_classes = torch.tensor(classes, dtype=torch.int64)
        rois.append(instances)
    return rois


def run_branch(model, rois, image_size=(IMAGE_HEIGHT, IMAGE_WIDTH)):
    """The mimicking branch alone, on image features that carry no gradient:
    any gradient the backbone gets then comes through the crops."""
    images = model.preprocess_image([{"image": torch.rand(3, *image_size) * 255} for _ in rois])
    with torch.no_grad():
        features = model.backbone(images.tensor)
    with EventStorage():
        return model.mimic(images, features, rois, backbone=model.backbone, roi_heads=model.roi_heads)


# ------------------------------------------------------------------ the loss
def test_mimic_loss_is_mean_of_one_minus_cosine():
    f_rcnn = torch.tensor([[3.0, 4.0], [1.0, 0.0], [2.0, 2.0]])
    f_frcnn = torch.tensor([[4.0, 3.0], [0.0, 5.0], [1.0, 1.0]])
    # cosines: 24/25, 0, 1
    expected = ((1 - 24 / 25) + (1 - 0) + (1 - 1)) / 3
    assert mimic_loss(f_rcnn, f_frcnn).item() == pytest.approx(expected, rel=1e-6)


def test_mimic_loss_sums_with_reduction_sum():
    f_rcnn = torch.tensor([[3.0, 4.0], [1.0, 0.0], [2.0, 2.0]])
    f_frcnn = torch.tensor([[4.0, 3.0], [0.0, 5.0], [1.0, 1.0]])
    assert mimic_loss(f_rcnn, f_frcnn, "sum").item() == pytest.approx((1 - 24 / 25) + (1 - 0) + (1 - 1), rel=1e-6)
    with pytest.raises(ValueError, match="reduction must be one of 'mean', 'sum'; got 'none'"):
        mimic_loss(f_rcnn, f_frcnn, "none")


# ---------------------------------------------------------- RoIs and crops
def test_sample_positive_rois_keeps_foreground_and_caps_each_image():
    background, ignored = NUM_CLASSES, -1
    boxes = [[float(i), 0.0, float(i) + 10, 10.0] for i in range(6)]
    rois = training_rois(
        [boxes, boxes[:2]],
        [[0, background, ignored, 2, 1, background], [background, background]],
    )
    torch.manual_seed(0)
    sampled = sample_positive_rois(rois, NUM_CLASSES, max_per_image=2)

    assert [len(s) for s in sampled] == [2, 0]
    # Two different RoIs among the three foreground ones, each with its own class.
    indices = sampled[0].proposal_boxes.tensor[:, 0].long()
    assert set(indices.tolist()) < {0, 3, 4} and len(set(indices.tolist())) == 2
    assert torch.equal(sampled[0].gt_classes, rois[0].gt_classes[indices])


@pytest.mark.parametrize(
    "regions, expected",
    [("foreground", {0, 3, 4}), ("background", {1, 5}), ("both", {0, 1, 3, 4, 5})],
)
def test_mimicked_regions_are_the_foreground_the_background_or_both_never_the_ignored(regions, expected):
    background, ignored = NUM_CLASSES, -1
    boxes = [[float(i), 0.0, float(i) + 10, 10.0] for i in range(6)]
    rois = training_rois([boxes], [[0, background, ignored, 2, 1, background]])
    sampled = sample_mimic_rois(rois, NUM_CLASSES, max_per_image=100, regions=regions)
    indices = sampled[0].proposal_boxes.tensor[:, 0].long().tolist()
    assert sorted(indices) == sorted(expected)
    assert sampled[0].gt_classes.tolist() == rois[0].gt_classes[indices].tolist()


def test_foreground_sampling_draws_the_rois_it_drew_before_regions_existed():
    # Before MODEL.DCNV2.MIMIC.REGIONS, the branch drew from detectron2's
    # select_foreground_proposals with one randperm per image: the default
    # must draw the same RoIs in the same order from the same random state.
    from detectron2.modeling.roi_heads import select_foreground_proposals

    generator = torch.Generator().manual_seed(5)
    classes = [torch.randint(-1, NUM_CLASSES + 1, (40,), generator=generator).tolist() for _ in range(3)]
    boxes = [[[float(i), 0.0, i + 10.0, 10.0] for i in range(40)]] * 3
    rois = training_rois(boxes, classes)
    torch.manual_seed(7)
    sampled = sample_mimic_rois(rois, NUM_CLASSES, max_per_image=6)
    torch.manual_seed(7)
    foreground, _ = select_foreground_proposals(rois, bg_label=NUM_CLASSES)
    before = [r[torch.randperm(len(r))[:6]] for r in foreground]
    for new, old in zip(sampled, before):
        assert torch.equal(new.proposal_boxes.tensor, old.proposal_boxes.tensor)
        assert torch.equal(new.gt_classes, old.gt_classes)


@pytest.mark.parametrize(
    "key, value",
    [
        ("MODEL.DCNV2.MIMIC.REGIONS", "fg"),
        ("MODEL.DCNV2.MIMIC.CROP_BN", "eval"),
        ("MODEL.DCNV2.MIMIC.LOSS_REDUCTION", "avg"),
    ],
)
def test_unknown_mimic_setting_is_refused_naming_the_key(key, value):
    cfg = load_config(MIMIC_CONFIGS[1], TINY_MODEL + [key, value])
    with pytest.raises(ValueError, match=f"{key} must be one of .*got '{value}'"):
        check_config(cfg)
    with pytest.raises(ValueError, match=f"{key} must be one of"):
        build_model(cfg)


def test_crop_and_resize_cuts_each_box_from_its_own_image():
    # Image i has channel 0 = column index, channel 1 = row index, channel 2 = i.
    height, width = 40, 48
    rows, columns = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    images = torch.stack([torch.stack([columns, rows, torch.full_like(rows, i)]) for i in range(2)]).float()
    boxes = [
        Boxes(torch.tensor([[8.0, 4.0, 24.0, 36.0]])),
        Boxes(torch.tensor([[10.0, 12.0, 18.0, 16.0], [0.0, 0.0, 48.0, 40.0]])),
    ]

    crops = crop_and_resize(images, boxes, size=8)

    assert crops.shape == (3, 3, 8, 8)
    assert crops[:, 2, 0, 0].tolist() == [0.0, 1.0, 1.0]
    # Output pixel j of a box [x1, x2] samples the image around x1 + (j + 0.5) * (x2 - x1) / 8
    # in continuous coordinates, i.e. pixel index x1 + (j + 0.5) * (x2 - x1) / 8 - 0.5
    # (the value there, since the image is linear in x and y).
    j = torch.arange(8, dtype=torch.float32)
    for crop, (x1, y1, x2, y2) in zip(crops[:2], [(8, 4, 24, 36), (10, 12, 18, 16)]):
        torch.testing.assert_close(crop[0, 3], x1 + (j + 0.5) * (x2 - x1) / 8 - 0.5)
        torch.testing.assert_close(crop[1, :, 3], y1 + (j + 0.5) * (y2 - y1) / 8 - 0.5)
    # The whole 48x40 image shrunk to 8x8 averages 6x5 pixels per output pixel.
    torch.testing.assert_close(crops[2, 0, 0], 6 * j + 2.5)
    torch.testing.assert_close(crops[2, 1, :, 0], 5 * j + 2.0)


# ------------------------------------------------------------- the branch
def test_mimic_losses_send_gradient_through_the_crops_into_backbone_and_shared_head():
    model = tiny_model(MIMIC_CONFIGS[0])
    rois = training_rois([[[4.0, 6.0, 40.0, 50.0], [30.0, 10.0, 90.0, 60.0]]], [[0, 2]])
    losses = run_branch(model, rois)

    losses["loss_mimic"].backward(retain_graph=True)
    shared = {
        "backbone.bottom_up.res5": model.backbone.bottom_up.res5,
        "box pooler": model.roi_heads.box_pooler,
        "box head": model.roi_heads.box_head,
    }
    for name, module in shared.items():
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        assert grads and any(g.abs().sum() > 0 for g in grads), f"no gradient reached the {name}"
    # The mimic loss does not train the R-CNN classifier; its own loss does.
    assert model.mimic.cls_score.weight.grad is None
    losses["loss_mimic_cls"].backward()
    assert model.mimic.cls_score.weight.grad.abs().sum() > 0


def test_cascade_mimicking_trains_the_final_stage_only():
    model = tiny_model(CASCADE_MIMIC_CONFIG)
    heads = model.roi_heads
    head_shape = heads.box_head[2].output_shape
    assert model.mimic.cls_score.in_features == head_shape.channels
    rois = training_rois([[[4.0, 6.0, 40.0, 50.0], [30.0, 10.0, 90.0, 60.0]]], [[0, 2]])
    losses = run_branch(model, rois)

    losses["loss_mimic"].backward()
    for stage in range(3):
        for name, module in [("box head", heads.box_head[stage]), ("box pooler", heads.box_pooler[stage])]:
            grads = [p.grad for p in module.parameters() if p.grad is not None]
            if stage == 2:
                assert grads and any(g.abs().sum() > 0 for g in grads), f"no gradient reached the final {name}"
            else:
                assert not grads, f"the mimic loss reached the {name} of stage {stage}"
    grads = [p.grad for p in model.backbone.bottom_up.res5.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)


def test_no_positive_roi_gives_zero_losses_still_connected_to_the_graph():
    model = tiny_model(MIMIC_CONFIGS[1])
    background = NUM_CLASSES
    rois = training_rois([[[4.0, 6.0, 40.0, 50.0]], []], [[background], []])
    with mock.patch.object(model.backbone, "forward", wraps=model.backbone.forward) as backbone:
        losses = run_branch(model, rois)
    assert backbone.call_count == 1  # the image only: no crop went through the backbone

    assert set(losses) == {"loss_mimic", "loss_mimic_cls"}
    for loss in losses.values():
        assert loss.item() == 0.0 and loss.requires_grad
    sum(losses.values()).backward()
    # A zero gradient, not None: every parameter takes part, as DDP requires.
    assert torch.count_nonzero(model.mimic.cls_score.weight.grad) == 0


def test_training_continues_on_a_batch_without_objects():
    model = tiny_model(MIMIC_CONFIGS[1])
    with EventStorage():
        losses = model(training_batch(with_objects=False))
    assert losses["loss_mimic"].item() == 0.0 and losses["loss_mimic_cls"].item() == 0.0
    assert all(math.isfinite(v.item()) for v in losses.values())
    sum(losses.values()).backward()


def test_default_crop_is_224_and_pooled_from_the_stride_16_level():
    # The paper's model at its real size: no TINY_MODEL overrides.
    torch.manual_seed(0)
    model = build_model(load_config(MIMIC_CONFIGS[1], ["MODEL.DEVICE", "cpu"]))
    assert model.mimic.crop_size == 224 and model.mimic.num_pos_rois == 32

    pooled = []  # (feature map height, number of RoIs) per level pooler call

    def record(module, inputs, output):
        feature_map, rois = inputs
        pooled.append((feature_map.shape[-2], len(rois)))

    for level_pooler in model.roi_heads.box_pooler.level_poolers:
        level_pooler.register_forward_hook(record)
    rois = training_rois([[[16.0, 16.0, 112.0, 96.0]]], [[1]], image_size=(128, 128))
    run_branch(model, rois, image_size=(128, 128))

    # The image's P2-P5 are 32, 16, 8 and 4 high; the crop's 56, 28, 14 and 7.
    crop_levels = {height: count for height, count in pooled if height in (56, 28, 14, 7)}
    assert crop_levels == {56: 0, 28: 0, 14: 1, 7: 0}, "the crop should be pooled from P4 (14x14) only"


# ------------------------------------------------------------ the detector
def test_mimic_configs_change_only_the_mimic_switches_of_their_base():
    for name in MIMIC_CONFIGS:
        cfg = load_config(name)
        base = load_config(name.replace("_mimic.yaml", ".yaml"))
        assert cfg.MODEL.META_ARCHITECTURE == "MimicRCNN"
        assert cfg.MODEL.DCNV2.MIMIC.ENABLED
        mimic = cfg.MODEL.DCNV2.MIMIC
        settings = (mimic.NUM_POS_ROIS, mimic.CROP_SIZE, mimic.LOSS_WEIGHT, mimic.CLS_LOSS_WEIGHT)
        assert settings == (32, 224, 0.1, 0.1)
        base.MODEL.META_ARCHITECTURE = "MimicRCNN"
        base.MODEL.DCNV2.MIMIC.ENABLED = True
        assert cfg == base, name


@pytest.mark.parametrize("config", MIMIC_CONFIGS)
def test_one_training_step_of_each_mimic_config(config):
    model = tiny_model(config)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    classifier_before = model.mimic.cls_score.weight.detach().clone()

    with EventStorage():
        losses = model(training_batch())
    assert {"loss_mimic", "loss_mimic_cls"} <= set(losses)
    assert ("loss_mask" in losses) == ("InstanceSegmentation" in config)
    assert all(math.isfinite(v.item()) for v in losses.values()), losses
    assert losses["loss_mimic"].item() > 0 and losses["loss_mimic_cls"].item() > 0
    sum(losses.values()).backward()
    optimizer.step()
    assert not torch.equal(model.mimic.cls_score.weight, classifier_before)


def test_inference_skips_the_branch_and_matches_generalized_rcnn():
    config = MIMIC_CONFIGS[2]  # Mask R-CNN with mdconv and mdpool: every head
    model = tiny_model(config).eval()
    plain_cfg = load_config(
        config, TINY_MODEL + ["MODEL.META_ARCHITECTURE", "GeneralizedRCNN", "MODEL.DCNV2.MIMIC.ENABLED", False]
    )
    plain = build_model(plain_cfg).eval()
    incompatible = plain.load_state_dict(model.state_dict(), strict=False)
    assert incompatible.missing_keys == []
    assert sorted(incompatible.unexpected_keys) == ["mimic.cls_score.bias", "mimic.cls_score.weight"]

    inputs = [{"image": b["image"], "height": IMAGE_HEIGHT, "width": IMAGE_WIDTH} for b in training_batch()]
    with torch.no_grad(), mock.patch.object(RCNNFeatureMimicking, "forward", autospec=True) as branch:
        outputs = model(inputs)
        expected = plain(inputs)
    branch.assert_not_called()

    for out, ref in zip(outputs, expected):
        out, ref = out["instances"], ref["instances"]
        assert len(ref) > 0
        torch.testing.assert_close(out.pred_boxes.tensor, ref.pred_boxes.tensor, rtol=0, atol=0)
        torch.testing.assert_close(out.scores, ref.scores, rtol=0, atol=0)
        assert torch.equal(out.pred_classes, ref.pred_classes)
        assert torch.equal(out.pred_masks, ref.pred_masks)


def test_disabled_mimicking_is_plain_generalized_rcnn():
    model = tiny_model(MIMIC_CONFIGS[1], ["MODEL.DCNV2.MIMIC.ENABLED", False])
    assert isinstance(model, MimicRCNN) and model.mimic is None
    with EventStorage():
        losses = model(training_batch())
    assert not any(name.startswith("loss_mimic") for name in losses)


@pytest.mark.parametrize(
    "override, message",
    [
        (["MODEL.DCNV2.MIMIC.CROP_SIZE", 48], "CROP_SIZE must be a positive multiple of 32"),
        (["MODEL.DCNV2.MIMIC.NUM_POS_ROIS", 0], "NUM_POS_ROIS must be at least 1"),
        (["MODEL.ROI_BOX_HEAD.TRAIN_ON_PRED_BOXES", True], "TRAIN_ON_PRED_BOXES"),
        (
            ["MODEL.ROI_HEADS.NAME", "CascadeROIHeads", "MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG", True],
            "set MODEL.ROI_HEADS.NAME to 'DCNv2CascadeROIHeads'",
        ),
        (
            ["MODEL.ROI_HEADS.NAME", "DCNv2Res5ROIHeads", "MODEL.ROI_HEADS.IN_FEATURES", ["p4"]],
            "builds DCNv2Res5ROIHeads",
        ),
    ],
)
def test_unsupported_settings_are_refused_when_building(override, message):
    with pytest.raises(ValueError, match=message):
        tiny_model(MIMIC_CONFIGS[1], override)


@pytest.mark.parametrize(
    "heads, message",
    [
        ("CascadeROIHeads", "set MODEL.ROI_HEADS.NAME to 'DCNv2CascadeROIHeads'"),
        ("Res5ROIHeads", "needs StandardROIHeads or a subclass"),
    ],
)
def test_heads_mimicking_cannot_use_are_refused_before_building(heads, message):
    # Without the check, detectron2's CascadeROIHeads would stop at its own
    # assertion about class-agnostic box regression while being built.
    cfg = load_config(MIMIC_CONFIGS[1], TINY_MODEL + ["MODEL.ROI_HEADS.NAME", heads])
    with pytest.raises(ValueError, match=message):
        check_config(cfg)  # what train_net's setup runs before building


def test_mimicking_without_its_meta_architecture_is_refused():
    # GeneralizedRCNN never runs the branch: the switch would silently do nothing.
    with pytest.raises(ValueError, match="META_ARCHITECTURE to 'MimicRCNN'"):
        tiny_model(
            "COCO-Detection/faster_rcnn_R_50_FPN_mdconv_c3-c5_mdpool.yaml",
            ["MODEL.META_ARCHITECTURE", "GeneralizedRCNN", "MODEL.DCNV2.MIMIC.ENABLED", True],
        )


# ------------------------------------------------------------ the losses by value
# Weights other than the defaults (0.1 both), and different from each other.
LOSS_WEIGHT, CLS_LOSS_WEIGHT = 0.3, 0.7
WEIGHTED = ["MODEL.DCNV2.MIMIC.LOSS_WEIGHT", LOSS_WEIGHT, "MODEL.DCNV2.MIMIC.CLS_LOSS_WEIGHT", CLS_LOSS_WEIGHT]


def cosine(a, b):
    return (a * b).sum() / (a.norm() * b.norm())


def mimic_losses_by_hand(model, images, features, positives, reduction="mean"):
    """Sec. 3.3 of the paper, one positive RoI at a time, from the model's own
    parts: f_FRCNN(b) pools b on its image's feature maps; f_RCNN(b) crops b
    from its image (RoIAlign, aligned), resizes the crop to CROP_SIZE, runs
    the backbone on it and pools the whole crop; both go through the box
    head. loss_mimic = LOSS_WEIGHT * mean (or sum) of 1 - cos, loss_mimic_cls =
    CLS_LOSS_WEIGHT * mean cross-entropy of the R-CNN classifier on f_RCNN(b).

    positives: per image, a list of (box, class)."""
    roi_heads, mimic, size = model.roi_heads, model.mimic, model.mimic.crop_size
    in_features = roi_heads.box_in_features
    one_minus_cosines, cross_entropies = [], []
    for image_index, image_positives in enumerate(positives):
        image = images.tensor[image_index : image_index + 1]
        maps = [features[f][image_index : image_index + 1] for f in in_features]
        for box, gt_class in image_positives:
            box = torch.tensor([box])
            f_frcnn = roi_heads.box_head(roi_heads.box_pooler(maps, [Boxes(box)]))[0]
            crop = torchvision.ops.roi_align(image, [box], size, spatial_scale=1.0, sampling_ratio=0, aligned=True)
            crop_maps = model.backbone(crop)
            whole_crop = Boxes(torch.tensor([[0.0, 0.0, size, size]]))
            f_rcnn = roi_heads.box_head(roi_heads.box_pooler([crop_maps[f] for f in in_features], [whole_crop]))[0]
            one_minus_cosines.append(1 - cosine(f_rcnn, f_frcnn))
            logits = mimic.cls_score(f_rcnn)
            cross_entropies.append(torch.logsumexp(logits, 0) - logits[gt_class])
    return {
        "loss_mimic": LOSS_WEIGHT * getattr(torch.stack(one_minus_cosines), reduction)(),
        "loss_mimic_cls": CLS_LOSS_WEIGHT * torch.stack(cross_entropies).mean(),
    }


def distinct_images(count, size=(IMAGE_HEIGHT, IMAGE_WIDTH)):
    generator = torch.Generator().manual_seed(3)
    return [{"image": torch.rand(3, *size, generator=generator) * 255} for _ in range(count)]


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_mimic_losses_equal_the_paper_computed_by_hand(reduction):
    model = tiny_model(MIMIC_CONFIGS[0], WEIGHTED + ["MODEL.DCNV2.MIMIC.LOSS_REDUCTION", reduction])
    # Offsets away from zero in the deformable convs and pooling.
    perturb_zero_initialized_weights(model, ("conv2_offset.weight", "offset_predictor.predictor.weight"))
    background, ignored = NUM_CLASSES, -1
    boxes = [
        [[4.0, 6.0, 40.0, 50.0], [10.0, 10.0, 20.0, 20.0], [30.0, 10.0, 90.0, 60.0], [0.0, 0.0, 30.0, 30.0]],
        [[50.0, 20.0, 94.0, 62.0]],
    ]
    classes = [[0, background, 2, ignored], [1]]
    rois = training_rois(boxes, classes)
    images = model.preprocess_image(distinct_images(2))
    with torch.no_grad():
        features = model.backbone(images.tensor)
        with EventStorage():
            losses = model.mimic(images, features, rois, backbone=model.backbone, roi_heads=model.roi_heads)
        positives = [[(boxes[0][0], 0), (boxes[0][2], 2)], [(boxes[1][0], 1)]]  # all of them: NUM_POS_ROIS is 2
        expected = mimic_losses_by_hand(model, images, features, positives, reduction)
    for name in ("loss_mimic", "loss_mimic_cls"):
        torch.testing.assert_close(losses[name], expected[name], rtol=1e-5, atol=0, msg=name)


@pytest.mark.parametrize("config", [MIMIC_CONFIGS[0], MIMIC_CONFIGS[3]])
def test_detector_mimic_losses_equal_the_hand_computed_ones_on_its_sampled_rois(config):
    # Every positive RoI the ROI heads sample is mimicked, so the losses are
    # determined by those RoIs.
    model = tiny_model(config, WEIGHTED + ["MODEL.DCNV2.MIMIC.NUM_POS_ROIS", 1000])
    batch = training_batch()
    for item, image in zip(batch, distinct_images(2)):
        item["image"] = image["image"]
    sampled = {}
    model.mimic.register_forward_pre_hook(lambda module, args: sampled.update(rois=args[2]))
    with torch.no_grad(), EventStorage():
        losses = model(batch)
        images = model.preprocess_image(batch)
        features = model.backbone(images.tensor)
        positives = [
            [(box.tolist(), int(c)) for box, c in zip(r.proposal_boxes.tensor, r.gt_classes) if 0 <= c < NUM_CLASSES]
            for r in sampled["rois"]
        ]
        assert all(positives), "each image should have positive RoIs"
        expected = mimic_losses_by_hand(model, images, features, positives)
    for name in ("loss_mimic", "loss_mimic_cls"):
        torch.testing.assert_close(losses[name], expected[name], rtol=1e-5, atol=0, msg=name)


def test_background_rois_are_mimicked_and_classified_as_background():
    model = tiny_model(MIMIC_CONFIGS[0], WEIGHTED + ["MODEL.DCNV2.MIMIC.REGIONS", "background"])
    perturb_zero_initialized_weights(model, ("conv2_offset.weight", "offset_predictor.predictor.weight"))
    background, ignored = NUM_CLASSES, -1
    boxes = [[[4.0, 6.0, 40.0, 50.0], [10.0, 10.0, 20.0, 20.0], [0.0, 0.0, 30.0, 30.0]], [[50.0, 20.0, 94.0, 62.0]]]
    rois = training_rois(boxes, [[0, background, ignored], [background]])
    images = model.preprocess_image(distinct_images(2))
    with torch.no_grad():
        features = model.backbone(images.tensor)
        with EventStorage():
            losses = model.mimic(images, features, rois, backbone=model.backbone, roi_heads=model.roi_heads)
        expected = mimic_losses_by_hand(
            model, images, features, [[(boxes[0][1], background)], [(boxes[1][0], background)]]
        )
    for name in ("loss_mimic", "loss_mimic_cls"):
        torch.testing.assert_close(losses[name], expected[name], rtol=1e-5, atol=0, msg=name)


# BatchNorm everywhere in the backbone (a frozen stage would get FrozenBN).
BATCHNORM = ["MODEL.RESNETS.NORM", "BN", "MODEL.BACKBONE.FREEZE_AT", 0]


def batchnorm_state(model):
    return {
        name: (m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
        for name, m in model.backbone.named_modules()
        if isinstance(m, torch.nn.BatchNorm2d)
    }


@pytest.mark.parametrize("crop_bn", ["train", "frozen"])
def test_frozen_crop_batchnorm_normalizes_the_crops_with_the_running_statistics(crop_bn):
    model = tiny_model(MIMIC_CONFIGS[0], WEIGHTED + BATCHNORM + ["MODEL.DCNV2.MIMIC.CROP_BN", crop_bn])
    model.train()
    # Running statistics that differ from any batch's.
    generator = torch.Generator().manual_seed(2)
    for m in model.backbone.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=generator) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
    boxes = [[[4.0, 6.0, 40.0, 50.0], [30.0, 10.0, 90.0, 60.0]], [[50.0, 20.0, 94.0, 62.0]]]
    rois = training_rois(boxes, [[0, 2], [1]])
    images = model.preprocess_image(distinct_images(2))
    with torch.no_grad():
        model.backbone.eval()  # the images' features, without touching the statistics
        features = model.backbone(images.tensor)
        model.backbone.train()
        before = batchnorm_state(model)
        with EventStorage():
            losses = model.mimic(images, features, rois, backbone=model.backbone, roi_heads=model.roi_heads)
        after = batchnorm_state(model)
        assert model.backbone.training and all(m.training for m in model.backbone.modules())
        if crop_bn == "frozen":
            # Normalized as in inference, each crop's features are its own:
            # the crops one at a time by hand give the same losses.
            model.backbone.eval()
            positives = [[(boxes[0][0], 0), (boxes[0][1], 2)], [(boxes[1][0], 1)]]
            expected = mimic_losses_by_hand(model, images, features, positives)
            for name in ("loss_mimic", "loss_mimic_cls"):
                torch.testing.assert_close(losses[name], expected[name], rtol=1e-5, atol=0, msg=name)
    changed = [name for name in before if any(not torch.equal(b, a) for b, a in zip(before[name], after[name]))]
    if crop_bn == "frozen":
        assert before and not changed
    else:
        assert before and changed == list(before)  # the crops' batch updated every BatchNorm layer


def test_frozen_crop_batchnorm_still_trains_the_backbone_through_the_crops():
    model = tiny_model(MIMIC_CONFIGS[0], BATCHNORM + ["MODEL.DCNV2.MIMIC.CROP_BN", "frozen"])
    rois = training_rois([[[4.0, 6.0, 40.0, 50.0], [30.0, 10.0, 90.0, 60.0]]], [[0, 2]])
    losses = run_branch(model, rois)
    losses["loss_mimic"].backward()
    stem_norm = model.backbone.bottom_up.stem.conv1.norm
    assert isinstance(stem_norm, torch.nn.BatchNorm2d)
    assert stem_norm.weight.grad is not None and stem_norm.weight.grad.abs().sum() > 0
