"""Reference sparse-supervision loss (docs/METHODS.md section 1), written for clarity, not speed.

``sparse_mask`` and ``sparse_mse_loss`` are the independent oracles the tests compare every
backend against (float64 math). ``sparse_mse_fwd`` and ``keep_mask`` are the ``torch`` backend's
primitives ``sparse_mse_fwd`` and ``sparse_mask`` (diffkernels/ops/_kernels.py), which the C++,
CUDA and Triton kernels implement too, so the ``torch`` backend runs anywhere torch does.
"""

from __future__ import annotations

import math

import torch

from .._validate import acc_dtype
from ..rng import uniform


def _mask_layout(shape, granularity: str) -> tuple[int, int, int]:
    """(B, C, R): the mask has one draw per (b, r), shared by the C channels."""
    B = shape[0]
    n = math.prod(shape[1:])
    C = shape[1] if granularity == "pixel" else 1
    return B, C, (n // C if C else 0)


def keep_mask(seed: int, B: int, C: int, R: int, mask_ratio: float, device=None) -> torch.Tensor:
    """Boolean keep-mask of shape (B, C, R), contiguous: U(seed, b * R + r) >= mask_ratio (compared
    in float32), shared by the C channels. Plain tensor ops, so traceable."""
    u = uniform(seed, torch.arange(B * R, device=device, dtype=torch.int64)).view(B, 1, R)
    threshold = torch.tensor(mask_ratio, dtype=torch.float32, device=device)
    return (u >= threshold).expand(B, C, R).contiguous()


def sparse_mask(shape, mask_ratio: float, seed: int, granularity: str = "element", device=None) -> torch.Tensor:
    B, C, R = _mask_layout(tuple(shape), granularity)
    return keep_mask(seed, B, C, R, mask_ratio, device).reshape(tuple(shape))


def sparse_mse_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    mask_ratio: float,
    seed: int,
    *,
    weight: torch.Tensor | None = None,
    granularity: str = "element",
    normalize: str = "expected",
    reduction: str = "mean",
) -> torch.Tensor:
    """The loss exactly as written in docs/METHODS.md, in float64, differentiable by autograd."""
    B = pred.shape[0]
    n = math.prod(pred.shape[1:])
    keep = sparse_mask(pred.shape, mask_ratio, seed, granularity, pred.device)
    diff = pred.double() - target.double()
    sq = torch.where(keep, diff * diff, torch.zeros((), dtype=torch.float64, device=pred.device))
    per_sample = sq.reshape(B, n).sum(dim=1)
    if normalize == "expected":
        per_sample = per_sample / (n * (1.0 - mask_ratio))
    elif normalize == "all":
        per_sample = per_sample / n
    elif normalize == "kept":
        per_sample = per_sample / keep.reshape(B, n).sum(dim=1).clamp(min=1).double()
    else:
        raise ValueError(f"unknown normalize {normalize!r}")
    if weight is not None:
        per_sample = per_sample * weight.double()
    out_dtype = torch.promote_types(pred.dtype, torch.float32)
    if reduction == "none":
        return per_sample.to(out_dtype)
    if reduction == "sum":
        return per_sample.sum().to(out_dtype)
    if reduction == "mean":
        return per_sample.mean().to(out_dtype)
    raise ValueError(f"unknown reduction {reduction!r}")


# --- the torch backend's primitives -------------------------------------------------


def sparse_mse_fwd(pred, target, mask_ratio: float, seed: int, channels: int, grad_scale):
    """Per-row sums of keep*(pred-target)^2 (float64), kept counts (int64), optional gradient."""
    B = pred.shape[0]
    n = pred.numel() // B if B else 0
    R = n // channels if channels else 0
    keep = keep_mask(seed, B, channels, R, mask_ratio, pred.device).reshape(B, n)
    acc = acc_dtype(pred.dtype)
    diff = pred.reshape(B, n).to(acc) - target.reshape(B, n).to(acc)
    zero = torch.zeros((), dtype=acc, device=pred.device)
    sq_sum = torch.where(keep, diff * diff, zero).double().sum(dim=1)
    kept = keep.sum(dim=1)
    if grad_scale is None:
        grad = pred.new_empty(0)
    else:
        grad = torch.where(keep, grad_scale.to(acc).view(B, 1) * diff, zero).to(pred.dtype).reshape(pred.shape)
    return sq_sum, kept, grad
