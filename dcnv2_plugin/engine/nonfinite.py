"""Where a non-finite loss came from: which losses, and the first geometry
layer (offsets, modulation, STN: a `GeometryPredictor`) whose output went
non-finite in the step.

During training, a forward hook on each geometry layer records whether its
input and output are finite as 0-dim tensors, without waiting for them
(no device synchronization); they are read only after detectron2 found the
loss non-finite."""

from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from ..ops import GeometryPredictor


def _all_finite(value: Any) -> Optional[torch.Tensor]:
    """A 0-dim bool tensor: whether every floating-point tensor in `value`
    (a tensor or nested tuples/lists of them) is finite; None if it has none."""
    if isinstance(value, torch.Tensor):
        return torch.isfinite(value).all() if value.is_floating_point() else None
    if isinstance(value, (tuple, list)):
        flags = [flag for flag in map(_all_finite, value) if flag is not None]
        if not flags:
            return None
        return torch.stack(flags).all() if len(flags) > 1 else flags[0]
    return None


class NonFiniteTracer:
    """Follows the geometry layers of `model` (and its loss dict) through each
    training step; `explain()` says where non-finite values appeared."""

    def __init__(self, model: nn.Module):
        self._records: List[Tuple[str, GeometryPredictor, Optional[torch.Tensor], Optional[torch.Tensor]]] = []
        self._losses: Dict[str, torch.Tensor] = {}
        self._handles = [model.register_forward_hook(self._record_losses)]
        for name, module in model.named_modules():
            if isinstance(module, GeometryPredictor):
                self._handles.append(module.register_forward_hook(self._recorder(name)))

    def _recorder(self, name: str):
        def record(module, inputs, output):
            if module.training and torch.is_grad_enabled():
                self._records.append((name, module, _all_finite(inputs), _all_finite(output)))

        return record

    def _record_losses(self, model, inputs, output):
        if model.training and isinstance(output, dict):
            self._losses = output

    def start_step(self) -> None:
        self._records.clear()
        self._losses = {}

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    def explain(self) -> str:
        """What went non-finite in the last step, in a few sentences."""
        bad_losses = [name for name, loss in self._losses.items() if not bool(torch.isfinite(loss).all())]
        lines = [
            f"Non-finite loss(es) in this process: {', '.join(bad_losses)}."
            if bad_losses
            else "The losses of this process were finite (another process's were not)."
        ]
        for name, module, input_finite, output_finite in self._records:
            if output_finite is None or bool(output_finite):
                continue
            if input_finite is not None and not bool(input_finite):
                cause = "its input was already non-finite, so the values broke before it"
            elif not all(bool(torch.isfinite(p).all()) for p in module.parameters()):
                cause = "its parameters are non-finite: an earlier update broke them"
            else:
                cause = "its input and parameters were finite: the values broke in this layer"
            lines.append(f"The first geometry layer with a non-finite output in this step: {name} ({cause}).")
            break
        else:
            lines.append("Every geometry layer (offsets, modulation, STN) had a finite output in this step.")
        return "\n".join(lines)
