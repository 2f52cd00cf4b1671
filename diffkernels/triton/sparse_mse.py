"""Triton kernels of the sparse-supervision loss (docs/METHODS.md section 1): sparse_mse_fwd, sparse_mask.

The input is viewed as (B, C, R) with one keep draw per (b, r): mask index m = b * R + r
(C = 1 for granularity "element"), tiled with ``philox.row_tile``. Masked-out elements are never
loaded: at 98% masking most memory sectors are skipped entirely.
"""

import torch
import triton
import triton.language as tl

from .._validate import acc_dtype
from .philox import row_tile, tasks_per_row

COUNTERS_PER_PROGRAM = 256  # 1024 mask indices per program


@triton.jit
def sparse_mse_fwd_kernel(
    pred_ptr, target_ptr, grad_ptr, grad_scale_ptr, sq_ptr, kept_ptr,
    R, C, T, seed, eta,
    WANT_GRAD: tl.constexpr, G: tl.constexpr,
):
    pid, b, r, inside, u = row_tile(R, T, seed, G)
    keep = inside & (u >= eta)
    acc_dtype = grad_scale_ptr.dtype.element_ty
    if WANT_GRAD:
        scale = tl.load(grad_scale_ptr + b)
    total = tl.zeros([G, 4], dtype=acc_dtype)
    for c in range(C):
        offs = (b * C + c) * R + r
        # Masked-out elements are not loaded (other=0), so their NaN/Inf never reach the sums.
        p = tl.load(pred_ptr + offs, mask=keep, other=0.0).to(acc_dtype)
        q = tl.load(target_ptr + offs, mask=keep, other=0.0).to(acc_dtype)
        d = p - q
        total += d * d
        if WANT_GRAD:
            g = tl.where(keep, scale * d, 0.0)
            tl.store(grad_ptr + offs, g.to(grad_ptr.dtype.element_ty), mask=inside)
    tl.store(sq_ptr + pid, tl.sum(tl.sum(total, axis=1), axis=0))
    tl.store(kept_ptr + pid, tl.sum(tl.sum(keep.to(tl.int32), axis=1), axis=0))  # kept draws; x C on the host


@triton.jit
def sparse_mask_kernel(out_ptr, R, C, T, seed, eta, G: tl.constexpr):
    pid, b, r, inside, u = row_tile(R, T, seed, G)
    keep = inside & (u >= eta)
    for c in range(C):
        tl.store(out_ptr + (b * C + c) * R + r, keep.to(tl.int8), mask=inside)


def sparse_mse_fwd(pred, target, mask_ratio: float, seed: int, channels: int, grad_scale):
    B = pred.shape[0]
    n = pred.numel() // B if B else 0
    R = n // channels
    T = tasks_per_row(R, COUNTERS_PER_PROGRAM)
    acc = acc_dtype(pred.dtype)
    sq = torch.empty(B * T, dtype=acc, device=pred.device)
    kept = torch.empty(B * T, dtype=torch.int32, device=pred.device)
    want_grad = grad_scale is not None
    grad = torch.empty_like(pred) if want_grad else pred.new_empty(0)
    scale = grad_scale.to(acc).contiguous() if want_grad else torch.empty(1, dtype=acc, device=pred.device)
    if B * T:
        sparse_mse_fwd_kernel[(B * T,)](
            pred, target, grad if want_grad else pred, scale, sq, kept,
            R, channels, T, seed, mask_ratio,
            WANT_GRAD=want_grad, G=COUNTERS_PER_PROGRAM,
        )
    sq_sum = sq.view(B, T).double().sum(dim=1)
    kept_sum = kept.view(B, T).sum(dim=1, dtype=torch.int64) * channels
    return sq_sum, kept_sum, grad


def sparse_mask(seed: int, B: int, C: int, R: int, mask_ratio: float, device):
    out = torch.empty((B, C, R), dtype=torch.bool, device=device)
    T = tasks_per_row(R, COUNTERS_PER_PROGRAM)
    if B * T:
        sparse_mask_kernel[(B * T,)](out.view(torch.int8), R, C, T, seed, mask_ratio, G=COUNTERS_PER_PROGRAM)
    return out
