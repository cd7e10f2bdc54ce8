"""The operators and their modules on the meta device (shape inference,
deferred initialization): the fake kernels give the shapes the CPU kernels
give, for the forward and every gradient, and modules built under
`torch.device("meta")` run there and materialize on a real device."""

import pytest
import torch

from dcnv2_plugin.ops import DeformConv2d, DeformConv2dPack, DeformRoIPool, deform_conv2d, deform_roi_pool

# (batch, in, out, height, width, kernel, stride, padding, dilation, groups, offset_groups)
CONV_CONFIGS = [
    (2, 4, 6, 7, 8, (3, 3), (1, 1), (1, 1), (1, 1), 1, 1),
    (1, 6, 4, 9, 7, (3, 2), (2, 1), (1, 0), (2, 1), 2, 3),
    (0, 4, 4, 6, 6, (1, 3), (1, 2), (0, 2), (1, 2), 4, 2),
]


def conv_inputs(config, device, use_mask, dtype=torch.float32):
    batch, cin, cout, h, w, (kh, kw), stride, pad, dil, groups, ogroups = config
    out_h = (h + 2 * pad[0] - (dil[0] * (kh - 1) + 1)) // stride[0] + 1
    out_w = (w + 2 * pad[1] - (dil[1] * (kw - 1) + 1)) // stride[1] + 1
    shapes = [
        (batch, cin, h, w),
        (batch, 2 * ogroups * kh * kw, out_h, out_w),
        (cout, cin // groups, kh, kw),
        (cout,),
        (batch, ogroups * kh * kw, out_h, out_w) if use_mask else None,
    ]
    tensors = [None if s is None else torch.rand(s, dtype=dtype).to(device).requires_grad_() for s in shapes]
    return tensors, dict(stride=stride, padding=pad, dilation=dil)


def output_and_gradient_shapes(fn, tensors):
    out = fn(*tensors)
    used = [t for t in tensors if t is not None]
    grads = torch.autograd.grad(out, used, torch.ones_like(out))
    return out.shape, out.dtype, [g.shape for g in grads]


@pytest.mark.parametrize("use_mask", [True, False], ids=["dcnv2", "dcnv1"])
@pytest.mark.parametrize("config", CONV_CONFIGS, ids=["basic", "odd-groups", "batch-0"])
def test_deform_conv2d_on_meta_has_the_cpu_shapes(config, use_mask):
    def fn(x, offset, weight, bias, mask):
        return deform_conv2d(x, offset, weight, bias, mask=mask, **kw)

    meta, kw = conv_inputs(config, "meta", use_mask)
    cpu, _ = conv_inputs(config, "cpu", use_mask)
    assert output_and_gradient_shapes(fn, meta) == output_and_gradient_shapes(fn, cpu)
    assert fn(*meta).device.type == "meta"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_meta_accepts_every_dtype_some_device_supports(dtype):
    (x, offset, weight, bias, mask), kw = conv_inputs(CONV_CONFIGS[0], "meta", True, dtype)
    assert deform_conv2d(x, offset, weight, bias, mask=mask, **kw).dtype == dtype


def test_argument_errors_are_raised_on_meta_too():
    (x, offset, weight, bias, mask), kw = conv_inputs(CONV_CONFIGS[0], "meta", True)
    with pytest.raises(ValueError, match="offset must have shape"):
        deform_conv2d(x, offset[:, :, :-1], weight, bias, mask=mask, **kw)
    with pytest.raises(TypeError, match="weight has dtype torch.float64"):
        deform_conv2d(x, offset, weight.double(), bias, mask=mask, **kw)


def pool_inputs(device, num_rois, use_offset, use_mask, output_size=(3, 4)):
    x = torch.rand(2, 5, 9, 11).to(device).requires_grad_()
    rois = torch.tensor([[0, 1.0, 2.0, 7.0, 8.0]] * num_rois).reshape(num_rois, 5).to(device)
    offset = torch.rand(num_rois, 2, *output_size).to(device).requires_grad_() if use_offset else None
    mask = torch.rand(num_rois, 1, *output_size).to(device).requires_grad_() if use_mask else None
    return x, rois, offset, mask


@pytest.mark.parametrize("num_rois", [0, 3])
@pytest.mark.parametrize("use_offset, use_mask", [(False, False), (True, False), (True, True)])
def test_deform_roi_pool_on_meta_has_the_cpu_shapes(num_rois, use_offset, use_mask):
    def fn(x, rois, offset, mask):
        return deform_roi_pool(x, rois, offset, mask, output_size=(3, 4), spatial_scale=0.5)

    def shapes(device):
        x, rois, offset, mask = pool_inputs(device, num_rois, use_offset, use_mask)
        out = fn(x, rois, offset, mask)
        used = [t for t in (x, offset, mask) if t is not None]
        return out.shape, [g.shape for g in torch.autograd.grad(out, used, torch.ones_like(out))]

    assert shapes("meta") == shapes("cpu")


def test_deform_roi_pool_on_meta_takes_per_image_boxes():
    x = torch.empty(2, 5, 9, 11, device="meta")
    boxes = [torch.empty(2, 4, device="meta"), torch.empty(3, 4, device="meta")]
    assert deform_roi_pool(x, boxes, output_size=7).shape == (5, 5, 7, 7)


def build_modules():
    return {
        "DeformConv2d": DeformConv2d(4, 6, (3, 2), stride=(2, 1), padding=1, dilation=(1, 2), groups=2),
        "DeformConv2dPack-modulated": DeformConv2dPack(4, 6, 3, padding=1, offset_groups=2),
        "DeformConv2dPack-unmodulated": DeformConv2dPack(4, 6, 3, padding=1, modulated=False),
        "DeformRoIPool": DeformRoIPool((3, 4), spatial_scale=0.5, sampling_ratio=2),
    }


def run_module(name, module, device):
    x = torch.rand(2, 4, 9, 11).to(device)
    if name == "DeformConv2d":
        offset = torch.rand(2, 2 * 3 * 2, 5, 11).to(device)
        return module(x, offset, torch.rand(2, 3 * 2, 5, 11).to(device))
    if name == "DeformRoIPool":
        # float32 boxes for any feature dtype, as detectron2 passes them
        rois = torch.tensor([[0, 1.0, 2.0, 7.0, 8.0], [1, 0.0, 0.0, 20.0, 16.0]]).to(device)
        return module(x, rois, torch.rand(2, 2, 3, 4).to(device), torch.rand(2, 1, 3, 4).to(device))
    return module(x)


@pytest.mark.parametrize("name", list(build_modules()))
def test_modules_built_on_meta_run_there_and_materialize(name):
    with torch.device("meta"):
        module = build_modules()[name]
    assert all(p.device.type == "meta" for p in module.parameters())
    meta_out = run_module(name, module, "meta")
    assert meta_out.device.type == "meta"
    assert meta_out.shape == run_module(name, build_modules()[name], "cpu").shape
    # Deferred initialization: allocate on a real device, then initialize.
    module.to_empty(device="cpu")
    for submodule in module.modules():
        if hasattr(submodule, "reset_parameters"):
            submodule.reset_parameters()
    out = run_module(name, module, "cpu")
    assert out.shape == meta_out.shape and torch.isfinite(out).all()
