"""Matplotlib figures of sampling points and RoI bins over an image.

Points are coloured by their weight (the modulation, or its product along a
path through stacked layers), on a scale from 0 to the figure's largest
weight, and drawn weakest first so the strongest stay visible.
"""

from typing import Optional, Sequence, Tuple

import numpy as np

# Figures are built without pyplot: no global state, no display backend.
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

_COLORMAP = "plasma"
_PANEL_INCHES = 4.0


def _image_axes(ax, image: np.ndarray, title: str) -> None:
    ax.imshow(image)
    ax.set_xlim(-0.5, image.shape[1] - 0.5)
    ax.set_ylim(image.shape[0] - 0.5, -0.5)
    ax.set_title(title, fontsize=9)
    ax.axis("off")


def _weighted_scatter(ax, yx: np.ndarray, weights: np.ndarray, vmax: float, size: float):
    order = np.argsort(weights, kind="stable")
    return ax.scatter(
        yx[order, 1],
        yx[order, 0],
        c=weights[order],
        cmap=_COLORMAP,
        vmin=0.0,
        vmax=vmax,
        s=size,
        linewidths=0,
        alpha=0.85,
    )


def sampling_figure(
    image: np.ndarray,
    panels: Sequence[Tuple[np.ndarray, np.ndarray, np.ndarray, str]],
    weight_label: Optional[str],
) -> Figure:
    """One panel per unit: (unit (y, x), points [N, 2], weights [N], title).

    weight_label: colour bar label, or None when the weights carry no
    information (DCNv1 and regular convs) and points get one colour.
    """
    figure = Figure(figsize=(_PANEL_INCHES * len(panels), _PANEL_INCHES))
    axes = figure.subplots(1, len(panels), squeeze=False)
    vmax = max(float(weights.max()) for _, _, weights, _ in panels) or 1.0
    for ax, (unit, points, weights, title) in zip(axes[0], panels):
        _image_axes(ax, image, title)
        if weight_label is None:
            ax.scatter(points[:, 1], points[:, 0], color="red", s=6, linewidths=0, alpha=0.6)
        else:
            scatter = _weighted_scatter(ax, points, weights, vmax, size=6)
        ax.plot(unit[1], unit[0], "o", color="lime", markersize=9, markerfacecolor="none", markeredgewidth=2)
    if weight_label is not None:
        figure.colorbar(scatter, ax=axes[0].tolist(), shrink=0.8, label=weight_label)
    return figure


def roi_bins_figure(
    image: np.ndarray,
    boxes: np.ndarray,
    labels: Sequence[str],
    regular: np.ndarray,
    shifted: np.ndarray,
    weights: Optional[np.ndarray],
    title: str,
) -> Figure:
    """Boxes [R, 4] (x1, y1, x2, y2), each bin's regular center (white) and
    shifted center, joined by a line; centers [R, ph, pw, 2] as (y, x).

    weights: [R, ph, pw] modulation, or None for unmodulated pooling.
    """
    figure = Figure(figsize=(_PANEL_INCHES * 1.6, _PANEL_INCHES * 1.6))
    ax = figure.subplots()
    _image_axes(ax, image, title)
    for box, label in zip(boxes, labels):
        x1, y1, x2, y2 = box
        # Boxes use pixel edges; the image is drawn with pixel centers at integers.
        ax.add_patch(Rectangle((x1 - 0.5, y1 - 0.5), x2 - x1, y2 - y1, fill=False, edgecolor="cyan", linewidth=1.2))
        ax.text(x1 - 0.5, y1 - 1.5, label, color="cyan", fontsize=7, va="bottom")
    start, end = regular.reshape(-1, 2), shifted.reshape(-1, 2)
    ax.plot(
        np.stack([start[:, 1], end[:, 1]]), np.stack([start[:, 0], end[:, 0]]), color="white", linewidth=0.5, alpha=0.7
    )
    ax.scatter(start[:, 1], start[:, 0], color="white", s=3, linewidths=0)
    if weights is None:
        ax.scatter(end[:, 1], end[:, 0], color="red", s=10, linewidths=0)
    else:
        flat = weights.reshape(-1)
        scatter = _weighted_scatter(ax, end, flat, float(flat.max()) or 1.0, size=10)
        figure.colorbar(scatter, ax=ax, shrink=0.7, label="bin modulation")
    return figure


def _node_marker(ax, support) -> None:
    """The conv5 unit (a circle) or the 2fc node's box."""
    if support.unit is not None:
        ax.plot(support.unit[1], support.unit[0], "o", color="lime", markersize=9, markerfacecolor="none", mew=2)
    if support.box is not None:
        x1, y1, x2, y2 = support.box
        ax.add_patch(Rectangle((x1 - 0.5, y1 - 0.5), x2 - x1, y2 - y1, fill=False, edgecolor="lime", linewidth=1.2))


def spatial_support_figure(image: np.ndarray, rows: Sequence[Tuple[str, object]], title: str) -> Figure:
    """One row per model (title, `SpatialSupport`): the effective sampling or
    bin locations (coloured by their share of the gradient), the effective
    receptive field (|gradient| per pixel, over a grey image, scaled to the
    panel's largest value) and the saliency region (the rest of the image
    dimmed)."""
    panel = _PANEL_INCHES * 0.75
    figure = Figure(figsize=(panel * 3, panel * len(rows) + 0.4), layout="constrained")
    axes = figure.subplots(len(rows), 3, squeeze=False)
    grey = image.mean(2, keepdims=True).repeat(3, 2).astype(np.uint8)
    for (model, support), (locations, field, saliency) in zip(rows, axes):
        weights = support.locations.weights
        kind = "bin locations" if support.box is not None else "sampling locations"
        _image_axes(locations, image, f"{model}: effective {kind}\n{support.locations.description}")
        scatter = _weighted_scatter(locations, support.locations.points, weights, float(weights.max()) or 1.0, 8)
        figure.colorbar(scatter, ax=locations, shrink=0.7, label="share of |gradient|")
        _node_marker(locations, support)

        _image_axes(field, grey, f"effective receptive field, {support.node}")
        heat = support.receptive_field / (support.receptive_field.max() or 1.0)
        field.imshow(heat, cmap="inferno", alpha=0.75, vmin=0.0, vmax=1.0)
        _node_marker(field, support)

        region = support.saliency
        dimmed = np.where(region.mask[..., None], image, (image * 0.25).astype(image.dtype))
        _image_axes(
            saliency,
            dimmed,
            f"saliency region: {region.mask.mean():.0%} of the image\n"
            f"L_rec {region.error:.3f} < {region.epsilon:g} (rest alone: {region.complement_error:.2f})",
        )
        _node_marker(saliency, support)
    figure.suptitle(title, fontsize=10)
    return figure
