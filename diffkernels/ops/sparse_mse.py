"""``diffkernels::sparse_mse``: the fused masked, weighted MSE of sparse supervision.

Default (backward="fused"): one pass over pred and target produces the per-sample losses and,
when an input needs a gradient, the gradient itself (already scaled for an upstream gradient of
1). Backward then only rescales it in place, in a kernel that skips rows whose factor is exactly
1, so the usual ``loss.backward()`` costs no second pass and no host sync. backward="recompute"
regenerates the mask in backward instead, for graphs differentiated more than once. The
keep-mask is regenerated from (seed, index) inside every kernel and never stored.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .._validate import check_choice, check_float_tensor, check_mask_ratio, check_seed
from . import _kernels
from ._inplace import saved_tensors

GRANULARITIES = ("element", "pixel")
NORMALIZATIONS = ("expected", "all", "kept")
REDUCTIONS = ("mean", "sum", "none")
BACKWARD_MODES = ("fused", "recompute")


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _loss_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _loss_shape(pred: Tensor, reduction: str) -> tuple[int, ...]:
    return (pred.shape[0],) if reduction == "none" else ()


def _grad_scale(weight: Optional[Tensor], B: int, n: int, mask_ratio: float, normalize: str, reduction: str,
                dtype: torch.dtype, device) -> Tensor:
    """Per-row c_b with d loss / d pred = c_b * keep * (pred - target) for an upstream gradient of 1.

    For normalize="kept" the 1/Z_b factor is only known after the pass, so it is left out here
    and applied with the upstream gradient (the per-row ``row_factor``).
    """
    w = weight.double() if weight is not None else torch.ones(B, dtype=torch.float64, device=device)
    reduce_factor = 1.0 / B if (reduction == "mean" and B) else 1.0
    z = _known_normaliser(n, mask_ratio, normalize) or 1.0
    return ((2.0 * reduce_factor / z) * w).to(_acc_dtype(dtype))


def _known_normaliser(n: int, mask_ratio: float, normalize: str) -> Optional[float]:
    return {"expected": n * (1.0 - mask_ratio), "all": float(n)}.get(normalize)


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
    fused_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (loss, gradient buffer, per-row backward factor, per-sample unweighted loss).

    With ``fused_grad`` the gradient for an upstream gradient of 1 is written in the same pass;
    otherwise the buffer is empty.
    """
    B = pred.shape[0]
    n = pred.numel() // B if B else 0
    acc = _acc_dtype(pred.dtype)
    grad_scale = _grad_scale(weight, B, n, mask_ratio, normalize, reduction, pred.dtype, pred.device) if fused_grad else None
    sq_sum, kept, grad = _kernels.for_device(pred.device).sparse_mse_fwd(
        pred, target, mask_ratio, seed, channels, grad_scale
    )
    z_known = _known_normaliser(n, mask_ratio, normalize)
    if z_known is not None:
        z = torch.full((B,), z_known, dtype=torch.float64, device=pred.device)
        row_factor = torch.ones(B, dtype=acc, device=pred.device)
    else:
        z = kept.clamp(min=1).double()
        row_factor = (1.0 / z).to(acc)
    unweighted = sq_sum / z
    per_sample = unweighted * weight.double() if weight is not None else unweighted
    if reduction == "none":
        loss = per_sample
    elif reduction == "sum":
        loss = per_sample.sum()
    else:
        loss = per_sample.mean()  # NaN for an empty batch, like torch.mean of nothing
    return loss.to(_loss_dtype(pred.dtype)), grad, row_factor, unweighted


@_sparse_mse.register_fake
def _(pred, target, weight, mask_ratio, seed, channels, normalize, reduction, fused_grad):
    B = pred.shape[0]
    acc = _acc_dtype(pred.dtype)
    loss = pred.new_empty(_loss_shape(pred, reduction), dtype=_loss_dtype(pred.dtype))
    grad = torch.empty_like(pred) if fused_grad else pred.new_empty(0)
    return loss, grad, pred.new_empty(B, dtype=acc), pred.new_empty(B, dtype=torch.float64)


@torch.library.custom_op("diffkernels::scale_rows_", mutates_args=("grad",))
def _scale_rows_(grad: Tensor, factor: Tensor) -> None:
    """grad[b] *= factor[b] in place; rows with factor exactly 1 are not touched."""
    _kernels.for_device(grad.device).scale_rows_(grad, factor)


@_scale_rows_.register_fake
def _(grad, factor):
    return None


@torch.library.custom_op("diffkernels::sparse_mse_grad", mutates_args=())
def _sparse_mse_grad(pred: Tensor, target: Tensor, grad_scale: Tensor, mask_ratio: float, seed: int,
                     channels: int) -> Tensor:
    """grad_scale[b] * keep * (pred - target): the gradient, regenerating the mask (backward="recompute")."""
    kernels = _kernels.for_device(pred.device)
    return kernels.sparse_mse_fwd(pred, target, mask_ratio, seed, channels, grad_scale)[2]


@_sparse_mse_grad.register_fake
def _(pred, target, grad_scale, mask_ratio, seed, channels):
    return torch.empty_like(pred)


def _setup_context(ctx, inputs, output):
    pred, target, weight, mask_ratio, seed, channels, normalize, reduction, fused_grad = inputs
    loss, grad, row_factor, unweighted = output
    ctx.mark_non_differentiable(grad, row_factor, unweighted)
    ctx.set_materialize_grads(False)  # no zero gradients for the auxiliary outputs
    ctx.fused_grad = fused_grad
    ctx.has_weight = weight is not None
    ctx.options = (mask_ratio, seed, channels, normalize, reduction)
    if fused_grad:
        ctx.save_for_backward(grad, row_factor, unweighted, weight)
    else:  # regenerate in backward: keep the inputs instead of a gradient buffer
        ctx.save_for_backward(pred, target, row_factor, unweighted, weight)


SECOND_BACKWARD = (
    "diffkernels.sparse_mse_loss: this graph was already differentiated once. With backward='fused' (the "
    "default) the gradient is computed in the forward pass and rescaled in place by the first backward, so a "
    "graph can be differentiated only once. For retain_graph=True, gradcheck or Jacobians, call "
    "sparse_mse_loss(..., backward='recompute')."
)


def _backward(ctx, grad_loss, _grad_buffer, _row_factor, _unweighted):
    mask_ratio, seed, channels, normalize, reduction = ctx.options
    if ctx.fused_grad:
        grad, row_factor, unweighted, weight = saved_tensors(ctx, SECOND_BACKWARD)
    else:
        pred, target, row_factor, unweighted, weight = saved_tensors(ctx, SECOND_BACKWARD)
    B = unweighted.shape[0]
    if grad_loss is None:
        return (None,) * 9
    per_row = grad_loss.expand(B) if reduction != "none" else grad_loss
    factor = per_row.to(row_factor.dtype) * row_factor  # upstream gradient (and 1/Z_b for "kept")
    grad_pred = grad_target = grad_weight = None
    if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
        if ctx.fused_grad:
            torch.ops.diffkernels.scale_rows_(grad, factor)
        else:
            n = pred.numel() // B if B else 0
            scale = _grad_scale(weight, B, n, mask_ratio, normalize, reduction, pred.dtype, pred.device) * factor
            grad = torch.ops.diffkernels.sparse_mse_grad(pred, target, scale, mask_ratio, seed, channels)
        grad_pred = grad if ctx.needs_input_grad[0] else None
        grad_target = -grad if ctx.needs_input_grad[1] else None
    if ctx.has_weight and ctx.needs_input_grad[2]:
        reduce_factor = 1.0 / B if (reduction == "mean" and B) else 1.0
        grad_weight = (per_row.double() * unweighted * reduce_factor).to(weight.dtype)
    return grad_pred, grad_target, grad_weight, None, None, None, None, None, None


_sparse_mse.register_autograd(_backward, setup_context=_setup_context)


# --- public functions -------------------------------------------------------------------------


def _channels(shape, granularity: str, name: str = "pred") -> int:
    check_choice(granularity, "granularity", GRANULARITIES)
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
    backward: str = "fused",
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

    ``backward``: ``"fused"`` (default, fastest) computes the gradient in the forward pass and
    rescales it in place in backward (skipped when the upstream gradient is exactly 1), so the
    graph can be differentiated once; for half/bfloat16 inputs with an upstream gradient other
    than 1 the gradient is rounded twice (at most 1 ulp more). ``"recompute"`` computes only the
    loss in forward and regenerates the mask in backward (one more read of pred and target); its
    graph can be differentiated any number of times (retain_graph, gradcheck, Jacobians).
    """
    check_float_tensor(pred, "pred")
    check_float_tensor(target, "target")
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have the same shape, got {tuple(pred.shape)} and {tuple(target.shape)}")
    if pred.dtype != target.dtype:
        raise TypeError(f"pred and target must have the same dtype, got {pred.dtype} and {target.dtype}")
    if pred.device != target.device:
        raise ValueError(f"pred and target must be on the same device, got {pred.device} and {target.device}")
    if pred.dim() < 1:
        raise ValueError("pred must have a batch dimension (dim 0), got a 0-d tensor")
    mask_ratio = check_mask_ratio(mask_ratio)
    seed = check_seed(seed)
    check_choice(normalize, "normalize", NORMALIZATIONS)
    check_choice(reduction, "reduction", REDUCTIONS)
    channels = _channels(pred.shape, granularity)
    B = pred.shape[0]
    if B and pred[0].numel() == 0:
        raise ValueError(f"pred has no elements per sample (shape {tuple(pred.shape)})")
    if weight is not None:
        check_float_tensor(weight, "weight")
        if weight.shape != (B,):
            raise ValueError(f"weight must have shape (B,) = ({B},), one weight per sample, got {tuple(weight.shape)}")
        if weight.device != pred.device:
            raise ValueError(f"weight must be on pred's device {pred.device}, got {weight.device}")
        weight = weight.contiguous()
    check_choice(backward, "backward", BACKWARD_MODES)
    fused_grad = backward == "fused" and torch.is_grad_enabled() and (pred.requires_grad or target.requires_grad)
    loss, _, _, _ = _sparse_mse(
        pred.contiguous(), target.contiguous(), weight, mask_ratio, seed, channels, normalize, reduction, fused_grad
    )
    return loss


def sparse_mask(shape, mask_ratio: float, seed: int, *, granularity: str = "element", device=None) -> Tensor:
    """The boolean keep-mask that ``sparse_mse_loss`` uses for a tensor of ``shape`` (True = kept)."""
    shape = torch.Size(shape)
    if len(shape) < 1:
        raise ValueError("shape must have a batch dimension")
    if any(s < 0 for s in shape):
        raise ValueError(f"shape must be non-negative, got {tuple(shape)}")
    mask_ratio = check_mask_ratio(mask_ratio)
    seed = check_seed(seed)
    C = _channels(shape, granularity, "shape")
    B = shape[0]
    n = math.prod(shape[1:])
    R = n // C if C else 0
    device = torch.device(device) if device is not None else torch.device("cpu")
    if C == 0:
        return torch.zeros(shape, dtype=torch.bool, device=device)
    mask = _kernels.for_device(device).sparse_mask(seed, B, C, R, mask_ratio, device)
    return mask.reshape(shape)
