"""Random geometric warps of a class template, rendered as an alpha patch.

A warp is scale, aspect, rotation and shear (an affine map), a perspective
term (a homography), and a smooth random displacement field (non-rigid). All
of them are applied in one resampling of the template, backwards: every output
pixel looks up where it comes from in the template.
"""

from dataclasses import dataclass

import cv2
import numpy as np

from .params import ShapesParams
from .shapes import TEMPLATE_SIZE, TEMPLATE_SPAN

# Output is rendered at this many samples per pixel side and averaged down,
# so thin parts and edges get anti-aliased coverage instead of jaggies.
_SUPERSAMPLE = 2


@dataclass(frozen=True)
class Warp:
    size: float  # longer side of the unwarped shape, in pixels
    aspect: float  # x scale / y scale
    rotation_deg: float
    shear: float
    perspective: np.ndarray  # (p_x, p_y), the homography's projective row
    elastic_field: np.ndarray  # [2, grid, grid] unit displacements (dx, dy)
    elastic_strength: float  # displacement std as a fraction of size

    def homography(self) -> np.ndarray:
        """3x3 map from template coordinates ([-1, 1]^2) to pixels around the shape's center."""
        pixels_per_unit = self.size / (2 * TEMPLATE_SPAN)
        root_aspect = np.sqrt(self.aspect)
        scale = np.diag([pixels_per_unit * root_aspect, pixels_per_unit / root_aspect])
        shear = np.array([[1.0, self.shear], [0.0, 1.0]])
        angle = np.deg2rad(self.rotation_deg)
        rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        matrix = np.eye(3)
        matrix[:2, :2] = rotation @ shear @ scale
        matrix[2, :2] = self.perspective
        return matrix


def sample_warp(rng: np.random.Generator, params: ShapesParams) -> Warp:
    low, high = params.object_size
    # Random sign per term and a random split of the perspective budget.
    perspective_share = rng.uniform(0.0, 1.0)
    perspective = (
        rng.uniform(0.0, params.max_perspective)
        * np.array([perspective_share, 1.0 - perspective_share])
        * rng.choice([-1.0, 1.0], size=2)
    )
    grid = params.elastic_grid
    return Warp(
        size=float(np.exp(rng.uniform(np.log(low), np.log(high)))),
        aspect=float(np.exp(rng.uniform(-np.log(params.max_aspect), np.log(params.max_aspect)))),
        rotation_deg=float(rng.uniform(-params.max_rotation_deg, params.max_rotation_deg)),
        shear=float(rng.uniform(-params.max_shear, params.max_shear)),
        perspective=perspective,
        elastic_field=rng.standard_normal((2, grid, grid)),
        elastic_strength=params.elastic_strength,
    )


def render_warped(template: np.ndarray, warp: Warp) -> np.ndarray:
    """The warped template as a float32 alpha patch in [0, 1].

    The patch holds the whole warped template square, so the shape is never
    cut; its center is the shape's center up to the perspective's shift.
    """
    homography = warp.homography()
    elastic_pixels = warp.elastic_strength * warp.size
    corners = np.array([[-1, -1, 1], [1, -1, 1], [1, 1, 1], [-1, 1, 1]], np.float64) @ homography.T
    corners = corners[:, :2] / corners[:, 2:]
    # Displacements beyond 3 standard deviations are rare; the template's
    # empty border absorbs them.
    margin = 3 * elastic_pixels
    left, top = np.floor(corners.min(0) - margin)
    right, bottom = np.ceil(corners.max(0) + margin)
    width, height = int(right - left), int(bottom - top)

    # Sample centers of the supersampled output, in pixels around the shape's center.
    xs = left + (np.arange(width * _SUPERSAMPLE) + 0.5) / _SUPERSAMPLE
    ys = top + (np.arange(height * _SUPERSAMPLE) + 0.5) / _SUPERSAMPLE
    x, y = np.meshgrid(xs, ys)
    displacement = [
        cv2.resize(component, (x.shape[1], x.shape[0]), interpolation=cv2.INTER_CUBIC)
        for component in warp.elastic_field.astype(np.float32)
    ]
    x = x + elastic_pixels * displacement[0]
    y = y + elastic_pixels * displacement[1]

    inverse = np.linalg.inv(homography)
    u_h = inverse[0, 0] * x + inverse[0, 1] * y + inverse[0, 2]
    v_h = inverse[1, 0] * x + inverse[1, 1] * y + inverse[1, 2]
    w_h = inverse[2, 0] * x + inverse[2, 1] * y + inverse[2, 2]
    # Template coordinates [-1, 1] -> template pixel indices (centers at integers).
    to_index = TEMPLATE_SIZE / 2.0
    map_x = ((u_h / w_h + 1.0) * to_index - 0.5).astype(np.float32)
    map_y = ((v_h / w_h + 1.0) * to_index - 0.5).astype(np.float32)
    supersampled = cv2.remap(template, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return cv2.resize(supersampled, (width, height), interpolation=cv2.INTER_AREA)
