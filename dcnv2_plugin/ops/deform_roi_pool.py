"""(Modulated) deformable RoI pooling (DCNv2, Eq. 2 of the paper):

    y(k) = sum_j x(p_kj + dp_k) * dm_k / n_k

Each bin k of a RoI averages n_k bilinear samples, as RoIAlign does (with
aligned=True, i.e. Detectron2's ROIAlignV2), after shifting the whole bin by
dp_k = gamma * offset_k * (roi width, roi height) and scaling it by dm_k.
With offset=None (or zero) and mask=None it *is* RoIAlignV2.
"""

from typing import List, Optional, Tuple, Union

import torch
from torch import nn

from . import _library
from ._checks import check_floating, check_rank, check_same_dtype_device, pair


def _rois_as_tensor(rois: Union[torch.Tensor, List[torch.Tensor]]) -> torch.Tensor:
    if isinstance(rois, (list, tuple)):
        # Per-image boxes [K_i, 4], as torchvision's RoI ops also accept.
        for i, boxes in enumerate(rois):
            check_rank(f"rois[{i}]", boxes, 2, "[K_i, 4] (x1, y1, x2, y2)")
        if not rois:
            raise ValueError("rois is an empty list: pass one [K_i, 4] tensor per image")
        index = torch.cat([torch.full_like(b[:, :1], i) for i, b in enumerate(rois)])
        return torch.cat([index, torch.cat(list(rois))], dim=1)
    return rois


def deform_roi_pool(
    input: torch.Tensor,
    rois: Union[torch.Tensor, List[torch.Tensor]],
    offset: Optional[torch.Tensor] = None,
    mask: Optional[torch.Tensor] = None,
    *,
    output_size: Union[int, Tuple[int, int]],
    spatial_scale: float = 1.0,
    sampling_ratio: int = 0,
    gamma: float = 0.1,
) -> torch.Tensor:
    """Deformable RoI pooling: modulated (DCNv2) when `mask` is given.

    Args:
        input: [B, C, H, W] feature map.
        rois: [K, 5] (batch index, x1, y1, x2, y2) in image coordinates, or a
            list of per-image [K_i, 4] boxes.
        offset: [K, 2, ph, pw] normalized bin offsets (dx, dy) or None.
        mask: [K, 1, ph, pw] bin modulation or None.
        output_size: (ph, pw).
        spatial_scale: feature-map size / image size.
        sampling_ratio: samples per bin side; <= 0 means adaptive,
            ceil(roi size / output size), as in RoIAlign, capped at 1024
            (only bins wider than 1024 feature-map pixels take fewer).
        gamma: scale of the normalized offsets (0.1 in the paper).
    Returns:
        [K, C, ph, pw].
    """
    rois = _rois_as_tensor(rois)
    check_rank("input", input, 4, "[batch, channels, height, width]")
    check_rank("rois", rois, 2, "[K, 5] (batch index, x1, y1, x2, y2)")
    if rois.shape[1] != 5:
        raise ValueError(f"rois must have 5 columns (batch index, x1, y1, x2, y2), got shape {tuple(rois.shape)}")
    check_floating("input", input)
    check_same_dtype_device("input", input, rois=rois, offset=offset, mask=mask)
    ph, pw = pair("output_size", output_size)
    if ph < 1 or pw < 1:
        raise ValueError(f"output_size must be positive, got {(ph, pw)}")
    num_rois = rois.shape[0]
    if offset is not None:
        check_rank("offset", offset, 4, "[K, 2, ph, pw]")
        if tuple(offset.shape) != (num_rois, 2, ph, pw):
            raise ValueError(
                f"offset must have shape [{num_rois}, 2, {ph}, {pw}] (K, (dx, dy), ph, pw), got {tuple(offset.shape)}"
            )
    if mask is not None:
        check_rank("mask", mask, 4, "[K, 1, ph, pw]")
        if tuple(mask.shape) != (num_rois, 1, ph, pw):
            raise ValueError(f"mask must have shape [{num_rois}, 1, {ph}, {pw}], got {tuple(mask.shape)}")
    return _library._ops.deform_roi_pool(
        input, rois, offset, mask, ph, pw, float(spatial_scale), int(sampling_ratio), float(gamma)
    )


class DeformRoIPool(nn.Module):
    """`deform_roi_pool` with fixed geometry; offsets and mask come from the
    caller (in the detector, from a sibling fc branch on the RoIAlign features)."""

    def __init__(self, output_size, spatial_scale: float, sampling_ratio: int = 0, gamma: float = 0.1):
        super().__init__()
        self.output_size = pair("output_size", output_size)
        self.spatial_scale = float(spatial_scale)
        self.sampling_ratio = int(sampling_ratio)
        self.gamma = float(gamma)

    def forward(self, input, rois, offset=None, mask=None):
        # Boxes usually stay float32 whatever the features' dtype; convert
        # them, as detectron2's ROIAlign does.
        if isinstance(rois, torch.Tensor):
            rois = rois.to(input.dtype)
        return deform_roi_pool(
            input,
            rois,
            offset,
            mask,
            output_size=self.output_size,
            spatial_scale=self.spatial_scale,
            sampling_ratio=self.sampling_ratio,
            gamma=self.gamma,
        )

    def extra_repr(self) -> str:
        return (
            f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
            f"sampling_ratio={self.sampling_ratio}, gamma={self.gamma}"
        )
