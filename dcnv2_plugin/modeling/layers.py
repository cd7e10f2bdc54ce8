"""The deformable conv of detectron2's deformable ResNet blocks, on this project's operator."""

from typing import Optional

import torch
from torch import nn

from ..ops import DeformConv2d


class DeformConv(DeformConv2d):
    """`DeformConv2d` with an optional norm after it and no bias by default.

    Its state dict (`weight`, `norm.*`) matches detectron2's
    `DeformConv`/`ModulatedDeformConv`, so their checkpoints load, but it runs
    on this project's operator, on CPU and GPU.
    """

    def __init__(self, *args, bias: bool = False, norm: Optional[nn.Module] = None, **kwargs):
        super().__init__(*args, bias=bias, **kwargs)
        self.norm = norm

    def forward(self, x: torch.Tensor, offset: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = super().forward(x, offset, mask)
        return self.norm(x) if self.norm is not None else x
