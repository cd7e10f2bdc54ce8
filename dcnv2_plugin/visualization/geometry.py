"""Where deformable layers sample, in image coordinates. Pure numpy.

Image coordinates here are pixel indices (pixel (0, 0) is centered at
(0, 0)), as matplotlib's imshow draws them. In these coordinates, unit i of a
feature map with stride S is centered at S * i: a k x k conv with stride s
and padding (k - 1) / 2, or a 1x1 conv with stride s, centers its output i
on input s * i, and ResNet is built from those.
"""

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np

IntPair = Tuple[int, int]


@dataclass(frozen=True)
class DeformableConvGeometry:
    """One deformable conv as it ran on one image.

    offset: [2 * kh * kw, out_h, out_w], interleaved (dy, dx) per kernel
        point, kernel points in row-major order (the operator's layout).
    mask: [kh * kw, out_h, out_w] modulation in [0, 1], or None (DCNv1).
    input_stride: stride of the conv's input feature map w.r.t. the image.
    """

    offset: np.ndarray
    mask: Optional[np.ndarray]
    kernel_size: IntPair
    stride: IntPair
    padding: IntPair
    dilation: IntPair
    input_stride: int

    def __post_init__(self):
        kh, kw = self.kernel_size
        if self.offset.ndim != 3 or self.offset.shape[0] != 2 * kh * kw:
            raise ValueError(
                f"offset must be [2 * {kh} * {kw}, out_h, out_w] for a {kh}x{kw} kernel, got {self.offset.shape}"
            )
        if self.mask is not None and self.mask.shape != (kh * kw,) + self.offset.shape[1:]:
            raise ValueError(f"mask must be [{kh * kw}, out_h, out_w] like offset, got {self.mask.shape}")

    @property
    def output_stride(self) -> Tuple[float, float]:
        return self.input_stride * self.stride[0], self.input_stride * self.stride[1]


def bilinear(field: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Samples field [C, H, W] at fractional (y, x) points [N, 2] -> [N, C].

    Points beyond the map take the border's values: the previous layer's
    sampling points may fall outside its output, and its nearest units
    stand in for them.
    """
    height, width = field.shape[1:]
    y = np.clip(points[:, 0], 0, height - 1)
    x = np.clip(points[:, 1], 0, width - 1)
    y0 = np.minimum(np.floor(y).astype(int), height - 2) if height > 1 else np.zeros(len(y), int)
    x0 = np.minimum(np.floor(x).astype(int), width - 2) if width > 1 else np.zeros(len(x), int)
    y1, x1 = np.minimum(y0 + 1, height - 1), np.minimum(x0 + 1, width - 1)
    wy, wx = (y - y0)[:, None], (x - x0)[:, None]
    top = field[:, y0, x0].T * (1 - wx) + field[:, y0, x1].T * wx
    bottom = field[:, y1, x0].T * (1 - wx) + field[:, y1, x1].T * wx
    return top * (1 - wy) + bottom * wy


def _kernel_grid(layer: DeformableConvGeometry) -> np.ndarray:
    """The regular grid's (y, x) displacements of the kernel points, row-major: [K, 2]."""
    kh, kw = layer.kernel_size
    ky, kx = np.meshgrid(np.arange(kh) * layer.dilation[0], np.arange(kw) * layer.dilation[1], indexing="ij")
    return np.stack([ky.ravel(), kx.ravel()], 1).astype(np.float64)


def _sample_once(layer: DeformableConvGeometry, units: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """The K sampling points (in the layer's input grid) of each output unit, and their modulation.

    DCNv2, Eq. 1: unit p samples p * stride - padding + p_k + dp_k, weighted by dm_k.
    Returns points [N, K, 2] (y, x) and modulation [N, K].
    """
    num_points = layer.kernel_size[0] * layer.kernel_size[1]
    offsets = bilinear(layer.offset, units).reshape(len(units), num_points, 2)
    origin = units * np.array(layer.stride, np.float64) - np.array(layer.padding, np.float64)
    points = origin[:, None, :] + _kernel_grid(layer)[None] + offsets
    if layer.mask is None:
        return points, np.ones((len(units), num_points))
    return points, bilinear(layer.mask, units)


def compose_sampling_points(
    layers: Sequence[DeformableConvGeometry], unit: Tuple[float, float]
) -> Tuple[np.ndarray, np.ndarray]:
    """The sampling points of `unit` through stacked deformable convs (DCNv1, Fig. 5).

    `unit` is a (y, x) position in the last layer's output. Its K sampling
    points in that layer's input are followed back through each earlier
    layer, whose K points for every one of them multiply the count, so three
    3x3 layers give 9 * 9 * 9 = 729 points. Layers between the deformable
    ones are taken as 1x1 (as in a bottleneck ResNet's 1x1 convs): a point
    moves to the previous layer's output by the ratio of their strides.

    Args:
        layers: the deformable convs in forward order.
        unit: (y, x) in the last layer's output grid.
    Returns:
        points [K^L, 2] as image (y, x), and weights [K^L]: the product of the
        modulation along each path (all ones for DCNv1).
    """
    if not layers:
        raise ValueError("compose_sampling_points needs at least one deformable layer")
    points = np.array([unit], np.float64)
    weights = np.ones(1)
    for index in range(len(layers) - 1, -1, -1):
        layer = layers[index]
        sampled, modulation = _sample_once(layer, points)
        points = sampled.reshape(-1, 2)
        weights = (weights[:, None] * modulation).ravel()
        if index > 0:
            # From this layer's input grid to the previous layer's output grid.
            points = points * layer.input_stride / np.array(layers[index - 1].output_stride)
    return points * layers[0].input_stride, weights


def roi_bin_centers(boxes: np.ndarray, offset: np.ndarray, gamma: float) -> Tuple[np.ndarray, np.ndarray]:
    """Bin centers of deformable RoI pooling (DCNv2, Eq. 2), in image coordinates.

    Bin (i, j) of box (x1, y1, x2, y2) moves by gamma * offset * (box width,
    box height) from its regular place.

    Args:
        boxes: [R, 4] (x1, y1, x2, y2) with pixel edges as coordinates, as
            detectron2 and the pooling operator (RoIAlignV2) use them.
        offset: [R, 2, ph, pw] normalized (dx, dy) per bin.
    Returns:
        regular and shifted centers, [R, ph, pw, 2] as image (y, x) pixel indices.
    """
    num_boxes, _, pooled_h, pooled_w = offset.shape
    if boxes.shape != (num_boxes, 4):
        raise ValueError(f"boxes must be [{num_boxes}, 4] like offset's first dimension, got {boxes.shape}")
    x1, y1, x2, y2 = (boxes[:, i, None, None] for i in range(4))
    box_w, box_h = x2 - x1, y2 - y1
    rows = (np.arange(pooled_h)[None, :, None] + 0.5) / pooled_h
    cols = (np.arange(pooled_w)[None, None, :] + 0.5) / pooled_w
    # Pixel edges to pixel indices: subtract half a pixel.
    regular = np.stack(np.broadcast_arrays(y1 + rows * box_h - 0.5, x1 + cols * box_w - 0.5), -1)
    shift = np.stack([gamma * offset[:, 1] * box_h, gamma * offset[:, 0] * box_w], -1)
    return regular, regular + shift


def sampling_points_at(
    layers: Sequence[DeformableConvGeometry], image_yx: Tuple[float, float]
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`compose_sampling_points` for the last layer's unit nearest to an image point.

    Returns the unit's own image position (y, x), the points and the weights.
    """
    last = layers[-1]
    out_h, out_w = last.offset.shape[1:]
    stride = np.array(last.output_stride, np.float64)
    unit = np.clip(np.round(np.asarray(image_yx, np.float64) / stride), 0, [out_h - 1, out_w - 1])
    points, weights = compose_sampling_points(layers, tuple(unit))
    return unit * stride, points, weights
