"""train_net.py end to end on a tiny COCO-format dataset written by the test."""

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
from detectron2.data.datasets import register_coco_instances
from detectron2.engine import default_argument_parser
from PIL import Image

from dcnv2_plugin._detectron2_compat import has_compiled_ops

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "COCO-InstanceSegmentation" / "mask_rcnn_R_50_FPN_mdconv_c3-c5_mdpool.yaml"
IMAGE_HEIGHT, IMAGE_WIDTH = 64, 96


def load_train_net():
    spec = importlib.util.spec_from_file_location("train_net", ROOT / "train_net.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_tiny_coco(directory: Path, num_images: int = 3) -> Path:
    """Noise images with one or two filled rectangles each, as COCO json with
    boxes and polygon masks, in two categories."""
    rng = np.random.default_rng(0)
    images, annotations = [], []
    for image_id in range(1, num_images + 1):
        pixels = rng.integers(0, 80, size=(IMAGE_HEIGHT, IMAGE_WIDTH, 3), dtype=np.uint8)
        for category_id in range(1, 1 + (image_id % 2) + 1):
            x, y = int(rng.integers(0, 40)), int(rng.integers(0, 20))
            w, h = int(rng.integers(20, 50)), int(rng.integers(16, 40))
            pixels[y : y + h, x : x + w] = 120 * category_id
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category_id,
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                    "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]],
                }
            )
        file_name = f"{image_id}.png"
        Image.fromarray(pixels).save(directory / file_name)
        images.append({"id": image_id, "file_name": file_name, "height": IMAGE_HEIGHT, "width": IMAGE_WIDTH})
    categories = [{"id": 1, "name": "dark"}, {"id": 2, "name": "bright"}]
    json_file = directory / "instances.json"
    json_file.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return json_file


@pytest.fixture(scope="module")
def tiny_coco(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny_coco")
    json_file = write_tiny_coco(directory)
    name = f"dcnv2_tiny_coco_{directory.name}"
    register_coco_instances(name, {}, str(json_file), str(directory))
    return name


def command_line(tiny_coco, output_dir, *extra):
    return [
        "--config-file",
        str(CONFIG),
        *extra,
        "MODEL.DEVICE",
        "cpu",
        "MODEL.WEIGHTS",
        "",
        # From scratch: BN (FrozenBN, the default for ImageNet-initialized
        # training, diverges), narrow layers and few RoIs for CPU speed.
        "MODEL.RESNETS.NORM",
        "BN",
        "MODEL.RESNETS.STEM_OUT_CHANNELS",
        "16",
        "MODEL.RESNETS.RES2_OUT_CHANNELS",
        "64",
        "MODEL.RESNETS.WIDTH_PER_GROUP",
        "16",
        "MODEL.FPN.OUT_CHANNELS",
        "32",
        "MODEL.ROI_MASK_HEAD.CONV_DIM",
        "32",
        "MODEL.ROI_BOX_HEAD.FC_DIM",
        "64",
        "MODEL.DCNV2.DEFORM_POOL.FC_DIM",
        "32",
        "MODEL.ROI_HEADS.NUM_CLASSES",
        "2",
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE",
        "16",
        "MODEL.RPN.BATCH_SIZE_PER_IMAGE",
        "64",
        "MODEL.RPN.POST_NMS_TOPK_TRAIN",
        "32",
        "MODEL.RPN.POST_NMS_TOPK_TEST",
        "32",
        # An untrained model's scores are low; keep its detections so that
        # COCO evaluation has predictions to score.
        "MODEL.ROI_HEADS.SCORE_THRESH_TEST",
        "0.0",
        "DATASETS.TRAIN",
        f"('{tiny_coco}',)",
        "DATASETS.TEST",
        f"('{tiny_coco}',)",
        "INPUT.MIN_SIZE_TRAIN",
        f"({IMAGE_HEIGHT},)",
        "INPUT.MAX_SIZE_TRAIN",
        str(IMAGE_WIDTH),
        "INPUT.MIN_SIZE_TEST",
        str(IMAGE_HEIGHT),
        "INPUT.MAX_SIZE_TEST",
        str(IMAGE_WIDTH),
        "DATALOADER.NUM_WORKERS",
        "0",
        "SOLVER.IMS_PER_BATCH",
        "2",
        "SOLVER.BASE_LR",
        "0.001",
        "SOLVER.MAX_ITER",
        "3",
        "SOLVER.STEPS",
        "()",
        "SOLVER.CHECKPOINT_PERIOD",
        "1000",
        "OUTPUT_DIR",
        str(output_dir),
    ]


def assert_coco_results(results):
    assert set(results) == {"bbox", "segm"}
    for task in ("bbox", "segm"):
        ap = results[task]["AP"]
        assert math.isfinite(ap) and 0.0 <= ap <= 100.0


def test_train_then_evaluate_only(tiny_coco, tmp_path):
    train_net = load_train_net()
    output_dir = tmp_path / "output"
    parser = default_argument_parser()

    train_net.main(parser.parse_args(command_line(tiny_coco, output_dir)))
    assert (output_dir / "model_final.pth").is_file()
    # detectron2's trainer evaluates after the last iteration.
    assert (output_dir / "inference" / "coco_instances_results.json").is_file()
    metrics = [json.loads(line) for line in (output_dir / "metrics.json").read_text().splitlines()]
    losses = [m["total_loss"] for m in metrics if "total_loss" in m]
    assert losses and all(math.isfinite(loss) for loss in losses)

    eval_dir = output_dir / "eval"
    args = parser.parse_args(
        command_line(tiny_coco, eval_dir, "--eval-only") + ["MODEL.WEIGHTS", str(output_dir / "model_final.pth")]
    )
    assert_coco_results(train_net.main(args))
    implementation = "detectron2's fast implementation" if has_compiled_ops() else "pycocotools"
    assert f"COCO evaluation with {implementation}" in (eval_dir / "log.txt").read_text()


def test_setup_adds_the_dcnv2_keys_and_applies_the_overrides(tiny_coco, tmp_path):
    train_net = load_train_net()
    args = default_argument_parser().parse_args(
        command_line(tiny_coco, tmp_path) + ["MODEL.DCNV2.OFFSET_LR_FACTOR", "0.5"]
    )
    cfg = train_net.setup(args)
    assert cfg.is_frozen()
    assert cfg.MODEL.DCNV2.OFFSET_LR_FACTOR == 0.5
    assert cfg.MODEL.ROI_BOX_HEAD.POOLER_TYPE == "ModulatedDeformRoIPool"
    assert (tmp_path / "config.yaml").is_file()  # written by detectron2's default_setup

    model = train_net.Trainer.build_model(cfg)
    optimizer = train_net.Trainer.build_optimizer(cfg, model)
    offset_params = {id(p) for name, p in model.named_parameters() if "conv2_offset" in name}
    offset_lrs = {g["lr"] for g in optimizer.param_groups if any(id(p) in offset_params for p in g["params"])}
    assert offset_lrs == {cfg.SOLVER.BASE_LR * 0.5}
