"""Config mistakes that detectron2 would ignore or report as someone else's
error, through train_net's `setup` and the trainer's loading of weights."""

import pytest
import torch
from detectron2.data.datasets import register_coco_instances
from helpers import CONFIG_DIR, tiny_training_opts, write_tiny_coco

from dcnv2_plugin.engine import CheckpointError, Trainer, VerifiedCheckpointer, parse_args, setup

DCNV2_CONFIG = CONFIG_DIR / "COCO-InstanceSegmentation" / "mask_rcnn_R_50_FPN_mdconv_c3-c5_mdpool.yaml"
REGULAR_CONFIG = CONFIG_DIR / "COCO-Detection" / "faster_rcnn_R_50_FPN_regular.yaml"


@pytest.fixture(scope="module")
def tiny_coco(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny_coco_checks")
    name = f"dcnv2_tiny_coco_{directory.name}"
    register_coco_instances(name, {}, str(write_tiny_coco(directory)), str(directory))
    return name


def tiny_cfg(tiny_coco, output_dir, config=DCNV2_CONFIG, *overrides):
    opts = tiny_training_opts(tiny_coco, output_dir) + list(overrides)
    return setup(parse_args(["--config-file", str(config), *opts]))


def test_mimicking_without_mimic_rcnn_is_refused(tiny_coco, tmp_path):
    with pytest.raises(ValueError, match="set MODEL.META_ARCHITECTURE to 'MimicRCNN'"):
        tiny_cfg(
            tiny_coco,
            tmp_path,
            REGULAR_CONFIG,
            "MODEL.META_ARCHITECTURE",
            "GeneralizedRCNN",
            "MODEL.ROI_HEADS.NAME",
            "StandardROIHeads",
            "MODEL.DCNV2.MIMIC.ENABLED",
            "True",
        )


def test_freezing_a_deformable_stage_warns_in_the_log(tiny_coco, tmp_path):
    tiny_cfg(tiny_coco, tmp_path, DCNV2_CONFIG, "MODEL.BACKBONE.FREEZE_AT", "3")
    log = (tmp_path / "log.txt").read_text()
    assert "MODEL.BACKBONE.FREEZE_AT=3 freezes the deformable stage(s) res3" in log
    assert "Set MODEL.BACKBONE.FREEZE_AT below 3" in log


def test_frozen_offsets_at_their_zero_start_are_refused(tiny_coco, tmp_path):
    trainer = Trainer(tiny_cfg(tiny_coco, tmp_path, DCNV2_CONFIG, "MODEL.BACKBONE.FREEZE_AT", "3"))
    with pytest.raises(ValueError, match=r"at their zero initialization \(backbone.bottom_up.res3.0.conv2_offset"):
        trainer.resume_or_load(resume=False)


def test_frozen_offsets_loaded_with_trained_values_are_accepted(tiny_coco, tmp_path):
    model = Trainer.build_model(tiny_cfg(tiny_coco, tmp_path / "pretrained"))
    with torch.no_grad():
        for block in model.backbone.bottom_up.res3:
            block.conv2_offset.weight.normal_(std=1e-3)
    VerifiedCheckpointer(model, save_dir=str(tmp_path)).save("pretrained")

    weights = str(tmp_path / "pretrained.pth")
    cfg = tiny_cfg(tiny_coco, tmp_path / "run", DCNV2_CONFIG, "MODEL.BACKBONE.FREEZE_AT", "3", "MODEL.WEIGHTS", weights)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    loaded = trainer.model.backbone.bottom_up.res3[0].conv2_offset.weight
    assert not loaded.requires_grad
    assert torch.equal(loaded, model.backbone.bottom_up.res3[0].conv2_offset.weight)


def test_weights_with_another_offset_group_count_are_refused(tiny_coco, tmp_path):
    model = Trainer.build_model(tiny_cfg(tiny_coco, tmp_path / "groups1"))
    VerifiedCheckpointer(model, save_dir=str(tmp_path)).save("groups1")

    weights = str(tmp_path / "groups1.pth")
    cfg = tiny_cfg(
        tiny_coco, tmp_path / "run", DCNV2_CONFIG, "MODEL.RESNETS.DEFORM_NUM_GROUPS", "2", "MODEL.WEIGHTS", weights
    )
    trainer = Trainer(cfg)
    with pytest.raises(CheckpointError) as error:
        trainer.resume_or_load(resume=False)
    message = str(error.value)
    assert weights in message
    assert "backbone.bottom_up.res3.0.conv2_offset.weight: (27, 32, 3, 3) in the checkpoint, (54, 32, 3, 3)" in message
    assert "and 22 more" in message  # 13 offset convs, weight and bias
