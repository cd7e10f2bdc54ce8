"""train_net.py end to end on a tiny COCO-format dataset written by the test."""

import math

import pytest
from detectron2.data.datasets import register_coco_instances
from helpers import CONFIG_DIR, read_metrics, tiny_training_opts, write_tiny_coco

from dcnv2_plugin._detectron2_compat import has_compiled_ops
from dcnv2_plugin.engine import Trainer, main, parse_args, setup

CONFIG = CONFIG_DIR / "COCO-InstanceSegmentation" / "mask_rcnn_R_50_FPN_mdconv_c3-c5_mdpool.yaml"


@pytest.fixture(scope="module")
def tiny_coco(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny_coco")
    json_file = write_tiny_coco(directory)
    name = f"dcnv2_tiny_coco_{directory.name}"
    register_coco_instances(name, {}, str(json_file), str(directory))
    return name


def command_line(tiny_coco, output_dir, *extra):
    return ["--config-file", str(CONFIG), *extra, *tiny_training_opts(tiny_coco, output_dir)]


def assert_coco_results(results):
    assert set(results) == {"bbox", "segm"}
    for task in ("bbox", "segm"):
        ap = results[task]["AP"]
        assert math.isfinite(ap) and 0.0 <= ap <= 100.0


def test_train_then_evaluate_only(tiny_coco, tmp_path):
    output_dir = tmp_path / "output"
    main(parse_args(command_line(tiny_coco, output_dir)))
    assert (output_dir / "model_final.pth").is_file()
    # detectron2's trainer evaluates after the last iteration.
    assert (output_dir / "inference" / "coco_instances_results.json").is_file()
    losses = [m["total_loss"] for m in read_metrics(output_dir) if "total_loss" in m]
    assert losses and all(math.isfinite(loss) for loss in losses)

    eval_dir = output_dir / "eval"
    args = parse_args(
        command_line(tiny_coco, eval_dir, "--eval-only") + ["MODEL.WEIGHTS", str(output_dir / "model_final.pth")]
    )
    assert_coco_results(main(args))
    implementation = "detectron2's fast implementation" if has_compiled_ops() else "pycocotools"
    assert f"COCO evaluation with {implementation}" in (eval_dir / "log.txt").read_text()


def test_setup_adds_the_dcnv2_keys_and_applies_the_overrides(tiny_coco, tmp_path):
    args = parse_args(command_line(tiny_coco, tmp_path) + ["MODEL.DCNV2.OFFSET_LR_FACTOR", "0.5"])
    cfg = setup(args)
    assert cfg.is_frozen()
    assert cfg.MODEL.DCNV2.OFFSET_LR_FACTOR == 0.5
    assert cfg.MODEL.ROI_BOX_HEAD.POOLER_TYPE == "ModulatedDeformRoIPool"
    assert (tmp_path / "config.yaml").is_file()  # written by detectron2's default_setup

    model = Trainer.build_model(cfg)
    optimizer = Trainer.build_optimizer(cfg, model)
    offset_params = {id(p) for name, p in model.named_parameters() if "conv2_offset" in name}
    offset_lrs = {g["lr"] for g in optimizer.param_groups if any(id(p) in offset_params for p in g["params"])}
    assert offset_lrs == {cfg.SOLVER.BASE_LR * 0.5}
