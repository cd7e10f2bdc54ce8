"""Everything that decides what the shapes dataset contains.

A split's cache folder is named by a hash of these values (and of
GENERATOR_VERSION), so changing any of them generates a new dataset instead of
silently reusing an old one.
"""

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Dict, Tuple

from .shapes import CLASS_NAMES

# Bump whenever the generator's code changes what it draws for the same
# parameters: the cache folders of older versions are then not reused.
GENERATOR_VERSION = 1


@dataclass(frozen=True)
class ShapesParams:
    """How images are drawn. Sizes are in pixels of the (square) image."""

    image_size: int = 128
    objects_per_image: Tuple[int, int] = (1, 4)  # inclusive range
    # Longer side of a shape before aspect, shear, perspective and elastic
    # warps; drawn log-uniformly so every scale is equally common.
    object_size: Tuple[float, float] = (20.0, 64.0)
    max_aspect: float = 1.6  # anisotropic scale: x/y ratio in [1/max, max]
    max_rotation_deg: float = 180.0  # full turn: no canonical orientation
    max_shear: float = 0.45  # x += shear * y
    # Projective terms (p_x, p_y) of the homography on template coordinates
    # in [-1, 1]^2; |p_x| + |p_y| <= max_perspective < 1 keeps it one-sided.
    max_perspective: float = 0.35
    # Non-rigid warp: a smooth random displacement field on an
    # elastic_grid x elastic_grid lattice, its standard deviation a
    # fraction of the object size.
    elastic_strength: float = 0.06
    elastic_grid: int = 4
    clutter_strokes: Tuple[int, int] = (6, 14)  # distractor lines and arcs under the objects
    # An instance is only kept (and a placement only accepted) when at least
    # this much of it stays visible after occlusion and the image border.
    min_visible_fraction: float = 0.55
    min_visible_area: int = 40
    placement_attempts: int = 20
    noise_sigma: float = 4.0  # camera-like pixel noise, in grey levels
    classes: Tuple[str, ...] = CLASS_NAMES

    def __post_init__(self):
        unknown = [name for name in self.classes if name not in CLASS_NAMES]
        if unknown:
            raise ValueError(f"unknown shape classes {unknown}; known: {', '.join(CLASS_NAMES)}")
        if not self.classes:
            raise ValueError("classes must name at least one shape class")
        low, high = self.objects_per_image
        if not 1 <= low <= high:
            raise ValueError(f"objects_per_image must be a range (low, high) with 1 <= low <= high, got {(low, high)}")
        if not 0 < self.object_size[0] <= self.object_size[1]:
            raise ValueError(f"object_size must be a range (low, high) with 0 < low <= high, got {self.object_size}")
        if not 0 <= self.max_perspective < 1:
            raise ValueError(f"max_perspective must be in [0, 1), got {self.max_perspective}")
        if self.max_aspect < 1:
            raise ValueError(f"max_aspect must be >= 1, got {self.max_aspect}")


@dataclass(frozen=True)
class SplitSpec:
    """One split: how many images, and the seed its images are drawn from."""

    num_images: int
    seed: int

    def __post_init__(self):
        if self.num_images < 1:
            raise ValueError(f"num_images must be positive, got {self.num_images}")


# Sized for CPU training: a few minutes per model on two cores, yet enough
# images that memorizing shapes in a few orientations does not pay.
DEFAULT_SPLITS: Dict[str, SplitSpec] = {
    "train": SplitSpec(num_images=1000, seed=0),
    "val": SplitSpec(num_images=200, seed=1),
}
DEFAULT_PARAMS = ShapesParams()


def describe(params: ShapesParams, split: SplitSpec) -> Dict:
    """The parameters as JSON-ready values with their hash, stored in the dataset's `info`."""
    described = {
        "generator_version": GENERATOR_VERSION,
        "params": dataclasses.asdict(params),
        "split": dataclasses.asdict(split),
    }
    digest = hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()
    return {**described, "fingerprint": digest[:12]}


def spec_fingerprint(params: ShapesParams, split: SplitSpec) -> str:
    """A short hash of everything that determines a split's content."""
    return describe(params, split)["fingerprint"]
