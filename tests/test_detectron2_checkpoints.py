"""detectron2's checkpoints load through its own DetectionCheckpointer: the
ImageNet-pretrained R-50 the configs name (a Caffe2 .pkl, matched by name
heuristics), and a deformable detector from detectron2's model zoo (a .pkl of
numpy arrays under detectron2's parameter names)."""

import pickle
import re

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model
from helpers import CONFIG_DIR

import dcnv2_plugin  # noqa: F401  (registers the components)
from dcnv2_plugin.config import load_config

CONFIG = CONFIG_DIR / "COCO-InstanceSegmentation" / "mask_rcnn_R_50_FPN_mdconv_c3-c5_mdpool.yaml"
# Narrow layers (the same names); the configs' FrozenBN, as with pretrained weights.
NARROW = [
    "MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "",
    "MODEL.RESNETS.STEM_OUT_CHANNELS", 16, "MODEL.RESNETS.RES2_OUT_CHANNELS", 64,
    "MODEL.RESNETS.WIDTH_PER_GROUP", 16, "MODEL.FPN.OUT_CHANNELS", 32,
    "MODEL.ROI_BOX_HEAD.FC_DIM", 64, "MODEL.ROI_MASK_HEAD.CONV_DIM", 32, "MODEL.DCNV2.DEFORM_POOL.FC_DIM", 32,
]  # fmt: skip


def build(*overrides):
    torch.manual_seed(0)
    return build_model(load_config(CONFIG, NARROW + list(overrides)))


def caffe2_name(name):
    """The name MSRA's ImageNet R-50.pkl gives a parameter of detectron2's
    ResNet (the inverse of detectron2's c2_model_loading), e.g.
    res3.0.conv2.norm.weight -> res3_0_branch2b_bn_s."""
    name = re.sub(r"^stem\.conv1\.norm\.", "res_conv1.bn.", name)
    name = re.sub(r"^stem\.conv1\.", "conv1.", name)
    for ours, theirs in (("shortcut", "branch1"), ("conv1", "branch2a"), ("conv2", "branch2b"), ("conv3", "branch2c")):
        name = re.sub(rf"^(res\d\.\d+)\.{ours}\.", rf"\1.{theirs}.", name)
    name = name.replace(".norm.", ".bn.").replace(".bn.weight", ".bn.s")
    return name.replace(".weight", ".w").replace(".bias", ".b").replace(".", "_")


def test_imagenet_pretrained_caffe2_pkl_fills_the_deformable_backbone(tmp_path):
    model = build()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    bottom_up = model.backbone.bottom_up
    # As in MSRA's file: convs, and BN folded into a scale and a bias (FrozenBN).
    loaded = {
        name: tensor
        for name, tensor in bottom_up.state_dict().items()
        if "conv2_offset" not in name and "running_" not in name
    }
    generator = torch.Generator().manual_seed(1)
    blobs = {caffe2_name(name): torch.randn(t.shape, generator=generator).numpy() for name, t in loaded.items()}
    assert "res3_0_branch2b_w" in blobs and "res_conv1_bn_s" in blobs and "res2_0_branch1_bn_b" in blobs
    blobs["fc1000_w"], blobs["fc1000_b"] = np.zeros((1000, 2048), np.float32), np.zeros(1000, np.float32)
    path = tmp_path / "R-50.pkl"
    path.write_bytes(pickle.dumps({"blobs": blobs}))

    DetectionCheckpointer(model).load(str(path))

    after = model.state_dict()
    for name in loaded:
        assert np.array_equal(after[f"backbone.bottom_up.{name}"].numpy(), blobs[caffe2_name(name)]), name
    # The offset convs keep their zero initialization (a deformable layer
    # starts as the regular one); FPN and heads are as built.
    offset_convs = [name for name in after if "conv2_offset" in name]
    assert offset_convs and not any(after[name].any() for name in offset_convs)
    for name, tensor in after.items():
        if not name.startswith("backbone.bottom_up."):
            assert torch.equal(tensor, before[name]), name


def test_detectron2_model_zoo_pkl_of_a_deformable_detector_loads_key_for_key(tmp_path):
    # detectron2's own detector with its deformable ResNet (constructs without its compiled ops).
    theirs = build(
        "MODEL.BACKBONE.NAME", "build_resnet_fpn_backbone",
        "MODEL.ROI_HEADS.NAME", "StandardROIHeads",
        "MODEL.ROI_BOX_HEAD.POOLER_TYPE", "ROIAlignV2",
    )  # fmt: skip
    generator = torch.Generator().manual_seed(2)
    model = {name: torch.randn(t.shape, generator=generator).numpy() for name, t in theirs.state_dict().items()}
    path = tmp_path / "model_final.pkl"
    path.write_bytes(pickle.dumps({"model": model, "__author__": "Detectron2 Model Zoo"}))

    ours = build("MODEL.ROI_BOX_HEAD.POOLER_TYPE", "ROIAlignV2")
    assert ours.state_dict().keys() == model.keys()
    DetectionCheckpointer(ours).load(str(path))
    for name, tensor in ours.state_dict().items():
        assert np.array_equal(tensor.numpy(), model[name]), name
