"""Cascade R-CNN (Cai and Vasconcelos, CVPR 2018) with (modulated) deformable
RoI pooling: one pooler, hence one offset branch, per stage.

Registered in detectron2's ROI_HEADS_REGISTRY as `DCNv2CascadeROIHeads`.
detectron2's `CascadeROIHeads` shares one parameter-free box pooler among its
stages, each with its own box head trained on the previous stage's boxes at a
higher IoU threshold. An offset branch learns where to pool for the head that
reads its features, so each stage here has its own, as it has its own head.
"""

from typing import List, Optional

from detectron2.modeling import ROI_HEADS_REGISTRY
from detectron2.modeling.roi_heads.cascade_rcnn import CascadeROIHeads, _ScaleGradient
from detectron2.structures import Instances
from torch import nn

from .roi_heads import DeformableMaskAndKeypointPoolers, head_pooler, with_regular_pooler


@ROI_HEADS_REGISTRY.register()
class DCNv2CascadeROIHeads(DeformableMaskAndKeypointPoolers, CascadeROIHeads):
    """`CascadeROIHeads` with one box pooler per stage (`box_pooler[k]`, beside
    `box_head[k]` and `box_predictor[k]`), deformable when
    MODEL.ROI_BOX_HEAD.POOLER_TYPE says so; the mask and keypoint poolers are
    those of `DCNv2ROIHeads`.

    In training, `forward` returns the final stage's RoIs, labelled by that
    stage's matcher (detectron2's returns the first stage's, which detectron2
    does not read in training): R-CNN feature mimicking learns from them.
    """

    _final_stage_rois: Optional[List[Instances]] = None

    @classmethod
    def _init_box_head(cls, cfg, input_shape):
        if not cfg.MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG:
            raise ValueError(
                "Cascade R-CNN refines one box per RoI from stage to stage: set "
                "MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG to True (detectron2's CascadeROIHeads needs it too)"
            )
        ret = super()._init_box_head(with_regular_pooler(cfg, "ROI_BOX_HEAD"), input_shape)
        ret["box_pooler"] = nn.ModuleList(head_pooler(cfg, "ROI_BOX_HEAD", input_shape) for _ in ret["box_heads"])
        return ret

    def forward(self, images, features, proposals, targets=None):
        instances, losses = super().forward(images, features, proposals, targets)
        if self.training:
            instances, self._final_stage_rois = self._final_stage_rois, None
        return instances, losses

    def _run_stage(self, features, proposals, stage):
        if self.training and stage == self.num_cascade_stages - 1:
            self._final_stage_rois = proposals
        # detectron2 scales the gradient of the pooled features by 1/stages, so
        # that the sum of the stages' losses trains each head with its own
        # loss and the shared feature maps with the mean. Scaling at the
        # pooler's input instead gives the maps the same gradient, and the
        # stage's offset branch, part of its head, its own loss's full one.
        features = [_ScaleGradient.apply(f, 1.0 / self.num_cascade_stages) for f in features]
        box_features = self.box_pooler[stage](features, [x.proposal_boxes for x in proposals])
        return self.box_predictor[stage](self.box_head[stage](box_features))
