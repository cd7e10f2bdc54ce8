"""CPU inference latency of the DCNv2 detector and its backbone against the
regular ones, in PyTorch (eager) and exported to ONNX in ONNX Runtime.

Models (--models):
  coco  the R-50-FPN Faster R-CNNs of the COCO configs, regular and DCNv2
        (mdconv c3-c5 + mdpool), on one 1000x1333 image (the configs' test
        size for a 3:4 image), 1000 proposals;
  demo  the demo's Mask R-CNNs (regular, DCNv2) on one 128x128 image.

Weights are random: the DCNv2 model loads the regular one's weights for the
layers both have, its geometry branches are drawn (see `draw_geometry`), and
the last norm of each residual branch is zero, so that activations stay in
range through 50 random layers and the RPN keeps as many proposals as a
trained model does (the counts are printed). Times are per image. In each
round the candidates take turns (regular then DCNv2 in eager, then in ONNX
Runtime), so a busy phase of the machine costs each alike; the tables give
the fastest and the median round, the DCNv2 / regular ratio of the
fastest rounds with its range over rounds, and the median of the rounds'
ratios (a round runs each pair back to back, so a slow phase of a shared
machine tends to slow both of a pair, while the fastest rounds of the two
may come from different phases). --breakdown adds where the time
goes: the stages of the eager detector, and ONNX Runtime's profile by
operator type.

    python benchmarks/bench_export.py --models coco --rounds 5 --threads 1 --breakdown
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from detectron2.modeling import build_model  # noqa: E402

from dcnv2_plugin.config import load_config  # noqa: E402
from dcnv2_plugin.export.detector import (  # noqa: E402
    ExportableRCNN,
    _pooler_format,
    compare_detections,
    export_detector_onnx,
)
from dcnv2_plugin.export.onnx_export import export_onnx  # noqa: E402
from dcnv2_plugin.export.runtime import inference_session, run  # noqa: E402
from dcnv2_plugin.modeling.poolers import RoIOffsetPredictor, pool_rois  # noqa: E402
from dcnv2_plugin.ops import OffsetConv2d  # noqa: E402

MODELS = {
    "coco": (
        "configs/COCO-Detection/faster_rcnn_R_50_FPN_regular.yaml",
        "configs/COCO-Detection/faster_rcnn_R_50_FPN_mdconv_c3-c5_mdpool.yaml",
        (1000, 1333),
    ),
    "demo": ("configs/demo/regular.yaml", "configs/demo/dcnv2.yaml", (128, 128)),
}
LABELS = ("regular", "DCNv2")
RUNTIMES = ("eager", "ONNX Runtime")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def draw_geometry(model):
    """Offsets of about a pixel and moving RoI bins, as trained DCNv2 layers have."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, OffsetConv2d):
                module.weight.copy_(torch.randn(module.weight.shape, generator=g) * 1e-3)
            elif isinstance(module, RoIOffsetPredictor):
                module.predictor.weight.copy_(torch.randn(module.predictor.weight.shape, generator=g) * 1e-3)


def build_pair(regular_config, dcnv2_config):
    """(regular, DCNv2) models in eval mode with shared random weights."""
    models = []
    for config in (regular_config, dcnv2_config):
        torch.manual_seed(0)
        cfg = load_config(os.path.join(ROOT, config), ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""])
        model = build_model(cfg).eval()
        if models:
            model.load_state_dict(models[0].state_dict(), strict=False)
            draw_geometry(model)
        with torch.no_grad():
            for name, module in model.named_modules():
                if name.endswith("conv3.norm"):  # the last norm of each R-50 bottleneck
                    module.weight.zero_()
        models.append(model)
    return models


class Backbone(torch.nn.Module):
    """The backbone on a preprocessed image, its outputs as a tuple."""

    def __init__(self, exportable: ExportableRCNN):
        super().__init__()
        self.backbone = exportable.model.backbone

    def forward(self, x):
        return tuple(self.backbone(x).values())


def fastest_and_median(times):
    return min(times), statistics.median(times)


def time_once(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def eager_stages(exportable: ExportableRCNN, image: torch.Tensor) -> dict:
    """Seconds per stage of the eager detector (and the counts of proposals
    and detections)."""
    times = {}
    size = (image.shape[-2], image.shape[-1])
    heads = exportable.model.roi_heads
    start = time.perf_counter()
    features = exportable.model.backbone(exportable._preprocess(image))
    times["backbone"] = time.perf_counter() - start
    start = time.perf_counter()
    proposals = exportable._proposals(features, size)
    times["RPN"] = time.perf_counter() - start
    start = time.perf_counter()
    boxes, _, classes = exportable._detections(features, proposals, size)
    times["box head: pooling, fc, NMS"] = time.perf_counter() - start
    start = time.perf_counter()
    pool_rois(heads.box_pooler, [features[f] for f in heads.box_in_features], _pooler_format(proposals))
    times["of which pooling (with the offset branch)"] = time.perf_counter() - start
    if exportable.mask_on:
        start = time.perf_counter()
        exportable._masks(features, boxes, classes)
        times["mask head"] = time.perf_counter() - start
    times["proposals"] = proposals.shape[0]
    times["detections"] = boxes.shape[0]
    return times


def onnx_profile(path: str, inputs, threads: int) -> dict:
    """Milliseconds per ONNX operator type in one run (ONNX Runtime's profiler)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.enable_profiling = True
    options.profile_file_prefix = os.path.join(tempfile.mkdtemp(), "profile")
    session = ort.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])
    run(session, *inputs)
    with open(session.end_profiling()) as f:
        events = json.load(f)
    per_type = defaultdict(float)
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            per_type[event["args"]["op_name"]] += event["dur"] / 1e3
    return dict(sorted(per_type.items(), key=lambda kv: -kv[1]))


def bench(args, key):
    regular_config, dcnv2_config, size = MODELS[key]
    models = build_pair(regular_config, dcnv2_config)
    exportables = [ExportableRCNN(m) for m in models]
    image = torch.rand(3, *size, generator=torch.Generator().manual_seed(0)) * 255
    folder = tempfile.mkdtemp()
    candidates, exported = {}, {}
    for part in args.parts:
        for label, exportable in zip(LABELS, exportables):
            path = os.path.join(folder, f"{label}_{part}.onnx")
            start = time.perf_counter()
            if part == "backbone":
                module, inputs = Backbone(exportable).eval(), (exportable._preprocess(image),)
                export_onnx(module, inputs, path, external_data=False)
            else:
                module, inputs = exportable, (image,)
                export_detector_onnx(exportable.model, image, path, external_data=False)
            print(f"exported {label} {part} in {time.perf_counter() - start:.0f} s", flush=True)
            session = inference_session(path, threads=args.threads)
            with torch.no_grad():
                expected = module(*inputs)
            outputs = run(session, *(t.numpy() for t in inputs))
            if part == "detector":
                print(f"  ONNX Runtime against eager: {compare_detections([t.numpy() for t in expected], outputs)}")
            candidates[(part, label, "eager")] = lambda m=module, i=inputs: m(*i)
            candidates[(part, label, "ONNX Runtime")] = lambda s=session, i=inputs: run(s, *(t.numpy() for t in i))
            exported[(part, label)] = (path, [t.numpy() for t in inputs])
    # Each regular / DCNv2 pair back to back: part, then runtime, then model.
    order = [(part, label, runtime) for part in args.parts for runtime in RUNTIMES for label in LABELS]
    candidates = {name: candidates[name] for name in order}
    times = defaultdict(list)
    with torch.no_grad():
        for _ in range(args.warmup):
            for fn in candidates.values():
                fn()
        for r in range(args.rounds):
            for name, fn in candidates.items():
                times[name].append(time_once(fn))
            print(f"round {r + 1}/{args.rounds} done", flush=True)

    print(f"\n## {key}: {size[0]}x{size[1]}, {args.threads} thread(s), {args.rounds} rounds, seconds per image")
    print(
        "| part | runtime | regular: fastest / median | DCNv2: fastest / median | "
        "DCNv2 / regular, fastest (range) | median of the rounds' ratios |"
    )
    print("|---|---|---|---|---|---|")
    results = {}
    for part in args.parts:
        for runtime in RUNTIMES:
            reg, dcn = times[(part, "regular", runtime)], times[(part, "DCNv2", runtime)]
            per_round = [d / r for d, r in zip(dcn, reg)]
            (rf, rm), (df, dm) = fastest_and_median(reg), fastest_and_median(dcn)
            print(
                f"| {part} | {runtime} | {rf:.3f} / {rm:.3f} | {df:.3f} / {dm:.3f} | "
                f"{df / rf:.2f} ({min(per_round):.2f}-{max(per_round):.2f}) | {statistics.median(per_round):.2f} |"
            )
            results[f"{part} {runtime}"] = {"regular": reg, "DCNv2": dcn}
    if args.breakdown:
        with torch.no_grad():
            stages = {
                label: [eager_stages(e, image) for _ in range(args.rounds)] for label, e in zip(LABELS, exportables)
            }
        print("\n### eager detector by stage, seconds (fastest of the rounds)")
        names = list(stages["regular"][0])
        print("| stage | regular | DCNv2 |")
        print("|---|---|---|")
        for name in names:
            reg = min(s[name] for s in stages["regular"])
            dcn = min(s[name] for s in stages["DCNv2"])
            fmt = "{:.0f}" if name in ("proposals", "detections") else "{:.3f}"
            print(f"| {name} | {fmt.format(reg)} | {fmt.format(dcn)} |")
        for part in args.parts:
            print(f"\n### ONNX Runtime {part} by operator type, ms in one run")
            profiles = {label: onnx_profile(*exported[(part, label)], args.threads) for label in LABELS}
            op_types = sorted(
                set(profiles["regular"]) | set(profiles["DCNv2"]),
                key=lambda t: -max(profiles["regular"].get(t, 0), profiles["DCNv2"].get(t, 0)),
            )
            print("| operator | regular | DCNv2 |")
            print("|---|---|---|")
            for op_type in op_types[:10]:
                reg, dcn = (profiles[label].get(op_type, 0.0) for label in LABELS)
                print(f"| {op_type} | {reg:.0f} | {dcn:.0f} |")
            print(f"| all | {sum(profiles['regular'].values()):.0f} | {sum(profiles['DCNv2'].values()):.0f} |")
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="coco", help="comma-separated: coco, demo")
    parser.add_argument("--parts", default="backbone,detector", help="comma-separated: backbone, detector")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--breakdown", action="store_true")
    parser.add_argument("--json", help="also write the times here")
    args = parser.parse_args()
    args.parts = args.parts.split(",")
    torch.set_num_threads(args.threads)
    import onnxruntime

    print(f"# torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, {args.threads} thread(s)")
    results = {key: bench(args, key) for key in args.models.split(",")}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
