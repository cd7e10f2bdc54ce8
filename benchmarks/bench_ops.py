"""Speed and memory of the dcnv2 operators against peers measured in the same run.

Every time is the minimum over --repeat runs on the same inputs with the same
thread count; every ratio is ours / peer (below 1 = ours faster). Sections:

  conv    modulated deformable conv at ResNet conv3/conv4/conv5 shapes of a
          detection batch: ours vs torchvision.ops.deform_conv2d vs dense
          conv2d, forward and forward+backward; ONNX Runtime's DeformConv
          (forward only) when `onnxruntime` and `onnx` are installed
          (`pip install -r benchmarks/requirements.txt`), and the same conv
          composed of standard ONNX Runtime kernels (GridSample + a 1x1
          Conv), the alternative to exporting it as DeformConv.
  pool    modulated deformable RoI pooling vs torchvision.ops.roi_align
          (aligned=True), forward and forward+backward, 512 RoIs per image.
  memory  peak extra memory of our deformable conv (forward+backward)
          against batch size.
  e2e     one training step of the DCNv2 R-50-FPN Faster R-CNN vs the
          regular one at the same config (CPU: small images, see --e2e-size).

    python benchmarks/bench_ops.py                     # CPU, every section
    python benchmarks/bench_ops.py --device cuda --dtype float16
"""

import argparse
import json
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
import torchvision

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dcnv2_plugin.ops import deform_conv2d, deform_roi_pool  # noqa: E402

# (name, batch, channels, height, width): the 3x3 convs of ResNet-50 stages
# conv3/conv4/conv5 for a detection batch of two ~800x1088 images.
CONV_SHAPES = [
    ("conv3", 2, 128, 100, 136),
    ("conv4", 2, 256, 50, 68),
    ("conv5", 2, 512, 25, 34),
]
# Rounds of the alternating loops that time our forward and ONNX Runtime's.
ALONE_ROUNDS = 3
POOL_LEVELS = [  # FPN P2..P5 of an ~800x1088 image pair
    (4, 200, 272),
    (8, 100, 136),
    (16, 50, 68),
    (32, 25, 34),
]


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def best_times(fns, device, repeat):
    """{name: fn} -> {name: min seconds over `repeat` calls}. The candidates
    take turns, so a slow phase of the machine (another process, memory
    being returned to the OS) costs each of them alike."""
    for fn in fns.values():
        fn()  # warm-up (allocator, lazy init, autotuning)
    _sync(device)
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeat):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            _sync(device)
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def best_time(fn, device, repeat):
    return best_times({"fn": fn}, device, repeat)["fn"]


def conv_inputs(batch, channels, height, width, device, dtype, requires_grad=True):
    g = torch.Generator().manual_seed(0)

    def make(*shape, scale=1.0, rand=torch.randn):
        return (rand(*shape, generator=g) * scale).to(device=device, dtype=dtype).requires_grad_(requires_grad)

    x = make(batch, channels, height, width)
    weight = make(channels, channels, 3, 3, scale=0.02)
    offset = make(batch, 18, height, width, scale=2.0)
    mask = make(batch, 9, height, width, rand=torch.rand)
    return x, weight, offset, mask


def _ort_session(model, threads):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _ort_deform_conv(x, weight, offset, mask, threads):
    """ONNX Runtime sessions for the 3x3, stride 1, padding 1 deformable conv
    of the inputs: its DeformConv operator (opset 19), and the same conv
    composed of GridSample (the 9 taps' bilinear samples) and a 1x1 Conv, the
    other way to export it. {name: run}, empty if ONNX Runtime is not
    installed."""
    try:
        import numpy as np
        import onnx  # noqa: F401  (its helper builds the models below)
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        return {}
    n, c, h, w = x.shape
    names = ["X", "W", "offset", "B", "mask"]
    arrays = [t.detach().float().cpu().numpy() for t in (x, weight, offset)]
    arrays += [np.zeros(weight.shape[0], np.float32), mask.detach().float().cpu().numpy()]
    inputs = [helper.make_tensor_value_info(n_, TensorProto.FLOAT, a.shape) for n_, a in zip(names, arrays)]
    output = helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)
    feed = dict(zip(names, arrays))
    deform_conv = helper.make_node(
        "DeformConv", names, ["Y"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[1, 1], group=1, offset_group=1
    )
    native = helper.make_model(
        helper.make_graph([deform_conv], "deform_conv", inputs, [output]), opset_imports=[helper.make_opsetid("", 19)]
    )

    # GridSample with align_corners=0 maps pixel p to (2p + 1) / size - 1.
    taps = np.arange(9)[None, :, None, None, None]
    consts = {
        # Each tap's sampling row / column before its offset: [1, 9, h or 1, 1 or w, 1].
        "tap_y": (np.arange(h)[None, None, :, None, None] - 1 + taps // 3).astype(np.float32),
        "tap_x": (np.arange(w)[None, None, None, :, None] - 1 + taps % 3).astype(np.float32),
        "scale_y": np.array(2.0 / h, np.float32), "shift_y": np.array(1.0 / h - 1, np.float32),
        "scale_x": np.array(2.0 / w, np.float32), "shift_x": np.array(1.0 / w - 1, np.float32),
        "pairs": np.array([n, 9, 2, h, w], np.int64), "per_tap": np.array([n, 9, h, w, 1], np.int64),
        "grid_shape": np.array([n, 9 * h, w, 2], np.int64), "mask_shape": np.array([n, 1, 9 * h, w], np.int64),
        "columns": np.array([n, c * 9, h, w], np.int64),
        "W_1x1": arrays[1].reshape(weight.shape[0], c * 9, 1, 1),
    }  # fmt: skip
    node = helper.make_node
    nodes = [
        node("Reshape", ["offset", "pairs"], ["dydx"]),
        node("Split", ["dydx"], ["dy", "dx"], axis=2, num_outputs=2),
        node("Reshape", ["dy", "per_tap"], ["dy_"]),
        node("Reshape", ["dx", "per_tap"], ["dx_"]),
        node("Add", ["dy_", "tap_y"], ["y"]),
        node("Add", ["dx_", "tap_x"], ["x"]),
        node("Mul", ["y", "scale_y"], ["y_scaled"]),
        node("Add", ["y_scaled", "shift_y"], ["grid_y"]),
        node("Mul", ["x", "scale_x"], ["x_scaled"]),
        node("Add", ["x_scaled", "shift_x"], ["grid_x"]),
        node("Concat", ["grid_x", "grid_y"], ["grid_5d"], axis=4),
        node("Reshape", ["grid_5d", "grid_shape"], ["grid"]),
        node("GridSample", ["X", "grid"], ["samples"], mode="linear", padding_mode="zeros", align_corners=0),
        node("Reshape", ["mask", "mask_shape"], ["mask_"]),
        node("Mul", ["samples", "mask_"], ["modulated"]),
        node("Reshape", ["modulated", "columns"], ["cols"]),
        node("Conv", ["cols", "W_1x1", "B"], ["Y"]),
    ]
    inits = [numpy_helper.from_array(v, k) for k, v in consts.items()]
    composed = helper.make_model(
        helper.make_graph(nodes, "deform_conv_composed", [inputs[i] for i in (0, 2, 3, 4)], [output], inits),
        opset_imports=[helper.make_opsetid("", 20)],
    )
    composed_feed = {k: v for k, v in feed.items() if k != "W"}
    sessions = {"onnxruntime": (_ort_session(native, threads), feed)}
    sessions["ort_composed"] = (_ort_session(composed, threads), composed_feed)
    first, second = (s.run(None, f)[0] for s, f in sessions.values())
    if not np.allclose(first, second, rtol=1e-3, atol=1e-3):
        raise RuntimeError(f"the composed deformable conv differs from DeformConv by {np.abs(first - second).max()}")
    return {name: (lambda s=s, f=f: s.run(None, f)) for name, (s, f) in sessions.items()}


def bench_conv(args):
    rows = []
    for name, batch, channels, height, width in CONV_SHAPES:
        x, weight, offset, mask = conv_inputs(batch, channels, height, width, args.device, args.dtype)

        def ours():
            return deform_conv2d(x, offset, weight, padding=1, mask=mask)

        def theirs():
            return torchvision.ops.deform_conv2d(x, offset, weight, padding=1, mask=mask)

        def dense():
            return F.conv2d(x, weight, padding=1)

        def fwd_bwd(fn):
            def run():
                out = fn()
                torch.autograd.grad(
                    out,
                    [t for t in (x, weight, offset, mask) if t is not None],
                    torch.ones_like(out),
                    allow_unused=True,
                )

            return run

        candidates = {"ours": ours, "torchvision": theirs, "conv2d": dense}
        fns = {
            **{(name, "fwd"): fn for name, fn in candidates.items()},
            **{(name, "fwd+bwd"): fwd_bwd(fn) for name, fn in candidates.items()},
        }
        with torch.autocast(args.device, dtype=args.autocast_dtype, enabled=args.autocast):
            best = best_times(fns, args.device, args.repeat)
        timed = {name: (best[(name, "fwd")], best[(name, "fwd+bwd")]) for name in candidates}
        # ONNX Runtime's threads spin for a while after each run and would
        # slow down whichever candidate came next, so it is timed in loops of
        # its own, and compared with our forward timed the same way (both with
        # their data warm in cache). The loops alternate, a few rounds each,
        # so that a slow phase of the machine does not fall on one of them.
        ort = _ort_deform_conv(x, weight, offset, mask, torch.get_num_threads()) if args.device == "cpu" else {}
        if ort:
            loops = {"ours_alone": ours, **ort}
            alone = dict.fromkeys(loops, float("inf"))
            for _ in range(ALONE_ROUNDS):
                for key, fn in loops.items():
                    alone[key] = min(alone[key], best_time(fn, "cpu", args.repeat))
            timed.update({key: (seconds, None) for key, seconds in alone.items()})
        rows.append((f"{name} {tuple(x.shape)}", timed))
    return rows


def pool_inputs(level, rois_per_image, device, dtype, channels=256, batch=2):
    stride, height, width = level
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, channels, height, width, generator=g).to(device=device, dtype=dtype).requires_grad_()
    image_h, image_w = height * stride, width * stride
    k = batch * rois_per_image
    xy = torch.rand(k, 2, generator=g) * torch.tensor([image_w * 0.8, image_h * 0.8])
    wh = (torch.rand(k, 2, generator=g) * 0.2 + 0.02) * torch.tensor([image_w, image_h])
    index = torch.arange(batch).repeat_interleave(rois_per_image).unsqueeze(1).float()
    rois = torch.cat([index, xy, xy + wh], dim=1).to(device=device, dtype=dtype)
    offset = (torch.randn(k, 2, 7, 7, generator=g) * 0.5).to(device=device, dtype=dtype).requires_grad_()
    mask = torch.rand(k, 1, 7, 7, generator=g).to(device=device, dtype=dtype).requires_grad_()
    return x, rois, offset, mask, 1.0 / stride


def bench_pool(args):
    rows = []
    for level in POOL_LEVELS:
        x, rois, offset, mask, scale = pool_inputs(level, 512, args.device, args.dtype)

        def ours():
            return deform_roi_pool(x, rois, offset, mask, output_size=7, spatial_scale=scale, sampling_ratio=0)

        def theirs():
            return torchvision.ops.roi_align(x, rois, 7, scale, 0, aligned=True)

        def fwd_bwd(fn, inputs):
            def run():
                out = fn()
                torch.autograd.grad(out, inputs, torch.ones_like(out))

            return run

        best = best_times({
            ("ours", "fwd"): ours, ("ours", "fwd+bwd"): fwd_bwd(ours, (x, offset, mask)),
            ("roi_align", "fwd"): theirs, ("roi_align", "fwd+bwd"): fwd_bwd(theirs, (x,)),
        }, args.device, args.repeat)  # fmt: skip
        timed = {name: (best[(name, "fwd")], best[(name, "fwd+bwd")]) for name in ("ours", "roi_align")}
        rows.append((f"stride {level[0]} {tuple(x.shape)} 1024 RoIs", timed))
    return rows


def _peak_rss_bytes():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _reset_peak_rss():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS


def memory_probe(batch, device, dtype):
    """Peak memory of one deform_conv2d forward+backward at conv4 shapes,
    measured from inputs created to gradients returned: (peak above start,
    of which beyond the output and the gradients, which must exist anyway)."""
    _, _, channels, height, width = CONV_SHAPES[1]
    x, weight, offset, mask = conv_inputs(batch, channels, height, width, device, dtype)
    held = sum(t.numel() * t.element_size() for t in (x, weight, offset, mask)) + x.numel() * x.element_size()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        _reset_peak_rss()
        base = _peak_rss_bytes()
    out = deform_conv2d(x, offset, weight, padding=1, mask=mask)
    grads = torch.autograd.grad(out, (x, weight, offset, mask), torch.ones_like(out))
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _peak_rss_bytes() - base
    del grads
    return peak, max(peak - held, 0)


def bench_memory(args):
    """memory_probe per batch size, each in a fresh process whose large
    allocations go back to the OS when freed, so RSS tracks live memory."""
    rows = []
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    for batch in (1, 2, 4, 8):
        command = [
            sys.executable,
            os.path.abspath(__file__),
            "--memory-probe",
            str(batch),
            "--device",
            args.device,
            "--dtype",
            str(args.dtype).replace("torch.", ""),
        ]
        if args.threads:
            command += ["--threads", str(args.threads)]
        output = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
        peak, extra = json.loads(output.strip().splitlines()[-1])
        rows.append((batch, peak, extra))
    return rows


def bench_e2e(args):
    """One training step (forward+backward) of the R-50-FPN Faster R-CNN,
    DCNv2 (mdconv c3-c5 + mdpool) against regular, at the same config."""
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage

    import dcnv2_plugin  # noqa: F401  (registers the components)

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    times = {}
    for name in ("regular", "mdconv_c3-c5_mdpool"):
        cfg = get_cfg()
        dcnv2_plugin.add_dcnv2_config(cfg)
        cfg.merge_from_file(os.path.join(root, "configs", "COCO-Detection", f"faster_rcnn_R_50_FPN_{name}.yaml"))
        cfg.MODEL.DEVICE = args.device
        cfg.MODEL.WEIGHTS = ""
        cfg.MODEL.RESNETS.NORM = "BN"  # from scratch: FrozenBN would not train, BN keeps both models comparable
        torch.manual_seed(0)
        model = build_model(cfg).train()
        h, w = args.e2e_size
        g = torch.Generator().manual_seed(0)
        inputs = []
        from detectron2.structures import Boxes, Instances

        for _ in range(2):
            image = (torch.rand(3, h, w, generator=g) * 255).to(args.device)
            inst = Instances((h, w))
            xy = torch.rand(4, 2, generator=g) * torch.tensor([w * 0.6, h * 0.6])
            inst.gt_boxes = Boxes(torch.cat([xy, xy + torch.tensor([w * 0.3, h * 0.3])], 1))
            inst.gt_classes = torch.randint(0, cfg.MODEL.ROI_HEADS.NUM_CLASSES, (4,), generator=g)
            inputs.append({"image": image, "height": h, "width": w, "instances": inst.to(args.device)})

        def step():
            with EventStorage():
                losses = model(inputs)
                sum(losses.values()).backward()

        times[name] = best_time(step, args.device, max(2, args.repeat // 2))
    return times


def _fmt(seconds):
    return "-" if seconds is None else f"{seconds * 1000:.1f} ms"


def _ratio(a, b):
    return "-" if a is None or b is None else f"{a / b:.2f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--autocast", action="store_true", help="inputs in float32, ops under torch.autocast(dtype)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--sections", default="conv,pool,memory,e2e")
    parser.add_argument("--e2e-size", type=int, nargs=2, default=(512, 672), metavar=("H", "W"))
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--memory-probe", type=int, metavar="BATCH", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.dtype = args.autocast_dtype = getattr(torch, args.dtype)
    if args.memory_probe:
        print(json.dumps(memory_probe(args.memory_probe, args.device, args.dtype)))
        return
    if args.autocast:
        args.dtype = torch.float32
    sections = args.sections.split(",")
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"# dcnv2 operator benchmark: {device_name}, torch {torch.__version__}, torchvision "
        f"{torchvision.__version__}, dtype {args.dtype}{' (autocast)' if args.autocast else ''}, "
        f"min of {args.repeat}"
    )
    results = {"device": device_name, "dtype": str(args.dtype)}

    if "conv" in sections:
        print("\n## modulated deformable conv 3x3 (fwd | fwd+bwd); ratio = ours / peer")
        print(
            "| shape | ours | torchvision | conv2d | ours/tv | ours/conv2d | fwd alone: ours | onnxruntime | ours/ort "
            "| ort: GridSample + 1x1 Conv |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|")
        results["conv"] = {}
        for label, t in bench_conv(args):
            ours, tv, dense = t["ours"], t["torchvision"], t["conv2d"]
            ours_alone, ort = t.get("ours_alone", (None,))[0], t.get("onnxruntime", (None,))[0]
            composed = t.get("ort_composed", (None,))[0]
            print(
                f"| {label} | {_fmt(ours[0])} / {_fmt(ours[1])} | {_fmt(tv[0])} / {_fmt(tv[1])} | "
                f"{_fmt(dense[0])} / {_fmt(dense[1])} | {_ratio(ours[0], tv[0])} / {_ratio(ours[1], tv[1])} | "
                f"{_ratio(ours[0], dense[0])} / {_ratio(ours[1], dense[1])} | {_fmt(ours_alone)} | {_fmt(ort)} | "
                f"{_ratio(ours_alone, ort)} | {_fmt(composed)} |"
            )
            results["conv"][label] = t
    if "pool" in sections:
        print("\n## modulated deformable RoI pooling 7x7 vs roi_align (fwd | fwd+bwd)")
        print("| level | ours | roi_align | ours/roi_align |")
        print("|---|---|---|---|")
        results["pool"] = {}
        for label, t in bench_pool(args):
            ours, ra = t["ours"], t["roi_align"]
            print(
                f"| {label} | {_fmt(ours[0])} / {_fmt(ours[1])} | {_fmt(ra[0])} / {_fmt(ra[1])} | "
                f"{_ratio(ours[0], ra[0])} / {_ratio(ours[1], ra[1])} |"
            )
            results["pool"][label] = t
    if "memory" in sections:
        print(f"\n## peak memory of deform_conv2d fwd+bwd at {CONV_SHAPES[1][0]} shapes vs batch")
        print("| batch | peak above start | of which beyond the output and gradients |")
        print("|---|---|---|")
        results["memory"] = []
        for batch, peak, extra in bench_memory(args):
            print(f"| {batch} | {peak / 2**20:.1f} MiB | {extra / 2**20:.1f} MiB |")
            results["memory"].append({"batch": batch, "peak": peak, "extra": extra})
    if "e2e" in sections:
        times = bench_e2e(args)
        ratio = times["mdconv_c3-c5_mdpool"] / times["regular"]
        print(f"\n## R-50-FPN Faster R-CNN train step, 2 images {args.e2e_size[0]}x{args.e2e_size[1]}")
        print(f"regular {_fmt(times['regular'])}, DCNv2 {_fmt(times['mdconv_c3-c5_mdpool'])}, ratio {ratio:.2f}")
        results["e2e"] = dict(times, ratio=ratio)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
