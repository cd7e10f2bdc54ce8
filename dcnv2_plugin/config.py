"""The config keys this project adds to detectron2's, all under MODEL.DCNV2.

detectron2's own keys keep their meaning; in particular the deformable
backbone is chosen with MODEL.RESNETS.DEFORM_ON_PER_STAGE, DEFORM_MODULATED
and DEFORM_NUM_GROUPS, and the deformable RoI pooling with
MODEL.ROI_BOX_HEAD.POOLER_TYPE (and ROI_MASK_HEAD.POOLER_TYPE,
ROI_KEYPOINT_HEAD.POOLER_TYPE).
"""

from typing import Sequence

from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg

from .model_zoo import get_config_file


def add_dcnv2_config(cfg: CN) -> None:
    """Add the MODEL.DCNV2 subtree (with its defaults) to `cfg`, in place."""
    _C = cfg
    _C.MODEL.DCNV2 = CN()

    # Learning-rate multiplier for the layers that predict sampling geometry:
    # the offset/modulation convs of the deformable convolutions, the offset
    # branch of deformable RoI pooling and the spatial transformer's
    # localization net. The paper trains the offset and modulation convs at
    # 0.1x the base learning rate (DCNv2, Sec. 3.2); the same factor is
    # applied here to the other geometry predictors.
    _C.MODEL.DCNV2.OFFSET_LR_FACTOR = 0.1

    # The fc branch that predicts the per-bin offsets (and modulation) of
    # (modulated) deformable RoI pooling, used when a head's POOLER_TYPE is
    # "DeformRoIPool" or "ModulatedDeformRoIPool" (DCNv2, Sec. 3.2).
    _C.MODEL.DCNV2.DEFORM_POOL = CN()
    # Width of the branch's two hidden fc layers (1024 in the paper).
    _C.MODEL.DCNV2.DEFORM_POOL.FC_DIM = 1024
    # Channels a 1x1 conv + ReLU reduces the branch's input RoI features to
    # before its first fc; 0 (the paper's branch): none. The first fc has
    # channels x pooled bins x FC_DIM weights: 13M on FPN's 256-channel 7x7
    # RoIs, but 205M on C4's 1024-channel 14x14 ones, where the C4 configs
    # reduce to 64 channels (as many inputs as on FPN).
    _C.MODEL.DCNV2.DEFORM_POOL.BRANCH_CHANNELS = 0
    # Scale of the normalized bin offsets: a bin moves by GAMMA * offset *
    # (RoI width, RoI height) (DCNv1, Sec. 2.2: gamma = 0.1).
    _C.MODEL.DCNV2.DEFORM_POOL.GAMMA = 0.1

    # Spatial Transformer baseline: one learned global affine warp of the input
    # of a ResNet stage, initialized to the identity. Its localization net
    # average-pools the features to a small grid, then fc -> ReLU -> fc(6).
    _C.MODEL.DCNV2.STN = CN()
    # Whether the ResNet backbones of this project insert the transformer.
    _C.MODEL.DCNV2.STN.ENABLED = False
    # The stage ("res2" ... "res5") whose input is warped; it must not be
    # frozen by MODEL.BACKBONE.FREEZE_AT.
    _C.MODEL.DCNV2.STN.STAGE = "res3"
    # Width of the localization net's hidden fc layer.
    _C.MODEL.DCNV2.STN.HIDDEN_DIM = 256

    # R-CNN feature mimicking (DCNv2, Sec. 3.3), used by the mimicking ROI heads.
    _C.MODEL.DCNV2.MIMIC = CN()
    # Whether the mimicking branch and its loss are added during training.
    _C.MODEL.DCNV2.MIMIC.ENABLED = False
    # Number of RoIs per image sampled for mimicking (32 in the paper), drawn
    # from the REGIONS below.
    _C.MODEL.DCNV2.MIMIC.NUM_POS_ROIS = 32
    # Which of the ROI heads' training RoIs are mimicked (the paper's Table 3):
    # "foreground" (positives only; the paper's choice and best setting),
    # "background" (negatives only) or "both". The R-CNN branch's classifier
    # learns a background RoI's crop as the background class.
    _C.MODEL.DCNV2.MIMIC.REGIONS = "foreground"
    # How the backbone's BatchNorm layers normalize the image crops: "train"
    # (like the images: the crops' own batch statistics, which also update
    # the running statistics that inference uses) or "frozen" (the running
    # statistics, left unchanged: the crops are normalized as inference
    # normalizes images, like the paper's backbone with frozen BN). Without
    # BatchNorm (FrozenBN, GN) the two are the same.
    _C.MODEL.DCNV2.MIMIC.CROP_BN = "train"
    # Side of the square image crop of each sampled RoI fed to the R-CNN branch.
    _C.MODEL.DCNV2.MIMIC.CROP_SIZE = 224
    # Weight of the feature mimic (cosine similarity) loss (0.1 in the paper).
    _C.MODEL.DCNV2.MIMIC.LOSS_WEIGHT = 0.1
    # How the mimic loss combines its RoIs' 1 - cos terms: "mean" (the loss
    # weight then means the same whatever the number of RoIs) or "sum" (the
    # paper's L_mimic, which grows with the RoIs mimicked per batch).
    _C.MODEL.DCNV2.MIMIC.LOSS_REDUCTION = "mean"
    # Weight of the R-CNN branch's own classification loss.
    _C.MODEL.DCNV2.MIMIC.CLS_LOSS_WEIGHT = 0.1


def load_config(config_file: str, opts: Sequence[str] = ()) -> CN:
    """detectron2's default config with the MODEL.DCNV2 keys, merged with
    `config_file` (a path or a packaged config's name, see
    `dcnv2_plugin.model_zoo`) and then with `opts` (KEY VALUE pairs). Not frozen."""
    cfg = get_cfg()
    add_dcnv2_config(cfg)
    cfg.merge_from_file(get_config_file(config_file))
    cfg.merge_from_list(list(opts))
    return cfg
