"""Sizes that a traced graph may treat as constants."""
import warnings

import torch
from torch import Tensor

__all__ = ["static_size"]


def static_size(tensor: Tensor, dim: int) -> int:
    """``tensor.shape[dim]`` as a Python int, for sizes fixed by the model (a box's 4 coordinates, the number of
    classes), not by the input. While tracing, sizes are traced values and turning one into a Python number
    warns that the trace fixes it; for such sizes that is intended, so the warning is silenced here."""
    if not torch.jit.is_tracing():
        return tensor.shape[dim]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        return int(tensor.shape[dim])
