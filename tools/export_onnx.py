#!/usr/bin/env python
"""Export a detector to ONNX, check it, and compare it with PyTorch.

Writes the detector of a config (Faster or Mask R-CNN, deformable or not)
as an .onnx file that takes one image of any size, checks it with
onnx.checker, runs it in ONNX Runtime on the CPU on sample images and
prints, per image, how its detections agree with PyTorch's and the latency
of both (each the fastest of --repeat runs).

    python tools/export_onnx.py --config-file configs/demo/dcnv2.yaml \\
        MODEL.WEIGHTS output/demo/runs/dcnv2_seed0/model_final.pth
    python tools/export_onnx.py --config-file COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_mdconv_c3-c5_mdpool.yaml \\
        --output mask_rcnn_dcnv2.onnx --input a.jpg b.jpg MODEL.WEIGHTS model_final.pth

The model's input is the image in the config's INPUT.FORMAT, 0-255,
[3, H, W], already resized to the test size (detectron2's DefaultPredictor
does that); its outputs are boxes, scores, classes (and masks: 28x28
probabilities of the detected class) in that image's coordinates. Without
--input the sample images are the first validation images of the embedded
dataset.
"""

import argparse
import time
from pathlib import Path

import cv2
import onnx
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model

from dcnv2_plugin.config import load_config
from dcnv2_plugin.data import DEFAULT_PARAMS, DEFAULT_SPLITS
from dcnv2_plugin.data.generate import draw_image
from dcnv2_plugin.export.detector import ExportableRCNN, compare_detections, export_detector_onnx, model_input
from dcnv2_plugin.export.runtime import inference_session, run


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, help="a config file or a packaged config's name")
    parser.add_argument("--output", type=Path, help="the .onnx file (default: output/<config name>.onnx)")
    parser.add_argument("--input", nargs="+", type=Path, help="sample image files (default: the demo's images)")
    parser.add_argument("--num-images", type=int, default=4, help="demo validation images, without --input")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of PyTorch and ONNX Runtime")
    parser.add_argument("--repeat", type=int, default=3, help="runs per image and runtime; the fastest is shown")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, KEY VALUE pairs (MODEL.WEIGHTS)")
    return parser.parse_args(argv)


def load_model(config_file: str, opts):
    cfg = load_config(config_file, list(opts) + ["MODEL.DEVICE", "cpu"])
    cfg.freeze()
    model = build_model(cfg).eval()
    if cfg.MODEL.WEIGHTS:
        DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    else:
        print("MODEL.WEIGHTS is empty: exporting the model with random weights")
    return cfg, model


def sample_images(cfg, args):
    """The model inputs of the sample images, with their names."""
    if args.input:
        bgr = []
        for path in args.input:
            image = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if image is None:
                raise FileNotFoundError(f"--input: cannot read an image from {path}")
            bgr.append((path.name, image))
    else:
        split = DEFAULT_SPLITS["val"]
        bgr = [(f"val {i}", draw_image(DEFAULT_PARAMS, split, i)[0][:, :, ::-1]) for i in range(args.num_images)]
    return [(name, model_input(cfg, image)) for name, image in bgr]


def fastest(fn, repeat: int):
    """(result, seconds of the fastest of `repeat` calls)."""
    best, result = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return result, best


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg, model = load_model(args.config_file, args.opts)
    images = sample_images(cfg, args)
    output = args.output or Path("output") / (Path(args.config_file).stem + ".onnx")
    output.parent.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    export_detector_onnx(model, images[0][1], str(output), external_data=False)
    print(f"wrote {output} ({output.stat().st_size / 2**20:.1f} MiB) in {time.perf_counter() - start:.0f} s")
    onnx.checker.check_model(str(output), full_check=True)
    print("onnx.checker: the model is valid")

    exportable = ExportableRCNN(model)
    session = inference_session(str(output), threads=args.threads)
    print(f"\nPyTorch (eager) against ONNX Runtime (CPU), {args.threads} thread(s):")
    print(
        "| image | size | detections (PyTorch / ONNX Runtime / paired) | max abs diff: boxes, scores"
        f"{', masks' if exportable.mask_on else ''} | PyTorch ms | ONNX Runtime ms |"
    )
    print("|---|---|---|---|---:|---:|")
    for name, image in images:
        with torch.no_grad():
            expected, eager_s = fastest(lambda: exportable(image), args.repeat)
        outputs, onnx_s = fastest(lambda: run(session, image.numpy()), args.repeat)
        agreement = compare_detections([t.numpy() for t in expected], outputs)
        diffs = ", ".join(f"{agreement[k]:.2g}" for k in ("boxes", "scores", "masks") if k in agreement)
        counts = f"{agreement['expected']} / {agreement['actual']} / {agreement['paired']}"
        size = "x".join(str(s) for s in image.shape[1:])
        print(f"| {name} | {size} | {counts} | {diffs} | {eager_s * 1e3:.1f} | {onnx_s * 1e3:.1f} |")


if __name__ == "__main__":
    main()
