"""Reference masked cross-entropy, plain PyTorch.

``masked_diffusion_loss`` is the test oracle of the masked diffusion LM loss (full float64 logits,
log_softmax, autograd). ``masked_ce_rows`` is the ``torch`` backend's primitive of the same name
(diffkernels/ops/_kernels.py), which the Triton kernel implements too: the CE of rows of logits and
its gradient, computed with in-place float32 (float64 for float64) ops on a copy of the rows in
that dtype, so no temporaries beyond that copy.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._validate import acc_dtype


def _ce_and_grad_(x: Tensor, targets: Tensor, coef: Tensor) -> Tensor:
    """CE of each row of float32/float64 ``x``, which is overwritten in place with
    coef * (softmax - onehot). Five passes over x, no temporaries of its size."""
    x_t = x.gather(1, targets[:, None]).squeeze(1)
    m = x.amax(dim=1, keepdim=True)
    m = torch.where(m == float("-inf"), 0.0, m)  # a row of -inf: s = 0, CE NaN (as log_softmax)
    x.sub_(m).exp_()
    s = x.sum(dim=1)
    ce = m.squeeze(1) + s.log() - x_t
    x.mul_((coef / s)[:, None])
    x.scatter_add_(1, targets[:, None], -coef[:, None])
    return ce


def masked_ce_rows(x: Tensor, targets: Tensor, coef: Tensor, ce_out: Tensor, *, rows: Optional[Tensor] = None,
                   grad: Optional[Tensor] = None) -> None:
    """CE of the rows of ``x`` (n, V) into ``ce_out`` and, with ``grad``, coef * (softmax - onehot).

    ``rows=None``: row i is token i; rows with coef 0 are never read (CE 0, zero gradient row).
    ``rows`` (n,) int64: row i is token ``rows[i]``, which indexes ``targets``, ``coef`` and
    ``ce_out``. ``grad`` (n, V), possibly ``x`` itself, receives the gradient in its dtype; ``x`` is
    left unchanged unless it is ``grad``.
    """
    if rows is None:
        tokens = torch.nonzero(coef != 0).squeeze(1)
        block = x.index_select(0, tokens)
        ce_out.zero_()
        masked_ce_rows(block, targets, coef, ce_out, rows=tokens, grad=block)
        if grad is not None:
            grad.zero_().index_copy_(0, tokens, block)
        return
    acc = acc_dtype(x.dtype)
    xf = x.to(acc)
    if xf is x and grad is not x:
        xf = x.clone()
    ce = _ce_and_grad_(xf, targets.index_select(0, rows), coef.index_select(0, rows).to(acc))
    ce_out.index_copy_(0, rows, ce.to(ce_out.dtype))
    if grad is not None and grad is not xf:
        grad.copy_(xf)


def masked_diffusion_loss(masked, targets, *, logits=None, hidden=None, lm_head_weight=None, lm_head_bias=None,
                          importance=None, normalizer="row", num_tokens=None, row_clamp=None):
    if logits is None:
        logits = hidden.double() @ lm_head_weight.double().t()
        if lm_head_bias is not None:
            logits = logits + lm_head_bias.double()
    logp = torch.log_softmax(logits.double(), dim=-1)
    src = masked.source_row
    ce = -logp.gather(-1, targets[src].unsqueeze(-1)).squeeze(-1)
    ce = torch.where(masked.weights != 0, ce, 0.0)  # unmasked tokens carry no loss, even if non-finite
    per_row = masked.row_weight.double() * (masked.weights.double() * ce).sum(dim=1)
    if importance is not None:
        per_row = per_row * importance.double()[src]
    B = masked.eligible_count.shape[0]
    per_sequence = torch.zeros(B, dtype=torch.float64, device=per_row.device).index_add(0, src, per_row)
    if normalizer == "row":
        per_sequence = per_sequence / masked.eligible_count.clamp(min=1).double()
        if row_clamp is not None:
            per_sequence = per_sequence.clamp(max=row_clamp)
        return per_sequence.mean()
    if normalizer == "batch":
        return per_sequence.sum() / masked.eligible_count.sum().clamp(min=1).double()
    return per_sequence.sum() / num_tokens
