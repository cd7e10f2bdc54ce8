"""The compiled operators against bad input, called directly
(torch.ops.dcnv2.*, past the Python wrappers' checks) as well as through
the wrappers: non-finite and huge RoIs, RoIs naming no image, mixed dtypes,
and the CPU conv's fallback from oneDNN's private packed conv. CPU and CUDA
must behave alike; the CUDA variants skip without a GPU."""

import json
import math

import pytest
import torch
from helpers import DEVICES, run_python
from reference_ops import deform_roi_pool_reference

from dcnv2_plugin.ops import deform_roi_pool

GOOD_ROIS = [[0, 1.2, 2.3, 8.5, 9.1], [1, -6.0, -4.0, 4.0, 30.0]]
BAD_ROIS = [
    [0, math.nan, 1.0, 5.0, 5.0],
    [1, 1.0, 1.0, math.inf, 5.0],
    [0, -math.inf, 0.0, 3.0, 3.0],
    [1, 2.0, math.nan, 6.0, math.nan],
]


def _pool_with_grads(x, rois, offset, mask, sampling_ratio):
    x, offset, mask = (t.detach().clone().requires_grad_() for t in (x, offset, mask))
    out = deform_roi_pool(x, rois, offset, mask, output_size=(3, 4), sampling_ratio=sampling_ratio, gamma=0.1)
    grad_out = torch.arange(out.numel(), dtype=out.dtype, device=out.device).view(out.shape).sin()
    grads = torch.autograd.grad(out, (x, offset, mask), grad_out)
    return (out,) + grads


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sampling_ratio", [0, 2])
def test_non_finite_rois_pool_to_zero_and_poison_no_gradient(device, sampling_ratio):
    g = torch.Generator().manual_seed(0)
    rois = torch.tensor(GOOD_ROIS + BAD_ROIS, dtype=torch.float64, device=device)
    k, good = rois.shape[0], len(GOOD_ROIS)
    x = torch.randn(2, 3, 10, 12, generator=g, dtype=torch.float64).to(device)
    offset = torch.randn(k, 2, 3, 4, generator=g, dtype=torch.float64).to(device)
    mask = torch.rand(k, 1, 3, 4, generator=g, dtype=torch.float64).to(device)
    out, grad_x, grad_offset, grad_mask = _pool_with_grads(x, rois, offset, mask, sampling_ratio)
    for t in (out, grad_x, grad_offset, grad_mask):
        assert torch.isfinite(t).all()
    # The bad RoIs pool to zero and get zero offset and mask gradients...
    assert not out[good:].any()
    assert not grad_offset[good:].any() and not grad_mask[good:].any()
    # ... and leave the good ones' results, and the input gradient, as if
    # they were not there.
    alone = _pool_with_grads(x, rois[:good], offset[:good], mask[:good], sampling_ratio)
    torch.testing.assert_close(out[:good], alone[0], rtol=0, atol=0)
    torch.testing.assert_close(grad_x, alone[1], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_offset[:good], alone[2], rtol=0, atol=0)
    torch.testing.assert_close(grad_mask[:good], alone[3], rtol=0, atol=0)


def test_rois_whose_size_overflows_pool_to_zero():
    # Finite float32 corners whose difference overflows to inf.
    x = torch.randn(1, 2, 8, 8)
    rois = torch.tensor([[0, -3e38, 0.0, 3e38, 5.0]])
    offset = torch.randn(1, 2, 3, 4)
    mask = torch.rand(1, 1, 3, 4)
    for sampling_ratio in (0, 2):
        out, *grads = _pool_with_grads(x, rois, offset, mask, sampling_ratio)
        assert not out.any()
        assert all(torch.isfinite(t).all() and not t.any() for t in grads)


# Peak RSS of one large RoI's forward and backward, in a fresh process (the
# peak of this one is whatever earlier tests reached), and its results
# against torchvision's roi_align with zero offsets.
_LARGE_ROI = """
import json, resource
import torch, torchvision
from dcnv2_plugin.ops import deform_roi_pool
torch.set_num_threads(1)
dtype = getattr(torch, DTYPE)
def peak_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
g = torch.Generator().manual_seed(0)
x = torch.randn(1, 2, 64, 80, generator=g, dtype=dtype) + 2
rois = torch.tensor([[0, -20.0, -30.0, 9980.0, 9970.0]], dtype=dtype)  # 1e4 px
def run(rois, size):
    inputs = [t.detach().clone().requires_grad_() for t in (x, torch.zeros(rois.shape[0], 2, *size, dtype=dtype))]
    out = deform_roi_pool(inputs[0], rois, inputs[1], output_size=size, spatial_scale=0.25, sampling_ratio=0)
    return (out,) + torch.autograd.grad(out, inputs, torch.ones_like(out))
run(rois / 100, (7, 7))  # warm-up: thread pools, lazy initialization
before = peak_mib()
out, grad_x, grad_offset = run(rois, (7, 7))
grow = peak_mib() - before
x_ = x.detach().clone().requires_grad_()
expected = torchvision.ops.roi_align(x_, rois, (7, 7), 0.25, 0, aligned=True)
(expected_grad_x,) = torch.autograd.grad(expected, x_, torch.ones_like(expected))
print(json.dumps({
    "grow_mib": grow,
    "out_diff": (out - expected).abs().max().item(),
    "out_max": expected.abs().max().item(),
    "grad_x_diff": (grad_x - expected_grad_x).abs().max().item(),
    "grad_offset_finite": bool(torch.isfinite(grad_offset).all()),
}))
"""


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_large_roi_with_adaptive_sampling_takes_little_memory(dtype):
    # 2500 feature pixels a side: 6.3M samples, whose taps took 0.4 GiB
    # (float32) and 0.7 GiB (float64) per pass when they were all tabulated.
    code = f"DTYPE = {dtype!r}\n" + _LARGE_ROI
    result = json.loads(run_python(code, env={"OMP_NUM_THREADS": "1"}, timeout=300).stdout)
    assert result["grow_mib"] < 200, result
    assert result["out_max"] > 0.01, result  # a bin covers the map: not all zeros
    tol = 1e-4 if dtype == "float32" else 1e-10
    assert result["out_diff"] < tol and result["grad_x_diff"] < tol * 100, result
    assert result["grad_offset_finite"], result


def test_bins_with_more_samples_than_one_chunk_match_the_reference():
    # One bin of 800 x 700 samples: more than one chunk of tabulated taps
    # (2^18), so its sums continue across chunks; values and all gradients
    # against the pure-PyTorch reference, offsets and mask included.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2, 120, 110, generator=g, dtype=torch.float64) + 2
    rois = torch.tensor([[0, -100.0, -50.0, 700.0, 650.0]], dtype=torch.float64)
    offset = torch.randn(1, 2, 1, 1, generator=g, dtype=torch.float64) * 0.3
    mask = torch.rand(1, 1, 1, 1, generator=g, dtype=torch.float64)
    inputs = [t.clone().requires_grad_() for t in (x, offset, mask)]
    out = deform_roi_pool(*inputs[:1], rois, *inputs[1:], output_size=(1, 1), sampling_ratio=0, gamma=0.1)
    grads = torch.autograd.grad(out, inputs, torch.ones_like(out) * 0.7)
    ref_inputs = [t.clone().requires_grad_() for t in (x, offset, mask)]
    expected = deform_roi_pool_reference(ref_inputs[0], rois, ref_inputs[1], ref_inputs[2], (1, 1), 1.0, 0, 0.1)
    expected_grads = torch.autograd.grad(expected, ref_inputs, torch.ones_like(expected) * 0.7)
    assert expected.abs().max() > 0.01
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-12)
    for ours, theirs in zip(grads, expected_grads):
        torch.testing.assert_close(ours, theirs, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
def test_adaptive_grid_is_capped_at_1024_per_side(device):
    # A bin of 2100 feature pixels a side takes 1024 x 1024 samples, as an
    # explicit sampling_ratio of 1024 would; a 1e9 px RoI then costs the same
    # and pools to finite values.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 1, 64, 64, generator=g, dtype=torch.float64).to(device)
    rois = torch.tensor([[0, -20.0, -10.0, 2080.0, 2090.0]], dtype=torch.float64, device=device)

    def pool(rois, sampling_ratio):
        x_ = x.to(rois.dtype)
        return torch.ops.dcnv2.deform_roi_pool(x_, rois, None, None, 1, 1, 1.0, sampling_ratio, 0.1)

    capped = pool(rois, 0)
    assert capped.abs().max() > 0
    torch.testing.assert_close(capped, pool(rois, 1024), rtol=0, atol=0)
    huge = torch.tensor([[0, -1e9, -1e9, 1e9, 1e9]], dtype=torch.float64, device=device)
    torch.testing.assert_close(pool(huge, 0), pool(huge, 1024), rtol=0, atol=0)
    assert torch.isfinite(pool(huge.float(), 0)).all()


def _conv_args(device, **dtypes):
    g = torch.Generator().manual_seed(0)
    args = {
        "input": torch.randn(1, 4, 6, 6, generator=g),
        "weight": torch.randn(4, 4, 3, 3, generator=g),
        "offset": torch.randn(1, 18, 6, 6, generator=g),
        "mask": torch.rand(1, 9, 6, 6, generator=g),
        "bias": torch.randn(4, generator=g),
    }
    return {name: t.to(device=device, dtype=dtypes.get(name, torch.float32)) for name, t in args.items()}


def _call_conv(a):
    return torch.ops.dcnv2.deform_conv2d(
        a["input"], a["weight"], a["offset"], a["mask"], a["bias"], 1, 1, 1, 1, 1, 1, 1, 1
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["weight", "offset", "mask", "bias"])
def test_conv_dtype_mismatch_names_the_argument(device, name):
    args = _conv_args(device, **{name: torch.float64})
    with pytest.raises(TypeError, match=f"deform_conv2d: {name} has dtype Double but input has dtype Float"):
        _call_conv(args)
    grad = torch.ones(1, 4, 6, 6, device=device)
    with pytest.raises(TypeError, match=f"{name} has dtype Double"):
        torch.ops.dcnv2._deform_conv2d_backward(
            grad, args["input"], args["weight"], args["offset"], args["mask"], args["bias"], 1, 1, 1, 1, 1, 1, 1, 1
        )


def _pool_args(device, **dtypes):
    g = torch.Generator().manual_seed(0)
    args = {
        "input": torch.randn(2, 3, 10, 12, generator=g),
        "rois": torch.tensor(GOOD_ROIS),
        "offset": torch.randn(2, 2, 3, 4, generator=g),
        "mask": torch.rand(2, 1, 3, 4, generator=g),
    }
    return {name: t.to(device=device, dtype=dtypes.get(name, torch.float32)) for name, t in args.items()}


def _call_pool(a, backward=False):
    if backward:
        grad = torch.ones(a["rois"].shape[0], 3, 3, 4, device=a["input"].device)
        return torch.ops.dcnv2._deform_roi_pool_backward(
            grad, a["input"], a["rois"], a["offset"], a["mask"], 3, 4, 1.0, 0, 0.1
        )
    return torch.ops.dcnv2.deform_roi_pool(a["input"], a["rois"], a["offset"], a["mask"], 3, 4, 1.0, 0, 0.1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["rois", "offset", "mask"])
def test_pool_dtype_mismatch_names_the_argument(device, name):
    args = _pool_args(device, **{name: torch.float64})
    for backward in (False, True):
        with pytest.raises(TypeError, match=f"deform_roi_pool: {name} has dtype Double but input has dtype Float"):
            _call_pool(args, backward)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "index, shown", [(2.0, "2"), (-1.0, "-1"), (7.0, "7"), (math.nan, "nan"), (math.inf, "inf"), (-math.inf, "-inf")]
)
def test_roi_batch_index_outside_the_batch_raises_on_every_device(device, index, shown):
    args = _pool_args(device)
    args["rois"][1, 0] = index
    message = rf"deform_roi_pool: rois\[1, 0\] = {shown} is not a batch index of input \(batch size 2\)"
    for backward in (False, True):
        with pytest.raises(RuntimeError, match=message):
            _call_pool(args, backward)


@pytest.mark.parametrize("device", DEVICES)
def test_roi_batch_index_is_truncated_like_roi_align(device):
    # The integer part names the image: 1.7 is image 1, -0.5 is image 0.
    args = _pool_args(device)
    exact = _call_pool(args)
    args["rois"][0, 0] = -0.5
    args["rois"][1, 0] = 1.7
    torch.testing.assert_close(_call_pool(args), exact, rtol=0, atol=0)


# A float32 deformable conv forward and backward in a fresh process (the
# packed conv's switch is read once), with the ops it called.
_CONV_PATHS = """
import json
import torch
from torch.profiler import ProfilerActivity, profile
from dcnv2_plugin.ops import deform_conv2d
torch.set_num_threads(1)
g = torch.Generator().manual_seed(0)
x = torch.randn(2, 32, 12, 14, generator=g).requires_grad_()
weight = (torch.randn(16, 32, 3, 3, generator=g) * 0.05).requires_grad_()
offset = (torch.randn(2, 18, 12, 14, generator=g) * 2).requires_grad_()
mask = torch.rand(2, 9, 12, 14, generator=g).requires_grad_()
with profile(activities=[ProfilerActivity.CPU]) as prof:
    out = deform_conv2d(x, offset, weight, mask=mask, padding=1)
grads = torch.autograd.grad(out.square().sum(), (x, offset, weight, mask))
print(json.dumps({
    "ops": sorted({e.key for e in prof.key_averages()}),
    "results": [t.flatten().tolist() for t in (out,) + grads],
}))
"""


def test_cpu_conv_without_the_packed_onednn_conv_gives_the_same_results():
    if not torch.backends.mkldnn.is_available():
        pytest.skip("this torch has no oneDNN: the fallback is the only path")
    runs = {
        disabled: json.loads(run_python(_CONV_PATHS, env={"DCNV2_DISABLE_PACKED_CONV": disabled}).stdout)
        for disabled in ("0", "1")
    }
    # The switch works: with it the private op is never called.
    assert "mkldnn::_convolution_pointwise" in runs["0"]["ops"]
    assert "mkldnn::_convolution_pointwise" not in runs["1"]["ops"]
    for packed, fallback in zip(runs["0"]["results"], runs["1"]["results"]):
        torch.testing.assert_close(torch.tensor(fallback), torch.tensor(packed), rtol=1e-4, atol=1e-5)
