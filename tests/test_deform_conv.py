"""Modulated deformable convolution against torchvision's deform_conv2d,
gradcheck, opcheck, dtypes, thread-count invariance and argument errors."""

import pytest
import torch
import torch.nn.functional as F
import torchvision
from helpers import DEVICES
from torch.autograd import gradcheck

from dcnv2_plugin.ops import DeformConv2d, DeformConv2dPack, deform_conv2d

# (batch, in, out, height, width, kernel, stride, padding, dilation, groups, offset_groups, offset scale)
CONFIGS = [
    (2, 4, 6, 7, 8, (3, 3), (1, 1), (1, 1), (1, 1), 1, 1, 1.0),
    (1, 6, 4, 9, 7, (3, 2), (2, 1), (1, 0), (2, 1), 2, 3, 2.0),  # non-square, stride, dilation, groups
    (3, 4, 4, 5, 6, (1, 3), (1, 2), (0, 2), (1, 2), 4, 2, 1.5),  # depthwise-style groups
    (1, 2, 3, 4, 5, (3, 3), (1, 1), (1, 1), (1, 1), 1, 1, 8.0),  # many samples outside the map
    (0, 4, 4, 6, 6, (3, 3), (1, 1), (1, 1), (1, 1), 1, 2, 1.0),  # empty batch
]
IDS = ["basic", "odd-kernel-stride-dilation-groups", "depthwise-offset-groups", "outside-map", "batch-0"]


def make_inputs(config, dtype, device, use_mask=True, requires_grad=True):
    batch, cin, cout, h, w, (kh, kw), stride, pad, dil, groups, ogroups, scale = config
    out_h = (h + 2 * pad[0] - (dil[0] * (kh - 1) + 1)) // stride[0] + 1
    out_w = (w + 2 * pad[1] - (dil[1] * (kw - 1) + 1)) // stride[1] + 1
    g = torch.Generator().manual_seed(0)

    def rand(*shape, fn=torch.randn):
        return fn(*shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype).requires_grad_(requires_grad)

    x = rand(batch, cin, h, w)
    weight = rand(cout, cin // groups, kh, kw)
    bias = rand(cout)
    offset = torch.randn(batch, 2 * ogroups * kh * kw, out_h, out_w, generator=g, dtype=torch.float64) * scale
    offset = offset.to(device=device, dtype=dtype).requires_grad_(requires_grad)
    mask = rand(batch, ogroups * kh * kw, out_h, out_w, fn=torch.rand) if use_mask else None
    return x, offset, weight, bias, mask, dict(stride=stride, padding=pad, dilation=dil)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("use_mask", [True, False], ids=["dcnv2", "dcnv1"])
@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_matches_torchvision_forward_and_gradients(config, use_mask, device):
    x, offset, weight, bias, mask, kw = make_inputs(config, torch.float64, device, use_mask)
    tensors = [t for t in (x, offset, weight, bias, mask) if t is not None]
    ours = deform_conv2d(x, offset, weight, bias, mask=mask, **kw)
    theirs = torchvision.ops.deform_conv2d(x, offset, weight, bias, mask=mask, **kw)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)
    grad_out = torch.randn_like(ours)
    ours_grads = torch.autograd.grad(ours, tensors, grad_out, allow_unused=True)
    theirs_grads = torch.autograd.grad(theirs, tensors, grad_out, allow_unused=True)
    for name, a, b in zip(["input", "offset", "weight", "bias", "mask"], ours_grads, theirs_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=lambda m: f"grad of {name}: {m}")


@pytest.mark.parametrize("device", DEVICES)
def test_zero_offsets_on_the_pixel_grid_match_torchvision_gradients(device):
    # Integer sampling points, including y = -1 / x = -1 from the padding: the
    # border case where the offset gradient is one-sided.
    x = torch.randn(1, 3, 5, 6, dtype=torch.float64, device=device, requires_grad=True)
    weight = torch.randn(2, 3, 3, 3, dtype=torch.float64, device=device)
    offset = torch.zeros(1, 18, 5, 6, dtype=torch.float64, device=device, requires_grad=True)
    mask = torch.rand(1, 9, 5, 6, dtype=torch.float64, device=device, requires_grad=True)
    ours = deform_conv2d(x, offset, weight, padding=1, mask=mask)
    theirs = torchvision.ops.deform_conv2d(x, offset, weight, padding=1, mask=mask)
    torch.testing.assert_close(ours, theirs)
    g = torch.randn_like(ours)
    for a, b in zip(torch.autograd.grad(ours, (x, offset, mask), g), torch.autograd.grad(theirs, (x, offset, mask), g)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("use_mask", [True, False], ids=["dcnv2", "dcnv1"])
@pytest.mark.parametrize("config", CONFIGS[:3] + CONFIGS[4:], ids=IDS[:3] + IDS[4:])
def test_gradcheck(config, use_mask, device):
    x, offset, weight, bias, mask, kw = make_inputs(config, torch.float64, device, use_mask)

    def fn(x, offset, weight, bias, mask):
        return deform_conv2d(x, offset, weight, bias, mask=mask, **kw)

    assert gradcheck(fn, (x, offset, weight, bias, mask), nondet_tol=1e-10 if device == "cuda" else 0.0)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device):
    x, offset, weight, bias, mask, kw = make_inputs(CONFIGS[0], torch.float64, device, requires_grad=False)
    # Same values, other memory layouts: channels-last input, transposed weight storage, strided offsets.
    x_nc = x.to(memory_format=torch.channels_last)
    weight_nc = weight.transpose(2, 3).contiguous().transpose(2, 3)
    offset_nc = torch.cat([offset, offset], dim=3)[..., : offset.shape[3]]
    assert not offset_nc.is_contiguous() and not weight_nc.is_contiguous() and not x_nc.is_contiguous()
    torch.testing.assert_close(
        deform_conv2d(x_nc, offset_nc, weight_nc, bias, mask=mask, **kw),
        deform_conv2d(x, offset, weight, bias, mask=mask, **kw),
    )


# float16, bfloat16 and autocast: test_low_precision.py.
@pytest.mark.parametrize(
    "dtype,device,tol",
    [
        (torch.float32, "cpu", 1e-5),
        pytest.param(torch.float32, "cuda", 1e-4, marks=DEVICES[1].marks),
    ],
)
def test_lower_precision_dtypes_match_float64(dtype, device, tol):
    x, offset, weight, bias, mask, kw = make_inputs(CONFIGS[0], torch.float64, device)
    expected = deform_conv2d(x, offset, weight, bias, mask=mask, **kw)
    cast = [t.detach().to(dtype).requires_grad_() for t in (x, offset, weight, bias, mask)]
    out = deform_conv2d(cast[0], cast[1], cast[2], cast[3], mask=cast[4], **kw)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol * 10)
    out.square().sum().backward()
    expected.square().sum().backward()
    for name, low, high in zip(["input", "offset", "weight", "bias", "mask"], cast, (x, offset, weight, bias, mask)):
        assert low.grad.dtype == dtype
        torch.testing.assert_close(low.grad.double(), high.grad, rtol=tol, atol=tol * 10, msg=lambda m: f"{name}: {m}")


def _fwd_bwd_at_thread_counts(x, offset, weight, bias, mask, kw):
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            out = deform_conv2d(x, offset, weight, bias, mask=mask, **kw)
            grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
            inputs = [t for t in (x, offset, weight, bias, mask) if t is not None]
            results.append((out,) + torch.autograd.grad(out, inputs, grad_out))
    finally:
        torch.set_num_threads(threads)
    return results


def test_results_do_not_depend_on_thread_count():
    x, offset, weight, bias, mask, kw = make_inputs(CONFIGS[1], torch.float32, "cpu")
    # Larger than one column chunk's worth of parallel tasks.
    x = torch.randn(2, 6, 20, 24, requires_grad=True)
    out_h, out_w = (20 + 2 - 5) // 2 + 1, 24 - 1
    offset = torch.randn(2, offset.shape[1], out_h, out_w, requires_grad=True)
    mask = torch.rand(2, mask.shape[1], out_h, out_w, requires_grad=True)
    results = _fwd_bwd_at_thread_counts(x, offset, weight, bias, mask, kw)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


# Detection widths (64-512 channels) rather than the tiny shapes above, where
# the float32 contraction runs on oneDNN with a packed weight: several tiles,
# spanning images, with a padded last one; and few channels on a large map,
# where the forward is one tile and the weight gradient one GEMM per tile.
@pytest.mark.parametrize(
    "shape", [(1, 64, 40, 48), (2, 128, 30, 34), (3, 256, 12, 17), (2, 512, 13, 20), (1, 16, 64, 64)]
)
def test_results_at_detection_widths_do_not_depend_on_thread_count(shape):
    g = torch.Generator().manual_seed(0)
    batch, channels, height, width = shape
    x = torch.randn(shape, generator=g).requires_grad_()
    weight = (torch.randn(channels, channels, 3, 3, generator=g) * 0.05).requires_grad_()
    offset = (torch.randn(batch, 18, height, width, generator=g) * 2).requires_grad_()
    mask = torch.rand(batch, 9, height, width, generator=g).requires_grad_()
    results = _fwd_bwd_at_thread_counts(x, offset, weight, None, mask, {"padding": 1})
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)
    # And they are right: torchvision's kernel in float64, gradients included.
    inputs = [t.detach().double().requires_grad_() for t in (x, offset, weight, mask)]
    expected = torchvision.ops.deform_conv2d(inputs[0], inputs[1], inputs[2], padding=1, mask=inputs[3])
    grad_out = torch.randn(expected.shape, generator=torch.Generator().manual_seed(1)).double()  # as above
    expected_grads = torch.autograd.grad(expected, inputs, grad_out)
    for ours, theirs in zip(results[0], (expected,) + expected_grads):
        torch.testing.assert_close(ours.double(), theirs, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("onednn", [True, False], ids=["onednn", "onednn-off"])
def test_float32_contraction_paths_match_torchvision(onednn):
    # float32 contracts on oneDNN with a packed weight, or through at::conv2d
    # when oneDNN is switched off: both must give torchvision's results
    # (here with 2 groups and 2 offset groups).
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 64, 20, 24, generator=g).requires_grad_()
    weight = (torch.randn(32, 32, 3, 3, generator=g) * 0.05).requires_grad_()
    offset = (torch.randn(2, 2 * 2 * 9, 20, 24, generator=g) * 2).requires_grad_()
    mask = torch.rand(2, 2 * 9, 20, 24, generator=g).requires_grad_()
    kw = dict(padding=1)
    with torch.backends.mkldnn.flags(enabled=onednn):
        out = deform_conv2d(x, offset, weight, mask=mask, **kw)
        grads = torch.autograd.grad(out.square().sum(), (x, offset, weight, mask))
    inputs = [t.detach().double().requires_grad_() for t in (x, offset, weight, mask)]
    expected = torchvision.ops.deform_conv2d(inputs[0], inputs[1], inputs[2], mask=inputs[3], **kw)
    expected_grads = torch.autograd.grad(expected.square().sum(), inputs)
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-4)
    for ours, theirs in zip(grads, expected_grads):
        torch.testing.assert_close(ours.double(), theirs, rtol=1e-3, atol=1e-3)


def test_opcheck():
    x, offset, weight, bias, mask, kw = make_inputs(CONFIGS[1], torch.float64, "cpu")
    args = (x, weight, offset, mask, bias, *kw["stride"], *kw["padding"], *kw["dilation"], 2, 3)
    torch.library.opcheck(torch.ops.dcnv2.deform_conv2d, args)
    torch.library.opcheck(torch.ops.dcnv2.deform_conv2d, (x, weight, offset, None, None) + args[5:])
    grad = torch.randn_like(torch.ops.dcnv2.deform_conv2d(*args))
    detached = [t.detach() for t in args[:5]]
    torch.library.opcheck(torch.ops.dcnv2._deform_conv2d_backward, (grad, *detached) + args[5:])


def test_module_starts_as_half_a_regular_conv():
    torch.manual_seed(0)
    layer = DeformConv2dPack(4, 5, 3, stride=2, padding=2, dilation=2, groups=1, offset_groups=2)
    x = torch.randn(2, 4, 9, 11)
    regular = F.conv2d(x, layer.weight, layer.bias, stride=2, padding=2, dilation=2)
    bias = layer.bias.view(1, -1, 1, 1)
    # sigmoid(0) = 0.5 scales the sampled values, not the bias.
    torch.testing.assert_close(layer(x), (regular - bias) * 0.5 + bias)
    v1 = DeformConv2dPack(4, 5, (3, 1), padding=(1, 0), modulated=False)
    torch.testing.assert_close(v1(x), F.conv2d(x, v1.weight, v1.bias, padding=(1, 0)))
    assert v1.conv_offset.out_channels == 2 * 3 and layer.conv_offset.out_channels == 2 * 3 * 9


def test_module_with_given_offsets_matches_torchvisions():
    torch.manual_seed(0)
    ours = DeformConv2d(4, 6, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=2).double()
    theirs = torchvision.ops.DeformConv2d(4, 6, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=2)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 4, 7, 8, dtype=torch.float64)
    out_h, out_w = 4, 10
    offset = torch.randn(2, 2 * 2 * 6, out_h, out_w, dtype=torch.float64)  # two offset groups
    mask = torch.rand(2, 2 * 6, out_h, out_w, dtype=torch.float64)
    torch.testing.assert_close(ours(x, offset, mask), theirs.double()(x, offset, mask))
    torch.testing.assert_close(ours(x, offset), theirs(x, offset))
    # Initialized as nn.Conv2d initializes its weight and bias: same bounds.
    conv = torch.nn.Conv2d(4, 6, (3, 2), groups=2)
    for ours_param, conv_param in ((ours.weight, conv.weight), (ours.bias, conv.bias)):
        bound = conv_param.abs().max().item()
        assert ours_param.abs().max().item() <= bound * 1.2 and ours_param.std() > 0.3 * conv_param.std()


@pytest.mark.parametrize("modulated", [True, False], ids=["dcnv2", "dcnv1"])
def test_module_trains_its_offsets(modulated):
    # Zero-initialized, the offset conv gets the gradient of torchvision's
    # deformable conv fed by a plain conv: offsets from its first channels,
    # interleaved (dy, dx) per kernel point and offset group, then the
    # modulation logits through a sigmoid.
    torch.manual_seed(0)
    layer = DeformConv2dPack(4, 5, 3, stride=2, padding=1, offset_groups=2, modulated=modulated).double()
    x = torch.randn(2, 4, 7, 8, dtype=torch.float64)
    layer(x).square().sum().backward()

    offset_weight, offset_bias = (
        p.detach().requires_grad_() for p in (layer.conv_offset.weight, layer.conv_offset.bias)
    )
    offset_mask = F.conv2d(x, offset_weight, offset_bias, stride=2, padding=1)
    mask = offset_mask[:, 36:].sigmoid() if modulated else None
    out = torchvision.ops.deform_conv2d(
        x, offset_mask[:, :36], layer.weight.detach(), layer.bias.detach(), stride=2, padding=1, mask=mask
    )
    expected = torch.autograd.grad(out.square().sum(), (offset_weight, offset_bias))
    assert expected[0].abs().sum() > 0
    torch.testing.assert_close(layer.conv_offset.weight.grad, expected[0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(layer.conv_offset.bias.grad, expected[1], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    "change,error,match",
    [
        (lambda a: {**a, "input": a["input"][0]}, ValueError, "input must be a 4-D"),
        (lambda a: {**a, "weight": a["weight"][:, :3]}, ValueError, "weight expects 3 input channels per group"),
        (
            lambda a: {**a, "weight": torch.randn(5, 2, 3, 3, dtype=torch.float64)},
            ValueError,
            "not divisible by groups",
        ),
        (lambda a: {**a, "offset": a["offset"][:, :17]}, ValueError, "offset must have 2 \\* offset_groups"),
        (lambda a: {**a, "offset": a["offset"][:, :, :3]}, ValueError, "offset must have shape"),
        (lambda a: {**a, "mask": a["mask"][:, :4]}, ValueError, "mask must have shape"),
        (lambda a: {**a, "bias": torch.zeros(3, dtype=torch.float64)}, ValueError, "bias must have 6"),
        (lambda a: {**a, "weight": a["weight"].float()}, TypeError, "weight has dtype torch.float32"),
        (
            lambda a: {**a, "input": a["input"].long(), "weight": a["weight"].long()},
            TypeError,
            "input has dtype torch.int64",
        ),
        (lambda a: {**a, "mask": a["mask"].to("meta")}, ValueError, "mask is on meta"),
        (lambda a: {**a, "stride": 0}, ValueError, "stride must be positive"),
        (lambda a: {**a, "input": a["input"][:, :, :1, :1], "padding": 0}, ValueError, "output would be empty"),
    ],
)
def test_bad_arguments_raise_clear_errors(change, error, match):
    x, offset, weight, bias, mask, kw = make_inputs(CONFIGS[0], torch.float64, "cpu", requires_grad=False)
    args = change(dict(input=x, offset=offset, weight=weight, bias=bias, mask=mask, **kw))
    with pytest.raises(error, match=match):
        deform_conv2d(**args)


def test_direct_op_call_with_bad_shapes_raises_instead_of_crashing():
    x = torch.randn(1, 4, 6, 6)
    with pytest.raises(RuntimeError, match="offset has shape"):
        torch.ops.dcnv2.deform_conv2d(
            x, torch.randn(4, 4, 3, 3), torch.randn(1, 18, 2, 2), None, None, 1, 1, 1, 1, 1, 1, 1, 1
        )


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic_algorithms_mode(device):
    # CPU: deterministic by construction, so it runs and gives the same
    # results. CUDA: the backward scatters with atomics and must refuse.
    x, offset, weight, bias, mask, kw = make_inputs(CONFIGS[0], torch.float32, device)
    inputs = (x, offset, weight, bias, mask)
    expected = torch.autograd.grad(deform_conv2d(x, offset, weight, bias, mask=mask, **kw).sum(), inputs)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        out = deform_conv2d(x, offset, weight, bias, mask=mask, **kw)
        if device == "cuda":
            with pytest.raises(RuntimeError, match="_deform_conv2d_backward"):
                torch.autograd.grad(out.sum(), inputs)
        else:
            for a, b in zip(torch.autograd.grad(out.sum(), inputs), expected):
                assert torch.equal(a, b)
    finally:
        torch.use_deterministic_algorithms(previous)


@pytest.mark.parametrize("device", DEVICES[1:])
def test_batch_64_matches_image_by_image(device):
    # The batch size that overflowed 32-bit indices in older kernels.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 512, 25, 34, generator=g).to(device)
    weight = (torch.randn(512, 512, 3, 3, generator=g) * 0.02).to(device)
    offset = (torch.randn(64, 18, 25, 34, generator=g) * 2).to(device)
    mask = torch.rand(64, 9, 25, 34, generator=g).to(device)
    out = deform_conv2d(x, offset, weight, padding=1, mask=mask)
    for b in (0, 31, 63):
        one = deform_conv2d(x[b : b + 1], offset[b : b + 1], weight, padding=1, mask=mask[b : b + 1])
        torch.testing.assert_close(out[b : b + 1], one, rtol=1e-4, atol=1e-4)
    torch.cuda.synchronize()
