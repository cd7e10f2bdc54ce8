"""Both operators give the same values and gradients on CPU and CUDA, in
float64, for ordinary and bad input alike (NaN, infinite and far offsets;
degenerate, reversed, huge, out-of-image and non-finite RoIs), and raise
the same error for a RoI batch index that names no image. Runs only with a
CUDA GPU (`make gpu-check` runs it)."""

import pytest
import torch
from helpers import NEEDS_CUDA

from dcnv2_plugin.ops import deform_conv2d, deform_roi_pool

pytestmark = NEEDS_CUDA
NAN, INF = float("nan"), float("inf")
# Equal up to the CUDA backward's atomic accumulation order.
TOL = dict(rtol=1e-10, atol=1e-10, equal_nan=True)

# (batch, in, out, height, width, kernel, stride, padding, dilation, groups, offset_groups)
CONV_CONFIGS = {
    "basic": (2, 4, 6, 7, 8, (3, 3), (1, 1), (1, 1), (1, 1), 1, 1),
    "odd-groups": (1, 6, 4, 9, 7, (3, 2), (2, 1), (1, 0), (2, 1), 2, 3),
    "depthwise": (3, 4, 4, 5, 6, (1, 3), (1, 2), (0, 2), (1, 2), 4, 2),
    "wide": (2, 64, 32, 12, 10, (3, 3), (1, 1), (1, 1), (1, 1), 1, 4),
}


def same_on_cpu_and_cuda(fn, inputs, constant=()):
    """fn's output and the gradients of its inputs (but those named in
    `constant`), from {name: tensor}, are the same on both devices."""
    results = []
    for device in ("cpu", "cuda"):
        tensors = {k: t.to(device).requires_grad_(k not in constant) for k, t in inputs.items()}
        out = fn(**tensors)
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(0), dtype=out.dtype).to(device)
        names = [k for k in tensors if k not in constant]
        grads = torch.autograd.grad(out, [tensors[k] for k in names], grad)
        results.append({"output": out.cpu(), **{f"grad of {k}": g.cpu() for k, g in zip(names, grads)}})
    cpu, cuda = results
    for name in cpu:
        torch.testing.assert_close(cuda[name], cpu[name], **TOL, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("bad_offsets", [False, True], ids=["offsets", "bad-offsets"])
@pytest.mark.parametrize("config", list(CONV_CONFIGS.values()), ids=list(CONV_CONFIGS))
def test_deform_conv2d(config, bad_offsets):
    batch, cin, cout, h, w, (kh, kw), stride, pad, dil, groups, ogroups = config
    out_h = (h + 2 * pad[0] - (dil[0] * (kh - 1) + 1)) // stride[0] + 1
    out_w = (w + 2 * pad[1] - (dil[1] * (kw - 1) + 1)) // stride[1] + 1
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, cin, h, w, generator=g, dtype=torch.float64)
    weight = torch.randn(cout, cin // groups, kh, kw, generator=g, dtype=torch.float64)
    bias = torch.randn(cout, generator=g, dtype=torch.float64)
    offset = torch.randn(batch, 2 * ogroups * kh * kw, out_h, out_w, generator=g, dtype=torch.float64) * 3
    mask = torch.rand(batch, ogroups * kh * kw, out_h, out_w, generator=g, dtype=torch.float64)
    if bad_offsets:
        flat = offset.view(-1)
        picks = torch.randperm(flat.numel(), generator=g)[:12]
        flat[picks] = torch.tensor(
            [NAN, INF, -INF, 1e6, -1e6, 1e30, -1.0, 0.0, 0.5, float(h), float(w), -2.0], dtype=torch.float64
        )

    def fn(x, offset, weight, bias, mask):
        return deform_conv2d(x, offset, weight, bias, stride, pad, dil, mask)

    same_on_cpu_and_cuda(fn, dict(x=x, offset=offset, weight=weight, bias=bias, mask=mask))


BOXES = {
    "ordinary": [[0, 1.2, 2.3, 8.5, 9.1], [1, 10.1, 6.2, 21.7, 13.9]],
    "degenerate-reversed": [[0, 5.0, 5.0, 5.0, 9.0], [1, 9.0, 3.0, 2.0, 1.0], [0, 4.0, 4.0, 4.0, 4.0]],
    "huge-outside": [[1, -900.0, -700.0, 1500.0, 1200.0], [0, 40.0, 30.0, 60.0, 50.0], [1, -6.0, -4.0, 4.0, 30.0]],
    "non-finite": [
        [0, NAN, 1.0, 5.0, 6.0],
        [1, 1.0, 2.0, INF, 6.0],
        [0, -INF, -INF, INF, INF],
        [1, 2.0, 2.0, 9.0, 9.0],
    ],
}


@pytest.mark.parametrize("sampling_ratio", [0, 2])
@pytest.mark.parametrize("bad_offsets", [False, True], ids=["offsets", "bad-offsets"])
@pytest.mark.parametrize("boxes", list(BOXES.values()), ids=list(BOXES))
def test_deform_roi_pool(boxes, bad_offsets, sampling_ratio):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 10, 12, generator=g, dtype=torch.float64)
    rois = torch.tensor(boxes, dtype=torch.float64)
    if sampling_ratio == 0:  # the huge RoI's adaptive grid would be 300 x 400 samples per bin
        rois[:, 1:] = rois[:, 1:].clamp(-100, 100)
    offset = torch.randn(rois.shape[0], 2, 3, 4, generator=g, dtype=torch.float64)
    mask = torch.rand(rois.shape[0], 1, 3, 4, generator=g, dtype=torch.float64)
    if bad_offsets:
        offset[0, 0, 0, :] = torch.tensor([NAN, INF, -INF, 1e6])

    def fn(x, rois, offset, mask):
        return deform_roi_pool(
            x, rois, offset, mask, output_size=(3, 4), spatial_scale=0.5, sampling_ratio=sampling_ratio, gamma=0.3
        )

    same_on_cpu_and_cuda(fn, dict(x=x, rois=rois, offset=offset, mask=mask), constant=("rois",))


@pytest.mark.parametrize("index", [-1.0, 2.0, NAN, INF])
def test_a_roi_batch_index_that_names_no_image_raises_the_same_error(index):
    messages = []
    for device in ("cpu", "cuda"):
        x = torch.randn(2, 3, 10, 12, dtype=torch.float64, device=device)
        rois = torch.tensor([[0, 1.0, 1.0, 8.0, 8.0], [index, 1.0, 1.0, 8.0, 8.0]], dtype=torch.float64, device=device)
        with pytest.raises(RuntimeError, match=r"rois\[1, 0\] = .* is not a batch index of input") as error:
            deform_roi_pool(x, rois, output_size=(3, 4))
        messages.append(str(error.value).splitlines()[0])
    assert messages[0] == messages[1]
