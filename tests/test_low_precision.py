"""float16, bfloat16 and autocast against float64 on the same inputs.

Rounding the inputs to a low dtype is not the kernels' doing, so the
reference is float64 computed on inputs already rounded to that dtype. What
is left is the kernels' own arithmetic: they accumulate in float32 and round
once (the CUDA convolution also rounds its column buffer to the input dtype
for the tensor cores, and rounds its GEMM's result before adding the bias),
which keeps each output within about one ulp. Accumulating in the low dtype
would be several to tens of ulps off at these sizes.

CPU autocast runs the kernels in float32, on the inputs as autocast hands
them over: it must then agree with float32 on those inputs to about 1e-5.
"""

import pytest
import torch
from helpers import DEVICES

from dcnv2_plugin.ops import deform_conv2d, deform_roi_pool

CUDA = DEVICES[1].marks
LOW_DTYPES = [pytest.param(dtype, marks=CUDA, id=str(dtype)[6:]) for dtype in (torch.float16, torch.bfloat16)]


def assert_within_ulps(actual, expected, dtype, ulps, name=""):
    """|actual - expected| <= ulps * eps * (|expected| + rms(expected)), eps
    the dtype's machine epsilon: eps * |y| is one to two ulps of y; the rms
    term is the same at the outputs' typical size, for outputs near zero
    whose error comes from larger terms that cancelled."""
    expected = expected.double()
    eps = torch.finfo(dtype).eps
    tolerance = ulps * eps * (expected.abs() + expected.square().mean().sqrt())
    excess = ((actual.double() - expected).abs() / tolerance).max().item()
    assert excess <= 1, f"{name}: off by {excess:.2f} x {ulps} ulp(s) of {dtype}"


def conv_inputs(device):
    """64 channels: the contraction sums 64 x 9 terms per output."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 64, 10, 12, generator=g, dtype=torch.float64)
    weight = torch.randn(16, 64, 3, 3, generator=g, dtype=torch.float64) / 24
    bias = torch.randn(16, generator=g, dtype=torch.float64)
    offset = torch.randn(2, 18, 10, 12, generator=g, dtype=torch.float64) * 2
    mask = torch.rand(2, 9, 10, 12, generator=g, dtype=torch.float64)
    grad = torch.randn(2, 16, 10, 12, generator=g, dtype=torch.float64)
    return [t.to(device) for t in (x, offset, weight, bias, mask)], grad.to(device)


def conv(x, offset, weight, bias, mask):
    return deform_conv2d(x, offset, weight, bias, padding=1, mask=mask)


def forward_and_gradients(fn, inputs, grad):
    inputs = [t.detach().requires_grad_() for t in inputs]
    out = fn(*inputs)
    return out, torch.autograd.grad(out, inputs, grad.to(out.dtype))


@pytest.mark.parametrize("dtype", LOW_DTYPES)
def test_conv_in_low_precision_is_within_an_ulp_of_float64(dtype):
    inputs, grad = conv_inputs("cuda")
    rounded = [t.to(dtype) for t in inputs]
    grad = grad.to(dtype)
    out, grads = forward_and_gradients(conv, rounded, grad)
    expected, expected_grads = forward_and_gradients(conv, [t.double() for t in rounded], grad.double())
    assert out.dtype == dtype
    assert_within_ulps(out, expected, dtype, 1, "output")
    # Gradients round twice: the low-precision GEMM result, then the float32 accumulator.
    for name, a, b in zip(["input", "offset", "weight", "bias", "mask"], grads, expected_grads):
        assert a.dtype == dtype
        assert_within_ulps(a, b, dtype, 2, f"grad of {name}")


@pytest.mark.parametrize("dtype", LOW_DTYPES)
def test_conv_under_cuda_autocast_is_within_an_ulp_of_float64(dtype):
    # Parameters and offsets in float32, as in a mixed-precision network:
    # autocast casts every floating input to its dtype.
    inputs, grad = conv_inputs("cuda")
    inputs = [t.float() for t in inputs]
    with torch.autocast("cuda", dtype=dtype):
        out, grads = forward_and_gradients(conv, inputs, grad)
    expected, expected_grads = forward_and_gradients(conv, [t.to(dtype).double() for t in inputs], grad.double())
    assert out.dtype == dtype
    assert_within_ulps(out, expected, dtype, 1, "output")
    for name, a, b in zip(["input", "offset", "weight", "bias", "mask"], grads, expected_grads):
        assert a.dtype == torch.float32
        assert_within_ulps(a, b, dtype, 2, f"grad of {name}")


def test_conv_under_cpu_autocast_is_float32_on_the_inputs_it_gets():
    inputs, grad = conv_inputs("cpu")
    x, *rest = [t.float() for t in inputs]
    x = x.to(torch.bfloat16)  # activations in the low dtype, parameters in float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, grads = forward_and_gradients(conv, [x, *rest], grad)
    expected, expected_grads = forward_and_gradients(conv, [x.float(), *rest], grad.float())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert grads[0].dtype == torch.bfloat16
    torch.testing.assert_close(grads[0], expected_grads[0].to(torch.bfloat16), rtol=0, atol=0)
    for name, a, b in zip(["offset", "weight", "bias", "mask"], grads[1:], expected_grads[1:]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"grad of {name}: {m}")


ROIS = [
    [0, 1.2, 2.3, 8.5, 9.1],
    [1, 0.0, 0.0, 23.0, 19.0],
    [1, -6.0, -4.0, 4.0, 30.0],
    [0, 3.3, 0.7, 3.9, 17.2],
    [1, 10.1, 6.2, 21.7, 13.9],
]


def pool_inputs(device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 10, 12, generator=g, dtype=torch.float64)
    rois = torch.tensor(ROIS, dtype=torch.float64)
    offset = torch.randn(len(ROIS), 2, 3, 4, generator=g, dtype=torch.float64)
    mask = torch.rand(len(ROIS), 1, 3, 4, generator=g, dtype=torch.float64)
    grad = torch.randn(len(ROIS), 8, 3, 4, generator=g, dtype=torch.float64)
    return [t.to(device) for t in (x, rois, offset, mask)], grad.to(device)


def pooling(rois):
    def pool(x, offset, mask):
        return deform_roi_pool(x, rois, offset, mask, output_size=(3, 4), spatial_scale=0.5, gamma=0.3)

    return pool


@pytest.mark.parametrize("dtype", LOW_DTYPES)
def test_roi_pool_in_low_precision_is_within_an_ulp_of_float64(dtype):
    (x, rois, offset, mask), grad = pool_inputs("cuda")
    rounded = [t.to(dtype) for t in (x, offset, mask)]
    rois, grad = rois.to(dtype), grad.to(dtype)
    out, grads = forward_and_gradients(pooling(rois), rounded, grad)
    expected, expected_grads = forward_and_gradients(
        pooling(rois.double()), [t.double() for t in rounded], grad.double()
    )
    assert out.dtype == dtype
    assert_within_ulps(out, expected, dtype, 1, "output")
    for name, a, b in zip(["input", "offset", "mask"], grads, expected_grads):
        assert a.dtype == dtype
        assert_within_ulps(a, b, dtype, 1, f"grad of {name}")


@pytest.mark.parametrize("device", DEVICES)
def test_roi_pool_under_autocast_is_float32_on_the_inputs_it_gets(device):
    # Boxes stay float32; features and offsets come in the low dtype.
    (x, rois, offset, mask), grad = pool_inputs(device)
    low = torch.bfloat16
    inputs = [x.to(low), offset.to(low), mask.float()]
    with torch.autocast(device, dtype=low):
        out, grads = forward_and_gradients(pooling(rois.float()), inputs, grad)
    expected, expected_grads = forward_and_gradients(pooling(rois.float()), [t.float() for t in inputs], grad.float())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    for name, a, b in zip(["input", "offset", "mask"], grads, expected_grads):
        assert a.dtype == inputs[["input", "offset", "mask"].index(name)].dtype
        torch.testing.assert_close(a, b.to(a.dtype), rtol=1e-5, atol=1e-5, msg=lambda m: f"grad of {name}: {m}")
