"""Triton kernel of the masked cross-entropy (docs/METHODS.md section 2): one program per row of logits.

Each program reads its row of logits once for an online log-sum-exp (a running maximum and sum of
exponentials, rescaled per block, accumulated in float32), writes the row's cross-entropy, and, when
a gradient is wanted, reads the row a second time (back to front, so the blocks read last in the
first pass, the likeliest to still be in L2, come first) and writes ``coef * (softmax - onehot)``
in the dtype of the gradient buffer, which may be the logits buffer itself (in place). The bf16
logits of a chunk are thus read twice and written once: 6 bytes per logit at most, against about
30 for the float32 passes of the plain-PyTorch path (upcast, log-sum-exp, subtract, exp, multiply,
downcast).

Rows are either all rows of the logits (``HAS_ROWS=False``: the logits form; rows whose coefficient
is 0 are never read, their gradient row is written as zeros and their CE as 0) or the chunk rows of
a compacted buffer (``HAS_ROWS=True``: row ``i`` of the buffer belongs to token ``rows[i]``, whose
target, coefficient and CE slot are indexed by that token).
"""

import torch
import triton
import triton.language as tl

MAX_BLOCK = 4096  # logits per loop iteration on a GPU: 8 KiB of bf16, 16 values per thread at 8 warps


@triton.jit
def masked_ce_kernel(
    x_ptr, g_ptr, rows_ptr, targets_ptr, coef_ptr, ce_ptr,
    V, stride_x, stride_g,
    HAS_ROWS: tl.constexpr, WANT_GRAD: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    if HAS_ROWS:
        tok = tl.load(rows_ptr + pid).to(tl.int64)
    else:
        tok = pid
    x_row = x_ptr + pid * stride_x
    g_row = g_ptr + pid * stride_g
    c = tl.load(coef_ptr + tok).to(tl.float32)
    cols0 = tl.arange(0, BLOCK)
    if c == 0.0:
        # No loss here: the logits are never read (they may be anything, NaN included).
        tl.store(ce_ptr + tok, 0.0)
        if WANT_GRAD:
            zero = tl.zeros([BLOCK], dtype=g_ptr.dtype.element_ty)
            for start in range(0, V, BLOCK):
                cols = start + cols0
                tl.store(g_row + cols, zero, mask=cols < V)
    else:
        t = tl.load(targets_ptr + tok).to(tl.int64)
        valid = (t >= 0) & (t < V)
        x_t = tl.load(x_row + tl.where(valid, t, 0)).to(tl.float32)
        x_t = tl.where(valid, x_t, float("nan"))  # an id outside [0, V) gives NaN, never a stray read

        # Pass 1: online log-sum-exp. m = running maximum, s = sum of exp(x - m).
        m = tl.max(tl.full([BLOCK], float("-inf"), tl.float32), axis=0)
        s = tl.sum(tl.zeros([BLOCK], dtype=tl.float32), axis=0)
        for start in range(0, V, BLOCK):
            cols = start + cols0
            x = tl.load(x_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # all -inf so far: keep s = 0, no NaN
            s = s * tl.exp(m - shift) + tl.sum(tl.exp(x - shift), axis=0)
            m = m_new
        shift = tl.where(m == float("-inf"), 0.0, m)
        lse = shift + tl.log(s)
        tl.store(ce_ptr + tok, lse - x_t)

        if WANT_GRAD:
            # Pass 2, back to front: g = c * (softmax - onehot(t)), stored in the gradient's dtype.
            # softmax = exp(x - m) / s, not exp(x - lse): x - m is exact near the maximum, while
            # lse carries a rounding error of |lse| ulps (large for large logits).
            scale = c / s
            last = ((V - 1) // BLOCK) * BLOCK  # start of the last block
            for start in range(0, V, BLOCK):
                cols = (last - start) + cols0
                inside = cols < V
                x = tl.load(x_row + cols, mask=inside, other=0.0).to(tl.float32)
                g = tl.exp(x - shift) * scale
                g = tl.where(cols == t, g - c, g)
                tl.store(g_row + cols, g.to(g_ptr.dtype.element_ty), mask=inside)


def launch_config(V: int, device: torch.device, block=None, num_warps=None) -> tuple[int, int]:
    """(BLOCK, num_warps) for rows of V logits."""
    if block is None:
        block = min(MAX_BLOCK, triton.next_power_of_2(max(V, 1)))
        if device.type != "cuda":  # the interpreter: small blocks keep numpy's temporaries small
            block = min(block, 1024)
    if num_warps is None:
        num_warps = 8 if block >= 2048 else (4 if block >= 512 else 1)
    return block, num_warps


def masked_ce_rows(x, targets, coef, ce_out, *, rows=None, grad=None, block=None, num_warps=None) -> None:
    """Cross-entropy of rows of ``x`` (n, V), written to ``ce_out`` (float32), and their gradient.

    ``rows=None``: row i of ``x`` is token i (every row); ``ce_out``, ``targets`` and ``coef`` have
    one entry per row, and rows with ``coef == 0`` are never read (CE 0, zero gradient row).
    ``rows`` (n,) int64: row i of ``x`` is token ``rows[i]``, which indexes ``targets``, ``coef``
    and ``ce_out``. ``grad`` (n, V) or None: receives ``coef * (softmax - onehot)`` in its dtype;
    it may be ``x`` itself. ``x`` and ``grad`` need unit stride along V.
    """
    n, V = x.shape
    if n == 0:
        return
    if x.stride(1) != 1 or (grad is not None and grad.stride(1) != 1):
        raise ValueError("masked_ce_rows needs unit stride along the vocabulary")
    blk, warps = launch_config(V, x.device, block, num_warps)
    g = grad if grad is not None else x
    masked_ce_kernel[(n,)](
        x, g, rows if rows is not None else targets, targets, coef, ce_out,
        V, x.stride(0), g.stride(0),
        HAS_ROWS=rows is not None, WANT_GRAD=grad is not None, BLOCK=blk, num_warps=warps,
    )
