"""The optimizer: detectron2's default, with the geometry predictors (offset
and modulation layers, the spatial transformer's localization net) at
MODEL.DCNV2.OFFSET_LR_FACTOR times the learning rate (DCNv2, Sec. 3.2)."""

from typing import Any, Dict, List, Set

import torch
from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping
from torch import nn

from ..ops import GeometryPredictor


def geometry_parameter_ids(model: nn.Module) -> Set[int]:
    """ids of the parameters of every `GeometryPredictor` in `model`."""
    return {id(p) for module in model.modules() if isinstance(module, GeometryPredictor) for p in module.parameters()}


def scale_geometry_lr(param_groups: List[Dict[str, Any]], model: nn.Module, factor: float) -> List[Dict[str, Any]]:
    """Splits each parameter group so the geometry predictors' parameters get
    `factor` times the group's learning rate (other settings unchanged)."""
    geometry = geometry_parameter_ids(model)
    scaled_groups = []
    for group in param_groups:
        others = [p for p in group["params"] if id(p) not in geometry]
        predictors = [p for p in group["params"] if id(p) in geometry]
        if others:
            scaled_groups.append({**group, "params": others})
        if predictors:
            scaled_groups.append({**group, "params": predictors, "lr": group["lr"] * factor})
    return scaled_groups


def build_optimizer(cfg, model: nn.Module) -> torch.optim.Optimizer:
    """detectron2's `build_optimizer` (SGD on `get_default_optimizer_params`,
    optional gradient clipping) plus MODEL.DCNV2.OFFSET_LR_FACTOR."""
    param_groups = get_default_optimizer_params(
        model,
        base_lr=cfg.SOLVER.BASE_LR,
        weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
        bias_lr_factor=cfg.SOLVER.BIAS_LR_FACTOR,
        weight_decay_bias=cfg.SOLVER.WEIGHT_DECAY_BIAS,
    )
    param_groups = scale_geometry_lr(param_groups, model, cfg.MODEL.DCNV2.OFFSET_LR_FACTOR)
    return maybe_add_gradient_clipping(cfg, torch.optim.SGD)(
        param_groups,
        lr=cfg.SOLVER.BASE_LR,
        momentum=cfg.SOLVER.MOMENTUM,
        nesterov=cfg.SOLVER.NESTEROV,
        weight_decay=cfg.SOLVER.WEIGHT_DECAY,
    )
