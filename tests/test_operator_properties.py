"""Property-based tests of both operators (hypothesis): drawn shapes, strides,
paddings, dilations, groups, offset groups, dtypes, offsets, masks and RoIs,
bad values included, against an independent implementation.

- Deformable conv against torchvision's `deform_conv2d`. An offset that is
  NaN or infinite makes its sampling point read zero, as a point far outside
  the map does: the reference gets those offsets replaced by a far finite one.
- Deformable RoI pooling with zero offsets and no mask against torchvision's
  `roi_align(aligned=True)`; with offsets and masks against the
  pure-PyTorch reference (tests/reference_ops.py), where NaN, infinite and
  far-outside sampling points read zero with zero gradient too. A RoI with a
  NaN or infinite coordinate pools to zero and gets zero (finite) offset and
  mask gradients, and changes nothing for the other RoIs. A RoI whose batch
  index names no image of the batch (negative, too large, NaN or infinite)
  raises an error naming it.

Every property: no crash; outputs and gradients (input, offset, mask, weight,
bias) finite wherever the reference's are, and equal to them there within the
dtype's tolerance; non-finite values only where the reference has them (from
the convolution's non-finite masks). Sizes are small: an example takes
milliseconds.

Profiles (tests/conftest.py): "ci", the default, derandomized; "long"
(`--hypothesis-profile=long` or DCNV2_HYPOTHESIS_PROFILE=long), 10,000
examples per test with a fixed seed.
"""

import math
import re

import pytest
import torch
import torchvision
from hypothesis import given, note
from hypothesis import strategies as st
from reference_ops import deform_roi_pool_reference

from dcnv2_plugin.ops import deform_conv2d, deform_roi_pool

NAN, INF = float("nan"), float("inf")
# A finite stand-in for a non-finite offset: far outside any map drawn here.
FAR = 1e6
# Offset entries besides the smooth draws: non-finite, far outside the map,
# and whole and half pixels, where bilinear sampling switches taps.
SPECIAL_OFFSETS = [NAN, INF, -INF, FAR, -FAR, 1e30, -1e30] + [k / 2 for k in range(-12, 13)]
SPECIAL_CONV_MASKS = [NAN, INF, -INF, 0.0, -1.0, 2.0, 1e30]
# Pooling masks stay finite: where a bin samples nothing (a degenerate RoI,
# or every sample outside the map) autograd gives the reference's offset a
# zero gradient, while the kernel multiplies its zero sum by the mask: NaN
# for a NaN mask, whose bin's output is NaN anyway.
SPECIAL_POOL_MASKS = [0.0, -1.0, 2.0, 1e6, -1e6]
# |ours - reference| <= TOLERANCE * (1 + max |reference|), on the reference's finite entries.
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-10}
DTYPES = st.sampled_from([torch.float32, torch.float64])
# Feature-pixel extent of the largest RoIs: with an adaptive sampling grid
# (ceil(bin size) samples per bin side) a RoI costs about its area in
# samples, so those stay modest; a fixed grid costs the same at any size.
HUGE_ADAPTIVE, HUGE_FIXED = 128.0, 2000.0


@st.composite
def tensors(draw, shape, dtype, base, specials=()):
    """A tensor drawn from `base(shape, generator)` with a drawn seed, then up
    to 8 entries replaced by drawn `specials`."""
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    t = base(shape, generator)
    if t.numel() and specials:
        flat = t.view(-1)
        for index, value in draw(
            st.lists(st.tuples(st.integers(0, t.numel() - 1), st.sampled_from(specials)), max_size=8)
        ):
            flat[index] = value
    return t.to(dtype)


def normal(scale=1.0):
    return lambda shape, g: torch.randn(shape, generator=g, dtype=torch.float64) * scale


def uniform(shape, g):
    return torch.rand(shape, generator=g, dtype=torch.float64)


def assert_matches(actual, expected, name):
    """Finite wherever `expected` is, and within tolerance there."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)}, expected {tuple(expected.shape)}"
    finite = torch.isfinite(expected)
    broken = finite & ~torch.isfinite(actual)
    assert not broken.any(), f"{name}: non-finite where the reference is finite, at {broken.nonzero()[:4].tolist()}"
    if not finite.any():
        return
    a, e = actual[finite].double(), expected[finite].double()
    error, scale = (a - e).abs().max().item(), 1 + e.abs().max().item()
    assert error <= TOLERANCE[expected.dtype] * scale, f"{name}: off by {error:.3g} (reference up to {scale - 1:.3g})"


def gradients(out, inputs, grad):
    """d(out . grad)/d(inputs), None for an input that is None."""
    used = [t for t in inputs if t is not None]
    if out.requires_grad:
        found = iter(torch.autograd.grad(out, used, grad, allow_unused=True, materialize_grads=True))
    else:  # the reference's result for no RoI is a constant
        found = iter([torch.zeros_like(t) for t in used])
    return [None if t is None else next(found) for t in inputs]


def require_grad(*tensors):
    return [None if t is None else t.detach().requires_grad_() for t in tensors]


# ---------------------------------------------------------------- deform_conv2d
@st.composite
def conv_cases(draw):
    dtype = draw(DTYPES)
    groups, offset_groups = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    in_channels = math.lcm(groups, offset_groups) * draw(st.integers(1, 2))
    out_channels = groups * draw(st.integers(1, 2))
    kernel, stride, padding, dilation, size = [], [], [], [], []
    for _ in range(2):
        k, s, p, d = draw(st.integers(1, 3)), draw(st.integers(1, 2)), draw(st.integers(0, 2)), draw(st.integers(1, 2))
        smallest = max(1, d * (k - 1) + 1 - 2 * p)  # at least one output position
        kernel.append(k), stride.append(s), padding.append(p), dilation.append(d)
        size.append(draw(st.integers(smallest, smallest + 6)))
    out_size = [
        (n + 2 * p - (d * (k - 1) + 1)) // s + 1 for n, p, d, k, s in zip(size, padding, dilation, kernel, stride)
    ]
    batch = draw(st.integers(0, 2))
    points = kernel[0] * kernel[1]
    offset_scale = draw(st.sampled_from([0.5, 2.0, 6.0]))
    case = dict(
        x=draw(tensors((batch, in_channels, *size), dtype, normal())),
        offset=draw(
            tensors((batch, 2 * offset_groups * points, *out_size), dtype, normal(offset_scale), SPECIAL_OFFSETS)
        ),
        weight=draw(tensors((out_channels, in_channels // groups, *kernel), dtype, normal())),
        bias=draw(tensors((out_channels,), dtype, normal())) if draw(st.booleans()) else None,
        mask=draw(tensors((batch, offset_groups * points, *out_size), dtype, uniform, SPECIAL_CONV_MASKS))
        if draw(st.booleans())
        else None,
        grad=draw(tensors((batch, out_channels, *out_size), dtype, normal())),
        geometry=dict(stride=tuple(stride), padding=tuple(padding), dilation=tuple(dilation)),
    )
    note(f"geometry {case['geometry']}, groups {groups}, offset groups {offset_groups}, {dtype}")
    return case


@given(case=conv_cases())
def test_deform_conv2d_matches_torchvision(case):
    x, offset, weight, bias, mask = require_grad(*(case[k] for k in ("x", "offset", "weight", "bias", "mask")))
    ours = deform_conv2d(x, offset, weight, bias, mask=mask, **case["geometry"])
    far = torch.where(torch.isfinite(offset), offset, torch.full_like(offset, FAR)).detach().requires_grad_()
    ref = torchvision.ops.deform_conv2d(x, far, weight, bias, mask=mask, **case["geometry"])
    assert_matches(ours, ref, "output")
    ours_grads = gradients(ours, (x, offset, weight, bias, mask), case["grad"])
    ref_grads = gradients(ref, (x, far, weight, bias, mask), case["grad"])
    for name, a, b in zip(("input", "offset", "weight", "bias", "mask"), ours_grads, ref_grads):
        if b is not None:
            assert_matches(a, b, f"grad of {name}")


# -------------------------------------------------------------- deform_roi_pool
ROI_KINDS = ("inside", "degenerate", "reversed", "outside", "huge")


@st.composite
def roi_edges(draw, kind, size, adaptive, zero_extent, spatial_scale):
    """(start, end) of a RoI along a map side of `size` feature pixels."""
    if kind == "huge":
        # Bounded by 2000 image pixels, and by HUGE_ADAPTIVE feature pixels on an adaptive grid.
        longest = min(2000.0 * spatial_scale, HUGE_ADAPTIVE if adaptive else HUGE_FIXED)
        extent = draw(st.floats(min(size + 1.0, longest), longest))
        start = draw(st.floats(-extent + 1, 0.0))
    elif kind == "outside":
        extent = draw(st.floats(0.0, size + 1.0))
        start = draw(st.one_of(st.floats(size + 1.0, size + 50.0), st.floats(-50.0, -2.0 - extent)))
    else:
        start = draw(st.floats(-1.0, float(size)))
        extent = draw(st.floats(0.0, size + 1.0))
        if kind == "reversed":
            extent = -extent
    if kind == "degenerate" and zero_extent:
        extent = 0.0
    return start, start + extent


@st.composite
def pool_cases(draw, kinds=ROI_KINDS, offsets="special", masks="special", min_rois=0):
    """offsets / masks: "none", "zero" (offsets only), "finite" or "special",
    or a strategy drawing one of those."""
    offsets = draw(offsets) if isinstance(offsets, st.SearchStrategy) else offsets
    masks = draw(masks) if isinstance(masks, st.SearchStrategy) else masks
    dtype = draw(DTYPES)
    batch, channels = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    height, width = draw(st.integers(1, 8)), draw(st.integers(1, 8))
    output_size = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    spatial_scale = draw(st.sampled_from([1.0, 0.5, 0.3, 1 / 16]))
    sampling_ratio = draw(st.sampled_from([0, 0, 1, 2, 3]))
    num_rois = draw(st.integers(min_rois, 4))
    rois = []
    for _ in range(num_rois):
        kind = draw(st.sampled_from(kinds))
        # A degenerate RoI has no extent along one side or both.
        zero_y, zero_x = draw(st.sampled_from([(True, False), (False, True), (True, True)]))
        y1, y2 = draw(roi_edges(kind, height, sampling_ratio == 0, zero_y, spatial_scale))
        x1, x2 = draw(roi_edges(kind, width, sampling_ratio == 0, zero_x, spatial_scale))
        index = draw(st.integers(0, batch - 1))
        rois.append([index] + [v / spatial_scale for v in (x1, y1, x2, y2)])
    shape = (num_rois, 2, *output_size)
    offset = None
    if offsets == "zero":
        offset = torch.zeros(shape, dtype=dtype)
    elif offsets != "none":
        scale = draw(st.sampled_from([0.1, 1.0, 5.0]))
        offset = draw(tensors(shape, dtype, normal(scale), SPECIAL_OFFSETS if offsets == "special" else ()))
    mask = None
    if masks != "none":
        shape = (num_rois, 1, *output_size)
        mask = draw(tensors(shape, dtype, uniform, SPECIAL_POOL_MASKS if masks == "special" else ()))
    case = dict(
        x=draw(tensors((batch, channels, height, width), dtype, normal())),
        rois=torch.tensor(rois, dtype=dtype).reshape(num_rois, 5),
        offset=offset,
        mask=mask,
        grad=draw(tensors((num_rois, channels, *output_size), dtype, normal())),
        kwargs=dict(
            output_size=output_size,
            spatial_scale=spatial_scale,
            sampling_ratio=sampling_ratio,
            gamma=draw(st.sampled_from([0.1, 0.5, 1.0])),
        ),
    )
    note(f"rois {case['rois'].tolist()}, {case['kwargs']}, {dtype}")
    return case


def reference_pool(x, rois, offset, mask, kwargs):
    return deform_roi_pool_reference(
        x, rois, offset, mask, kwargs["output_size"], kwargs["spatial_scale"], kwargs["sampling_ratio"], kwargs["gamma"]
    )


# torchvision's roi_align fails on inverted RoIs with an adaptive grid: the
# reference test below covers those.
@given(
    case=pool_cases(
        kinds=("inside", "degenerate", "outside", "huge"), offsets=st.sampled_from(["none", "zero"]), masks="none"
    )
)
def test_deform_roi_pool_without_offsets_is_roi_align(case):
    x, offset = require_grad(case["x"], case["offset"])
    kwargs = case["kwargs"]
    ours = deform_roi_pool(x, case["rois"], offset, **kwargs)
    ref = torchvision.ops.roi_align(
        x, case["rois"], kwargs["output_size"], kwargs["spatial_scale"], kwargs["sampling_ratio"], aligned=True
    )
    assert_matches(ours, ref, "output")
    grad_input, grad_offset = gradients(ours, (x, offset), case["grad"])
    assert_matches(grad_input, gradients(ref, (x,), case["grad"])[0], "grad of input")
    if offset is not None:
        offset_ref = offset.detach().requires_grad_()
        pooled = reference_pool(x, case["rois"], offset_ref, None, kwargs)
        assert_matches(grad_offset, gradients(pooled, (offset_ref,), case["grad"])[0], "grad of offset")


@given(case=pool_cases(offsets=st.sampled_from(["none", "special"]), masks=st.sampled_from(["none", "special"])))
def test_deform_roi_pool_matches_the_reference(case):
    x, offset, mask = require_grad(case["x"], case["offset"], case["mask"])
    ours = deform_roi_pool(x, case["rois"], offset, mask, **case["kwargs"])
    ref = reference_pool(x, case["rois"], offset, mask, case["kwargs"])
    assert_matches(ours, ref, "output")
    ours_grads = gradients(ours, (x, offset, mask), case["grad"])
    ref_grads = gradients(ref, (x, offset, mask), case["grad"])
    for name, a, b in zip(("input", "offset", "mask"), ours_grads, ref_grads):
        if b is not None:
            assert_matches(a, b, f"grad of {name}")


def assert_broken_rois_pool_to_zero(case, rois, broken):
    """RoIs `broken` pool to zero with zero offset and mask gradients (and
    nothing for the input); the others are pooled as if those were not there."""
    x, offset, mask = require_grad(case["x"], case["offset"], case["mask"])
    ours = deform_roi_pool(x, rois, offset, mask, **case["kwargs"])
    grad_input, grad_offset, grad_mask = gradients(ours, (x, offset, mask), case["grad"])
    for name, t in (("output", ours), ("grad of offset", grad_offset), ("grad of mask", grad_mask)):
        assert torch.equal(t[broken], torch.zeros_like(t[broken])), f"{name} of the broken RoIs: {t[broken]}"
    kept = [k for k in range(rois.shape[0]) if k not in broken]
    ref = reference_pool(x, rois[kept], offset[kept], mask[kept], case["kwargs"])
    assert_matches(ours[kept], ref, "output of the other RoIs")
    ref_input, ref_offset, ref_mask = gradients(ref, (x, offset, mask), case["grad"][kept])
    assert_matches(grad_input, ref_input, "grad of input")
    assert_matches(grad_offset[kept], ref_offset[kept], "grad of offset of the other RoIs")
    assert_matches(grad_mask[kept], ref_mask[kept], "grad of mask of the other RoIs")


@given(case=pool_cases(offsets="finite", masks="finite", min_rois=1), data=st.data())
def test_a_roi_with_a_non_finite_coordinate_pools_to_zero_with_zero_gradients(case, data):
    rois = case["rois"].clone()
    broken = data.draw(st.lists(st.integers(0, rois.shape[0] - 1), min_size=1, unique=True), label="broken rois")
    for k in broken:
        for column in data.draw(st.lists(st.integers(1, 4), min_size=1, unique=True), label=f"columns of roi {k}"):
            rois[k, column] = data.draw(st.sampled_from([NAN, INF, -INF]), label=f"rois[{k}, {column}]")
    assert_broken_rois_pool_to_zero(case, rois, broken)


@given(case=pool_cases(offsets="finite", masks="finite", min_rois=1), data=st.data())
def test_a_roi_whose_batch_index_names_no_image_raises_naming_it(case, data):
    rois = case["rois"].clone()
    batch = case["x"].shape[0]
    broken = data.draw(st.lists(st.integers(0, rois.shape[0] - 1), min_size=1, unique=True), label="broken rois")
    for k in broken:
        rois[k, 0] = data.draw(st.sampled_from([-1.0, float(batch), batch + 3.0, 2.0**40, -(2.0**40), NAN, INF, -INF]))
    first = min(broken)
    shown = re.escape(f"{rois[first, 0].item():g}")  # as C++ streams print it: -1, 1.09951e+12, nan, -inf
    message = rf"rois\[{first}, 0\] = {shown} is not a batch index of input \(batch size {batch}\)"
    with pytest.raises(RuntimeError, match=message):
        deform_roi_pool(case["x"], rois, case["offset"], case["mask"], **case["kwargs"])
