"""Triton kernel of scale_rows_: grad[b] *= factor[b] in place, skipping rows whose factor is 1."""

import triton
import triton.language as tl

from .._validate import acc_dtype

SCALE_BLOCK = 2048


@triton.jit
def scale_rows_kernel(grad_ptr, factor_ptr, n, T, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // T
    f = tl.load(factor_ptr + b)
    if f != 1.0:  # the usual loss.backward() passes exactly 1: skip the pass, without a host sync
        offs = (pid % T) * BLOCK + tl.arange(0, BLOCK)
        inside = offs < n
        g = tl.load(grad_ptr + b * n + offs, mask=inside)
        tl.store(grad_ptr + b * n + offs, (g.to(factor_ptr.dtype.element_ty) * f).to(g.dtype), mask=inside)


def scale_rows_(grad, factor) -> None:
    B = grad.shape[0]
    n = grad.numel() // B if B else 0
    T = triton.cdiv(n, SCALE_BLOCK)
    if B * T:
        f = factor.to(acc_dtype(grad.dtype)).contiguous()
        scale_rows_kernel[(B * T,)](grad, f, n, T, BLOCK=SCALE_BLOCK)
