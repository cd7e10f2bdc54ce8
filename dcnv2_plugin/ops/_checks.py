"""Argument checks shared by the operator wrappers: each error names the
argument at fault, before any kernel runs."""

from typing import Optional

import torch


def check_rank(name: str, t: torch.Tensor, rank: int, layout: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
    if t.dim() != rank:
        raise ValueError(f"{name} must be a {rank}-D tensor {layout}, got shape {tuple(t.shape)}")


def autocast_will_cast(t: torch.Tensor) -> bool:
    """Under autocast the operators' autocast kernels cast every floating
    input to one compute dtype, so mixed dtypes are expected there.

    Devices without autocast (the meta device of shape inference and
    deferred initialization) never cast: asking them would raise."""
    device_type = t.device.type
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


def check_same_dtype_device(ref_name: str, ref: torch.Tensor, **others: Optional[torch.Tensor]) -> None:
    casting = autocast_will_cast(ref)
    for name, t in others.items():
        if t is None:
            continue
        if t.dtype != ref.dtype and not casting:
            raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has dtype {ref.dtype}")
        if t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")


def check_floating(name: str, t: torch.Tensor) -> None:
    if t.is_floating_point() and autocast_will_cast(t):
        return
    supported = (torch.float32, torch.float64)
    # The meta device stands for any device in shape inference.
    if t.is_cuda or t.is_meta:
        supported = supported + (torch.float16, torch.bfloat16)
    if t.dtype not in supported:
        raise TypeError(
            f"{name} has dtype {t.dtype}; supported on {t.device.type}: " + ", ".join(str(d) for d in supported)
        )


def pair(name: str, value) -> tuple:
    if isinstance(value, int):
        value = (value, value)
    value = tuple(int(v) for v in value)
    if len(value) != 2:
        raise ValueError(f"{name} must be an int or a pair of ints, got {value}")
    return value


def conv_output_size(size: int, pad: int, dilation: int, kernel: int, stride: int) -> int:
    """Output length of a convolution along one dimension."""
    return (size + 2 * pad - (dilation * (kernel - 1) + 1)) // stride + 1
