"""The mark of a layer that predicts where to sample."""

from torch import nn


class GeometryPredictor(nn.Module):
    """Marks a layer that predicts sampling geometry: a deformable conv's
    offsets and modulation, a deformable RoI pooling's bin offsets, a spatial
    transformer's warp. DCNv2 trains such layers at a lower learning rate
    (Sec. 3.2); detectron2's optimizer here finds them by this class."""
