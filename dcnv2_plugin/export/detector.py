"""A detectron2 R-CNN's inference on one image as a module that torch.export
traces, and so torch's dynamo ONNX exporter exports.

detectron2's inference code is written for eager mode and torch.jit.trace:
it branches in Python on tensor values (`if not valid_mask.all()` in
`find_top_rpn_proposals` and `fast_rcnn_inference_single_image`, the
algorithm choice in `batched_nms`), takes `len()` of data-dependent sizes
(`Instances`, `convert_boxes_to_pooler_format`) and pads images to sizes
computed from tensors. torch.export traces none of these. `ExportableRCNN`
runs the model's own modules (backbone, RPN head and anchors, poolers, box
and mask heads) and does the steps between them on plain tensors, without
such branches, computing what detectron2's inference computes.
(detectron2's own `TracingAdapter` targets torch.jit.trace, and in
detectron2 0.6 `detectron2.export` needs caffe2 to import.)
"""

from typing import List, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from detectron2.data import transforms as T
from detectron2.layers import cat
from detectron2.modeling import GeneralizedRCNN
from detectron2.modeling.roi_heads.mask_head import MaskRCNNConvUpsampleHead
from torch import nn

from ..modeling.poolers import pool_rois


class ExportableRCNN(nn.Module):
    """Inference of a `GeneralizedRCNN` (Faster or Mask R-CNN with an RPN and
    `StandardROIHeads`, as the plugin's configs build) on one image.

    forward(image): `image` is [3, H, W] in the model's input format
    (cfg.INPUT.FORMAT, 0-255), already resized to the test size, as the
    model's `inference` takes it. Returns, for the N detections, in the
    image's coordinates: boxes [N, 4] (x1, y1, x2, y2), scores [N], classes
    [N] (int64) and, with a mask head, masks [N, 1, M, M]: the mask head's
    probabilities for the predicted class. These are the fields of
    `model.inference([{"image": image}], do_postprocess=False)` (before
    detectron2 rescales boxes to another output size and pastes the masks
    into the image).
    """

    def __init__(self, model: GeneralizedRCNN):
        super().__init__()
        if not isinstance(model, GeneralizedRCNN) or model.proposal_generator is None:
            raise TypeError(
                "ExportableRCNN takes a GeneralizedRCNN with an RPN (MODEL.META_ARCHITECTURE "
                f"'GeneralizedRCNN', MODEL.PROPOSAL_GENERATOR.NAME 'RPN'), got {type(model).__name__}"
            )
        if getattr(model.roi_heads, "keypoint_on", False):
            raise TypeError("ExportableRCNN does not export keypoint heads (MODEL.KEYPOINT_ON)")
        self.mask_on = getattr(model.roi_heads, "mask_on", False)
        if self.mask_on and not isinstance(model.roi_heads.mask_head, MaskRCNNConvUpsampleHead):
            raise TypeError(
                "ExportableRCNN supports the mask head MaskRCNNConvUpsampleHead "
                f"(MODEL.ROI_MASK_HEAD.NAME), got {type(model.roi_heads.mask_head).__name__}"
            )
        self.model = model.eval()

    def forward(self, image: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        image_size = (image.shape[-2], image.shape[-1])
        features = self.model.backbone(self._preprocess(image))
        proposals = self._proposals(features, image_size)
        boxes, scores, classes = self._detections(features, proposals, image_size)
        if not self.mask_on:
            return boxes, scores, classes
        return boxes, scores, classes, self._masks(features, boxes, classes)

    def _preprocess(self, image: torch.Tensor) -> torch.Tensor:
        """Normalized and padded to the backbone's size divisibility, as
        `ImageList.from_tensors` pads one image."""
        height, width = image.shape[-2:]
        divisor = max(self.model.backbone.size_divisibility, 1)
        x = (image - self.model.pixel_mean) / self.model.pixel_std
        return F.pad(x, (0, -width % divisor, 0, -height % divisor))[None]

    def _proposals(self, features, image_size: Tuple[int, int]) -> torch.Tensor:
        """`RPN.forward` at inference: the proposals [P, 4] of the image."""
        rpn = self.model.proposal_generator
        maps = [features[f] for f in rpn.in_features]
        logits, deltas = rpn.rpn_head(maps)
        # (1, A, Hi, Wi) -> (Hi*Wi*A,) and (1, A*B, Hi, Wi) -> (1, Hi*Wi*A, B), as RPN.forward
        logits = [score[0].permute(1, 2, 0).flatten() for score in logits]
        dim = rpn.anchor_generator.box_dim
        deltas = [d.view(1, -1, dim, d.shape[-2], d.shape[-1]).permute(0, 3, 4, 1, 2).flatten(1, -2) for d in deltas]
        proposals = rpn._decode_proposals(rpn.anchor_generator(maps), deltas)
        return _top_proposals(
            [p[0] for p in proposals],
            logits,
            image_size,
            rpn.nms_thresh,
            rpn.pre_nms_topk[False],
            rpn.post_nms_topk[False],
            rpn.min_box_size,
        )

    def _detections(self, features, proposals: torch.Tensor, image_size: Tuple[int, int]):
        """`StandardROIHeads._forward_box` at inference: boxes, scores, classes."""
        heads = self.model.roi_heads
        maps = [features[f] for f in heads.box_in_features]
        box_features = heads.box_head(pool_rois(heads.box_pooler, maps, _pooler_format(proposals)))
        predictor = heads.box_predictor
        scores, deltas = predictor(box_features)
        # FastRCNNOutputLayers.predict_boxes and predict_probs, for one image.
        boxes = predictor.box2box_transform.apply_deltas(deltas, proposals)
        probs = scores.sigmoid() if getattr(predictor, "use_sigmoid_ce", False) else F.softmax(scores, dim=-1)
        return _detections(
            boxes,
            probs,
            image_size,
            predictor.test_score_thresh,
            predictor.test_nms_thresh,
            predictor.test_topk_per_image,
        )

    def _masks(self, features, boxes: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """The mask head's probabilities for each detection's class, as
        `mask_rcnn_inference` gives them."""
        heads = self.model.roi_heads
        maps = [features[f] for f in heads.mask_in_features]
        logits = heads.mask_head.layers(pool_rois(heads.mask_pooler, maps, _pooler_format(boxes)))
        if logits.shape[1] > 1:  # one mask per class: the predicted class's
            logits = logits[torch.arange(logits.shape[0]), classes][:, None]
        return logits.sigmoid()


OUTPUT_NAMES = ("boxes", "scores", "classes", "masks")


def export_detector_onnx(model: GeneralizedRCNN, image: torch.Tensor, path=None, **kwargs) -> "torch.onnx.ONNXProgram":
    """`ExportableRCNN(model)` exported to ONNX, traced on `image` (a model
    input, see `model_input`), with a dynamic height and width: it takes
    images of other sizes too (both sides above 64 pixels, so that every
    FPN level is larger than 1x1, as at the trace). Its input is "image";
    its outputs "boxes", "scores", "classes" and, with a mask head,
    "masks". Other keyword arguments go to `torch.onnx.export` (e.g.
    external_data=False: the weights in the .onnx file). Needs the
    `export` extra."""
    from .onnx_export import export_onnx

    exportable = ExportableRCNN(model)
    return export_onnx(
        exportable,
        (image,),
        path,
        # Named axes: torch.export infers the sizes' constraints (padding
        # to the size divisibility, the FPN levels) instead of failing on them.
        dynamic_shapes=({1: "height", 2: "width"},),
        input_names=["image"],
        output_names=list(OUTPUT_NAMES[: 4 if exportable.mask_on else 3]),
        **kwargs,
    )


def compare_detections(expected: Sequence[np.ndarray], actual: Sequence[np.ndarray], min_iou: float = 0.9) -> dict:
    """How two runs' detections agree (each: boxes, scores, classes[, masks]
    as `ExportableRCNN` returns them). Detections are paired greedily, in
    `expected`'s order, with the unpaired `actual` detection of the same
    class whose box overlaps most (IoU >= min_iou), so that near-equal scores
    in another order still pair. Returns the counts ("expected", "actual",
    "paired") and the max abs differences over the pairs ("boxes",
    "scores" and, with masks, "masks")."""
    boxes_e, scores_e, classes_e = (np.asarray(t) for t in expected[:3])
    boxes_a, scores_a, classes_a = (np.asarray(t) for t in actual[:3])
    iou = torchvision.ops.box_iou(torch.as_tensor(boxes_e), torch.as_tensor(boxes_a)).numpy()
    iou[classes_e[:, None] != classes_a[None, :]] = -1.0
    pairs = []
    for i in range(len(boxes_e)):
        j = int(np.argmax(iou[i])) if iou.shape[1] else -1
        if j >= 0 and iou[i, j] >= min_iou:
            pairs.append((i, j))
            iou[:, j] = -1.0
    e, a = np.array([p[0] for p in pairs], dtype=np.int64), np.array([p[1] for p in pairs], dtype=np.int64)
    result = {"expected": len(boxes_e), "actual": len(boxes_a), "paired": len(pairs)}
    fields = [("boxes", boxes_e, boxes_a), ("scores", scores_e, scores_a)]
    if len(expected) > 3:
        fields.append(("masks", np.asarray(expected[3]), np.asarray(actual[3])))
    for name, x, y in fields:
        result[name] = float(np.abs(x[e] - y[a]).max()) if pairs else 0.0
    return result


def model_input(cfg, image: np.ndarray) -> torch.Tensor:
    """An image ([H, W, 3] uint8 BGR, as cv2 reads it) as the model's input
    [3, H', W']: resized to the test size and in cfg.INPUT.FORMAT, as
    detectron2's `DefaultPredictor` prepares it."""
    if cfg.INPUT.FORMAT == "RGB":
        image = image[:, :, ::-1]
    resize = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)
    image = resize.get_transform(image).apply_image(image)
    return torch.as_tensor(image.astype("float32").transpose(2, 0, 1))


def _top_proposals(
    proposals: List[torch.Tensor],
    logits: List[torch.Tensor],
    image_size: Tuple[int, int],
    nms_thresh: float,
    pre_nms_topk: int,
    post_nms_topk: int,
    min_box_size: float,
) -> torch.Tensor:
    """`find_top_rpn_proposals` at inference for one image: per level the
    top-k anchors, then finite, clipped, non-empty boxes, per-level NMS and
    the overall top-k."""
    boxes, scores, levels = [], [], []
    for level, (proposals_i, logits_i) in enumerate(zip(proposals, logits)):
        # sym_min: with a dynamic image size, min() would specialize the
        # export to sizes on one side of pre_nms_topk anchors.
        k = torch.sym_min(logits_i.shape[0], pre_nms_topk)
        logits_i, order = logits_i.sort(descending=True)
        boxes.append(proposals_i[order[:k]])
        scores.append(logits_i[:k])
        levels.append(torch.full((k,), level, dtype=torch.int64, device=logits_i.device))
    boxes, scores, levels = cat(boxes), cat(scores), cat(levels)
    finite = torch.isfinite(boxes).all(dim=1) & torch.isfinite(scores)
    boxes = _clip(boxes, image_size)
    keep = finite & ((boxes[:, 2:] - boxes[:, :2]) > min_box_size).all(dim=1)
    boxes, scores, levels = boxes[keep], scores[keep], levels[keep]
    keep = _batched_nms(boxes, scores, levels, nms_thresh, image_size)[:post_nms_topk]
    return _assume_some(boxes[keep])


def _detections(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    image_size: Tuple[int, int],
    score_thresh: float,
    nms_thresh: float,
    topk_per_image: int,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`fast_rcnn_inference_single_image`: boxes [R, K*4] (or [R, 4]) and
    class probabilities [R, K+1] to the boxes, scores and classes of the
    detections, per-class NMS."""
    finite = torch.isfinite(boxes).all(dim=1) & torch.isfinite(scores).all(dim=1)
    boxes, scores = boxes[finite], scores[finite][:, :-1]
    num_bbox_reg_classes = boxes.shape[1] // 4
    boxes = _clip(boxes.reshape(-1, 4), image_size).view(-1, num_bbox_reg_classes, 4)
    filter_mask = scores > score_thresh
    filter_inds = filter_mask.nonzero()
    boxes = boxes[filter_inds[:, 0], 0] if num_bbox_reg_classes == 1 else boxes[filter_mask]
    scores = scores[filter_mask]
    keep = _batched_nms(boxes, scores, filter_inds[:, 1], nms_thresh, image_size)
    if topk_per_image >= 0:
        keep = keep[:topk_per_image]
    keep = _assume_some(keep)
    return boxes[keep], scores[keep], filter_inds[keep, 1]


def _clip(boxes: torch.Tensor, image_size: Tuple[int, int]) -> torch.Tensor:
    """`Boxes.clip` on [R, 4] boxes."""
    height, width = image_size
    x1, y1, x2, y2 = boxes.unbind(1)
    return torch.stack((x1.clamp(0, width), y1.clamp(0, height), x2.clamp(0, width), y2.clamp(0, height)), dim=1)


def _batched_nms(boxes, scores, groups, iou_threshold: float, image_size: Tuple[int, int]) -> torch.Tensor:
    """NMS within each group, by torchvision's coordinate trick: the boxes
    are clipped to the image, so shifting each group by more than the
    image's size keeps the groups apart. The bound is known when tracing;
    torchvision takes the boxes' maximum, and detectron2 chooses between
    algorithms by the number of boxes."""
    shift = groups.to(boxes.dtype) * float(max(image_size) + 1)
    return torchvision.ops.nms(boxes + shift[:, None], scores, iou_threshold)


def _pooler_format(boxes: torch.Tensor) -> torch.Tensor:
    """The image's boxes [K, 4] as RoIs [K, 5] (batch index 0, x1, y1, x2, y2)."""
    return torch.cat([boxes.new_zeros((boxes.shape[0], 1)), boxes], dim=1)


def _assume_some(t: torch.Tensor) -> torch.Tensor:
    """While torch.export traces, lets it assume that `t` (proposals or
    detections) is not empty. detectron2's modules ask `numel() == 0` of
    their inputs (`Boxes`, `Conv2d`), which it cannot decide for a
    data-dependent size; each such branch does the same for an empty input.
    The exported graph keeps no such assumption (the ONNX exporter drops
    the check), so it runs on images without detections too."""
    if torch.compiler.is_exporting():
        torch._check(t.shape[0] > 0)
    return t
