"""The MODEL.DCNV2 keys and the shipped COCO configs."""

import pytest
import yaml
from detectron2.config import get_cfg
from helpers import CONFIG_DIR

import dcnv2_plugin
from dcnv2_plugin.config import load_config

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
    assert dcnv2.DEFORM_POOL == {"FC_DIM": 1024, "GAMMA": 0.1}
    assert dcnv2.STN == {"ENABLED": False, "STAGE": "res3", "HIDDEN_DIM": 256}
    assert dcnv2.MIMIC == {
        "ENABLED": False,
        "NUM_POS_ROIS": 32,
        "CROP_SIZE": 224,
        "LOSS_WEIGHT": 0.1,
        "CLS_LOSS_WEIGHT": 0.1,
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


@pytest.mark.parametrize(
    "path, name, mask_on", LEAF_CONFIGS, ids=[path.relative_to(CONFIG_DIR).as_posix() for path, _, _ in LEAF_CONFIGS]
)
def test_leaf_config_sets_the_ablation_row(path, name, mask_on):
    # Each _BASE_ chain stays inside configs/ and ends at the base config.
    chain = [path]
    while True:
        with open(chain[-1]) as f:
            parent = yaml.safe_load(f).get("_BASE_")
        if parent is None:
            break
        chain.append((chain[-1].parent / parent).resolve())
        assert CONFIG_DIR in chain[-1].parents
    assert chain[-1] == BASE_CONFIG

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
