"""``diffkernels::sparse_mse``: the fused masked, weighted MSE of sparse supervision (the op layer
of ``diffkernels.sparse.sparse_mse_loss``, docs/METHODS.md section 1).

Default (backward="fused"): one pass over pred and target produces the per-sample losses and,
when an input needs a gradient, the gradient itself (already scaled for an upstream gradient of
1). Backward then only rescales it in place (``diffkernels::scale_rows_``, which skips rows whose
factor is exactly 1), so the usual ``loss.backward()`` costs no second pass and no host sync.
backward="recompute" regenerates the mask in backward instead (``diffkernels::sparse_mse_grad``),
for graphs differentiated more than once and for second-order gradients (``create_graph=True``:
backward is then written in differentiable tensor ops, with the mask materialised). The
keep-mask is regenerated from (seed, index) inside every kernel and never stored.

The custom ops are what torch.compile, export and fake tensors see. Plain eager calls skip their
Python dispatcher (about 100 us a call, more than the kernels at small shapes) through an
autograd.Function that runs the same ``_forward`` / ``_backward`` (``sparse_mse``, the entry point
of the public function); both issue as few tensor ops as they can, since on a GPU each is a
kernel launch. The commonest eager call, backward="fused" on CPU tensors with the C++ backend,
takes the native op ``diffkernels_native::sparse_mse_loss`` instead (csrc/sparse_mse.cpp): the
same ops in C++ with an autograd node in C++, so that a small training step costs no more host
time than the dense ``F.mse_loss`` step it replaces.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .. import _backend, _native
from .._validate import acc_dtype, check_fake_devices, eager_fast_path
from ..reference import sparse_mse as reference
from . import _kernels
from .scale_rows import saved_tensors, scale_rows_

NORMALIZATIONS = ("expected", "all", "kept")
REDUCTIONS = ("mean", "sum", "none")


def _loss_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _loss_shape(pred: Tensor, reduction: str) -> tuple[int, ...]:
    return (pred.shape[0],) if reduction == "none" else ()


def _known_normaliser(n: int, mask_ratio: float, normalize: str) -> Optional[float]:
    """Z_b when it is the same for every row (None for "kept": Z_b = max(1, K_b))."""
    if normalize == "expected":
        return n * (1.0 - mask_ratio)
    return float(n) if normalize == "all" else None


def _loss_scale(B: int, n: int, mask_ratio: float, normalize: str, reduction: str) -> float:
    """d loss / d sq_sum[b] apart from w_b and, for normalize="kept", 1/Z_b: the reduction's factor
    (1/B for "mean", NaN for an empty batch like torch.mean of nothing) over the known normaliser."""
    reduce_factor = (1.0 / B if B else math.nan) if reduction == "mean" else 1.0
    return reduce_factor / (_known_normaliser(n, mask_ratio, normalize) or 1.0)


def _grad_scale(weight: Optional[Tensor], B: int, c: float, acc: torch.dtype, device) -> Tensor:
    """Per-row c * w_b in the accumulation dtype: the primitives' ``grad_scale``."""
    if weight is None:
        return torch.full((B,), c, dtype=acc, device=device)
    return weight.to(acc) * c


def _mul_cast(x: Tensor, c: float, dtype: torch.dtype) -> Tensor:
    """x * c computed in x's dtype and stored as ``dtype``: one kernel on the GPU (cast on store).
    Not differentiable (out=): for the forward pass only."""
    if x.dtype == dtype:
        return x * c
    return torch.mul(x, c, out=torch.empty(x.shape, dtype=dtype, device=x.device))


def _forward(kernels, pred: Tensor, target: Tensor, weight: Optional[Tensor], mask_ratio: float, seed: int,
             channels: int, normalize: str, reduction: str, fused_grad: bool):
    """The op on the backend ``kernels``, shared by the custom op and the eager fast path.

    Returns (loss, grad, kept, sq_sum). ``grad`` (only with ``fused_grad``, else None) is
    d loss / d pred for an upstream gradient of 1, except the 1/Z_b of normalize="kept", which
    backward applies with the upstream gradient. ``kept`` (normalize="kept" only) holds the
    Z_b = max(1, K_b), ``sq_sum`` (only with a weight) the per-row float64 sums, both for backward.
    Few tensor ops: at small shapes each costs about as much as the kernel.
    """
    B = pred.shape[0]
    n = pred.numel() // B if B else 0
    scale = _loss_scale(B, n, mask_ratio, normalize, reduction)
    grad_scale = _grad_scale(weight, B, 2.0 * scale, acc_dtype(pred.dtype), pred.device) if fused_grad else None
    sq_sum, kept, grad = kernels.sparse_mse_fwd(pred, target, mask_ratio, seed, channels, grad_scale)
    kept = kept.clamp(min=1) if normalize == "kept" else None
    per_sample = sq_sum if kept is None else sq_sum / kept  # float64, like the per-row sums
    if weight is not None:
        per_sample = per_sample * weight  # promotes to float64
    if reduction != "none":
        per_sample = per_sample.sum()
    loss = _mul_cast(per_sample, scale, _loss_dtype(pred.dtype))
    return loss, (grad if fused_grad else None), kept, (sq_sum if weight is not None else None)


def _save(ctx, pred, target, weight, options, fused_grad, grad, kept, sq_sum) -> None:
    """What backward needs; ``options`` = (mask_ratio, seed, channels, normalize, reduction)."""
    ctx.options = options
    ctx.fused_grad = fused_grad
    ctx.rows = (pred.shape[0], pred.numel() // pred.shape[0] if pred.shape[0] else 0)
    if fused_grad:  # the gradient is already computed: pred and target are not needed
        pred = target = None
    ctx.save_for_backward(pred, target, grad, weight, kept, sq_sum)


SECOND_BACKWARD = (
    "diffkernels.sparse_mse_loss: this graph was already differentiated once. With backward='fused' (the "
    "default) the gradient is computed in the forward pass and rescaled in place by the first backward, so a "
    "graph can be differentiated only once. For retain_graph=True, gradcheck or Jacobians, call "
    "sparse_mse_loss(..., backward='recompute')."
)


CREATE_GRAPH_FUSED = (
    "diffkernels.sparse_mse_loss: backward='fused' (the default) cannot give second-order gradients "
    "(create_graph=True, e.g. a gradient penalty or Hessian-vector products): its gradient is computed in the "
    "forward pass, as a constant. Call sparse_mse_loss(..., backward='recompute'), whose backward is "
    "differentiable."
)


def _differentiable_backward(ctx, pred, target, weight, kept, per_row, scale, kernels) -> tuple:
    """backward='recompute' under create_graph=True: the gradients in differentiable tensor ops
    (the keep-mask materialised), so that they can be differentiated again. The loss is quadratic:
    d loss / d pred = c_b * keep * (pred - target) with c_b = 2 * scale * w_b * upstream_b / Z_b."""
    mask_ratio, seed, channels, _, _ = ctx.options
    B, n = ctx.rows
    R = n // channels if channels else 0
    # the eager fast path's backend, else plain tensor ops (traceable)
    keep = (kernels.sparse_mask if kernels is not None else reference.keep_mask)(seed, B, channels, R, mask_ratio,
                                                                                   pred.device)
    keep = keep.reshape(B, n)
    acc = acc_dtype(pred.dtype)
    diff = torch.where(keep, pred.reshape(B, n).to(acc) - target.reshape(B, n).to(acc), 0.0)
    factor = (per_row if kept is None else per_row / kept).to(acc)
    grad_pred = grad_target = grad_weight = None
    if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
        c = factor * (2.0 * scale) if weight is None else factor * weight.to(acc) * (2.0 * scale)
        grad = (diff * c[:, None]).to(pred.dtype).reshape(pred.shape)
        grad_pred = grad if ctx.needs_input_grad[0] else None
        grad_target = -grad if ctx.needs_input_grad[1] else None
    if ctx.needs_input_grad[2]:
        sq_sum = (diff * diff).sum(dim=1, dtype=torch.float64)
        grad_weight = (sq_sum * factor.double() * scale).to(weight.dtype)
    return grad_pred, grad_target, grad_weight, None, None, None, None, None, None


def _backward(ctx, grad_loss: Tensor, kernels) -> tuple:
    """Gradients for the 9 inputs, shared by the custom op and the eager fast path.

    The eager fast path passes the forward's ``kernels`` to call directly; the custom op passes None
    and goes through the helper custom ops, which torch.compile traces.
    """
    if torch.is_grad_enabled() and ctx.fused_grad:  # create_graph=True: the gradient must be differentiable
        raise RuntimeError(CREATE_GRAPH_FUSED)
    pred, target, grad, weight, kept, sq_sum = saved_tensors(ctx, SECOND_BACKWARD)
    mask_ratio, seed, channels, normalize, reduction = ctx.options
    B, n = ctx.rows
    scale = _loss_scale(B, n, mask_ratio, normalize, reduction)
    per_row = grad_loss if reduction == "none" else grad_loss.expand(B)  # upstream gradient of each row's loss
    if torch.is_grad_enabled():
        return _differentiable_backward(ctx, pred, target, weight, kept, per_row, scale, kernels)
    grad_pred = grad_target = grad_weight = None
    if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
        factor = per_row if kept is None else per_row / kept  # (B,), in the loss dtype = accumulation dtype
        if ctx.fused_grad:
            scale_rows_(grad, factor.contiguous(), kernels)  # contiguous: as the primitives take it
        else:
            grad_scale = factor * (2.0 * scale) if weight is None else (
                _grad_scale(weight, B, 2.0 * scale, factor.dtype, factor.device) * factor)
            if kernels is not None:
                grad = kernels.sparse_mse_fwd(pred, target, mask_ratio, seed, channels, grad_scale)[2]
            else:
                grad = sparse_mse_grad_op(pred, target, grad_scale, mask_ratio, seed, channels)
        grad_pred = grad if ctx.needs_input_grad[0] else None
        grad_target = -grad if ctx.needs_input_grad[1] else None
    if ctx.needs_input_grad[2]:
        per_sample = sq_sum * per_row if kept is None else sq_sum * per_row / kept  # float64
        grad_weight = (per_sample * scale).to(weight.dtype)
    return grad_pred, grad_target, grad_weight, None, None, None, None, None, None


# --- the custom ops: what torch.compile, export and fake tensors see -------------------------


def check_args(pred: Tensor, target: Tensor, channels: int, per_row: Optional[Tensor], per_row_name: str) -> None:
    """What the kernels assume of the tensors (checked by the custom ops and their fake kernels
    alike, so a direct call cannot skip it): pred and target contiguous, floating-point, of one
    shape and dtype with a batch dimension B; ``per_row`` (weight or grad_scale) None or (B,)
    floating-point; ``channels`` 1 or pred's dim 1 (granularity "pixel")."""
    torch._check_type(pred.dtype.is_floating_point, lambda: f"pred must be floating-point, got {pred.dtype}")
    torch._check_type(target.dtype == pred.dtype,
                      lambda: f"target must have pred's dtype {pred.dtype}, got {target.dtype}")
    torch._check_value(pred.dim() >= 1, lambda: "pred must have a batch dimension (dim 0)")
    torch._check_value(target.shape == pred.shape,
                       lambda: f"target must have pred's shape {tuple(pred.shape)}, got {tuple(target.shape)}")
    torch._check_value(pred.is_contiguous() and target.is_contiguous(), lambda: "pred and target must be contiguous")
    torch._check_value(channels == 1 or (pred.dim() >= 2 and channels == pred.shape[1]),
                       lambda: f"channels must be 1 or pred's dim 1 ({tuple(pred.shape)}), got {channels}")
    if per_row is not None:
        torch._check_type(per_row.dtype.is_floating_point,
                          lambda: f"{per_row_name} must be floating-point, got {per_row.dtype}")
        torch._check_value(per_row.dim() == 1 and per_row.shape[0] == pred.shape[0],
                           lambda: f"{per_row_name} must have shape (B,) = ({pred.shape[0]},), "
                                   f"got {tuple(per_row.shape)}")


def _check_options(mask_ratio: float, normalize: str, reduction: str) -> None:
    torch._check_value(0.0 <= mask_ratio < 1.0, lambda: f"mask_ratio must lie in [0, 1), got {mask_ratio}")
    torch._check_value(normalize in NORMALIZATIONS,
                       lambda: f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
    torch._check_value(reduction in REDUCTIONS, lambda: f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


@torch.library.custom_op("diffkernels::sparse_mse", mutates_args=())
def sparse_mse_op(
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
    """``_forward`` with its absent outputs as empty tensors: (loss, grad, kept, sq_sum)."""
    check_args(pred, target, channels, weight, "weight")
    _check_options(mask_ratio, normalize, reduction)
    loss, grad, kept, sq_sum = _forward(_kernels.for_device(pred.device), pred, target, weight, mask_ratio, seed,
                                        channels, normalize, reduction, fused_grad)
    return (loss, pred.new_empty(0) if grad is None else grad,
            pred.new_empty(0, dtype=torch.int64) if kept is None else kept,
            pred.new_empty(0, dtype=torch.float64) if sq_sum is None else sq_sum)


@sparse_mse_op.register_fake
def _(pred, target, weight, mask_ratio, seed, channels, normalize, reduction, fused_grad):
    check_fake_devices("diffkernels::sparse_mse", pred, target, weight)
    check_args(pred, target, channels, weight, "weight")
    _check_options(mask_ratio, normalize, reduction)
    B = pred.shape[0]
    loss = pred.new_empty(_loss_shape(pred, reduction), dtype=_loss_dtype(pred.dtype))
    grad = torch.empty_like(pred) if fused_grad else pred.new_empty(0)
    kept = pred.new_empty(B if normalize == "kept" else 0, dtype=torch.int64)
    sq_sum = pred.new_empty(B if weight is not None else 0, dtype=torch.float64)
    return loss, grad, kept, sq_sum


@torch.library.custom_op("diffkernels::sparse_mse_grad", mutates_args=())
def sparse_mse_grad_op(pred: Tensor, target: Tensor, grad_scale: Tensor, mask_ratio: float, seed: int,
                       channels: int) -> Tensor:
    """grad_scale[b] * keep * (pred - target): the gradient, regenerating the mask (backward="recompute")."""
    check_args(pred, target, channels, grad_scale, "grad_scale")
    kernels = _kernels.for_device(pred.device)
    return kernels.sparse_mse_fwd(pred, target, mask_ratio, seed, channels, grad_scale)[2]


@sparse_mse_grad_op.register_fake
def _(pred, target, grad_scale, mask_ratio, seed, channels):
    check_fake_devices("diffkernels::sparse_mse_grad", pred, target, grad_scale)
    check_args(pred, target, channels, grad_scale, "grad_scale")
    return torch.empty_like(pred)


def _setup_context(ctx, inputs, output):
    pred, target, weight, mask_ratio, seed, channels, normalize, reduction, fused_grad = inputs
    _, grad, kept, sq_sum = output
    ctx.mark_non_differentiable(grad, kept, sq_sum)
    ctx.set_materialize_grads(False)  # no zero gradients for the auxiliary outputs
    _save(ctx, pred, target, weight, (mask_ratio, seed, channels, normalize, reduction), fused_grad,
          grad if fused_grad else None, kept if normalize == "kept" else None, sq_sum if weight is not None else None)


def _custom_op_backward(ctx, grad_loss, _grad, _kept, _sq_sum):
    if grad_loss is None:
        return (None,) * 9
    return _backward(ctx, grad_loss, None)


sparse_mse_op.register_autograd(_custom_op_backward, setup_context=_setup_context)


class _SparseMSEFunction(torch.autograd.Function):
    """The eager fast path: the same forward and backward as the custom op, without torch.library's
    Python dispatcher (which costs more than the kernels at small shapes)."""

    @staticmethod
    def forward(ctx, pred, target, weight, mask_ratio, seed, channels, normalize, reduction, fused_grad):
        ctx.kernels = _kernels.for_device(pred.device)  # backward runs on the forward's backend
        loss, grad, kept, sq_sum = _forward(ctx.kernels, pred, target, weight, mask_ratio, seed, channels, normalize,
                                            reduction, fused_grad)
        _save(ctx, pred, target, weight, (mask_ratio, seed, channels, normalize, reduction), fused_grad, grad, kept,
              sq_sum)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        return _backward(ctx, grad_loss, ctx.kernels)


# --- the entry points of the public functions (diffkernels/sparse/loss.py) ------------------------


_NORMALIZE_CODE = {name: i for i, name in enumerate(NORMALIZATIONS)}  # as the native op numbers them
_REDUCTION_CODE = {name: i for i, name in enumerate(REDUCTIONS)}
_native_loss = None  # diffkernels_native::sparse_mse_loss once looked up; False where the library lacks it


def native_loss():
    """The native op that runs ``_forward`` and ``_backward`` of backward="fused" for CPU tensors, with
    its autograd node in C++ (one dispatcher call a step, no Python in backward), or None."""
    global _native_loss
    if _native_loss is None:
        # a library built from older sources lacks the op
        packet = getattr(_native.ops(), "sparse_mse_loss", None) if _native.load() else None
        _native_loss = packet.default if packet is not None else False
    return _native_loss or None


def sparse_mse(pred: Tensor, target: Tensor, weight: Optional[Tensor], mask_ratio: float, seed: int, channels: int,
               normalize: str, reduction: str, fused_grad: bool) -> Tensor:
    """The loss, for validated contiguous arguments: in plain eager mode the kernels directly (through
    the native op or an autograd.Function where a gradient is wanted), else (torch.compile, fake
    tensors, ...) the custom op."""
    if not eager_fast_path(pred, target, weight):
        return sparse_mse_op(pred, target, weight, mask_ratio, seed, channels, normalize, reduction, fused_grad)[0]
    # The common CPU training step, decided without the (slower) general backend selection: the C++
    # backend runs CPU tensors unless another one is forced.
    if fused_grad and pred.is_cpu and (_native_loss or native_loss()) and _backend.forced() in (None, "cpp"):
        return _native_loss(pred, target, weight, mask_ratio, seed, channels, _NORMALIZE_CODE[normalize],
                            _REDUCTION_CODE[reduction])
    kernels = _kernels.for_device(pred.device)
    args = (pred, target, weight, mask_ratio, seed, channels, normalize, reduction, fused_grad)
    if torch.is_grad_enabled() and (pred.requires_grad or target.requires_grad
                                    or (weight is not None and weight.requires_grad)):
        return _SparseMSEFunction.apply(*args)
    return _forward(kernels, *args)[0]


def sparse_mask(seed: int, B: int, C: int, R: int, mask_ratio: float, device: torch.device) -> Tensor:
    """The (B, C, R) bool keep-mask of the backend that runs on ``device``."""
    return _kernels.for_device(device).sparse_mask(seed, B, C, R, mask_ratio, device)
