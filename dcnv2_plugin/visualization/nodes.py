"""The talk's two nodes of a detectron2 R-CNN, as functions of the image
(`support.Response`), and the gradients of their sampling locations and bins.

- `Conv5Node`: a unit of the last layer of the conv5 stage (the ResNet's
  `res5` output) at one position;
- `BoxHeadNode`: the 2fc node of the per-RoI head (the box head's output,
  after its second fc and ReLU) for one box.

Both take images in the model's input format ([B, 3, H, W], pixel values as
`model.inference` gets them) and an optional mask [B, 1, H, W]: the mask
multiplies the *normalized* image, so a masked-out pixel is the model's mean
pixel, the value that carries no signal after normalization.
"""

from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np
import torch
from detectron2.structures import Boxes, ImageList
from torch import nn

from .capture import BlockConvRecorder, last_layers, roi_pooling_bins
from .support import sampled_value_gradient, sampling_locations


def _network_images(model: nn.Module, images: torch.Tensor, masks: Optional[torch.Tensor]) -> torch.Tensor:
    """What `model.preprocess_image` makes of the images, with the masks applied after normalization."""
    normalized = (images.to(model.pixel_mean.device) - model.pixel_mean) / model.pixel_std
    if masks is not None:
        normalized = normalized * masks.to(normalized.device)
    return ImageList.from_tensors(list(normalized), model.backbone.size_divisibility).tensor


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _resnet(model: nn.Module) -> nn.Module:
    resnet = getattr(model.backbone, "bottom_up", model.backbone)
    if "res5" not in resnet.output_shape():
        raise ValueError("the model's backbone gives no res5 output (the conv5 node needs a ResNet with res5)")
    return resnet


@dataclass
class EffectiveLocations:
    """Sampling points or bins as image (y, x) [N, 2], each weighted [N] by
    the gradient magnitude of the node with respect to the value sampled
    there (see `sampled_value_gradient`); points of zero weight are left out."""

    points: np.ndarray
    weights: np.ndarray
    description: str


class Conv5Node:
    """The unit of `res5` nearest to an image point (y, x); its response is
    its channels [B, C], or one channel [B, 1]."""

    def __init__(self, model: nn.Module, image_yx: Tuple[float, float], image_size: Tuple[int, int], channel=None):
        self.model = model
        self.channel = channel
        self.stride = _resnet(model).output_shape()["res5"].stride
        divisor = max(1, model.backbone.size_divisibility)
        # The res5 map's last unit, for an image padded to a multiple of the divisor.
        last = [_ceil_div(_ceil_div(size, divisor) * divisor, self.stride) - 1 for size in image_size]
        self.unit = tuple(int(np.clip(round(c / self.stride), 0, m)) for c, m in zip(image_yx, last))

    @property
    def image_position(self) -> Tuple[float, float]:
        """The unit's center in image (y, x) pixel indices."""
        return self.unit[0] * self.stride, self.unit[1] * self.stride

    def __call__(self, images: torch.Tensor, masks: Optional[torch.Tensor] = None) -> torch.Tensor:
        res5 = _resnet(self.model)(_network_images(self.model, images, masks))["res5"]
        response = res5[:, :, self.unit[0], self.unit[1]]
        return response if self.channel is None else response[:, self.channel : self.channel + 1]


class BoxHeadNode:
    """The box head's output (2fc) for one box (x1, y1, x2, y2) in image
    coordinates; its response is [B, D], or one channel [B, 1]."""

    def __init__(self, model: nn.Module, box, channel=None):
        roi_heads = model.roi_heads
        if not isinstance(getattr(roi_heads, "box_head", None), nn.Module):
            raise ValueError("the 2fc node needs ROI heads with one box head (not a cascade)")
        self.model = model
        self.box = torch.as_tensor(box, dtype=torch.float32).reshape(4)
        self.channel = channel

    def features(self, images: torch.Tensor, masks: Optional[torch.Tensor] = None) -> List[torch.Tensor]:
        features = self.model.backbone(_network_images(self.model, images, masks))
        return [features[name] for name in self.model.roi_heads.box_in_features]

    def head(self, pooled: torch.Tensor) -> torch.Tensor:
        response = self.model.roi_heads.box_head(pooled)
        return response if self.channel is None else response[:, self.channel : self.channel + 1]

    def __call__(self, images: torch.Tensor, masks: Optional[torch.Tensor] = None) -> torch.Tensor:
        features = self.features(images, masks)
        boxes = [Boxes(self.box[None].to(features[0].device))] * len(images)
        return self.head(self.model.roi_heads.box_pooler(features, boxes))


class _GradientConvRecorder(BlockConvRecorder):
    """Also keeps each block conv's raw output (the input of its norm), in
    the graph, for its gradient. (A conv without a norm gives its output,
    which a block may then ReLU in place: its gradient is then the ReLU's.)"""

    def __enter__(self):
        super().__enter__()
        self.raw_outputs: List[torch.Tensor] = []
        for _, conv in self._convs:
            norm = getattr(conv, "norm", None)
            if isinstance(norm, nn.Module):
                hook = norm.register_forward_hook(lambda module, inputs, output: self.raw_outputs.append(inputs[0]))
            else:
                hook = conv.register_forward_hook(lambda module, inputs, output: self.raw_outputs.append(output))
            self._handles.append(hook)
        return self


def effective_sampling_locations(node: Conv5Node, image: torch.Tensor, layers: int = 3) -> EffectiveLocations:
    """The effective sampling locations of a conv5 node in the last `layers`
    deformable 3x3 convs (the last regular ones in a model without any).

    Every sampling point of every unit of those layers is weighted by
    |d node / d x(p + p_k + dp_k)| summed over the input channels (DCNv2
    Eq. 1: the modulation times the weights times the output gradient), then
    each layer's weights are divided by their sum, so that the layers count
    alike; coinciding points add up. Units the node does not depend on get
    zero weight.
    """
    model = node.model
    with torch.enable_grad(), _GradientConvRecorder(model.backbone) as recorder:
        total = node(image[None]).sum()
        padded = tuple(_network_images(model, image[None], None).shape[-2:])
        recorded = recorder.recorded(padded)
        chosen = {conv.block_name for conv in last_layers(recorded, layers)}
        indices = [i for i, conv in enumerate(recorded) if conv.block_name in chosen]
        grads = torch.autograd.grad(total, [recorder.raw_outputs[i] for i in indices], allow_unused=True)
    points, weights = [], []
    for index, grad in zip(indices, grads):
        call, geometry = recorder.calls[index], recorded[index].geometry
        conv = call.conv
        if getattr(conv, "groups", 1) != 1:
            raise ValueError(f"{call.block_name}: grouped convs are not supported")
        kh, kw = conv.kernel_size
        offset = call.offset if call.offset is not None else torch.zeros((2 * kh * kw,) + call.output_size)
        if grad is None:  # a block after the unit's stage output
            continue
        gradient = sampled_value_gradient(conv.weight.detach(), grad[0], call.mask, offset.shape[0] // (2 * kh * kw))
        weight = gradient.abs().sum(1).double()
        where = sampling_locations(offset.double(), conv.kernel_size, conv.stride, conv.padding, conv.dilation)
        weight = weight / weight.sum().clamp_min(torch.finfo(weight.dtype).tiny)
        keep = weight > 0
        points.append((where[keep] * geometry.input_stride).numpy())
        weights.append(weight[keep].numpy())
    names = [recorded[i].block_name.removeprefix("bottom_up.") for i in indices]
    kind = "deformable" if recorded[indices[0]].deformable else "regular"
    description = f"{len(names)} {kind} convs, {names[0]} to {names[-1]}"
    # Points that coincide (a regular grid's, shared by neighbouring units) add up.
    unique, inverse = np.unique(np.concatenate(points), axis=0, return_inverse=True)
    summed = np.bincount(inverse.reshape(-1), weights=np.concatenate(weights), minlength=len(unique))
    return EffectiveLocations(unique, summed, description)


def effective_bin_locations(node: BoxHeadNode, image: torch.Tensor, gamma: float) -> EffectiveLocations:
    """The effective bin locations of a 2fc node: each bin of the box head's
    (deformable) RoI pooling, at its (shifted) center, weighted by
    |d node / d pooled bin| summed over channels, times the bin's modulation
    (DCNv2 Eq. 2: the gradient of the value the bin averages, before it is
    modulated), normalized to sum 1."""
    model = node.model
    with torch.no_grad():
        features = node.features(image[None])
    named = dict(zip(model.roi_heads.box_in_features, features))
    bins = roi_pooling_bins(model.roi_heads, named, node.box[None], gamma)
    with torch.enable_grad():
        pooled = model.roi_heads.box_pooler(features, [Boxes(node.box[None])]).detach().requires_grad_(True)
        (gradient,) = torch.autograd.grad(node.head(pooled).sum(), pooled)
    weight = gradient[0].abs().sum(0).double().numpy()
    if bins.modulation is not None:
        weight = weight * bins.modulation[0]
    weight = weight / max(weight.sum(), np.finfo(np.float64).tiny)
    kind = "deformable" if bins.deformable else "regular"
    return EffectiveLocations(bins.shifted[0].reshape(-1, 2), weight.reshape(-1), f"{kind} RoI pooling")
