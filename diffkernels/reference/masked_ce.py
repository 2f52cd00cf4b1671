"""Reference masked diffusion LM loss: full float64 logits, log_softmax, autograd (the test oracle)."""

from __future__ import annotations

import torch


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
