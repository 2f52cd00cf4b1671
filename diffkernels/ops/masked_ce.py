"""``diffkernels::masked_ce_logits`` / ``masked_ce_hidden``: cross-entropy only where it is needed.

Both compute ``loss = sum_i coef_i * CE(logits_i, target_i)`` over the tokens with ``coef_i != 0``
(the masked tokens of a masked diffusion LM, already weighted and normalised by the caller), and
the gradient during the forward pass. Backward rescales the saved gradients in place by the
upstream gradient (skipped when it is exactly 1), so such a graph can be differentiated once.

Hidden-state form. Tokens with a loss are compacted (one host sync sizes the chunk loop) and
processed in balanced chunks of at most ``chunk_size`` tokens (0: the default, 2 GiB of logits
in the input dtype, so at V <= 128256 and ~8k masked bf16 tokens a step is one chunk; the
reference counts the float32 copy of narrower logits too). Per chunk:

1. gather the chunk's hidden rows h (m, H); logits = h @ W^T (+ b) in the input dtype (one GEMM
   into a reused buffer, never a float32 copy);
2. per row, log-sum-exp, CE and d = coef * (softmax - onehot) written over the logits in place:
   the backend's ``masked_ce_rows`` primitive (diffkernels/ops/_kernels.py), i.e. the Triton kernel
   (``diffkernels.triton.masked_ce``: reads the bf16 row twice, writes it once, float32 arithmetic
   in registers), or the plain-PyTorch reference (``diffkernels.reference.masked_ce``: in-place
   float32 torch ops, no temporaries beyond the float32 copy of a low-precision chunk);
3. grad W += d^T h, grad h[rows] = d @ W (two GEMMs; grad b += column sums of d).

grad W is accumulated in float32: with one chunk the GEMM (float32 accumulation inside) writes
it once in the weight dtype; with several, the GEMM accumulates into a float32 buffer itself
(``torch.addmm(acc, d^T, h, out_dtype=float32, out=acc)``, CUDA, where this torch has it; probed
once) or, failing that, a per-chunk product is added to it. The (tokens x vocabulary) logits are
never materialised; peak extra memory is one chunk of logits plus the gradients.

Logits form. With the Triton kernel and contiguous logits one kernel covers every row (rows with
coef == 0 are never read; their gradient row is written as zeros): no compaction, no host sync, no
chunks. Otherwise the rows with a loss are compacted and chunked as above.

There is no C++ or CUDA kernel for ``masked_ce_rows``: the ``cpp`` backend runs the reference, the
``cuda`` backend the Triton kernel (the reference where Triton is not installed). float64 inputs
always take the reference (the kernel accumulates in float32).

Targets of tokens with a loss must lie in [0, V) (tokens with coef == 0 are never read, so any id,
e.g. -100 padding, is fine there): a ValueError for CPU tensors on every path; for CUDA tensors an
asynchronous device-side assert (reading the check on the host would cost a sync). The gradients
are constants of the forward pass, so there are no second-order gradients (``create_graph=True``
is an error).
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch
from torch import Tensor

from .._validate import acc_dtype, check_fake_devices
from ..reference import masked_ce as reference
from . import _kernels
from .scale_rows import saved_tensors, scale_rows_

CHUNK_BYTES = 1 << 31  # logits per chunk, in the input dtype: 2 GiB


def default_chunk_size(vocab: int, element_size: int = 2) -> int:
    """Tokens per chunk: CHUNK_BYTES of logits of ``element_size`` bytes (2: bf16/fp16)."""
    return max(1, CHUNK_BYTES // (max(1, element_size) * max(1, vocab)))


def chunk_tokens(chunk_size: int, V: int, dtype: torch.dtype, fused: bool) -> int:
    """``chunk_size`` if positive, else the default: CHUNK_BYTES of chunk working set, i.e. the
    logits in the input dtype (fused kernel), plus their float32 copy on the reference when the
    input dtype is narrower."""
    if chunk_size > 0:
        return chunk_size
    item = torch.empty((), dtype=dtype).element_size()
    acc = acc_dtype(dtype)
    if not fused and acc != dtype:
        item += torch.empty((), dtype=acc).element_size()
    return default_chunk_size(V, item)


def row_kernel(device: torch.device, dtype: torch.dtype):
    """(``masked_ce_rows`` of the backend that runs on ``device``, whether it is a fused kernel):
    anything but the plain-PyTorch reference reads the rows in their own dtype, in place, with no
    temporaries. float64 always takes the reference, since the kernel accumulates in float32."""
    rows = _kernels.for_device(device).masked_ce_rows
    if dtype == torch.float64:
        rows = reference.masked_ce_rows
    return rows, rows is not reference.masked_ce_rows


def _check_targets(targets: Tensor, coef: Tensor, V: int) -> None:
    """Every token with a loss (coef != 0) has a target in [0, V); V >= 1.

    CPU tensors: a ValueError naming the first bad token. CUDA tensors: an asynchronous
    device-side assert, since reading the result on the host would be a sync."""
    if V < 1:
        raise ValueError("the vocabulary must not be empty (V = 0)")
    if targets.numel() == 0:
        return
    bad = (coef != 0) & ((targets < 0) | (targets >= V))
    message = f"targets must be token ids in [0, V) = [0, {V}) wherever coef != 0"
    if targets.is_cpu and not torch.compiler.is_compiling():
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"{message}; token {i} has target {int(targets[i])}")
    else:
        torch._assert_async(~bad.any(), message)


def _active(coef: Tensor) -> Tensor:
    # The one host sync: the number of tokens that carry a loss sizes the chunk loop.
    return torch.nonzero(coef != 0).squeeze(1)


def chunks(n: int, chunk_size: int) -> list[tuple[int, int]]:
    """[start, end) bounds of ceil(n / chunk_size) chunks of (nearly) equal size."""
    if n == 0:
        return []
    k = math.ceil(n / max(1, chunk_size))
    size = math.ceil(n / k)
    return [(s, min(n, s + size)) for s in range(0, n, size)]


@functools.lru_cache(maxsize=None)
def gemm_accumulates_in_fp32(device: str, dtype: torch.dtype) -> bool:
    """Whether ``torch.mm(a, b, out_dtype=float32, out=acc)`` and ``torch.addmm(acc, a, b,
    out_dtype=float32, out=acc)`` work here for ``dtype`` inputs (a transposed, as ``d^T`` is) and
    really add in float32. Probed once per device and dtype with small integers: the products are
    exact, the sums exceed bf16/fp16's precision, and the second GEMM adds 2**-10 times the first."""
    if not device.startswith("cuda") or dtype not in (torch.bfloat16, torch.float16):
        return False
    try:
        gen = torch.Generator().manual_seed(0)
        A = torch.randint(-16, 17, (32, 16), generator=gen).double()
        B = torch.randint(-16, 17, (32, 16), generator=gen).double()
        a, b = A.to(device=device, dtype=dtype), B.to(device=device, dtype=dtype)
        acc = torch.empty(16, 16, device=device, dtype=torch.float32)
        torch.mm(a.t(), b, out_dtype=torch.float32, out=acc)
        torch.addmm(acc, a.t() * 2**-10, b, out_dtype=torch.float32, out=acc)
        expected = (A.t() @ B) * (1 + 2**-10)  # |A^T B| < 2**13: exact in float32, not in bf16/fp16
        return acc.dtype == torch.float32 and bool(torch.equal(acc.cpu().double(), expected))
    except Exception:  # noqa: BLE001 -- missing overload, dtype checks of an older torch, ...: fall back
        return False


class WeightGrad:
    """grad W = sum over chunks of d_c^T h_c, accumulated in float32 (float64 for float64)."""

    def __init__(self, V: int, H: int, dtype: torch.dtype, device: torch.device, n_chunks: int):
        self.dtype = dtype
        self.first = True
        acc = acc_dtype(dtype)
        if n_chunks == 0:
            self.mode, self.out = "none", torch.zeros(V, H, dtype=dtype, device=device)
        elif n_chunks == 1 or dtype == acc:
            # The GEMM accumulates in float32 internally: write (and add into) the result directly.
            self.mode, self.out = "direct", torch.empty(V, H, dtype=dtype, device=device)
        elif gemm_accumulates_in_fp32(str(device), dtype):
            self.mode, self.out = "gemm_fp32", torch.empty(V, H, dtype=acc, device=device)
        else:
            self.mode, self.out = "add_fp32", torch.zeros(V, H, dtype=acc, device=device)

    def add(self, d_t: Tensor, h: Tensor) -> None:
        first, self.first = self.first, False
        if self.mode == "direct":
            if first:
                torch.mm(d_t, h, out=self.out)
            else:
                self.out.addmm_(d_t, h)
        elif self.mode == "gemm_fp32":
            if first:
                torch.mm(d_t, h, out_dtype=torch.float32, out=self.out)
            else:
                torch.addmm(self.out, d_t, h, out_dtype=torch.float32, out=self.out)
        else:
            self.out.add_(d_t @ h)  # the chunk's product in the input dtype, added in float32

    def result(self) -> Tensor:
        return self.out if self.out.dtype == self.dtype else self.out.to(self.dtype)


def _scratch_grad(x: Tensor, need_grad: bool, fused: bool) -> Optional[Tensor]:
    """The ``grad`` argument of masked_ce_rows for a scratch chunk ``x``: x itself where the gradient
    is wanted, and on the reference, which computes it anyway (and would otherwise work on a copy)."""
    return x if need_grad or not fused else None


def _loss(coef: Tensor, ce_all: Tensor, acc: torch.dtype) -> Tensor:
    # ce_all is 0 where coef == 0; summed in float64.
    return (coef.double() * ce_all.double()).sum().to(acc)


def _check_targets_coef(targets: Tensor, coef: Tensor, N: int) -> None:
    torch._check_type(targets.dtype == torch.int64, lambda: f"targets must be int64, got {targets.dtype}")
    torch._check_value(targets.dim() == 1 and targets.shape[0] == N and targets.is_contiguous(),
                       lambda: f"targets must be a contiguous ({N},) tensor, got shape {tuple(targets.shape)}")
    torch._check_type(coef.dtype.is_floating_point, lambda: f"coef must be floating-point, got {coef.dtype}")
    torch._check_value(coef.dim() == 1 and coef.shape[0] == N and coef.is_contiguous(),
                       lambda: f"coef must be a contiguous ({N},) tensor, got shape {tuple(coef.shape)}")


def check_logits_args(logits: Tensor, targets: Tensor, coef: Tensor, chunk_size: int) -> None:
    """What masked_ce_logits assumes (checked by the custom op and its fake kernel alike)."""
    torch._check_type(logits.dtype.is_floating_point, lambda: f"logits must be floating-point, got {logits.dtype}")
    torch._check_value(logits.dim() == 2, lambda: f"logits must have shape (N, V), got {tuple(logits.shape)}")
    _check_targets_coef(targets, coef, logits.shape[0])
    torch._check_value(chunk_size >= 0, lambda: f"chunk_size must be >= 0, got {chunk_size}")


def check_hidden_args(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, coef: Tensor,
                      chunk_size: int) -> None:
    """What masked_ce_hidden assumes (checked by the custom op and its fake kernel alike)."""
    torch._check_type(hidden.dtype.is_floating_point, lambda: f"hidden must be floating-point, got {hidden.dtype}")
    torch._check_value(hidden.dim() == 2, lambda: f"hidden must have shape (N, H), got {tuple(hidden.shape)}")
    torch._check_type(weight.dtype == hidden.dtype, lambda: f"weight must have hidden's dtype, got {weight.dtype}")
    torch._check_value(weight.dim() == 2 and weight.shape[1] == hidden.shape[1],
                       lambda: f"weight must have shape (V, H) with H = {hidden.shape[1]}, got {tuple(weight.shape)}")
    if bias is not None:
        torch._check_type(bias.dtype == hidden.dtype, lambda: f"bias must have hidden's dtype, got {bias.dtype}")
        torch._check_value(bias.dim() == 1 and bias.shape[0] == weight.shape[0],
                           lambda: f"bias must have shape (V,) = ({weight.shape[0]},), got {tuple(bias.shape)}")
    _check_targets_coef(targets, coef, hidden.shape[0])
    torch._check_value(chunk_size >= 0, lambda: f"chunk_size must be >= 0, got {chunk_size}")


@torch.library.custom_op("diffkernels::masked_ce_logits", mutates_args=())
def masked_ce_logits_op(logits: Tensor, targets: Tensor, coef: Tensor, chunk_size: int,
                        need_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, per-token CE (N,) float32 with 0 where coef == 0, gradient w.r.t. logits or empty)."""
    check_logits_args(logits, targets, coef, chunk_size)
    N, V = logits.shape
    _check_targets(targets, coef, V)
    acc = acc_dtype(logits.dtype)
    rows_kernel, fused = row_kernel(logits.device, logits.dtype)
    if fused and logits.is_contiguous():
        ce_all = torch.empty(N, dtype=acc, device=logits.device)
        grad = torch.empty_like(logits) if need_grad else logits.new_empty(0)  # every row is written
        rows_kernel(logits, targets, coef, ce_all, grad=grad if need_grad else None)
        return _loss(coef, ce_all, acc), ce_all, grad
    ce_all = torch.zeros(N, dtype=acc, device=logits.device)
    # contiguous whatever the logits' layout: backward rescales the gradient rows in place
    grad = logits.new_zeros(logits.shape) if need_grad else logits.new_empty(0)
    active = _active(coef)
    for start, end in chunks(active.numel(), chunk_tokens(chunk_size, V, logits.dtype, fused)):
        rows = active[start:end]
        block = logits.index_select(0, rows)
        rows_kernel(block, targets, coef, ce_all, rows=rows, grad=_scratch_grad(block, need_grad, fused))
        if need_grad:
            grad.index_copy_(0, rows, block)
    return _loss(coef, ce_all, acc), ce_all, grad


@masked_ce_logits_op.register_fake
def _(logits, targets, coef, chunk_size, need_grad):
    check_fake_devices("diffkernels::masked_ce_logits", logits, targets, coef)
    check_logits_args(logits, targets, coef, chunk_size)
    N = logits.shape[0]
    acc = acc_dtype(logits.dtype)
    return (logits.new_empty((), dtype=acc), logits.new_empty(N, dtype=acc),
            logits.new_empty(logits.shape) if need_grad else logits.new_empty(0))


@torch.library.custom_op("diffkernels::masked_ce_hidden", mutates_args=())
def masked_ce_hidden_op(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, coef: Tensor,
                        chunk_size: int, need_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss, per-token CE, grad hidden (N, H), grad weight (V, H), grad bias (V,)); grads empty without need_grad."""
    check_hidden_args(hidden, weight, bias, targets, coef, chunk_size)
    N, H = hidden.shape
    V = weight.shape[0]
    _check_targets(targets, coef, V)
    dev = hidden.device
    dtype = hidden.dtype
    acc = acc_dtype(dtype)
    rows_kernel, fused = row_kernel(dev, dtype)
    ce_all = torch.zeros(N, dtype=acc, device=dev)
    active = _active(coef)
    bounds = chunks(active.numel(), chunk_tokens(chunk_size, V, dtype, fused))
    if need_grad:
        grad_hidden = hidden.new_zeros(hidden.shape)  # contiguous: backward rescales its rows in place
        grad_weight = WeightGrad(V, H, weight.dtype, dev, len(bounds))
        grad_bias = torch.zeros(V, dtype=acc, device=dev) if bias is not None else hidden.new_empty(0, dtype=torch.float32)
    if bounds:
        m_max = bounds[0][1] - bounds[0][0]
        logits_buf = torch.empty(m_max, V, dtype=dtype, device=dev)  # reused by every chunk
        h_buf = torch.empty(m_max, H, dtype=dtype, device=dev)
    for start, end in bounds:
        rows = active[start:end]
        m = end - start
        h = torch.index_select(hidden, 0, rows, out=h_buf[:m])
        x = logits_buf[:m]
        if bias is None:
            torch.mm(h, weight.t(), out=x)
        else:
            torch.addmm(bias, h, weight.t(), out=x)
        rows_kernel(x, targets, coef, ce_all, rows=rows, grad=_scratch_grad(x, need_grad, fused))
        if need_grad:  # x now holds d = coef * (softmax - onehot) in the input dtype
            if bias is not None:
                grad_bias.add_(x.sum(dim=0, dtype=acc))
            grad_weight.add(x.t(), h)
            grad_hidden.index_copy_(0, rows, torch.mm(x, weight, out=h_buf[:m]))  # h is no longer needed
    loss = _loss(coef, ce_all, acc)
    if not need_grad:
        return loss, ce_all, hidden.new_empty(0), hidden.new_empty(0), hidden.new_empty(0)
    if bias is not None:
        grad_bias = grad_bias.to(weight.dtype)
    return loss, ce_all, grad_hidden, grad_weight.result(), grad_bias


@masked_ce_hidden_op.register_fake
def _(hidden, weight, bias, targets, coef, chunk_size, need_grad):
    check_fake_devices("diffkernels::masked_ce_hidden", hidden, weight, bias, targets, coef)
    check_hidden_args(hidden, weight, bias, targets, coef, chunk_size)
    N = hidden.shape[0]
    acc = acc_dtype(hidden.dtype)
    loss = hidden.new_empty((), dtype=acc)
    ce = hidden.new_empty(N, dtype=acc)
    if not need_grad:
        return loss, ce, hidden.new_empty(0), hidden.new_empty(0), hidden.new_empty(0)
    grad_bias = weight.new_empty(weight.shape[0]) if bias is not None else hidden.new_empty(0, dtype=torch.float32)
    return loss, ce, hidden.new_empty(hidden.shape), weight.new_empty(weight.shape), grad_bias


# --- autograd: the gradients were computed in forward; backward rescales them in place -------


def _scale_(grad: Tensor, grad_output: Tensor) -> None:
    if grad.numel():
        scale_rows_(grad, grad_output.to(acc_dtype(grad.dtype)).expand(grad.shape[0]))


SECOND_BACKWARD = (
    "diffkernels masked cross-entropy: this graph was already differentiated once; the gradients are "
    "computed in the forward pass and rescaled in place by the first backward."
)


CREATE_GRAPH = (
    "diffkernels masked cross-entropy gives no second-order gradients (create_graph=True): its gradients "
    "are computed in the forward pass, as constants. For second-order gradients compute the loss from full "
    "logits with torch.nn.functional.cross_entropy (as diffkernels.reference.masked_ce does)."
)


def _check_first_order() -> None:
    if torch.is_grad_enabled():  # backward runs with grad mode on only under create_graph=True
        raise RuntimeError(CREATE_GRAPH)


def _setup_logits(ctx, inputs, output):
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.set_materialize_grads(False)  # no zero gradients for the auxiliary outputs
    ctx.save_for_backward(output[2])


def _backward_logits(ctx, grad_loss, _ce, _grad):
    _check_first_order()
    (grad,) = saved_tensors(ctx, SECOND_BACKWARD)
    if grad_loss is None or not ctx.needs_input_grad[0]:
        return None, None, None, None, None
    _scale_(grad, grad_loss)
    return grad, None, None, None, None


def _setup_hidden(ctx, inputs, output):
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)  # no zero gradients for the auxiliary outputs
    ctx.save_for_backward(*output[2:])
    ctx.has_bias = inputs[2] is not None


def _backward_hidden(ctx, grad_loss, *_):
    _check_first_order()
    grads = saved_tensors(ctx, SECOND_BACKWARD)
    if grad_loss is None:
        return (None,) * 7
    wanted = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]]
    out = []
    for g, want in zip(grads, wanted):
        if want:
            _scale_(g, grad_loss)
        out.append(g if want else None)
    return out[0], out[1], out[2], None, None, None, None


masked_ce_logits_op.register_autograd(_backward_logits, setup_context=_setup_logits)
masked_ce_hidden_op.register_autograd(_backward_hidden, setup_context=_setup_hidden)
