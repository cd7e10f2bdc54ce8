"""Deformable RoI pooling against torchvision's roi_align, sharing none of its
rules: moving a box keeps its bin grid (bin sizes and the adaptive sampling
grid depend on the box size only), so bin (i, j) of deformable pooling is bin
(i, j) of RoIAlign(aligned=True) of the box shifted by that bin's offset,
gamma * offset * box size (DCNv2, Eq. 2), times the bin's modulation."""

import pytest
import torch
import torchvision
from helpers import DEVICES

from dcnv2_plugin.ops import deform_roi_pool

OUTPUT_SIZE = (3, 4)
GAMMA = 0.3
# Upright boxes (torchvision's roi_align is not defined on inverted ones), in
# image coordinates of a 20 x 24 image (a 10 x 12 map at scale 0.5).
BOXES = [
    [0, 1.2, 2.3, 8.5, 9.1],  # ordinary
    [1, 0.0, 0.0, 23.0, 19.0],  # the whole image: shifted bins leave the map
    [1, -6.0, -4.0, 4.0, 30.0],  # partly outside
    [0, 3.3, 0.7, 3.9, 17.2],  # thin: one sample across, several down
    [1, 10.1, 6.2, 21.7, 13.9],  # bins wider than a pixel: an adaptive grid of several samples
]


def make_inputs(device, num_channels=3):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, num_channels, 10, 12, generator=g, dtype=torch.float64)
    rois = torch.tensor(BOXES, dtype=torch.float64)
    offset = torch.randn(len(BOXES), 2, *OUTPUT_SIZE, generator=g, dtype=torch.float64) * 1.5
    mask = torch.rand(len(BOXES), 1, *OUTPUT_SIZE, generator=g, dtype=torch.float64)
    return (t.to(device) for t in (x, rois, offset, mask))


def roi_align_of_shifted_boxes(x, rois, offset, mask, spatial_scale, sampling_ratio):
    """Bin (i, j) of torchvision's RoIAlign(aligned=True) on each box shifted
    by bin (i, j)'s offset, times bin (i, j)'s modulation: [K, C, ph, pw]."""
    num_rois, (ph, pw) = rois.shape[0], OUTPUT_SIZE
    width, height = rois[:, 3] - rois[:, 1], rois[:, 4] - rois[:, 2]
    dx = GAMMA * offset[:, 0] * width.view(-1, 1, 1)  # [K, ph, pw], image units
    dy = GAMMA * offset[:, 1] * height.view(-1, 1, 1)
    zero = torch.zeros_like(dx)
    shifted = rois.view(-1, 1, 1, 5) + torch.stack([zero, dx, dy, dx, dy], dim=3)  # one box per bin
    pooled = torchvision.ops.roi_align(
        x, shifted.view(-1, 5), OUTPUT_SIZE, spatial_scale, sampling_ratio, aligned=True
    ).view(num_rois, ph, pw, x.shape[1], ph, pw)
    i = torch.arange(ph, device=x.device).view(ph, 1)
    j = torch.arange(pw, device=x.device).view(1, pw)
    # The box shifted for bin (i, j) contributes its own bin (i, j) only.
    bins = pooled[:, i, j, :, i, j].permute(2, 3, 0, 1)  # [ph, pw, K, C] -> [K, C, ph, pw]
    return bins if mask is None else bins * mask


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("modulated", [True, False], ids=["mdpool", "dpool"])
@pytest.mark.parametrize("sampling_ratio", [0, 2])
@pytest.mark.parametrize("spatial_scale", [1.0, 0.5])
def test_each_bin_is_roi_align_of_the_box_shifted_by_its_offset(device, modulated, sampling_ratio, spatial_scale):
    x, rois, offset, mask = make_inputs(device)
    mask = mask if modulated else None
    x.requires_grad_()
    if mask is not None:
        mask.requires_grad_()
    kw = dict(output_size=OUTPUT_SIZE, spatial_scale=spatial_scale, sampling_ratio=sampling_ratio, gamma=GAMMA)
    ours = deform_roi_pool(x, rois, offset, mask, **kw)
    theirs = roi_align_of_shifted_boxes(x, rois, offset, mask, spatial_scale, sampling_ratio)
    assert theirs.flatten(1).ne(0).any(dim=1).all()  # every box samples the map
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)

    # The input and mask gradients follow from the same identity.
    inputs = [x] if mask is None else [x, mask]
    grad = torch.randn(ours.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(device)
    for name, a, b in zip(
        ["input", "mask"], torch.autograd.grad(ours, inputs, grad), torch.autograd.grad(theirs, inputs, grad)
    ):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=lambda m: f"grad of {name}: {m}")
