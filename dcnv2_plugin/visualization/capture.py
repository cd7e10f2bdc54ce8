"""Records what a detector's (deformable) layers did on one image, through forward hooks.

Hooks read only what detectron2's layers are called with, so the same code
works for this project's deformable blocks, detectron2's own ones and
regular ones (whose offsets are zero):

- every residual block's 3x3 `conv2`: a deformable conv is called as
  conv2(x, offset[, mask]), a regular one as conv2(x);
- the box head's pooler: a deformable one has an `offset_predictor` that
  returns (offset, mask) per RoI.
"""

import math
import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from detectron2.layers import CNNBlockBase
from detectron2.structures import Boxes, Instances
from torch import nn

from .geometry import DeformableConvGeometry, roi_bin_centers


@dataclass(frozen=True)
class RecordedConv:
    block_name: str  # e.g. "bottom_up.res5.2"
    deformable: bool
    geometry: DeformableConvGeometry


@dataclass
class _ConvCall:
    block_name: str
    conv: nn.Module
    input_size: Tuple[int, int]
    output_size: Tuple[int, int]
    offset: Optional[torch.Tensor]  # [2 * G * K, H, W] of the first image, or None for a regular conv
    mask: Optional[torch.Tensor]  # [G * K, H, W] or None


def _power_of_two_stride(image_size: int, feature_size: int) -> int:
    # Exact when the padded image is a multiple of the largest stride (as
    # with FPN); otherwise rounding absorbs the feature maps' rounded-up sizes.
    return 2 ** round(math.log2(image_size / feature_size))


class BlockConvRecorder:
    """Context manager recording each residual block's `conv2` call, in forward order."""

    def __init__(self, backbone: nn.Module):
        self._convs = [
            (name, block.conv2)
            for name, block in backbone.named_modules()
            if isinstance(block, CNNBlockBase) and isinstance(getattr(block, "conv2", None), nn.Module)
        ]
        if not self._convs:
            raise ValueError("the backbone has no residual blocks with a `conv2` (is it a ResNet?)")
        self.calls: List[_ConvCall] = []
        self._handles = []

    def __enter__(self):
        for name, conv in self._convs:
            self._handles.append(conv.register_forward_hook(self._recorder(name)))
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _recorder(self, block_name: str):
        def record(conv, inputs, output):
            offset = inputs[1][0].detach() if len(inputs) > 1 else None
            mask = inputs[2][0].detach() if len(inputs) > 2 and inputs[2] is not None else None
            self.calls.append(
                _ConvCall(block_name, conv, tuple(inputs[0].shape[-2:]), tuple(output.shape[-2:]), offset, mask)
            )

        return record

    def recorded(self, image_size: Tuple[int, int]) -> List[RecordedConv]:
        """Each recorded conv with its geometry, for an input image (padded) of `image_size`.

        Regular convs get zero offsets. With several offset groups, the
        first group's offsets are used.
        """
        result = []
        for call in self.calls:
            kh, kw = call.conv.kernel_size
            points = kh * kw
            if call.offset is None:
                offset = np.zeros((2 * points,) + call.output_size)
                mask = None
            else:
                if call.offset.shape[0] > 2 * points:
                    warnings.warn(
                        f"{call.block_name}: several offset groups; drawing the first group's offsets", stacklevel=2
                    )
                offset = call.offset[: 2 * points].double().cpu().numpy()
                mask = None if call.mask is None else call.mask[:points].double().cpu().numpy()
            stride = _power_of_two_stride(image_size[0], call.input_size[0])
            geometry = DeformableConvGeometry(
                offset=offset,
                mask=mask,
                kernel_size=tuple(call.conv.kernel_size),
                stride=tuple(call.conv.stride),
                padding=tuple(call.conv.padding),
                dilation=tuple(call.conv.dilation),
                input_stride=stride,
            )
            result.append(RecordedConv(call.block_name, call.offset is not None, geometry))
        return result


@dataclass
class InferenceRecord:
    """One image through the detector, in the coordinates of the network's input (resized, unpadded)."""

    instances: Instances
    features: Dict[str, torch.Tensor]
    padded_size: Tuple[int, int]
    convs: List[RecordedConv]  # every block's conv2, in forward order


@torch.no_grad()
def record_inference(model: nn.Module, image: torch.Tensor) -> InferenceRecord:
    """Runs a detectron2 `GeneralizedRCNN`-style model on one [C, H, W] image in eval mode."""
    captured = {}

    def keep_backbone_io(module, inputs, output):
        captured["padded_size"] = tuple(inputs[0].shape[-2:])
        captured["features"] = output

    handle = model.backbone.register_forward_hook(keep_backbone_io)
    try:
        with BlockConvRecorder(model.backbone) as convs:
            height, width = image.shape[-2:]
            (instances,) = model.inference([{"image": image, "height": height, "width": width}], do_postprocess=False)
    finally:
        handle.remove()
    return InferenceRecord(
        instances=instances.to("cpu"),
        features=captured["features"],
        padded_size=captured["padded_size"],
        convs=convs.recorded(captured["padded_size"]),
    )


@dataclass
class RoIBins:
    """The box pooler's bins for some boxes: centers [R, ph, pw, 2] as image (y, x)."""

    regular: np.ndarray
    shifted: np.ndarray
    modulation: Optional[np.ndarray]  # [R, ph, pw], for modulated pooling
    deformable: bool


@torch.no_grad()
def roi_pooling_bins(
    roi_heads: nn.Module, features: Dict[str, torch.Tensor], boxes: torch.Tensor, gamma: float
) -> RoIBins:
    """Bins of the box head's pooler for `boxes` [R, 4] (network input coordinates).

    Pools the boxes once more, recording the offsets and modulation that a
    deformable pooler predicts for them; a regular pooler's bins stay put.
    """
    pooler = getattr(roi_heads, "box_pooler", None)
    if not isinstance(pooler, nn.Module):
        raise NotImplementedError(
            f"RoI bins are drawn for ROI heads with one box pooler (roi_heads.box_pooler, as StandardROIHeads and "
            f"DCNv2ROIHeads have); {type(roi_heads).__name__} has none"
        )
    predictor: Optional[nn.Module] = getattr(pooler, "offset_predictor", None)
    captured = {}
    handle = None
    if predictor is not None:
        handle = predictor.register_forward_hook(lambda module, inputs, output: captured.update(prediction=output))
    try:
        device = next(iter(features.values())).device
        pooled = pooler([features[f] for f in roi_heads.box_in_features], [Boxes(boxes.to(device))])
    finally:
        if handle is not None:
            handle.remove()
    offset = np.zeros((len(boxes), 2) + tuple(pooled.shape[-2:]))
    modulation = None
    if "prediction" in captured:
        offset_tensor, mask = captured["prediction"]
        offset = offset_tensor.double().cpu().numpy()
        modulation = None if mask is None else mask[:, 0].double().cpu().numpy()
    regular, shifted = roi_bin_centers(boxes.double().cpu().numpy(), offset, gamma)
    return RoIBins(regular, shifted, modulation, deformable=predictor is not None)


def last_layers(convs: Sequence[RecordedConv], count: int) -> List[RecordedConv]:
    """The stack to compose: the last `count` deformable convs, or, in a
    model without any, the last `count` regular ones (the paper's baseline
    picture)."""
    deformable = [conv for conv in convs if conv.deformable]
    chosen = deformable or list(convs)
    if len(chosen) < count:
        kind = "deformable " if deformable else ""
        raise ValueError(f"asked for {count} layers, but the backbone has only {len(chosen)} {kind}3x3 block convs")
    return chosen[-count:]
