"""The screening GEMM: a @ b.T accurate to float32 rounding, and the bound on its error.

Float32 BLAS on the CPU; on CUDA three TF32 tensor-core products (each operand split as hi + lo,
both TF32). The screen-and-refine engine and the knn screen take every squared distance from it and
use :func:`screen_sq_error` to prove which rows they may drop.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["screen_error_factor", "screen_sq_error", "screen_operand", "screen_products", "screen_distances",
           "fp32_accurate_mm", "SCREEN_MAX_NORM", "SPLIT_TF32_ON_CPU"]

# Tests set this to run the CUDA path's 3xTF32 splitting on the CPU (TF32 rounding emulated).
SPLIT_TF32_ON_CPU = False

# The screen's float32 range: with every norm <= SCREEN_MAX_NORM, no product, partial sum or squared
# norm of the float32 GEMM comes near float32's overflow (2^128). Beyond it the screen is not used.
SCREEN_MAX_NORM = 2.0**50


def screen_error_factor(D: int) -> float:
    """gamma(D): |fp32-accurate a.b - a.b| <= gamma(D) ||a|| ||b|| for the screening GEMM.

    Measured worst cases (float32 BLAS and emulated 3xTF32, D = 64..12288, signed and all-positive
    data): 7 and 21 units of 2^-24. The bound is 2^-24 (256 + D), 10-100x above them and above the
    classical worst case of blocked summation (D units); the 256 also covers the few roundings of a
    screened distance outside the dot product (the float32 conversions, the norm and its square, the
    fused add of :func:`screen_distances`). A loose bound only widens the screening margin.
    """
    return 2.0**-24 * (256 + D)


def screen_sq_error(D: int, a_norm: Tensor, alpha_sq, max_norm: Tensor) -> Tensor:
    """Bound on the error of screened squared distances ||a||^2 + alpha^2 ||y||^2 - 2 a.y (per query),
    +inf where the operands leave the screen's float32 range (the query then takes the float64 path).

    Relative part: gamma(D) (2 ||a|| + alpha^2 max ||y||) max ||y||. Absolute part: below 2^-126
    float32 rounds to multiples of 2^-149, so each converted element, product, sum and square may be
    off by 2^-150 more; with norms <= 2^50 that adds < D 2^-97 (1 + alpha^2), bounded by D 2^-96 (1 + alpha^2).
    """
    bound = screen_error_factor(D) * (2.0 * a_norm + alpha_sq * max_norm) * max_norm + D * 2.0**-96 * (1.0 + alpha_sq)
    safe = (a_norm <= SCREEN_MAX_NORM) & (max_norm <= SCREEN_MAX_NORM)  # False for inf and NaN too
    return torch.where(safe, bound, float("inf"))


def _round_tf32(x: Tensor) -> Tensor:
    """float32 rounded to the nearest TF32 value (10 mantissa bits), as tensor cores read it."""
    return ((x.view(torch.int32) + 0x1000) & ~0x1FFF).view(torch.float32)


def screen_operand(x: Tensor, left: bool) -> Tensor:
    """A float32 GEMM operand prepared for :func:`screen_products` (made once per query block / chunk).

    CPU: x itself (one float32 GEMM). CUDA (3xTF32): x = hi + lo with hi the TF32 rounding of x, laid
    out as [hi, hi, lo] (left) and [hi, lo, hi] (right) so that one TF32 tensor-core GEMM over a 3x
    longer inner dimension gives hi.hi' + hi.lo' + lo.hi' (the dropped lo.lo' is ~2^-22 relative).
    """
    if x.device.type != "cuda" and not SPLIT_TF32_ON_CPU:
        return x
    hi = _round_tf32(x)
    lo = _round_tf32(x - hi)
    return torch.cat([hi, hi, lo] if left else [hi, lo, hi], dim=1)


def screen_products(left: Tensor, right: Tensor) -> Tensor:
    """left @ right.T of two screen operands, accurate to float32 rounding (float32 accumulation)."""
    if left.device.type != "cuda":
        return left @ right.T
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        return left @ right.T
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def screen_distances(ysq: Tensor, left: Tensor, right: Tensor, out: Optional[Tensor] = None) -> Tensor:
    """ysq[None, :] - 2 left @ right.T in float32, by one fused GEMM (addmm, into ``out`` if given):
    screened squared distances less ||left||^2, the same for every row of a query (no ranking changes)."""
    if left.device.type != "cuda":
        return torch.addmm(ysq[None, :], left, right.T, alpha=-2.0, out=out)
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        return torch.addmm(ysq[None, :], left, right.T, alpha=-2.0, out=out)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def fp32_accurate_mm(a: Tensor, b: Tensor) -> Tensor:
    """a @ b.T (float32 in and out) accurate to float32 rounding: float32 GEMM on the CPU, 3xTF32 on CUDA."""
    return screen_products(screen_operand(a, left=True), screen_operand(b, left=False))
