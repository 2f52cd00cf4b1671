"""Reference scale_rows_, plain PyTorch: the in-place rescale of a gradient computed in the forward
pass (the ``torch`` backend's primitive)."""

from __future__ import annotations

import math

import torch

from .._validate import acc_dtype


def scale_rows_(grad: torch.Tensor, factor: torch.Tensor) -> None:
    """grad[b] *= factor[b] in place, computed in the accumulation dtype and rounded to grad's."""
    B, n = grad.shape[0], math.prod(grad.shape[1:])
    acc = acc_dtype(grad.dtype)
    scaled = grad.reshape(B, n).to(acc) * factor.to(acc).view(B, 1)
    grad.copy_(scaled.view(grad.shape))
