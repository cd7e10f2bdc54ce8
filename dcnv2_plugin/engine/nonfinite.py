"""Non-finite values in training, traced to the geometry layers (offsets,
modulation, STN: each a `GeometryPredictor`).

During a training step, a forward hook on each geometry layer keeps its
input and output (which autograd keeps for the backward pass anyway). After
the step, one flag says whether every output was finite (one
synchronization); this has to be checked even when the loss is finite:
deformable sampling reads zero at a non-finite position, so the loss can stay
finite while the layer is broken for good. Only when something was not
finite are the inputs, parameters and losses looked at, to say where it
started."""

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
    training step."""

    def __init__(self, model: nn.Module):
        self._records: List[Tuple[str, GeometryPredictor, Any, Any]] = []
        self._losses: Dict[str, torch.Tensor] = {}
        self._handles = [model.register_forward_hook(self._record_losses)]
        for name, module in model.named_modules():
            if isinstance(module, GeometryPredictor):
                self._handles.append(module.register_forward_hook(self._recorder(name)))

    def _recorder(self, name: str):
        def record(module, inputs, output):
            if module.training and torch.is_grad_enabled():
                self._records.append((name, module, inputs, output))

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

    def check_step(self, iteration: int) -> None:
        """Raises FloatingPointError if a geometry layer's output was not
        finite in the step just run (one synchronization)."""
        flags = [flag for flag in (_all_finite(output) for *_, output in self._records) if flag is not None]
        if flags and not bool(torch.stack(flags).all()):
            raise FloatingPointError(
                f"A geometry layer's output became infinite or NaN at iteration={iteration}; the loss can stay "
                "finite, as deformable sampling reads zero there, but the layer would stay broken.\n"
                + self.explain_geometry()
            )
        self._records.clear()

    def explain_losses(self) -> str:
        bad = [name for name, loss in self._losses.items() if not bool(torch.isfinite(loss).all())]
        if not bad:
            return "The losses of this process were finite (another process's were not)."
        return f"Non-finite loss(es) in this process: {', '.join(bad)}."

    def explain_geometry(self) -> str:
        """The first geometry layer whose output was not finite in the step,
        and whether its input or its parameters already were not."""
        for name, module, inputs, output in self._records:
            output_finite, input_finite = _all_finite(output), _all_finite(inputs)
            if output_finite is None or bool(output_finite):
                continue
            if input_finite is not None and not bool(input_finite):
                cause = "its input was already non-finite, so the values broke before it"
            elif not all(bool(torch.isfinite(p).all()) for p in module.parameters()):
                cause = "its parameters are non-finite: an earlier update broke them"
            else:
                cause = "its input and parameters were finite: the values broke in this layer"
            return f"The first geometry layer with a non-finite output in this step: {name} ({cause})."
        return "Every geometry layer (offsets, modulation, STN) had a finite output in this step."
