"""Pictures of deformable sampling (the DCNv1/DCNv2 papers' figures): the
sampling points of a unit through stacked deformable convs, and the bins of
deformable RoI pooling. `tools/visualize.py` is the command line."""

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
