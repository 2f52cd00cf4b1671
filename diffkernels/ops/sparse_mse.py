"""``diffkernels::sparse_mse``: the fused masked, weighted MSE of sparse supervision.

One pass over pred and target produces the per-sample losses and, when an input needs a
gradient, the gradient itself (already scaled for an incoming gradient of 1). Backward then only
rescales it in place by the incoming gradient, in a kernel that skips rows whose factor is exactly
1, so the usual ``loss.backward()`` costs no second pass and no host sync. The keep-mask is
regenerated from (seed, index) inside every kernel and never stored.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ..rng import seed_to_int64
from . import _kernels

GRANULARITIES = ("element", "pixel")
NORMALIZATIONS = ("expected", "all", "kept")
REDUCTIONS = ("mean", "sum", "none")


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _loss_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _loss_shape(pred: Tensor, reduction: str) -> tuple[int, ...]:
    return (pred.shape[0],) if reduction == "none" else ()


@torch.library.custom_op("diffkernels::sparse_mse", mutates_args=())
def _sparse_mse(
    pred: Tensor,
    target: Tensor,
    weight: Optional[Tensor],
    mask_ratio: float,
    seed: int,
    channels: int,
    normalize: str,
    reduction: str,
    compute_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (loss, grad buffer, per-row backward factor, per-sample unweighted loss)."""
    kernels = _kernels.for_device(pred.device)
    B = pred.shape[0]
    n = pred.numel() // B if B else 0
    acc = _acc_dtype(pred.dtype)
    w = weight.double() if weight is not None else torch.ones(B, dtype=torch.float64, device=pred.device)
    reduce_factor = 1.0 / B if (reduction == "mean" and B) else 1.0
    z_known = {"expected": n * (1.0 - mask_ratio), "all": float(n)}.get(normalize)

    grad_scale = None
    if compute_grad:
        # d loss / d pred = grad_scale[b] * keep * (pred - target); for "kept" the 1/Z_b factor is
        # only known after the pass, so backward applies it.
        grad_scale = (2.0 * reduce_factor / (z_known if z_known else 1.0)) * w
        grad_scale = grad_scale.to(acc)
    sq_sum, kept, grad = kernels.sparse_mse_fwd(pred, target, mask_ratio, seed, channels, grad_scale)

    if z_known is not None:
        z = torch.full((B,), z_known, dtype=torch.float64, device=pred.device)
        row_factor = torch.ones(B, dtype=acc, device=pred.device)
    else:
        z = kept.clamp(min=1).double()
        row_factor = (1.0 / z).to(acc)
    unweighted = sq_sum / z
    per_sample = w * unweighted
    if reduction == "none":
        loss = per_sample
    elif reduction == "sum":
        loss = per_sample.sum()
    else:
        loss = per_sample.mean()  # NaN for an empty batch, like torch.mean of nothing
    return loss.to(_loss_dtype(pred.dtype)), grad, row_factor, unweighted


@_sparse_mse.register_fake
def _(pred, target, weight, mask_ratio, seed, channels, normalize, reduction, compute_grad):
    B = pred.shape[0]
    acc = _acc_dtype(pred.dtype)
    loss = pred.new_empty(_loss_shape(pred, reduction), dtype=_loss_dtype(pred.dtype))
    grad = torch.empty_like(pred) if compute_grad else pred.new_empty(0)
    return loss, grad, pred.new_empty(B, dtype=acc), pred.new_empty(B, dtype=torch.float64)


@torch.library.custom_op("diffkernels::scale_rows_", mutates_args=("grad",))
def _scale_rows_(grad: Tensor, factor: Tensor) -> None:
    """grad[b] *= factor[b] in place; rows with factor exactly 1 are not touched."""
    _kernels.for_device(grad.device).scale_rows_(grad, factor)


@_scale_rows_.register_fake
def _(grad, factor):
    return None


def _setup_context(ctx, inputs, output):
    pred, target, weight, mask_ratio, seed, channels, normalize, reduction, compute_grad = inputs
    loss, grad, row_factor, unweighted = output
    ctx.mark_non_differentiable(grad, row_factor, unweighted)
    ctx.save_for_backward(grad, row_factor, unweighted)
    ctx.reduction = reduction
    ctx.compute_grad = compute_grad
    ctx.weight_dtype = None if weight is None else weight.dtype


def _backward(ctx, grad_loss, _grad_buffer, _row_factor, _unweighted):
    grad, row_factor, unweighted = ctx.saved_tensors
    B = unweighted.shape[0]
    if grad_loss is None:
        return (None,) * 9
    per_row = grad_loss.expand(B) if ctx.reduction != "none" else grad_loss
    grad_pred = grad_target = grad_weight = None
    if ctx.compute_grad and (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]):
        factor = per_row.to(row_factor.dtype) * row_factor
        torch.ops.diffkernels.scale_rows_(grad, factor)
        grad_pred = grad if ctx.needs_input_grad[0] else None
        grad_target = -grad if ctx.needs_input_grad[1] else None
    if ctx.weight_dtype is not None and ctx.needs_input_grad[2]:
        reduce_factor = 1.0 / B if (ctx.reduction == "mean" and B) else 1.0
        grad_weight = (per_row.double() * unweighted * reduce_factor).to(ctx.weight_dtype)
    return grad_pred, grad_target, grad_weight, None, None, None, None, None, None


_sparse_mse.register_autograd(_backward, setup_context=_setup_context)


# --- public functions -------------------------------------------------------------------------


def _check_tensor(x, name: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")


def _check_mask_ratio(mask_ratio) -> float:
    if isinstance(mask_ratio, bool) or not isinstance(mask_ratio, (int, float)):
        raise TypeError(f"mask_ratio must be a Python float in [0, 1), got {type(mask_ratio).__name__}")
    mask_ratio = float(mask_ratio)
    if not (0.0 <= mask_ratio < 1.0):  # also rejects NaN
        raise ValueError(f"mask_ratio must lie in [0, 1), got {mask_ratio}")
    return mask_ratio


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be a Python int, got {type(seed).__name__}")
    return seed_to_int64(seed)


def _check_choice(value, name: str, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _channels(shape, granularity: str, name: str = "pred") -> int:
    _check_choice(granularity, "granularity", GRANULARITIES)
    if granularity == "pixel":
        if len(shape) < 2:
            raise ValueError(
                f"granularity='pixel' shares one draw across dim 1 (channels), but {name} has shape "
                f"{tuple(shape)} with no channel dimension"
            )
        return shape[1]
    return 1


def sparse_mse_loss(
    pred: Tensor,
    target: Tensor,
    mask_ratio: float,
    seed: int,
    *,
    weight: Optional[Tensor] = None,
    granularity: str = "element",
    normalize: str = "expected",
    reduction: str = "mean",
) -> Tensor:
    """Masked, weighted MSE of sparse supervision (METHODS.md section 1), fused.

    loss_b = w_b * sum_i keep[b, i] * (pred[b, i] - target[b, i])**2 / Z_b, reduced over b by
    ``reduction`` ("mean", "sum" or "none" for the (B,) vector), with
    ``keep[b, i] = U(seed, index) >= mask_ratio`` from the counter RNG of :mod:`diffkernels.rng`
    (index: the flat element index, or with ``granularity="pixel"`` the flat index with the
    channel dim 1 removed, so all channels of a pixel share one draw).

    ``normalize``: ``"expected"`` (Z_b = n * (1 - mask_ratio), an unbiased estimate of the dense
    MSE), ``"all"`` (Z_b = n) or ``"kept"`` (Z_b = max(1, kept elements of sample b)).

    Accumulates in float32 (float64 for float64 inputs); returns float32 for half, bfloat16 and
    float32 inputs. NaN/Inf in kept elements propagate; in masked-out elements they are ignored.
    An empty batch gives NaN for "mean" (like ``torch.mean`` of nothing), 0 for "sum" and an
    empty vector for "none". Gradients flow to ``pred``, ``target`` and ``weight``.
    """
    _check_tensor(pred, "pred")
    _check_tensor(target, "target")
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have the same shape, got {tuple(pred.shape)} and {tuple(target.shape)}")
    if pred.dtype != target.dtype:
        raise TypeError(f"pred and target must have the same dtype, got {pred.dtype} and {target.dtype}")
    if pred.device != target.device:
        raise ValueError(f"pred and target must be on the same device, got {pred.device} and {target.device}")
    if pred.dim() < 1:
        raise ValueError("pred must have a batch dimension (dim 0), got a 0-d tensor")
    mask_ratio = _check_mask_ratio(mask_ratio)
    seed = _check_seed(seed)
    _check_choice(normalize, "normalize", NORMALIZATIONS)
    _check_choice(reduction, "reduction", REDUCTIONS)
    channels = _channels(pred.shape, granularity)
    B = pred.shape[0]
    if B and pred[0].numel() == 0:
        raise ValueError(f"pred has no elements per sample (shape {tuple(pred.shape)})")
    if weight is not None:
        _check_tensor(weight, "weight")
        if weight.shape != (B,):
            raise ValueError(f"weight must have shape (B,) = ({B},), one weight per sample, got {tuple(weight.shape)}")
        if weight.device != pred.device:
            raise ValueError(f"weight must be on pred's device {pred.device}, got {weight.device}")
        weight = weight.contiguous()
    compute_grad = torch.is_grad_enabled() and (pred.requires_grad or target.requires_grad)
    loss, _, _, _ = _sparse_mse(
        pred.contiguous(), target.contiguous(), weight, mask_ratio, seed, channels, normalize, reduction, compute_grad
    )
    return loss


def sparse_mask(shape, mask_ratio: float, seed: int, *, granularity: str = "element", device=None) -> Tensor:
    """The boolean keep-mask that ``sparse_mse_loss`` uses for a tensor of ``shape`` (True = kept)."""
    shape = torch.Size(shape)
    if len(shape) < 1:
        raise ValueError("shape must have a batch dimension")
    if any(s < 0 for s in shape):
        raise ValueError(f"shape must be non-negative, got {tuple(shape)}")
    mask_ratio = _check_mask_ratio(mask_ratio)
    seed = _check_seed(seed)
    C = _channels(shape, granularity, "shape")
    B = shape[0]
    n = math.prod(shape[1:])
    R = n // C if C else 0
    device = torch.device(device) if device is not None else torch.device("cpu")
    if C == 0:
        return torch.zeros(shape, dtype=torch.bool, device=device)
    mask = _kernels.for_device(device).sparse_mask(seed, B, C, R, mask_ratio, device)
    return mask.reshape(shape)


class SparseMSELoss(torch.nn.Module):
    """Module form of :func:`sparse_mse_loss`; ``forward(pred, target, seed, weight=None)``.

    Derive a fresh seed every step (e.g. ``diffkernels.fold_seed(base_seed, step, rank)``):
    the same seed gives the same mask.
    """

    def __init__(self, mask_ratio: float, *, granularity: str = "element", normalize: str = "expected",
                 reduction: str = "mean"):
        super().__init__()
        self.mask_ratio = _check_mask_ratio(mask_ratio)
        _channels((1, 1), granularity)
        _check_choice(normalize, "normalize", NORMALIZATIONS)
        _check_choice(reduction, "reduction", REDUCTIONS)
        self.granularity, self.normalize, self.reduction = granularity, normalize, reduction

    def forward(self, pred: Tensor, target: Tensor, seed: int, weight: Optional[Tensor] = None) -> Tensor:
        return sparse_mse_loss(pred, target, self.mask_ratio, seed, weight=weight, granularity=self.granularity,
                               normalize=self.normalize, reduction=self.reduction)

    def extra_repr(self) -> str:
        return (f"mask_ratio={self.mask_ratio}, granularity={self.granularity!r}, normalize={self.normalize!r}, "
                f"reduction={self.reduction!r}")
