"""Effective spatial support of one network node (the DCNv2 talk's three
pictures), for any differentiable function of an image. Torch only.

A *node* here is a function `response(images [B, 3, H, W], masks [B, 1, H, W]
or None) -> [B, D]`: the D values of one unit (all its channels, or one) for
each image, with each image multiplied by its mask where the network sees it
(`nodes.py` builds them for detectors). Where a scalar is needed (gradients),
the node's value is the sum of its D values, as in Luo et al. (NIPS 2016),
who set the output gradient to 1 at the unit in every channel.
"""

from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import numpy as np
import torch

Response = Callable[[torch.Tensor, Optional[torch.Tensor]], torch.Tensor]

# The saliency region's bound: the relative L2 error of the node's response.
DEFAULT_EPSILON = 0.1


def sampled_value_gradient(
    weight: torch.Tensor, grad_output: torch.Tensor, mask: Optional[torch.Tensor], offset_groups: int = 1
) -> torch.Tensor:
    """The gradient of a node with respect to the values a (deformable) conv samples.

    DCNv2, Eq. 1: y(p) = sum_k w_k x(p + p_k + dp_k) dm_k, so the value
    sampled at kernel point k of unit p gets d node / d x(p + p_k + dp_k) =
    dm_k(p) * w_k^T g(p), with g = d node / d y the gradient at the conv's
    output (before any norm after it).

    Args:
        weight: [O, C, kh, kw] (one group of channels).
        grad_output: [O, H, W].
        mask: [G * kh * kw, H, W] modulation, or None (DCNv1, regular conv: 1).
        offset_groups: G; input channel c samples with offset group c // (C / G).
    Returns:
        [G, C / G, kh * kw, H, W]: per input channel, kernel point and output unit.
    """
    out_channels, in_channels, kh, kw = weight.shape
    points = kh * kw
    gradient = torch.einsum("ock,ohw->ckhw", weight.reshape(out_channels, in_channels, points), grad_output)
    gradient = gradient.reshape((offset_groups, in_channels // offset_groups, points) + tuple(grad_output.shape[1:]))
    if mask is not None:
        gradient = gradient * mask.reshape((offset_groups, 1, points) + tuple(mask.shape[1:]))
    return gradient


def sampling_locations(
    offset: torch.Tensor,
    kernel_size: Tuple[int, int],
    stride: Tuple[int, int],
    padding: Tuple[int, int],
    dilation: Tuple[int, int],
) -> torch.Tensor:
    """Where each kernel point of each output unit samples: p * stride -
    padding + p_k * dilation + dp_k, in the conv's input grid.

    Args:
        offset: [2 * G * kh * kw, H, W], interleaved (dy, dx) per kernel point.
    Returns:
        [G, kh * kw, H, W, 2] as (y, x).
    """
    kh, kw = kernel_size
    height, width = offset.shape[1:]
    offset = offset.reshape(-1, kh * kw, 2, height, width).permute(0, 1, 3, 4, 2)
    ky, kx = torch.meshgrid(torch.arange(kh) * dilation[0], torch.arange(kw) * dilation[1], indexing="ij")
    uy, ux = torch.meshgrid(torch.arange(height) * stride[0], torch.arange(width) * stride[1], indexing="ij")
    grid_y = ky.reshape(-1, 1, 1) + uy - padding[0]
    grid_x = kx.reshape(-1, 1, 1) + ux - padding[1]
    return torch.stack([grid_y, grid_x], -1).to(offset.dtype) + offset


def effective_receptive_field(response: Response, image: torch.Tensor) -> torch.Tensor:
    """Luo et al. (NIPS 2016): |d node / d pixel|, summed over the colour
    channels, for one image [3, H, W]; returns [H, W]."""
    pixels = image.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        (gradient,) = torch.autograd.grad(response(pixels[None], None).sum(), pixels)
    return gradient.abs().sum(0)


def relative_error(reference: torch.Tensor, responses: torch.Tensor) -> torch.Tensor:
    """L_rec: ||r - r_ref||_2 / ||r_ref||_2 per row of responses [B, D] against reference [D]."""
    scale = reference.norm().clamp_min(torch.finfo(reference.dtype).tiny)
    return (responses - reference).norm(dim=1) / scale


@dataclass
class SaliencyRegion:
    mask: np.ndarray  # [H, W] bool, M
    error: float  # L_rec of the image with M
    complement_error: float  # L_rec of the image with the complement of M alone
    epsilon: float


@torch.no_grad()
def saliency_region(
    response: Response,
    image: torch.Tensor,
    priority: torch.Tensor,
    epsilon: float = DEFAULT_EPSILON,
    batch_size: int = 8,
) -> SaliencyRegion:
    """The error-bounded saliency region (the DCNv2 talk):

        min ||M||_1  s.t.  L_rec(N(I), N(I * M)) < epsilon,

    searched over the regions made of the `priority` [H, W] map's top-k
    pixels (the effective receptive field, in practice). The region grows
    on a geometric grid of k, then a coarse-to-fine search narrows the
    first k that meets the bound down to 0.1% of the image (at least one
    pixel). The error need not
    fall monotonically as the region grows, so this is the smallest
    region along the search's path, not a certified minimum; it always
    meets the bound (at worst, the whole image does).
    """
    height, width = priority.shape
    total = height * width
    order = torch.argsort(priority.reshape(-1), descending=True, stable=True)
    rank = torch.empty(total, dtype=torch.long)
    rank[order] = torch.arange(total)
    rank = rank.reshape(1, 1, height, width)
    reference = response(image[None], None)[0]

    def errors(sizes):
        result = []
        for start in range(0, len(sizes), batch_size):
            chunk = torch.tensor(sizes[start : start + batch_size])
            masks = (rank < chunk.reshape(-1, 1, 1, 1)).to(image.dtype)
            result += relative_error(reference, response(image.expand(len(chunk), -1, -1, -1), masks)).tolist()
        return result

    grid = sorted(set(np.unique(np.round(np.geomspace(1, total, 24)).astype(int)).tolist()) | {total})
    grid_errors = errors(grid)
    first = next(i for i, error in enumerate(grid_errors) if error < epsilon or grid[i] == total)
    low, high, high_error = (grid[first - 1] if first else 0), grid[first], grid_errors[first]
    while high - low > max(1, total // 1000):
        inside = np.unique(np.linspace(low, high, batch_size + 2).round().astype(int))
        candidates = [size for size in inside.tolist() if low < size < high]
        candidate_errors = errors(candidates)
        passing = [i for i, error in enumerate(candidate_errors) if error < epsilon]
        if passing:
            high, high_error = candidates[passing[0]], candidate_errors[passing[0]]
            low = candidates[passing[0] - 1] if passing[0] else low
        else:
            low = candidates[-1]
    region = rank[0, 0] < high
    complement = (~region).to(image.dtype)[None, None]
    complement_error = relative_error(reference, response(image[None], complement)).item()
    return SaliencyRegion(region.numpy(), float(high_error), complement_error, epsilon)
