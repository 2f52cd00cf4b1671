"""The masked diffusion LM loss (docs/METHODS.md section 2), computed only where tokens are masked."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._validate import acc_dtype, check_choice, check_devices, check_finite
from ..ops.masked_ce import masked_ce_hidden_op, masked_ce_logits_op
from .masking import MaskedTokens

NORMALIZERS = ("row", "batch", "global")


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def masked_cross_entropy(
    targets: Tensor,
    coef: Tensor,
    *,
    logits: Optional[Tensor] = None,
    hidden: Optional[Tensor] = None,
    lm_head_weight: Optional[Tensor] = None,
    lm_head_bias: Optional[Tensor] = None,
    chunk_size: Optional[int] = None,
) -> Tensor:
    """``sum_i coef_i * CE_i`` over the tokens with ``coef_i != 0``, never forming the other logits.

    Give either ``logits`` (..., V), or ``hidden`` (..., H) with ``lm_head_weight`` (V, H) and an
    optional ``lm_head_bias`` (V,): then logits are computed only for tokens with a nonzero
    coefficient, ``chunk_size`` tokens at a time (default: 2 GiB of logits per chunk; see
    diffkernels/ops/masked_ce.py).
    ``targets`` (...) are the token ids to predict, ``coef`` (...) the weights (e.g. 1/p for masked
    tokens, 0 elsewhere, divided by the normaliser). Accumulates in float32 (float64 for float64
    inputs); the gradients are produced in the forward pass. One host sync per call (the number of
    tokens with a loss sizes the chunk loop).

    Every token with ``coef != 0`` needs a target in [0, V) (elsewhere targets are not read):
    a ValueError for CPU tensors, an asynchronous device-side assert for CUDA tensors. All tensors
    must be on one device (meta tensors are rejected outside fake-tensor tracing). No tokens give
    a loss of 0. The gradients are computed once, as constants: no second-order gradients.

    Examples:
        >>> import torch
        >>> import torch.nn.functional as F
        >>> from diffkernels.mdm import masked_cross_entropy
        >>> logits = torch.randn(4, 10, requires_grad=True)  # 4 tokens, vocabulary of 10
        >>> targets = torch.tensor([1, 2, 3, 4])
        >>> coef = torch.tensor([1.0, 0.0, 0.5, 0.0])  # tokens 1 and 3 carry no loss
        >>> loss = masked_cross_entropy(targets, coef, logits=logits)
        >>> reference = (coef * F.cross_entropy(logits, targets, reduction="none")).sum()
        >>> bool(torch.allclose(loss, reference))
        True
        >>> loss.backward()
        >>> bool((logits.grad[1] == 0).all())  # no gradient where coef is 0
        True

        From the hidden states and the LM head, without the logits of the other tokens:

        >>> hidden, head = torch.randn(4, 8), torch.randn(10, 8)
        >>> loss = masked_cross_entropy(targets, coef, hidden=hidden, lm_head_weight=head)
        >>> bool(torch.allclose(loss, masked_cross_entropy(targets, coef, logits=hidden @ head.T)))
        True
    """
    flat_targets, flat_coef, source, name = _check_inputs(targets, coef, logits, hidden, lm_head_weight,
                                                          lm_head_bias, chunk_size)
    chunk = chunk_size or 0  # 0: the op's default, which depends on the path and dtype
    if logits is not None:
        V = logits.shape[-1]
        loss, _, _ = masked_ce_logits_op(logits.reshape(flat_targets.numel(), V), flat_targets, flat_coef, chunk,
                                         _needs_grad(logits))
        return loss
    need = _needs_grad(hidden, lm_head_weight, lm_head_bias)
    loss, *_ = masked_ce_hidden_op(hidden.reshape(flat_targets.numel(), hidden.shape[-1]), lm_head_weight,
                                   lm_head_bias, flat_targets, flat_coef, chunk, need)
    return loss


def _check_tensor(x, name: str, *, floating: bool) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if floating and not x.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")


def _check_inputs(targets, coef, logits, hidden, lm_head_weight, lm_head_bias, chunk_size):
    """Checks the arguments of masked_cross_entropy; returns (flat int64 targets, flat coef in the
    accumulation dtype, the logits or hidden tensor, its name)."""
    if (logits is None) == (hidden is None):
        raise ValueError("give exactly one of logits or hidden (with lm_head_weight)")
    _check_tensor(targets, "targets", floating=False)
    if targets.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"targets must hold integer token ids (int32 or int64), got {targets.dtype}")
    lead = targets.shape
    _check_tensor(coef, "coef", floating=True)
    if coef.shape != lead:
        raise ValueError(f"coef must be shaped like targets {tuple(lead)}, got {tuple(coef.shape)}")
    source = logits if logits is not None else hidden
    name = "logits" if logits is not None else "hidden"
    _check_tensor(source, name, floating=True)
    if source.dim() < 1 or source.shape[:-1] != lead:
        raise ValueError(f"{name} must have shape {tuple(lead)} + (last dim,), got {tuple(source.shape)}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 0):
        raise TypeError(f"chunk_size must be None or an int >= 0, got {chunk_size!r}")
    if logits is None:
        _check_tensor(lm_head_weight, "lm_head_weight", floating=True)
        if lm_head_weight.dim() != 2 or lm_head_weight.shape[1] != hidden.shape[-1]:
            raise ValueError(f"lm_head_weight must have shape (V, H) with H = {hidden.shape[-1]}, "
                             f"got {tuple(lm_head_weight.shape)}")
        if lm_head_weight.dtype != hidden.dtype:
            raise TypeError(f"lm_head_weight must have hidden's dtype {hidden.dtype}, got {lm_head_weight.dtype}")
        V = lm_head_weight.shape[0]
        if lm_head_bias is not None:
            _check_tensor(lm_head_bias, "lm_head_bias", floating=True)
            if lm_head_bias.shape != (V,):
                raise ValueError(f"lm_head_bias must have shape ({V},), got {tuple(lm_head_bias.shape)}")
            if lm_head_bias.dtype != hidden.dtype:
                raise TypeError(f"lm_head_bias must have hidden's dtype {hidden.dtype}, got {lm_head_bias.dtype}")
    else:
        if lm_head_weight is not None or lm_head_bias is not None:
            raise ValueError("lm_head_weight and lm_head_bias go with hidden, not with logits")
        V = logits.shape[-1]
    if V == 0:
        raise ValueError("the vocabulary must not be empty (V = 0)")
    check_devices({name: source, "targets": targets, "coef": coef, "lm_head_weight": lm_head_weight,
                   "lm_head_bias": lm_head_bias}, reference=name)
    # contiguous: the Triton kernel indexes targets and coef as flat arrays
    flat_targets = targets.reshape(-1).to(torch.int64).contiguous()
    flat_coef = coef.reshape(-1).to(acc_dtype(source.dtype)).contiguous()
    return flat_targets, flat_coef, source, name


def masked_diffusion_loss(
    masked: MaskedTokens,
    targets: Tensor,
    *,
    logits: Optional[Tensor] = None,
    hidden: Optional[Tensor] = None,
    lm_head_weight: Optional[Tensor] = None,
    lm_head_bias: Optional[Tensor] = None,
    importance: Optional[Tensor] = None,
    normalizer: str = "row",
    num_tokens: Optional[float] = None,
    row_clamp: Optional[float] = None,
    chunk_size: Optional[int] = None,
) -> Tensor:
    """The MDM training loss for a batch masked by :func:`mask_tokens`.

    Per sequence b: l_b = sum over its rows r (1 or 2 copies) of row_weight_r * importance_b *
    sum_l weights_rl * CE_rl, with CE = -log p_theta(x0 | x_t) at masked tokens only, computed
    from ``logits`` (R, L, V) or from ``hidden`` (R, L, H) and the LM head without forming the
    logits of unmasked tokens. ``targets`` (B, L) are the clean ids x0 of the B input rows.
    ``importance`` (B,): per-sequence weights, e.g. 1/p(t) from a P-POTS sampler.

    ``normalizer``:
    * ``"row"`` (docs/METHODS.md): divide l_b by the row's eligible count P_b, average over the B rows;
    * ``"batch"``: sum over the batch divided by the batch's total eligible count;
    * ``"global"``: sum divided by ``num_tokens``, a count you fix for the whole optimizer step,
      so the gradient does not change with gradient accumulation or data-parallel size: in one
      process, the eligible tokens of all its micro-batches; under DDP/FSDP, which average the
      ranks' gradients, the eligible tokens of the global batch divided by the world size. Sum
      the losses of the micro-batches (do not average them).
    ``row_clamp``: clamp each l_b (after normalisation) at this finite value >= 0; clamped rows
    get no gradient. Biased; needs ``normalizer="row"``; costs a second pass over the masked tokens.

    An empty batch (B = 0, L = 0 or no eligible token) gives a loss of 0.

    Examples:
        >>> import math
        >>> import torch
        >>> from diffkernels.mdm import mask_tokens, masked_diffusion_loss
        >>> ids = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])
        >>> masked = mask_tokens(ids, 0.5, seed=0, mask_id=0)  # masks 2 tokens of row 0, 3 of row 1
        >>> logits = torch.zeros(2, 6, 20, requires_grad=True)  # a model that predicts uniformly
        >>> loss = masked_diffusion_loss(masked, ids, logits=logits)
        >>> expected = (2 * 2 / 6 + 3 * 2 / 6) / 2 * math.log(20)  # mean over rows of sum(CE / p) / P
        >>> round(loss.item(), 4), round(expected, 4)
        (2.4964, 2.4964)
        >>> loss.backward()

        With a model's hidden states and LM head (the logits of unmasked tokens are never formed):

        >>> hidden = torch.randn(2, 6, 8, requires_grad=True)
        >>> head = torch.randn(20, 8, requires_grad=True)
        >>> loss = masked_diffusion_loss(masked, ids, hidden=hidden, lm_head_weight=head)
        >>> bool(torch.allclose(loss, masked_diffusion_loss(masked, ids, logits=hidden @ head.T)))
        True
    """
    if not isinstance(masked, MaskedTokens):
        raise TypeError("masked must be the MaskedTokens returned by diffkernels.mdm.mask_tokens")
    check_choice(normalizer, "normalizer", NORMALIZERS)
    R, L = masked.noisy_ids.shape
    B = masked.eligible_count.shape[0]
    _check_tensor(targets, "targets", floating=False)
    if targets.shape != (B, L):
        raise ValueError(f"targets must be the clean ids of the B input rows, shape ({B}, {L}), got {tuple(targets.shape)}")
    if importance is not None:
        _check_tensor(importance, "importance", floating=True)
        if importance.shape != (B,):
            raise ValueError(f"importance must have shape (B,) = ({B},), got {tuple(importance.shape)}")
    dev = check_devices({"masked.weights": masked.weights, "targets": targets, "importance": importance,
                         "masked.row_weight": masked.row_weight, "masked.eligible_count": masked.eligible_count,
                         "masked.source_row": masked.source_row})
    if normalizer == "global":
        if num_tokens is None:
            raise ValueError("normalizer='global' needs num_tokens > 0 (fixed for the whole optimizer step)")
        num_tokens = check_finite(num_tokens, "num_tokens", minimum=0.0, strict=True)
    elif num_tokens is not None:
        raise ValueError("num_tokens applies to normalizer='global' only")
    if row_clamp is not None:
        if normalizer != "row":
            raise ValueError("row_clamp needs normalizer='row' (it clamps each sequence's normalised loss)")
        row_clamp = check_finite(row_clamp, "row_clamp", minimum=0.0)
    row_factor = masked.row_weight.double()
    if importance is not None:
        row_factor = row_factor * importance.double()[masked.source_row]
    if normalizer == "row":
        row_factor = row_factor / (masked.eligible_count.clamp(min=1).double()[masked.source_row] * B)
    elif normalizer == "batch":
        row_factor = row_factor / masked.eligible_count.sum().clamp(min=1).double()
    else:
        row_factor = row_factor / num_tokens
    coef = masked.weights.double() * row_factor[:, None]
    row_targets = targets[masked.source_row]
    kw = dict(logits=logits, hidden=hidden, lm_head_weight=lm_head_weight, lm_head_bias=lm_head_bias, chunk_size=chunk_size)
    if row_clamp is None:
        return masked_cross_entropy(row_targets, coef, **kw)

    # Clamp: a first pass without gradients finds each sequence's loss l_b; clamped sequences
    # keep the clamp value as a constant and drop out of the gradient pass.
    with torch.no_grad():
        per_token = _per_token_ce(row_targets, coef, **kw)
        per_sequence = torch.zeros(B, dtype=torch.float64, device=dev).index_add_(
            0, masked.source_row, (coef * per_token.double()).sum(dim=1)) * B
        clamped = per_sequence > row_clamp
    coef = torch.where(clamped[masked.source_row][:, None], 0.0, coef)
    loss = masked_cross_entropy(row_targets, coef, **kw)
    return loss + (clamped.double().sum() * row_clamp / max(B, 1)).to(loss.dtype)  # B = 0: 0, not 0 / 0


def _per_token_ce(targets, coef, *, logits, hidden, lm_head_weight, lm_head_bias, chunk_size):
    """Per-token CE (0 where coef == 0), without gradients."""
    flat_t = targets.reshape(-1).to(torch.int64).contiguous()
    source = logits if logits is not None else hidden
    flat_c = coef.reshape(-1).to(acc_dtype(source.dtype)).contiguous()
    if logits is not None:
        V = logits.shape[-1]
        _, ce, _ = masked_ce_logits_op(logits.reshape(-1, V), flat_t, flat_c, chunk_size or 0, False)
    else:
        _, ce, *_ = masked_ce_hidden_op(hidden.reshape(flat_t.numel(), hidden.shape[-1]), lm_head_weight,
                                        lm_head_bias, flat_t, flat_c, chunk_size or 0, False)
    return ce.view(targets.shape)
