"""R-CNN feature mimicking, DCNv2's training-time guidance (paper, Sec. 3.3).

Even with deformable convolution and pooling, the spatial support of the
per-RoI feature spreads well beyond the RoI. An R-CNN sees only the image
inside the RoI, so the paper trains the Fast R-CNN feature of each positive
RoI to resemble the feature the same network computes for that RoI's image
crop alone. Inference is unchanged: the branch only adds training losses.

`MimicRCNN` is the meta-architecture that runs it: the ROI heads never see
the backbone, which the R-CNN branch needs for the crops.

With Cascade R-CNN (`DCNv2CascadeROIHeads`) the final stage's pooler and box
head are mimicked, on that stage's RoIs. That stage gives the detector's
boxes, and its positives (IoU >= 0.7 by default) are the RoIs whose crops
best show their object, R-CNN's premise. One stage keeps the branch's cost,
mostly the backbone on the crops, that of a single-head detector: mimicking
every stage on its own RoIs would triple it, and on shared RoIs would call
objects RoIs that the later stages learn to call background. The backbone
that all stages read is guided either way.
"""

from contextlib import contextmanager
from typing import Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, GeneralizedRCNN
from detectron2.modeling.roi_heads import CascadeROIHeads, StandardROIHeads
from detectron2.structures import Boxes, ImageList, Instances
from detectron2.utils.events import get_event_storage
from torch import nn

from .cascade_roi_heads import DCNv2CascadeROIHeads
from .mimic_sampling import MIMIC_REGIONS, crop_and_resize, sample_mimic_rois

# MODEL.DCNV2.MIMIC.CROP_BN: how the backbone's BatchNorm layers normalize the crops.
CROP_BN_MODES = ("train", "frozen")
# MODEL.DCNV2.MIMIC.LOSS_REDUCTION: how the mimic loss combines the RoIs' terms.
LOSS_REDUCTIONS = ("mean", "sum")

__all__ = ["MimicRCNN", "RCNNFeatureMimicking", "mimic_loss", "check_mimicked_roi_heads"]


def mimic_loss(f_rcnn: torch.Tensor, f_frcnn: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """1 - cos(f_RCNN(b), f_FRCNN(b)), averaged ("mean") or summed ("sum")
    over the RoIs b.

    The paper's L_mimic is the sum; the mean (the default) keeps the loss
    weight's meaning independent of how many RoIs a batch has.
    """
    terms = 1.0 - F.cosine_similarity(f_rcnn, f_frcnn, dim=1)
    if reduction == "sum":
        return terms.sum()
    if reduction == "mean":
        return terms.mean()
    raise ValueError(f"reduction must be one of {', '.join(map(repr, LOSS_REDUCTIONS))}; got {reduction!r}")


@contextmanager
def batchnorm_in_inference_mode(module: nn.Module) -> Iterator[None]:
    """Within the block, every BatchNorm layer of `module` normalizes with its
    running statistics and leaves them unchanged (as in inference), while
    gradients still flow to its weights and inputs; the layers' modes are
    restored after it."""
    batchnorms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    modes = [m.training for m in batchnorms]
    try:
        for m in batchnorms:
            m.train(False)
        yield
    finally:
        for m, mode in zip(batchnorms, modes):
            m.train(mode)


def check_mimic_settings(mimic_cfg) -> None:
    """The MODEL.DCNV2.MIMIC keys that take one of a few names."""
    if mimic_cfg.REGIONS not in MIMIC_REGIONS:
        raise ValueError(
            f"MODEL.DCNV2.MIMIC.REGIONS must be one of {', '.join(map(repr, MIMIC_REGIONS))}; got {mimic_cfg.REGIONS!r}"
        )
    if mimic_cfg.CROP_BN not in CROP_BN_MODES:
        raise ValueError(
            f"MODEL.DCNV2.MIMIC.CROP_BN must be one of {', '.join(map(repr, CROP_BN_MODES))}; got {mimic_cfg.CROP_BN!r}"
        )
    if mimic_cfg.LOSS_REDUCTION not in LOSS_REDUCTIONS:
        raise ValueError(
            f"MODEL.DCNV2.MIMIC.LOSS_REDUCTION must be one of {', '.join(map(repr, LOSS_REDUCTIONS))}; "
            f"got {mimic_cfg.LOSS_REDUCTION!r}"
        )


def check_mimicked_roi_heads(head_class: type) -> None:
    """Refuse ROI heads whose box head the branch cannot mimic."""
    if issubclass(head_class, DCNv2CascadeROIHeads):
        return
    if issubclass(head_class, CascadeROIHeads):
        raise ValueError(
            "R-CNN feature mimicking with Cascade R-CNN mimics the final stage's head on that stage's "
            f"RoIs, which {head_class.__name__} does not hand over: set MODEL.ROI_HEADS.NAME to "
            "'DCNv2CascadeROIHeads'"
        )
    if not issubclass(head_class, StandardROIHeads):
        raise ValueError(
            "R-CNN feature mimicking shares the ROI heads' box pooler and box head, so it needs "
            "StandardROIHeads or a subclass (such as DCNv2ROIHeads), or DCNv2CascadeROIHeads; "
            f"MODEL.ROI_HEADS.NAME builds {head_class.__name__}"
        )


def mimicked_pooler_and_head(roi_heads: StandardROIHeads) -> Tuple[nn.Module, nn.Module]:
    """The box pooler and box head that the branch shares: a cascade's final stage's."""
    if isinstance(roi_heads, DCNv2CascadeROIHeads):
        return roi_heads.box_pooler[-1], roi_heads.box_head[-1]
    return roi_heads.box_pooler, roi_heads.box_head


def box_head_features(
    roi_heads: StandardROIHeads, feature_maps: Dict[str, torch.Tensor], boxes: List[Boxes]
) -> torch.Tensor:
    """The mimicked box pooler and box head (the 2fc head) applied to `boxes`,
    one `Boxes` per image of `feature_maps`: [K, box head output dim]."""
    pooler, head = mimicked_pooler_and_head(roi_heads)
    return head(pooler([feature_maps[f] for f in roi_heads.box_in_features], boxes))


class RCNNFeatureMimicking(nn.Module):
    """The R-CNN branch and its two losses.

    For each sampled RoI b (at most `num_pos_rois` per image, from the
    foreground RoIs, the background ones or both, as `regions` says):
    - f_FRCNN(b): the box head's feature of b in the Fast R-CNN branch;
    - f_RCNN(b): b's image region, resized to `crop_size` x `crop_size`, put
      through the same backbone, pooled as one whole-crop RoI by the same box
      pooler and put through the same box head.
    Losses: `loss_mimic` (see `mimic_loss`) and `loss_mimic_cls`, a
    (C+1)-way softmax classification of f_RCNN(b) against b's ground-truth
    class (the background class for a background RoI). With `crop_bn`
    "frozen" the backbone's BatchNorm layers normalize the crops with their
    running statistics, which the crops then leave unchanged. The backbone,
    pooler and box head are shared and passed in at each call; the only
    parameters owned here are the R-CNN branch's classifier, which the paper
    keeps apart from the Fast R-CNN one.
    """

    @configurable
    def __init__(
        self,
        *,
        feature_dim: int,
        num_classes: int,
        num_pos_rois: int,
        crop_size: int,
        loss_weight: float,
        cls_loss_weight: float,
        regions: str = "foreground",
        crop_bn: str = "train",
        loss_reduction: str = "mean",
    ):
        super().__init__()
        self.num_classes = num_classes
        self.num_pos_rois = num_pos_rois
        self.crop_size = crop_size
        self.loss_weight = loss_weight
        self.cls_loss_weight = cls_loss_weight
        self.regions = regions
        self.crop_bn = crop_bn
        self.loss_reduction = loss_reduction
        self.cls_score = nn.Linear(feature_dim, num_classes + 1)
        # As detectron2 initializes the Fast R-CNN classifier.
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.constant_(self.cls_score.bias, 0)

    @classmethod
    def from_config(cls, cfg, backbone: nn.Module, roi_heads: nn.Module):
        mimic = cfg.MODEL.DCNV2.MIMIC
        check_mimicked_roi_heads(type(roi_heads))
        check_mimic_settings(mimic)
        if cfg.MODEL.ROI_BOX_HEAD.TRAIN_ON_PRED_BOXES:
            raise ValueError(
                "R-CNN feature mimicking needs the RoIs the box head was trained on, but "
                "MODEL.ROI_BOX_HEAD.TRAIN_ON_PRED_BOXES replaces them with predicted boxes"
            )
        if mimic.NUM_POS_ROIS < 1:
            raise ValueError(
                f"MODEL.DCNV2.MIMIC.NUM_POS_ROIS must be at least 1, got {mimic.NUM_POS_ROIS} "
                "(set MODEL.DCNV2.MIMIC.ENABLED False to train without mimicking)"
            )
        divisor = max(backbone.size_divisibility, 1)
        if mimic.CROP_SIZE < 1 or mimic.CROP_SIZE % divisor:
            raise ValueError(
                f"MODEL.DCNV2.MIMIC.CROP_SIZE must be a positive multiple of {divisor}, the size "
                f"divisibility of the backbone that runs on the crops; got {mimic.CROP_SIZE}"
            )
        head_shape = mimicked_pooler_and_head(roi_heads)[1].output_shape
        return {
            "feature_dim": head_shape.channels * (head_shape.width or 1) * (head_shape.height or 1),
            "num_classes": cfg.MODEL.ROI_HEADS.NUM_CLASSES,
            "num_pos_rois": mimic.NUM_POS_ROIS,
            "crop_size": mimic.CROP_SIZE,
            "loss_weight": mimic.LOSS_WEIGHT,
            "cls_loss_weight": mimic.CLS_LOSS_WEIGHT,
            "regions": mimic.REGIONS,
            "crop_bn": mimic.CROP_BN,
            "loss_reduction": mimic.LOSS_REDUCTION,
        }

    def forward(
        self,
        images: ImageList,
        features: Dict[str, torch.Tensor],
        rois: List[Instances],
        *,
        backbone: nn.Module,
        roi_heads: StandardROIHeads,
    ) -> Dict[str, torch.Tensor]:
        """
        Args:
            images: the normalized, batched input images the proposals refer to.
            features: the backbone's feature maps of `images`.
            rois: per image, the RoIs the mimicked box head was trained on,
                with `proposal_boxes` and `gt_classes`.
            backbone, roi_heads: the detector's own, whose backbone, box pooler
                and box head the R-CNN branch shares.
        Returns:
            {"loss_mimic", "loss_mimic_cls"}, already weighted.
        """
        sampled = sample_mimic_rois(rois, self.num_classes, self.num_pos_rois, self.regions)
        boxes = [s.proposal_boxes for s in sampled]
        gt_classes = torch.cat([s.gt_classes for s in sampled])
        get_event_storage().put_scalar("mimic/num_rois_per_image", gt_classes.numel() / len(rois))
        if gt_classes.numel() == 0:
            return self._zero_losses()

        # Recomputed here for the few sampled RoIs, which leaves the ROI heads'
        # code unchanged: the same pooler and head on the same maps and boxes
        # give the Fast R-CNN branch's values and gradients (for heads without
        # batch statistics; a BatchNorm conv head would normalize over these
        # RoIs only).
        f_frcnn = box_head_features(roi_heads, features, boxes)

        crops = crop_and_resize(images.tensor, boxes, self.crop_size)
        # Each crop is pooled as one RoI covering all of it, by the same pooler.
        # With FPN, the pooler's own level rule (FPN paper, Eq. 1:
        # k = floor(4 + log2(sqrt(wh) / 224))) then puts the default 224x224
        # crop on P4 (stride 16, a 14x14 map): the level it gives a 224x224 RoI
        # of the image, so the crop is pooled like a RoI of its size. (224, the
        # rule's canonical size, is the ImageNet pre-training size, and the
        # paper's crop size too.) Another CROP_SIZE moves to the level the rule
        # gives a RoI of that size.
        whole_crop = Boxes(crops.new_tensor([[0.0, 0.0, self.crop_size, self.crop_size]]))
        if self.crop_bn == "frozen":
            with batchnorm_in_inference_mode(backbone):
                crop_features = backbone(crops)
        else:
            crop_features = backbone(crops)
        f_rcnn = box_head_features(roi_heads, crop_features, [whole_crop] * len(crops))

        return {
            "loss_mimic": self.loss_weight * mimic_loss(f_rcnn, f_frcnn, self.loss_reduction),
            "loss_mimic_cls": self.cls_loss_weight * F.cross_entropy(self.cls_score(f_rcnn), gt_classes),
        }

    def _zero_losses(self) -> Dict[str, torch.Tensor]:
        # No RoI to mimic in the batch. The zeros still depend on the
        # classifier, which would otherwise get no gradient this step and stall
        # DistributedDataParallel (it expects one for every parameter).
        empty = self.cls_score.weight.new_zeros((0, self.cls_score.in_features))
        zero = self.cls_score(empty).sum()
        return {"loss_mimic": zero, "loss_mimic_cls": zero}


@META_ARCH_REGISTRY.register()
class MimicRCNN(GeneralizedRCNN):
    """GeneralizedRCNN trained with R-CNN feature mimicking when
    MODEL.DCNV2.MIMIC.ENABLED is set; otherwise exactly GeneralizedRCNN.

    Inference is GeneralizedRCNN's: the R-CNN branch never runs there, and a
    model gives the same outputs as a GeneralizedRCNN with the same weights
    (the branch's classifier, under `mimic.`, is the only extra parameter).
    """

    @configurable
    def __init__(self, *, mimic: Optional[RCNNFeatureMimicking], **kwargs):
        super().__init__(**kwargs)
        self.mimic = mimic

    @classmethod
    def from_config(cls, cfg):
        ret = super().from_config(cfg)
        if not cfg.MODEL.DCNV2.MIMIC.ENABLED:
            ret["mimic"] = None
            return ret
        if ret["proposal_generator"] is None:
            raise ValueError(
                "R-CNN feature mimicking is built for end-to-end Faster/Mask R-CNN: it needs a "
                "proposal generator (MODEL.PROPOSAL_GENERATOR.NAME), not precomputed proposals"
            )
        ret["mimic"] = RCNNFeatureMimicking(cfg, ret["backbone"], ret["roi_heads"])
        return ret

    def forward(self, batched_inputs: List[Dict[str, torch.Tensor]]):
        if not self.training or self.mimic is None:
            return super().forward(batched_inputs)

        images = self.preprocess_image(batched_inputs)
        gt_instances = [x["instances"].to(self.device) for x in batched_inputs]
        features = self.backbone(images.tensor)
        proposals, proposal_losses = self.proposal_generator(images, features, gt_instances)
        # In training the ROI heads return the RoIs they sampled (a cascade:
        # its final stage's RoIs), each labelled with its matched ground truth:
        # the pool the mimicked RoIs come from.
        rois, detector_losses = self.roi_heads(images, features, proposals, gt_instances)
        mimic_losses = self.mimic(images, features, rois, backbone=self.backbone, roi_heads=self.roi_heads)
        if self.vis_period > 0 and get_event_storage().iter % self.vis_period == 0:
            self.visualize_training(batched_inputs, proposals)
        return {**detector_losses, **proposal_losses, **mimic_losses}
