"""C4 ROI heads with (modulated) deformable RoI pooling and a deformable res5.

Registered in detectron2's ROI_HEADS_REGISTRY as `DCNv2Res5ROIHeads`. In a C4
model (detectron2's `Res5ROIHeads`) one pooler crops res4 (stride 16) for
each RoI, and the res5 stage, run per RoI, is the head that the box predictor
and the mask head share; the backbone ends at res4. DCNv1's setting
(deformable conv5 and deformable RoI pooling) then puts the pooling in front
of the deformable convs. (DCNv1's own Faster R-CNN pooled after a dilated
conv5; the closest layout here is DC5: `build_dcnv2_resnet_backbone` with
MODEL.RESNETS.RES5_DILATION 2, and `DCNv2ROIHeads`.)
"""

from detectron2.modeling import ROI_HEADS_REGISTRY
from detectron2.modeling.roi_heads import Res5ROIHeads
from torch import nn

from .backbone.resnet import check_resnet_config, make_resnet_stage
from .config_checks import check_deformable_pooler_types, check_mimic_architecture
from .roi_heads import head_pooler, with_regular_pooler


@ROI_HEADS_REGISTRY.register()
class DCNv2Res5ROIHeads(Res5ROIHeads):
    """`Res5ROIHeads` whose pooler may be (modulated) deformable RoI pooling
    (MODEL.ROI_BOX_HEAD.POOLER_TYPE "DeformRoIPool" or "ModulatedDeformRoIPool")
    and whose res5 blocks are (modulated) deformable when
    MODEL.RESNETS.DEFORM_ON_PER_STAGE[3] says so (detectron2 refuses that).

    The mask head reads the res5 features of the box pooler's crops: it has
    no pooler of its own, and MODEL.ROI_MASK_HEAD.POOLER_TYPE is not used.
    """

    deformable_pooler_heads = ("ROI_BOX_HEAD",)

    @classmethod
    def from_config(cls, cfg, input_shape):
        check_mimic_architecture(cfg)
        check_deformable_pooler_types(cfg, cls)
        ret = super().from_config(with_regular_pooler(cfg, "ROI_BOX_HEAD"), input_shape)
        ret["pooler"] = head_pooler(cfg, "ROI_BOX_HEAD", input_shape)
        return ret

    @classmethod
    def _build_res5_block(cls, cfg):
        """res5 as detectron2's C4 head builds it (stride 2, no dilation), with
        the block class of this project's backbones: the same parameter names,
        and deformable 3x3 convs per MODEL.RESNETS.DEFORM_ON_PER_STAGE[3]."""
        check_resnet_config(cfg)
        resnets = cfg.MODEL.RESNETS
        stage_channel_factor = 2**3  # res5 is 8x res2
        out_channels = resnets.RES2_OUT_CHANNELS * stage_channel_factor
        bottleneck_channels = resnets.NUM_GROUPS * resnets.WIDTH_PER_GROUP * stage_channel_factor
        blocks = make_resnet_stage(cfg, 3, out_channels // 2, out_channels, bottleneck_channels, dilation=1)
        return nn.Sequential(*blocks), out_channels
