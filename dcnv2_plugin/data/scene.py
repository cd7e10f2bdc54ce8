"""One image: a cluttered background with warped, partly overlapping shapes.

Objects are placed one after another, each over the ones before it. A
placement is accepted only while every object, the new one included, keeps
enough of itself visible (after the image border and the objects above it);
otherwise another position is tried, and after `placement_attempts` failures
the object is left out. So every object in the image is annotated, and no
annotation is a sliver.
"""

from dataclasses import dataclass
from typing import List, Tuple

import cv2
import numpy as np

from .params import ShapesParams
from .shapes import class_template
from .warps import Warp, render_warped, sample_warp

# A pixel belongs to an object where its alpha (coverage) is at least half.
_ALPHA_THRESHOLD = 0.5
# Objects stand out from the background by at least this much luminance, and
# from each other by this RGB distance, so a person can see every edge.
_MIN_LUMINANCE_CONTRAST = 60.0
_MIN_COLOR_DISTANCE = 80.0
_LUMINANCE_WEIGHTS = np.array([0.299, 0.587, 0.114])


@dataclass
class Instance:
    category: int  # index into params.classes
    mask: np.ndarray  # bool [H, W]: the visible part
    full_area: int  # pixels of the whole object, hidden and off-image parts included
    warp: Warp

    @property
    def visible_fraction(self) -> float:
        return float(self.mask.sum()) / self.full_area


def _background(rng: np.random.Generator, params: ShapesParams) -> Tuple[np.ndarray, float]:
    """Smooth coloured shading, grain and distractor strokes; returns (RGB float image, base luminance)."""
    size = params.image_size
    luminance = rng.uniform(70.0, 185.0)
    tint = rng.normal(0.0, 20.0, 3)
    shading = cv2.resize(
        rng.normal(0.0, 18.0, (3, 3, 3)).astype(np.float32), (size, size), interpolation=cv2.INTER_CUBIC
    )
    grain = cv2.GaussianBlur(rng.normal(0.0, 10.0, (size, size)).astype(np.float32), (0, 0), 1.0)
    image = luminance + (tint - tint.mean()) + shading + grain[..., None]
    canvas = np.clip(image, 0, 255).astype(np.uint8)

    # Strokes look like shape parts (bars, arcs, corners) but are not objects.
    # Arcs and corners stay one pixel thin: thicker, a short arc would pass
    # for a crescent and a corner for an arrow head.
    for _ in range(rng.integers(params.clutter_strokes[0], params.clutter_strokes[1] + 1)):
        color = tuple(float(c) for c in np.clip(luminance + rng.uniform(-90.0, 90.0, 3), 0, 255))
        kind = rng.integers(3)
        if kind == 0:
            start, end = rng.uniform(0, size, (2, 2)).round().astype(int)
            cv2.line(canvas, tuple(start), tuple(end), color, int(rng.integers(1, 3)), cv2.LINE_AA)
        elif kind == 1:
            center = tuple(rng.uniform(0, size, 2).round().astype(int))
            axes = tuple(rng.uniform(4, 24, 2).round().astype(int))
            start_angle = rng.uniform(0, 360)
            cv2.ellipse(
                canvas,
                center,
                axes,
                rng.uniform(0, 180),
                start_angle,
                start_angle + rng.uniform(60, 270),
                color,
                1,
                cv2.LINE_AA,
            )
        else:
            steps = rng.uniform(-22, 22, (int(rng.integers(2, 5)), 2))
            points = np.cumsum(np.vstack([rng.uniform(0, size, (1, 2)), steps]), 0)
            cv2.polylines(canvas, [points.round().astype(np.int32)], False, color, 1, cv2.LINE_AA)
    return canvas.astype(np.float32), float(luminance)


def _object_color(rng: np.random.Generator, background_luminance: float, others: List[np.ndarray]) -> np.ndarray:
    # Rejection sampling; the constraints leave most of the RGB cube, so it
    # ends after a few draws.
    while True:
        color = rng.uniform(0.0, 255.0, 3)
        if abs(color @ _LUMINANCE_WEIGHTS - background_luminance) < _MIN_LUMINANCE_CONTRAST:
            continue
        if all(np.linalg.norm(color - other) >= _MIN_COLOR_DISTANCE for other in others):
            return color


def _object_layer(rng: np.random.Generator, color: np.ndarray, size: int) -> np.ndarray:
    """The object's paint over the whole image: its colour, a soft gradient and grain."""
    direction = rng.normal(0.0, 1.0, 2)
    x, y = np.meshgrid(np.linspace(-1, 1, size), np.linspace(-1, 1, size))
    gradient = 18.0 * (direction[0] * x + direction[1] * y) / max(np.linalg.norm(direction), 1e-6)
    grain = rng.normal(0.0, 6.0, (size, size))
    return (color + (gradient + grain)[..., None]).astype(np.float32)


def _paste(patch: np.ndarray, center: np.ndarray, size: int) -> np.ndarray:
    """The patch placed with its center at `center` on a size x size image, cut at the border."""
    canvas = np.zeros((size, size), np.float32)
    height, width = patch.shape
    left, top = np.round(center - np.array([width, height]) / 2.0).astype(int)
    x0, y0 = max(left, 0), max(top, 0)
    x1, y1 = min(left + width, size), min(top + height, size)
    if x0 < x1 and y0 < y1:
        canvas[y0:y1, x0:x1] = patch[y0 - top : y1 - top, x0 - left : x1 - left]
    return canvas


def _visible_enough(mask: np.ndarray, full_area: int, params: ShapesParams) -> bool:
    area = int(mask.sum())
    return area >= params.min_visible_area and area >= params.min_visible_fraction * full_area


def render_scene(rng: np.random.Generator, params: ShapesParams) -> Tuple[np.ndarray, List[Instance]]:
    """Draws one image; returns (RGB uint8 [H, W, 3], its instances in drawing order)."""
    size = params.image_size
    image, background_luminance = _background(rng, params)
    instances: List[Instance] = []
    colors: List[np.ndarray] = []
    low, high = params.objects_per_image
    for _ in range(rng.integers(low, high + 1)):
        category = int(rng.integers(len(params.classes)))
        warp = sample_warp(rng, params)
        patch = render_warped(class_template(params.classes[category]), warp)
        full_area = int((patch >= _ALPHA_THRESHOLD).sum())
        color = _object_color(rng, background_luminance, colors)
        layer = _object_layer(rng, color, size)
        for _ in range(params.placement_attempts):
            alpha = _paste(patch, rng.uniform(0.0, size, 2), size)
            mask = alpha >= _ALPHA_THRESHOLD
            if not _visible_enough(mask, full_area, params):
                continue
            if all(_visible_enough(other.mask & ~mask, other.full_area, params) for other in instances):
                for other in instances:
                    other.mask &= ~mask
                instances.append(Instance(category, mask, full_area, warp))
                colors.append(color)
                image = image * (1.0 - alpha[..., None]) + layer * alpha[..., None]
                break
    image = image + rng.normal(0.0, params.noise_sigma, image.shape)
    return np.clip(np.round(image), 0, 255).astype(np.uint8), instances
