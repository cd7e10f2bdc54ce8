"""An independent, pure-PyTorch (autograd-differentiable) reference for
deformable RoI pooling, written from the definition: RoIAlign (aligned=True)
sampling with every bin shifted by gamma * offset * roi size and scaled by
the mask. Slow and simple on purpose."""

import math

import torch


def _roi_align_bilinear(feature, y, x):
    """RoIAlign's bilinear sampling of feature [C, H, W] at points y, x [N].

    Points more than a pixel outside the map, and NaN or infinite points,
    read zero with zero gradient; points in (-1, 0] read the border (RoIAlign
    sets them to 0, so their coordinate gradient is zero there too)."""
    _, height, width = feature.shape
    inside = (y >= -1) & (y <= height) & (x >= -1) & (x <= width)
    # Moved inside before any arithmetic, so that no NaN reaches a gradient.
    y = torch.where(inside, y, 0.0)
    x = torch.where(inside, x, 0.0)
    y = torch.where(y <= 0, 0.0, y)
    x = torch.where(x <= 0, 0.0, x)
    y_low = y.detach().floor().long()
    x_low = x.detach().floor().long()
    y_at_edge = y_low >= height - 1
    x_at_edge = x_low >= width - 1
    y_low = torch.where(y_at_edge, height - 1, y_low)
    x_low = torch.where(x_at_edge, width - 1, x_low)
    y = torch.where(y_at_edge, y_low.to(y.dtype), y)
    x = torch.where(x_at_edge, x_low.to(x.dtype), x)
    y_high = torch.where(y_at_edge, y_low, y_low + 1)
    x_high = torch.where(x_at_edge, x_low, x_low + 1)
    ly, lx = y - y_low, x - x_low
    hy, hx = 1 - ly, 1 - lx

    def at(yy, xx):
        return feature[:, yy.clamp(0, height - 1), xx.clamp(0, width - 1)]

    value = (
        hy * hx * at(y_low, x_low)
        + hy * lx * at(y_low, x_high)
        + ly * hx * at(y_high, x_low)
        + ly * lx * at(y_high, x_high)
    )
    return torch.where(inside, value, 0.0)


def deform_roi_pool_reference(input, rois, offset, mask, output_size, spatial_scale, sampling_ratio, gamma):
    ph, pw = output_size
    outputs = []
    for k in range(rois.shape[0]):
        b = int(rois[k, 0])
        x1, y1, x2, y2 = (rois[k, 1:] * spatial_scale - 0.5).unbind()
        roi_w, roi_h = x2 - x1, y2 - y1
        bin_h, bin_w = roi_h / ph, roi_w / pw
        grid_h = sampling_ratio if sampling_ratio > 0 else max(math.ceil(bin_h.item()), 0)
        grid_w = sampling_ratio if sampling_ratio > 0 else max(math.ceil(bin_w.item()), 0)
        if grid_h * grid_w == 0:  # no sample: zero, still times the mask (a NaN mask stays NaN)
            outputs.append(input.new_zeros(input.shape[1], ph, pw) * (mask[k, 0] if mask is not None else 1))
            continue
        i = torch.arange(ph, dtype=input.dtype).view(ph, 1, 1, 1)
        j = torch.arange(pw, dtype=input.dtype).view(1, pw, 1, 1)
        iy = torch.arange(grid_h, dtype=input.dtype).view(1, 1, grid_h, 1)
        ix = torch.arange(grid_w, dtype=input.dtype).view(1, 1, 1, grid_w)
        dx = dy = 0
        if offset is not None:
            dx = (gamma * offset[k, 0] * roi_w).view(ph, pw, 1, 1)
            dy = (gamma * offset[k, 1] * roi_h).view(ph, pw, 1, 1)
        y = y1 + dy + i * bin_h + (iy + 0.5) * bin_h / grid_h
        x = x1 + dx + j * bin_w + (ix + 0.5) * bin_w / grid_w
        y, x = torch.broadcast_tensors(y, x)
        samples = _roi_align_bilinear(input[b], y.reshape(-1), x.reshape(-1))
        pooled = samples.view(-1, ph, pw, grid_h * grid_w).mean(dim=3)
        if mask is not None:
            pooled = pooled * mask[k, 0]
        outputs.append(pooled)
    if not outputs:
        return input.new_zeros(0, input.shape[1], ph, pw)
    return torch.stack(outputs)
