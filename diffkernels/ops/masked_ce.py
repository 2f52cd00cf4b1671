"""``diffkernels::masked_ce_logits`` / ``masked_ce_hidden``: cross-entropy only where it is needed.

Both compute ``loss = sum_i coef_i * CE(logits_i, target_i)`` over the tokens with ``coef_i != 0``
(the masked tokens of a masked diffusion LM, already weighted and normalised by the caller).
Tokens are compacted first (one host sync to size the chunk loop, documented), then processed
in chunks: logits for a chunk of masked tokens only (from hidden states and the LM head, or
gathered from given logits), a row-wise log-sum-exp in float32, and the gradient of that chunk
written during the forward pass. The (tokens x vocabulary) logits are never materialised; peak
extra memory is one chunk of logits plus the gradients themselves. Backward rescales the saved
gradients in place by the upstream gradient (skipped when it is exactly 1), so such a graph can
be differentiated once.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ._inplace import saved_tensors

CHUNK_BYTES = 1 << 28  # float32 logits per chunk: 256 MiB


def default_chunk_size(vocab: int) -> int:
    return max(1, CHUNK_BYTES // (4 * max(1, vocab)))


def _chunk_ce_(logits: Tensor, targets: Tensor, coef: Tensor) -> Tensor:
    """CE of each row of float32 ``logits``, which is overwritten with coef * (softmax - onehot)."""
    lse = torch.logsumexp(logits, dim=1)
    ce = lse - logits.gather(1, targets[:, None]).squeeze(1)
    logits.sub_(lse[:, None]).exp_().mul_(coef[:, None])
    logits.scatter_add_(1, targets[:, None], -coef[:, None])
    return ce


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _active(coef: Tensor) -> Tensor:
    # The one host sync: the number of tokens that carry a loss sizes the chunk loop.
    return torch.nonzero(coef != 0).squeeze(1)


@torch.library.custom_op("diffkernels::masked_ce_logits", mutates_args=())
def _masked_ce_logits(logits: Tensor, targets: Tensor, coef: Tensor, chunk_size: int,
                      need_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, per-token CE (N,) float32 with 0 where coef == 0, gradient w.r.t. logits or empty)."""
    N, V = logits.shape
    acc = _acc(logits.dtype)
    ce_all = torch.zeros(N, dtype=acc, device=logits.device)
    grad = torch.zeros_like(logits) if need_grad else logits.new_empty(0)
    loss = torch.zeros((), dtype=torch.float64, device=logits.device)
    active = _active(coef)
    for start in range(0, active.numel(), chunk_size):
        rows = active[start:start + chunk_size]
        block = logits.index_select(0, rows).to(acc)
        c = coef.index_select(0, rows).to(acc)
        ce = _chunk_ce_(block, targets.index_select(0, rows), c)
        ce_all.index_copy_(0, rows, ce)
        loss += (c.double() * ce.double()).sum()
        if need_grad:
            grad.index_copy_(0, rows, block.to(grad.dtype))
    return loss.to(acc), ce_all, grad


@_masked_ce_logits.register_fake
def _(logits, targets, coef, chunk_size, need_grad):
    N = logits.shape[0]
    acc = _acc(logits.dtype)
    return (logits.new_empty((), dtype=acc), logits.new_empty(N, dtype=acc),
            torch.empty_like(logits) if need_grad else logits.new_empty(0))


@torch.library.custom_op("diffkernels::masked_ce_hidden", mutates_args=())
def _masked_ce_hidden(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, coef: Tensor,
                      chunk_size: int, need_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss, per-token CE, grad hidden (N, H), grad weight (V, H), grad bias (V,)); grads empty without need_grad."""
    N, H = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    acc = _acc(hidden.dtype)
    ce_all = torch.zeros(N, dtype=acc, device=dev)
    loss = torch.zeros((), dtype=torch.float64, device=dev)
    if need_grad:
        grad_hidden = torch.zeros_like(hidden)
        grad_weight = torch.zeros(V, H, dtype=acc, device=dev)  # accumulated over chunks
        grad_bias = torch.zeros(V, dtype=acc, device=dev) if bias is not None else hidden.new_empty(0)
    active = _active(coef)
    for start in range(0, active.numel(), chunk_size):
        rows = active[start:start + chunk_size]
        h = hidden.index_select(0, rows)
        block = (h @ weight.t() if bias is None else torch.addmm(bias, h, weight.t())).to(acc)
        c = coef.index_select(0, rows).to(acc)
        ce = _chunk_ce_(block, targets.index_select(0, rows), c)
        ce_all.index_copy_(0, rows, ce)
        loss += (c.double() * ce.double()).sum()
        if need_grad:
            d = block.to(weight.dtype)
            grad_hidden.index_copy_(0, rows, (d @ weight).to(hidden.dtype))
            grad_weight.add_(d.t() @ h)  # the chunk's product in the input dtype, accumulated in float32
            if bias is not None:
                grad_bias.add_(block.sum(dim=0))
    if not need_grad:
        return loss.to(acc), ce_all, hidden.new_empty(0), hidden.new_empty(0), hidden.new_empty(0)
    if bias is not None:
        grad_bias = grad_bias.to(weight.dtype)
    return loss.to(acc), ce_all, grad_hidden, grad_weight.to(weight.dtype), grad_bias


@_masked_ce_hidden.register_fake
def _(hidden, weight, bias, targets, coef, chunk_size, need_grad):
    N = hidden.shape[0]
    acc = _acc(hidden.dtype)
    loss = hidden.new_empty((), dtype=acc)
    ce = hidden.new_empty(N, dtype=acc)
    if not need_grad:
        return loss, ce, hidden.new_empty(0), hidden.new_empty(0), hidden.new_empty(0)
    grad_bias = weight.new_empty(weight.shape[0]) if bias is not None else hidden.new_empty(0, dtype=torch.float32)
    return loss, ce, torch.empty_like(hidden), torch.empty_like(weight), grad_bias


# --- autograd: the gradients were computed in forward; backward rescales them in place -------


def _scale_(grad: Tensor, grad_output: Tensor) -> None:
    if grad.numel():
        factor = grad_output.to(_acc(grad.dtype)).expand(grad.shape[0])
        torch.ops.diffkernels.scale_rows_(grad, factor)


SECOND_BACKWARD = (
    "diffkernels masked cross-entropy: this graph was already differentiated once; the gradients are "
    "computed in the forward pass and rescaled in place by the first backward."
)


def _setup_logits(ctx, inputs, output):
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.set_materialize_grads(False)  # no zero gradients for the auxiliary outputs
    ctx.save_for_backward(output[2])


def _backward_logits(ctx, grad_loss, _ce, _grad):
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


_masked_ce_logits.register_autograd(_backward_logits, setup_context=_setup_logits)
_masked_ce_hidden.register_autograd(_backward_hidden, setup_context=_setup_hidden)
