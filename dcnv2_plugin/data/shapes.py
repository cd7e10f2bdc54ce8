"""The object classes: canonical shapes, drawn once as high-resolution alpha maps.

Classes differ only in shape (colour and texture are random per instance), and
some pairs share parts (an arrow ends in a triangle, a cross and an F are both
made of bars, a ring and a crescent are both round), so telling them apart
under rotation, shear and warps takes a model of the geometry, not a local
texture cue. No class is a rotated or mirrored copy of another.
"""

from functools import lru_cache
from typing import Callable, Dict

import cv2
import numpy as np

# Side of the square canonical template, in pixels; it is only ever sampled
# down (objects are at most about half of this), so edges stay smooth.
TEMPLATE_SIZE = 128
# Part of the template side the shape's longer side spans; the rest is
# border so warps never sample past a shape's edge.
TEMPLATE_SPAN = 0.84
_DRAW_SIZE = 512  # shapes are drawn large, then cropped and resized


def _polygon(points) -> np.ndarray:
    canvas = np.zeros((_DRAW_SIZE, _DRAW_SIZE), np.uint8)
    pts = np.round(np.asarray(points, np.float64) * _DRAW_SIZE).astype(np.int32)
    cv2.fillPoly(canvas, [pts], 255, lineType=cv2.LINE_AA)
    return canvas


def _star(points: int = 5, inner: float = 0.42) -> np.ndarray:
    angles = -np.pi / 2 + np.arange(2 * points) * np.pi / points
    radii = np.where(np.arange(2 * points) % 2 == 0, 0.45, 0.45 * inner)
    return _polygon(np.stack([0.5 + radii * np.cos(angles), 0.5 + radii * np.sin(angles)], 1))


def _arrow() -> np.ndarray:
    # Shaft on the left, triangular head on the right.
    return _polygon([(0.05, 0.39), (0.55, 0.39), (0.55, 0.18), (0.95, 0.5), (0.55, 0.82), (0.55, 0.61), (0.05, 0.61)])


def _cross() -> np.ndarray:
    a, b = 0.38, 0.62
    return _polygon(
        [
            (a, 0.05),
            (b, 0.05),
            (b, a),
            (0.95, a),
            (0.95, b),
            (b, b),
            (b, 0.95),
            (a, 0.95),
            (a, b),
            (0.05, b),
            (0.05, a),
            (a, a),
        ]
    )


def _triangle() -> np.ndarray:
    return _polygon([(0.5, 0.08), (0.93, 0.85), (0.07, 0.85)])


def _discs(outer: float, inner: float, inner_shift: float) -> np.ndarray:
    canvas = np.zeros((_DRAW_SIZE, _DRAW_SIZE), np.uint8)
    center = _DRAW_SIZE // 2
    cv2.circle(canvas, (center, center), int(outer * _DRAW_SIZE), 255, -1, cv2.LINE_AA)
    cv2.circle(canvas, (center + int(inner_shift * _DRAW_SIZE), center), int(inner * _DRAW_SIZE), 0, -1, cv2.LINE_AA)
    return canvas


def _ring() -> np.ndarray:
    return _discs(outer=0.45, inner=0.27, inner_shift=0.0)


def _crescent() -> np.ndarray:
    return _discs(outer=0.45, inner=0.40, inner_shift=0.2)


def _glyph(letter: str) -> np.ndarray:
    canvas = np.zeros((_DRAW_SIZE, _DRAW_SIZE), np.uint8)
    font, scale, thickness = cv2.FONT_HERSHEY_SIMPLEX, 10.0, 60
    (width, height), _ = cv2.getTextSize(letter, font, scale, thickness)
    origin = ((_DRAW_SIZE - width) // 2, (_DRAW_SIZE + height) // 2)
    cv2.putText(canvas, letter, origin, font, scale, 255, thickness, cv2.LINE_AA)
    return canvas


_DRAWERS: Dict[str, Callable[[], np.ndarray]] = {
    "star": _star,
    "arrow": _arrow,
    "cross": _cross,
    "triangle": _triangle,
    "ring": _ring,
    "crescent": _crescent,
    "letter_F": lambda: _glyph("F"),
    "letter_G": lambda: _glyph("G"),
}

CLASS_NAMES = tuple(_DRAWERS)


def _normalize(drawing: np.ndarray) -> np.ndarray:
    """Centers the shape's tight box in a square template, longer side = TEMPLATE_SPAN."""
    ys, xs = np.nonzero(drawing)
    crop = drawing[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    height, width = crop.shape
    side = int(round(max(height, width) / TEMPLATE_SPAN))
    square = np.zeros((side, side), np.uint8)
    top, left = (side - height) // 2, (side - width) // 2
    square[top : top + height, left : left + width] = crop
    return cv2.resize(square, (TEMPLATE_SIZE, TEMPLATE_SIZE), interpolation=cv2.INTER_AREA)


@lru_cache(maxsize=None)
def class_template(name: str) -> np.ndarray:
    """The class's canonical alpha map, float32 in [0, 1], TEMPLATE_SIZE square.

    Template coordinates map to [-1, 1]^2; the shape spans [-TEMPLATE_SPAN, TEMPLATE_SPAN]
    along its longer side.
    """
    if name not in _DRAWERS:
        raise KeyError(f"unknown shape class {name!r}; known classes: {', '.join(CLASS_NAMES)}")
    template = _normalize(_DRAWERS[name]()).astype(np.float32) / 255.0
    template.setflags(write=False)  # shared by every caller through the cache
    return template
