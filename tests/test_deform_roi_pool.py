"""(Modulated) deformable RoI pooling: zero offsets against torchvision's
roi_align(aligned=True), offsets and masks against an independent
pure-PyTorch reference, gradcheck, opcheck, torch.compile and errors."""

import pytest
import torch
import torchvision
from helpers import DEVICES
from reference_ops import deform_roi_pool_reference
from torch.autograd import gradcheck

from dcnv2_plugin.ops import DeformConv2dPack, DeformRoIPool, deform_roi_pool

ROIS = [
    [0, 1.2, 2.3, 8.5, 9.1],  # ordinary
    [1, 0.0, 0.0, 23.0, 19.0],  # the whole map
    [0, 5.0, 5.0, 5.0, 5.0],  # degenerate: zero size
    [1, -6.0, -4.0, 4.0, 30.0],  # partly outside
    [0, 40.0, 50.0, 60.0, 70.0],  # wholly outside
    [1, 9.0, 3.0, 2.0, 8.0],  # inverted (x2 < x1)
    [0, 3.3, 0.7, 3.9, 17.2],  # thin
]


def make_inputs(device, dtype=torch.float64, num_rois=None, output_size=(3, 4), requires_grad=True):
    num_rois = len(ROIS) if num_rois is None else num_rois
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 10, 12, generator=g, dtype=torch.float64)
    rois = torch.tensor(ROIS[:num_rois], dtype=torch.float64)
    offset = torch.randn(num_rois, 2, *output_size, generator=g, dtype=torch.float64)
    mask = torch.rand(num_rois, 1, *output_size, generator=g, dtype=torch.float64)
    x, offset, mask = (t.to(device=device, dtype=dtype).requires_grad_(requires_grad) for t in (x, offset, mask))
    return x, rois.to(device=device, dtype=dtype), offset, mask


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sampling_ratio", [0, 1, 2])
@pytest.mark.parametrize("spatial_scale", [1.0, 0.5])
def test_without_offsets_it_is_roi_align_v2(device, sampling_ratio, spatial_scale):
    x, rois, offset, _ = make_inputs(device)
    # torchvision's roi_align fails on inverted boxes (x2 < x1) with an
    # adaptive grid; those are covered by the reference test below.
    upright = (rois[:, 3] >= rois[:, 1]) & (rois[:, 4] >= rois[:, 2])
    rois, offset = rois[upright], offset[upright]
    kw = dict(output_size=(3, 4), spatial_scale=spatial_scale, sampling_ratio=sampling_ratio)
    expected = torchvision.ops.roi_align(x, rois, aligned=True, **kw)
    g = torch.randn_like(expected)
    expected_grad = torch.autograd.grad(expected, x, g)[0]
    for off in (None, torch.zeros_like(offset)):
        ours = deform_roi_pool(x, rois, off, **kw)
        torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(torch.autograd.grad(ours, x, g)[0], expected_grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("use_offset,use_mask", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("sampling_ratio", [0, 2])
def test_matches_reference_with_offsets_and_masks(device, use_offset, use_mask, sampling_ratio):
    x, rois, offset, mask = make_inputs(device)
    offset = offset if use_offset else None
    mask = mask if use_mask else None
    kw = dict(output_size=(3, 4), spatial_scale=0.5, sampling_ratio=sampling_ratio, gamma=0.3)
    ours = deform_roi_pool(x, rois, offset, mask, **kw)
    ref = deform_roi_pool_reference(
        x.cpu(),
        rois.cpu(),
        *(t.cpu() if t is not None else None for t in (offset, mask)),
        kw["output_size"],
        kw["spatial_scale"],
        sampling_ratio,
        kw["gamma"],
    )
    torch.testing.assert_close(ours.cpu(), ref, rtol=1e-10, atol=1e-10)
    inputs = [t for t in (x, offset, mask) if t is not None]
    g = torch.randn_like(ours)
    for a, b in zip(torch.autograd.grad(ours, inputs, g), torch.autograd.grad(ref, inputs, g.cpu())):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sampling_ratio", [0, 2])
def test_gradcheck(device, sampling_ratio):
    x, rois, offset, mask = make_inputs(device)
    # Keep samples away from the pixel grid's kinks: gradcheck differentiates numerically.
    offset = (offset * 0.37 + 0.013).detach().requires_grad_()

    def fn(x, offset, mask):
        return deform_roi_pool(
            x, rois, offset, mask, output_size=(3, 4), spatial_scale=0.5, sampling_ratio=sampling_ratio
        )

    assert gradcheck(fn, (x, offset, mask), nondet_tol=1e-10 if device == "cuda" else 0.0)


@pytest.mark.parametrize("device", DEVICES)
def test_no_rois(device):
    x, rois, offset, mask = make_inputs(device)
    out = deform_roi_pool(x, rois[:0], offset[:0], mask[:0], output_size=(3, 4))
    assert out.shape == (0, 3, 3, 4)
    out.sum().backward()
    assert x.grad is not None and torch.all(x.grad == 0)


# float16, bfloat16 and autocast: test_low_precision.py.
@pytest.mark.parametrize(
    "dtype,device,tol",
    [
        (torch.float32, "cpu", 1e-5),
        pytest.param(torch.float32, "cuda", 1e-5, marks=DEVICES[1].marks),
    ],
)
def test_lower_precision_dtypes(dtype, device, tol):
    x, rois, offset, mask = make_inputs(device)
    expected = deform_roi_pool(x, rois, offset, mask, output_size=(3, 4), spatial_scale=0.5)
    cast = [t.detach().to(dtype).requires_grad_() for t in (x, offset, mask)]
    out = deform_roi_pool(cast[0], rois.to(dtype), cast[1], cast[2], output_size=(3, 4), spatial_scale=0.5)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol)
    out.square().sum().backward()
    expected.square().sum().backward()
    for name, low, high in zip(["input", "offset", "mask"], cast, (x, offset, mask)):
        assert low.grad.dtype == dtype
        torch.testing.assert_close(low.grad.double(), high.grad, rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")


def test_results_do_not_depend_on_thread_count():
    x, rois, offset, mask = make_inputs("cpu", dtype=torch.float32)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            out = deform_roi_pool(x, rois, offset, mask, output_size=(3, 4), spatial_scale=0.5)
            results.append((out,) + torch.autograd.grad(out, (x, offset, mask), torch.ones_like(out)))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_rois_as_list_of_boxes():
    x, rois, offset, mask = make_inputs("cpu", requires_grad=False)
    boxes = [rois[rois[:, 0] == i, 1:] for i in range(2)]
    order = torch.cat([torch.nonzero(rois[:, 0] == i).flatten() for i in range(2)])
    expected = deform_roi_pool(x, rois[order], offset[order], mask[order], output_size=(3, 4))
    torch.testing.assert_close(deform_roi_pool(x, boxes, offset[order], mask[order], output_size=(3, 4)), expected)


def test_opcheck():
    x, rois, offset, mask = make_inputs("cpu")
    args = (x, rois, offset, mask, 3, 4, 0.5, 2, 0.1)
    torch.library.opcheck(torch.ops.dcnv2.deform_roi_pool, args)
    torch.library.opcheck(torch.ops.dcnv2.deform_roi_pool, (x, rois, None, None, 3, 4, 0.5, 0, 0.1))
    grad = torch.randn(len(ROIS), 3, 3, 4, dtype=torch.float64)
    torch.library.opcheck(
        torch.ops.dcnv2._deform_roi_pool_backward,
        (grad, x.detach(), rois, offset.detach(), mask.detach(), 3, 4, 0.5, 2, 0.1),
    )


class _TinyDeformableHead(torch.nn.Module):
    """A module using both operators, for torch.compile."""

    def __init__(self):
        super().__init__()
        self.conv = DeformConv2dPack(3, 4, 3, padding=1)
        self.pool = DeformRoIPool((2, 2), spatial_scale=0.5, sampling_ratio=2)
        self.offset = torch.nn.Linear(4 * 2 * 2, 3 * 2 * 2)

    def forward(self, x, rois):
        features = self.conv(x)
        plain = self.pool(features, rois)
        om = self.offset(plain.flatten(1)).view(-1, 3, 2, 2)
        return self.pool(features, rois, om[:, :2], om[:, 2:].sigmoid())


# inductor generates and compiles C++ for the CPU: slow.
@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_torch_compile_fullgraph(backend):
    torch.manual_seed(0)
    model = _TinyDeformableHead()
    x = torch.randn(2, 3, 10, 12)
    rois = torch.tensor(ROIS[:4], dtype=torch.float32)
    expected = model(x, rois)
    expected_grads = torch.autograd.grad(expected.square().sum(), list(model.parameters()))
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    out = compiled(x, rois)
    torch.testing.assert_close(out, expected)
    grads = torch.autograd.grad(out.square().sum(), list(model.parameters()))
    names = [name for name, _ in model.named_parameters()]
    for name, grad, expected_grad in zip(names, grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, msg=lambda m: f"grad of {name}: {m}")
    assert grads[names.index("conv.conv_offset.weight")].abs().sum() > 0  # through both operators' backward


@pytest.mark.parametrize(
    "change,error,match",
    [
        (lambda a: {**a, "input": a["input"][0]}, ValueError, "input must be a 4-D"),
        (lambda a: {**a, "rois": a["rois"][:, :4]}, ValueError, "rois must have 5 columns"),
        (lambda a: {**a, "rois": a["rois"][0]}, ValueError, "rois must be a 2-D"),
        (lambda a: {**a, "offset": a["offset"][:, :1]}, ValueError, "offset must have shape"),
        (lambda a: {**a, "offset": a["offset"][:3]}, ValueError, "offset must have shape"),
        (lambda a: {**a, "mask": a["mask"][..., :2]}, ValueError, "mask must have shape"),
        (lambda a: {**a, "mask": a["mask"].float()}, TypeError, "mask has dtype torch.float32"),
        (lambda a: {**a, "rois": a["rois"].to("meta")}, ValueError, "rois is on meta"),
        (lambda a: {**a, "output_size": (0, 2)}, ValueError, "output_size must be positive"),
    ],
)
def test_bad_arguments_raise_clear_errors(change, error, match):
    x, rois, offset, mask = make_inputs("cpu", requires_grad=False)
    args = change(dict(input=x, rois=rois, offset=offset, mask=mask, output_size=(3, 4)))
    with pytest.raises(error, match=match):
        deform_roi_pool(**args)


def test_bad_batch_index_raises_instead_of_crashing():
    x, rois, offset, mask = make_inputs("cpu", requires_grad=False)
    rois = rois.clone()
    rois[1, 0] = 7
    with pytest.raises(RuntimeError, match="is not a batch index"):
        deform_roi_pool(x, rois, offset, mask, output_size=(3, 4))
