"""Pictures of deformable sampling (the DCNv1/DCNv2 papers' figures): the
sampling points of a unit through stacked deformable convs, and the bins of
deformable RoI pooling. `tools/visualize.py` is the command line.

The effective spatial support of a node (the DCNv2 talk: effective sampling
locations, effective receptive field, error-bounded saliency region) is in
`support` (any differentiable function), `nodes` (a detector's conv5 and 2fc
nodes) and `spatial_support` (pictures and measurement);
`tools/spatial_support.py` is its command line."""

from .capture import (
    BlockConvRecorder,
    InferenceRecord,
    RecordedConv,
    RoIBins,
    last_layers,
    record_inference,
    roi_pooling_bins,
)
from .draw import roi_bins_figure, sampling_figure
from .geometry import DeformableConvGeometry, compose_sampling_points, roi_bin_centers, sampling_points_at

__all__ = [
    "BlockConvRecorder",
    "DeformableConvGeometry",
    "InferenceRecord",
    "RecordedConv",
    "RoIBins",
    "compose_sampling_points",
    "last_layers",
    "record_inference",
    "roi_bin_centers",
    "roi_bins_figure",
    "roi_pooling_bins",
    "sampling_figure",
    "sampling_points_at",
]
