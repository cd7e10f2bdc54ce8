"""The MODEL.DCNV2 keys and the shipped COCO configs."""

import pytest
import yaml
from detectron2.config import get_cfg
from helpers import CONFIG_DIR

import dcnv2_plugin
from dcnv2_plugin.config import load_config
from dcnv2_plugin.modeling import check_config

BASE_CONFIG = CONFIG_DIR / "Base-RCNN-FPN.yaml"

# The paper's ablation rows: (DEFORM_ON_PER_STAGE, DEFORM_MODULATED, box POOLER_TYPE).
ABLATION_SETTINGS = {
    "regular": ([False, False, False, False], False, "ROIAlignV2"),
    "dconv_c5_dpool": ([False, False, False, True], False, "DeformRoIPool"),
    "dconv_c3-c5": ([False, True, True, True], False, "ROIAlignV2"),
    "dconv_c3-c5_dpool": ([False, True, True, True], False, "DeformRoIPool"),
    "mdconv_c3-c5_mdpool": ([False, True, True, True], True, "ModulatedDeformRoIPool"),
}
LEAF_CONFIGS = [
    (CONFIG_DIR / "COCO-Detection" / f"faster_rcnn_R_50_FPN_{name}.yaml", name, False) for name in ABLATION_SETTINGS
] + [
    (CONFIG_DIR / "COCO-InstanceSegmentation" / f"mask_rcnn_R_50_FPN_{name}.yaml", name, True)
    for name in ABLATION_SETTINGS
]


def test_add_dcnv2_config_adds_only_the_dcnv2_subtree():
    cfg = get_cfg()
    before = cfg.dump()
    dcnv2_plugin.add_dcnv2_config(cfg)
    dcnv2 = cfg.MODEL.pop("DCNV2")
    assert cfg.dump() == before

    assert dcnv2.OFFSET_LR_FACTOR == 0.1
    assert dcnv2.DEFORM_POOL == {"FC_DIM": 1024, "GAMMA": 0.1, "BRANCH_CHANNELS": 0}
    assert dcnv2.STN == {"ENABLED": False, "STAGE": "res3", "HIDDEN_DIM": 256}
    assert dcnv2.MIMIC == {
        "ENABLED": False,
        "NUM_POS_ROIS": 32,
        "CROP_SIZE": 224,
        "LOSS_WEIGHT": 0.1,
        "CLS_LOSS_WEIGHT": 0.1,
        "REGIONS": "foreground",
        "CROP_BN": "train",
        "LOSS_REDUCTION": "mean",
    }


def test_base_config_is_self_contained():
    with open(BASE_CONFIG) as f:
        base = yaml.safe_load(f)
    assert "_BASE_" not in base
    cfg = load_config(BASE_CONFIG)
    assert cfg.MODEL.BACKBONE.NAME == "build_dcnv2_resnet_fpn_backbone"
    assert cfg.MODEL.ROI_HEADS.NAME == "DCNv2ROIHeads"
    assert cfg.DATASETS.TRAIN == ("coco_2017_train",)
    assert cfg.DATASETS.TEST == ("coco_2017_val",)
    assert cfg.INPUT.MIN_SIZE_TEST == 1000


def base_chain(path):
    """`path` and the configs it inherits from, in order; each stays inside configs/."""
    chain = [path]
    while True:
        with open(chain[-1]) as f:
            parent = yaml.safe_load(f).get("_BASE_")
        if parent is None:
            return chain
        chain.append((chain[-1].parent / parent).resolve())
        assert CONFIG_DIR in chain[-1].parents


@pytest.mark.parametrize(
    "path, name, mask_on", LEAF_CONFIGS, ids=[path.relative_to(CONFIG_DIR).as_posix() for path, _, _ in LEAF_CONFIGS]
)
def test_leaf_config_sets_the_ablation_row(path, name, mask_on):
    assert base_chain(path)[-1] == BASE_CONFIG

    cfg = load_config(path)
    deform_on, modulated, pooler_type = ABLATION_SETTINGS[name]
    assert cfg.MODEL.RESNETS.DEPTH == 50
    assert list(cfg.MODEL.RESNETS.DEFORM_ON_PER_STAGE) == deform_on
    assert cfg.MODEL.RESNETS.DEFORM_MODULATED == modulated
    assert cfg.MODEL.ROI_BOX_HEAD.POOLER_TYPE == pooler_type
    assert cfg.MODEL.MASK_ON == mask_on
    assert cfg.DATASETS.TRAIN == ("coco_2017_train",)
    assert cfg.DATASETS.TEST == ("coco_2017_val",)


def test_config_without_dcnv2_keys_is_a_clear_error():
    from detectron2.modeling import build_backbone

    cfg = get_cfg()
    cfg.MODEL.BACKBONE.NAME = "build_dcnv2_resnet_backbone"
    with pytest.raises(KeyError, match="add_dcnv2_config"):
        build_backbone(cfg)


C4_BASE_CONFIG = CONFIG_DIR / "Base-RCNN-C4.yaml"
NO_DCONV = [False, False, False, False]
DCONV_C5 = [False, False, False, True]
DCONV_C3_C5 = [False, True, True, True]
# The C4, Cascade and keypoint configs: (path, base, ROI heads, DEFORM_ON_PER_STAGE,
# DEFORM_MODULATED, POOLER_TYPE of each head that is on).
LAYOUT_CONFIGS = [
    (
        "COCO-Detection/faster_rcnn_R_50_C4_regular.yaml",
        C4_BASE_CONFIG,
        "DCNv2Res5ROIHeads",
        NO_DCONV,
        False,
        {"ROI_BOX_HEAD": "ROIAlignV2"},
    ),
    (
        "COCO-Detection/faster_rcnn_R_50_C4_dconv_c5_dpool.yaml",
        C4_BASE_CONFIG,
        "DCNv2Res5ROIHeads",
        DCONV_C5,
        False,
        {"ROI_BOX_HEAD": "DeformRoIPool"},
    ),
    (
        "COCO-InstanceSegmentation/cascade_mask_rcnn_R_50_FPN_regular.yaml",
        BASE_CONFIG,
        "DCNv2CascadeROIHeads",
        NO_DCONV,
        False,
        {"ROI_BOX_HEAD": "ROIAlignV2", "ROI_MASK_HEAD": "ROIAlignV2"},
    ),
    (
        "COCO-InstanceSegmentation/cascade_mask_rcnn_R_50_FPN_mdconv_c3-c5_mdpool.yaml",
        BASE_CONFIG,
        "DCNv2CascadeROIHeads",
        DCONV_C3_C5,
        True,
        {"ROI_BOX_HEAD": "ModulatedDeformRoIPool", "ROI_MASK_HEAD": "ROIAlignV2"},
    ),
    (
        "COCO-Keypoints/keypoint_rcnn_R_50_FPN_regular.yaml",
        BASE_CONFIG,
        "DCNv2ROIHeads",
        NO_DCONV,
        False,
        {"ROI_BOX_HEAD": "ROIAlignV2", "ROI_KEYPOINT_HEAD": "ROIAlignV2"},
    ),
    (
        "COCO-Keypoints/keypoint_rcnn_R_50_FPN_mdconv_c3-c5_mdpool.yaml",
        BASE_CONFIG,
        "DCNv2ROIHeads",
        DCONV_C3_C5,
        True,
        {"ROI_BOX_HEAD": "ModulatedDeformRoIPool", "ROI_KEYPOINT_HEAD": "ModulatedDeformRoIPool"},
    ),
]


def test_c4_base_config_is_self_contained():
    with open(C4_BASE_CONFIG) as f:
        assert "_BASE_" not in yaml.safe_load(f)
    cfg = load_config(C4_BASE_CONFIG)
    assert cfg.MODEL.BACKBONE.NAME == "build_dcnv2_resnet_backbone"
    assert cfg.MODEL.ROI_HEADS.NAME == "DCNv2Res5ROIHeads"
    assert list(cfg.MODEL.RESNETS.OUT_FEATURES) == list(cfg.MODEL.RPN.IN_FEATURES) == ["res4"]
    assert list(cfg.MODEL.ROI_HEADS.IN_FEATURES) == ["res4"]
    assert cfg.MODEL.DCNV2.DEFORM_POOL.BRANCH_CHANNELS == 64
    assert cfg.INPUT.MIN_SIZE_TEST == 1000


@pytest.mark.parametrize(
    "name, base, roi_heads, deform_on, modulated, pooler_types", LAYOUT_CONFIGS, ids=[c[0] for c in LAYOUT_CONFIGS]
)
def test_layout_config_sets_its_heads_and_row(name, base, roi_heads, deform_on, modulated, pooler_types):
    assert base_chain(CONFIG_DIR / name)[-1] == base
    cfg = load_config(name)
    assert cfg.MODEL.ROI_HEADS.NAME == roi_heads
    assert list(cfg.MODEL.RESNETS.DEFORM_ON_PER_STAGE) == deform_on
    assert cfg.MODEL.RESNETS.DEFORM_MODULATED == modulated
    assert cfg.MODEL.MASK_ON == ("ROI_MASK_HEAD" in pooler_types)
    assert cfg.MODEL.KEYPOINT_ON == ("ROI_KEYPOINT_HEAD" in pooler_types)
    assert {head: cfg.MODEL[head].POOLER_TYPE for head in pooler_types} == pooler_types
    if roi_heads == "DCNv2CascadeROIHeads":
        assert cfg.MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG
    prefix = "keypoints_" if cfg.MODEL.KEYPOINT_ON else ""
    assert cfg.DATASETS.TRAIN == (f"{prefix}coco_2017_train",)
    assert cfg.DATASETS.TEST == (f"{prefix}coco_2017_val",)
    check_config(cfg)
