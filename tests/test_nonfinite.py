"""A non-finite loss stops training with a message that names the losses and
the first geometry layer (offsets, modulation, STN) whose output went
non-finite, and says whether its input or its parameters already were; a
geometry layer whose output goes non-finite stops training even where the
loss stays finite."""

import pytest
import torch
from detectron2.data.datasets import register_coco_instances
from helpers import CONFIG_DIR, tiny_training_opts, write_tiny_coco

from dcnv2_plugin.engine import Trainer, parse_args, setup

CONFIG = CONFIG_DIR / "COCO-InstanceSegmentation" / "mask_rcnn_R_50_FPN_mdconv_c3-c5_mdpool.yaml"


@pytest.fixture(scope="module")
def tiny_coco(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny_coco_nonfinite")
    name = f"dcnv2_tiny_coco_{directory.name}"
    register_coco_instances(name, {}, str(write_tiny_coco(directory)), str(directory))
    return name


def failing_step_message(tiny_coco, output_dir, break_model) -> str:
    opts = tiny_training_opts(tiny_coco, output_dir) + ["SOLVER.MAX_ITER", "1", "DATASETS.TEST", "()"]
    trainer = Trainer(setup(parse_args(["--config-file", str(CONFIG), *opts])))
    trainer.resume_or_load(resume=False)
    with torch.no_grad():
        break_model(trainer.model)
    with pytest.raises(FloatingPointError) as error:
        trainer.train()
    return str(error.value)


def test_a_geometry_layer_that_overflows_is_named(tiny_coco, tmp_path):
    def overflow_the_roi_offset_branch(model):
        # Finite weights whose products overflow: the hidden layer reaches
        # inf, and the zero-initialized output fc makes 0 * inf = NaN.
        model.roi_heads.box_pooler.offset_predictor.fc2.weight.mul_(1e38)

    message = failing_step_message(tiny_coco, tmp_path, overflow_the_roi_offset_branch)
    assert "Loss became infinite or NaN at iteration=0" in message
    assert "Non-finite loss(es) in this process: loss_cls, loss_box_reg" in message
    assert (
        "The first geometry layer with a non-finite output in this step: roi_heads.box_pooler.offset_predictor "
        "(its input and parameters were finite: the values broke in this layer)" in message
    )


def test_a_geometry_layer_that_breaks_while_the_loss_stays_finite_stops_training(tiny_coco, tmp_path):
    def break_an_offset_conv(model):
        # NaN offsets and modulation: the sampling reads zero there, so the loss stays finite.
        model.backbone.bottom_up.res4[1].conv2_offset.weight.fill_(float("nan"))

    message = failing_step_message(tiny_coco, tmp_path, break_an_offset_conv)
    assert "A geometry layer's output became infinite or NaN at iteration=0" in message
    assert (
        "backbone.bottom_up.res4.1.conv2_offset (its parameters are non-finite: an earlier update broke them)"
        in message
    )


def test_values_broken_before_the_geometry_layers_are_told_apart(tiny_coco, tmp_path):
    def break_the_stem(model):
        model.backbone.bottom_up.stem.conv1.weight.fill_(float("nan"))

    message = failing_step_message(tiny_coco, tmp_path, break_the_stem)
    assert (
        "backbone.bottom_up.res3.0.conv2_offset (its input was already non-finite, so the values broke before it)"
        in message
    )


def test_a_loss_broken_outside_the_geometry_layers_says_so(tiny_coco, tmp_path):
    def break_the_classifier(model):
        model.roi_heads.box_predictor.cls_score.weight.fill_(float("inf"))

    message = failing_step_message(tiny_coco, tmp_path, break_the_classifier)
    assert "Non-finite loss(es) in this process: loss_cls." in message
    assert "Every geometry layer (offsets, modulation, STN) had a finite output in this step." in message
