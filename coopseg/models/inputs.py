"""Input checks shared by the networks (the segmentor and the registor)."""
from __future__ import annotations

import torch


def check_float_input(what: str, x: torch.Tensor, weight: torch.Tensor) -> None:
    """x must be floating point and in the parameters' dtype, unless autocast (which
    casts it for the convolutions) is on for its device."""
    if not x.is_floating_point():
        raise TypeError(f"{what} input must be a floating-point tensor, got {x.dtype}")
    if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(f"{what} input dtype {x.dtype} must match the parameters' {weight.dtype} "
                        f"(or run under torch.autocast)")
