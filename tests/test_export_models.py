"""Whole deformable models exported to ONNX and run in ONNX Runtime against
PyTorch: the ResNet-FPN backbones, and the demo's DCNv2 Faster and Mask
R-CNN through `ExportableRCNN`, on the demo's validation images.

The weights are random, with the geometry branches (zero at
initialization) drawn too, so that the deformable convs sample 1-3 pixels
away from the regular grid and the RoI bins move."""

import copy
import functools
import importlib.util

import numpy as np
import pytest
import torch
from helpers import CONFIG_DIR, ROOT, draw_geometry, onnx_session, record_max_abs_diff

pytest.importorskip("onnxscript", reason="needs the export extra (onnx, onnxscript, onnxruntime)")
pytest.importorskip("onnxruntime", reason="needs the export extra (onnx, onnxscript, onnxruntime)")
import onnx  # noqa: E402
from detectron2.modeling import build_backbone, build_model  # noqa: E402

from dcnv2_plugin.config import load_config  # noqa: E402
from dcnv2_plugin.data import DEFAULT_PARAMS, DEFAULT_SPLITS  # noqa: E402
from dcnv2_plugin.data.generate import draw_image  # noqa: E402
from dcnv2_plugin.export.detector import ExportableRCNN, compare_detections, export_detector_onnx, model_input  # noqa: E402
from dcnv2_plugin.export.onnx_export import export_onnx  # noqa: E402
from dcnv2_plugin.export.runtime import run  # noqa: E402

DEMO_DCNV2 = CONFIG_DIR / "demo" / "dcnv2.yaml"
COCO_DCNV2 = CONFIG_DIR / "COCO-Detection" / "faster_rcnn_R_50_FPN_mdconv_c3-c5_mdpool.yaml"
CPU = ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""]


def relative_diff(outputs, expected) -> float:
    """Max abs difference over max abs value, over all outputs."""
    return max(float(np.abs(o - e).max() / np.abs(e).max()) for o, e in zip(outputs, expected))


@pytest.mark.slow
@pytest.mark.parametrize(
    "config_file,size,conv_std",
    [(DEMO_DCNV2, (128, 128), 0.05), (COCO_DCNV2, (256, 320), 0.01)],
    ids=["demo", "coco_r50_mdconv_c3-c5"],
)
def test_deformable_backbone_runs_in_onnx_runtime(config_file, size, conv_std, record_property):
    torch.manual_seed(0)
    backbone = build_backbone(load_config(str(config_file), CPU)).eval()
    draw_geometry(backbone, conv_std)
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(1))
    program = export_onnx(backbone, (x,))
    assert sum(n.op_type == "DeformConv" for n in program.model_proto.graph.node) == 13  # res3-res5 of R-50
    with torch.no_grad():
        expected = [t.numpy() for t in backbone(x).values()]
    diff = relative_diff(run(onnx_session(program), x.numpy()), expected)
    record_max_abs_diff(record_property, f"backbone {config_file.stem} {size}, relative", diff)
    # Offsets of pixels make the samples sensitive to rounding through 13
    # deformable blocks; a wrong layout or geometry differs by O(1).
    assert diff < 1e-4


def demo_images(cfg, count: int):
    """The first validation images of the demo's dataset, as model inputs,
    and a crop of the last one, of another size."""
    rgb = [draw_image(DEFAULT_PARAMS, DEFAULT_SPLITS["val"], i)[0] for i in range(count)]
    images = [model_input(cfg, image[:, :, ::-1]) for image in rgb]
    return images + [images[-1][:, 8:104, 4:124].contiguous()]


@functools.lru_cache(maxsize=None)
def exported_demo_detector(mask_on: bool):
    """The demo's DCNv2 detector (random weights), its ExportableRCNN and
    its ONNX export (exported once per test session)."""
    cfg = load_config(str(DEMO_DCNV2), CPU + ["MODEL.MASK_ON", str(mask_on)])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    # Smaller offset weights than for the backbone alone: on the demo's
    # images this random network's features are large, and offsets of tens
    # of pixels would make its detections chaotic in float rounding.
    draw_geometry(model, 0.002)
    images = demo_images(cfg, 4)
    return model, images, ExportableRCNN(model), export_detector_onnx(model, images[0]).model_proto


@pytest.mark.slow
@pytest.mark.parametrize("mask_on", [False, True], ids=["faster_rcnn", "mask_rcnn"])
def test_dcnv2_detector_runs_in_onnx_runtime(mask_on, record_property):
    """On the demo's validation images (and on a crop of another size: the
    export takes any size), ONNX Runtime finds the detections PyTorch finds:
    the same count, each paired with one of the same class and an
    overlapping box (near-equal scores may come in another order), with
    boxes within 1e-2 pixel, scores within 1e-3 and mask probabilities
    within 1e-3."""
    model, images, exportable, onnx_model = exported_demo_detector(mask_on)
    assert {"DeformConv", "RoiAlign", "NonMaxSuppression"} <= {n.op_type for n in onnx_model.graph.node}
    session = onnx_session(onnx_model)
    worst = {"boxes": 0.0, "scores": 0.0, "masks": 0.0}
    for image in images:
        with torch.no_grad():
            expected = exportable(image)
            reference = model.inference([{"image": image}], do_postprocess=False)[0]
        # ExportableRCNN computes what detectron2's inference computes.
        torch.testing.assert_close(expected[0], reference.pred_boxes.tensor, rtol=0, atol=0)
        torch.testing.assert_close(expected[1], reference.scores, rtol=0, atol=0)
        torch.testing.assert_close(expected[2], reference.pred_classes, rtol=0, atol=0)
        if mask_on:
            torch.testing.assert_close(expected[3], reference.pred_masks, rtol=0, atol=0)
        outputs = run(session, image.numpy())
        assert len(outputs) == len(expected) == (4 if mask_on else 3)
        agreement = compare_detections([t.numpy() for t in expected], outputs)
        assert agreement["expected"] == agreement["actual"] == agreement["paired"] > 0, agreement
        for name in worst:
            worst[name] = max(worst[name], agreement.get(name, 0.0))
    for name in ("boxes", "scores", "masks") if mask_on else ("boxes", "scores"):
        record_max_abs_diff(record_property, f"demo DCNv2 {'Mask' if mask_on else 'Faster'} R-CNN {name}", worst[name])
    assert worst["boxes"] <= 1e-2 and worst["scores"] <= 1e-3 and worst["masks"] <= 1e-3, worst


@pytest.mark.slow
def test_exported_detector_runs_on_images_without_detections():
    """Exporting assumes some detections to trace detectron2's emptiness
    checks; the exported graph must still run when there are none."""
    model, images, _, onnx_model = exported_demo_detector(True)
    model = copy.deepcopy(model)
    name = "model.roi_heads.box_predictor.cls_score.weight"
    weight = model.roi_heads.box_predictor.cls_score.weight.detach().clone()
    weight[-1] = 10.0  # on the non-negative box features: every RoI is background
    onnx_model = copy.deepcopy(onnx_model)
    (initializer,) = [t for t in onnx_model.graph.initializer if t.name == name]
    initializer.CopyFrom(onnx.numpy_helper.from_array(weight.numpy(), name))
    outputs = run(onnx_session(onnx_model), images[0].numpy())
    with torch.no_grad():
        model.roi_heads.box_predictor.cls_score.weight.copy_(weight)
        expected = ExportableRCNN(model)(images[0])
    assert [o.shape for o in outputs] == [tuple(e.shape) for e in expected] == [(0, 4), (0,), (0,), (0, 1, 28, 28)]


@pytest.mark.slow
def test_export_tool_writes_checks_and_compares(tmp_path, capsys):
    """tools/export_onnx.py: the .onnx file (weights inside), onnx.checker's
    verdict, and a line per sample image with the agreement and latencies."""
    spec = importlib.util.spec_from_file_location("export_onnx", ROOT / "tools" / "export_onnx.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    checkpoint = tmp_path / "model.pth"
    model, *_ = exported_demo_detector(True)
    torch.save({"model": model.state_dict()}, checkpoint)
    output = tmp_path / "dcnv2.onnx"
    tool.main(
        ["--config-file", str(DEMO_DCNV2), "--output", str(output), "--num-images", "2", "--repeat", "1"]
        + ["--threads", str(torch.get_num_threads())]
        + ["MODEL.WEIGHTS", str(checkpoint)]
    )
    printed = capsys.readouterr().out
    assert output.is_file() and not (tmp_path / "dcnv2.onnx.data").exists()
    assert "onnx.checker: the model is valid" in printed
    rows = [line.split(" | ") for line in printed.splitlines() if line.startswith("| val ")]
    assert len(rows) == 2
    for row in rows:
        expected, actual, paired = (int(n) for n in row[2].split(" / "))
        assert expected == actual == paired > 0
