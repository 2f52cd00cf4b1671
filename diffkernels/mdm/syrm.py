"""SyRM: syntax-token masking for masked diffusion LMs (docs/METHODS.md section 2, method 6).

Structural prompt tokens (table tags, code syntax, delimiters), given by a set of token ids or a
predicate, become eligible for masking alongside the response. Each sequence's loss is

    l = alpha * L_resp + (1 - alpha) * L_syntax

where each L is the standard MDM loss over its own group of tokens:
L_g = (1 / P_g) * sum_{i in g} 1[masked_i] * w_i * CE_i, with P_g the number of tokens of group g in
the sequence and w_i the mask weight of :func:`mask_tokens` (1/p, or the ISAD / MIRROR weights).
The extra masked tokens add more supervised positions per sequence (less masking-pattern noise,
term A) at the price of a bounded bias: the objective now also rewards reconstructing the prompt's
structure, with weight 1 - alpha.

Two variants (``syrm_weights(..., variant=)``):

- ``"groups"`` (default): alpha is a fixed number; each group is normalised by its own size, as above.
- ``"core"`` (the SyRM reference code's variant): one normaliser over all eligible tokens,
  l = (1 / P) sum_{i eligible} 1[masked_i] w_i CE_i with P = P_resp + P_syn, which is the formula
  above with a per-sequence alpha = P_resp / P.

In both, ``prompt_rate`` = m > 0 also makes each remaining prompt token eligible with probability m
(drawn per token from a seed, counter-based: reproducible and the same on every backend); those
tokens join the syntax group.

Usage (one training step)::

    groups = syrm_weights(ids, response_mask, syntax_ids=tag_ids, alpha=0.8)
    masked = mask_tokens(ids, p, seed, mask_id=MASK, eligible=groups.eligible)
    ce = per-token cross-entropy of the model at masked.noisy_ids     # (rows, L)
    loss = syrm_loss(ce, masked, groups=groups, response_mask=response_mask)
    # or, without materialising logits: the per-token coefficients for the fused CE
    coef = syrm_coefficients(masked, groups=groups, response_mask=response_mask)
    loss = masked_cross_entropy(ids[masked.source_row], coef, hidden=h, lm_head_weight=W)

These functions are device-side only (no host synchronisation), so they can run every step.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor

from .._validate import check_choice, check_seed
from ..rng import fold_seed, uniform
from .masking import MaskedTokens

__all__ = ["SyRMWeights", "syrm_weights", "syrm_loss", "syrm_coefficients"]

REDUCTIONS = ("mean", "sum", "none")
EMPTY_GROUP = ("renormalize", "zero")
VARIANTS = ("groups", "core")
_PROMPT_STREAM = 0x5379_524D  # "SyRM": the random prompt tokens' stream, folded into the seed


class SyRMWeights(NamedTuple):
    """What :func:`syrm_weights` returns (unpacks as ``eligible, weight``).

    eligible (B, L) bool: response tokens and syntax tokens of the prompt; pass it as
        ``mask_tokens(..., eligible=eligible)``.
    weight (B, L) float32: alpha on response tokens, 1 - alpha on syntax tokens, 0 elsewhere
        (with ``variant="core"`` alpha is each sequence's P_resp / P).

    Examples:
        >>> import torch
        >>> from diffkernels.mdm import syrm_weights
        >>> eligible, weight = syrm_weights(torch.tensor([[1, 7, 8]]), torch.tensor([[False, False, True]]),
        ...                                 syntax_ids=[1])
        >>> eligible, weight
        (tensor([[ True, False,  True]]), tensor([[0.5000, 0.0000, 0.5000]]))
    """

    eligible: Tensor
    weight: Tensor


def _check_alpha(alpha) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"alpha must be a Python float in [0, 1], got {type(alpha).__name__}")
    alpha = float(alpha)
    if not (0.0 <= alpha <= 1.0):  # also rejects NaN
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    return alpha


def _check_bool_like(x, name: str, shape, device) -> Tensor:
    if not isinstance(x, Tensor) or x.dtype != torch.bool:
        got = x.dtype if isinstance(x, Tensor) else type(x).__name__
        raise TypeError(f"{name} must be a bool tensor, got {got}")
    if tuple(x.shape) != tuple(shape) or x.device != device:
        raise ValueError(f"{name} must have shape {tuple(shape)} on {device}, got {tuple(x.shape)} on {x.device}")
    return x


def syrm_weights(
    input_ids: Tensor,
    response_mask: Tensor,
    *,
    syntax_ids=None,
    syntax_predicate: Optional[Callable[[Tensor], Tensor]] = None,
    alpha: Optional[float] = None,
    prompt_mask: Optional[Tensor] = None,
    variant: str = "groups",
    prompt_rate: float = 0.0,
    seed: Optional[int] = None,
) -> SyRMWeights:
    """The SyRM eligible set and per-token group weights.

    ``input_ids`` (B, L) int32/int64; ``response_mask`` (B, L) bool marks the response tokens
    (exclude padding from it). Syntax tokens are the tokens of the prompt that are in
    ``syntax_ids`` (an iterable or tensor of token ids, matched with ``torch.isin``) or for which
    ``syntax_predicate(input_ids)`` is True (a callable returning a (B, L) bool tensor); give at
    least one of the two (both: their union). The prompt is ``prompt_mask`` (B, L) bool if given,
    else every non-response position; pass it to keep padding or special tokens out when their ids
    could match. A token is never both: response wins.

    Returns ``SyRMWeights(eligible, weight)``: eligible = response | syntax; weight = alpha on
    response tokens, 1 - alpha on syntax tokens, 0 elsewhere (float32). ``alpha`` in [0, 1]
    (default 0.5): 1 ignores the syntax loss (standard training, but the syntax tokens are still
    masked in the input), 0 trains on the syntax tokens only.

    ``variant="core"``: alpha = P_resp / P per sequence (P = its eligible count), so that
    :func:`syrm_loss` normalises every eligible token by the one count P; do not pass ``alpha``.
    ``prompt_rate`` m in [0, 1]: every other prompt token also joins the syntax group with
    probability m, drawn with ``seed`` (required when m > 0; fold the step into it) at the flat
    token index b * L + i. With m > 0, ``syntax_ids`` and ``syntax_predicate`` may both be omitted.

    Examples:
        Prompt "( 5 )" (ids 1 7 2, brackets are syntax), response 8 9:

        >>> import torch
        >>> from diffkernels.mdm import syrm_weights
        >>> ids = torch.tensor([[1, 7, 2, 8, 9]])
        >>> response = torch.tensor([[False, False, False, True, True]])
        >>> groups = syrm_weights(ids, response, syntax_ids=[1, 2], alpha=0.75)
        >>> groups.eligible
        tensor([[ True, False,  True,  True,  True]])
        >>> groups.weight
        tensor([[0.2500, 0.0000, 0.2500, 0.7500, 0.7500]])
    """
    if not isinstance(input_ids, Tensor) or input_ids.dtype not in (torch.int32, torch.int64):
        got = input_ids.dtype if isinstance(input_ids, Tensor) else type(input_ids).__name__
        raise TypeError(f"input_ids must be an int32 or int64 tensor of token ids, got {got}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must have shape (B, L), got {tuple(input_ids.shape)}")
    device = input_ids.device
    response = _check_bool_like(response_mask, "response_mask", input_ids.shape, device)
    prompt = ~response if prompt_mask is None else _check_bool_like(prompt_mask, "prompt_mask", input_ids.shape, device)
    check_choice(variant, "variant", VARIANTS)
    if variant == "core" and alpha is not None:
        raise ValueError("variant='core' sets alpha = P_resp / P per sequence: do not pass alpha")
    alpha = 0.5 if alpha is None else _check_alpha(alpha)
    if isinstance(prompt_rate, bool) or not isinstance(prompt_rate, (int, float)):
        raise TypeError(f"prompt_rate must be a Python float in [0, 1], got {type(prompt_rate).__name__}")
    prompt_rate = float(prompt_rate)
    if not (0.0 <= prompt_rate <= 1.0):
        raise ValueError(f"prompt_rate must lie in [0, 1], got {prompt_rate}")
    if prompt_rate > 0:
        if seed is None:
            raise ValueError("prompt_rate > 0 draws random prompt tokens: give seed")
        seed = check_seed(seed)
    if syntax_ids is None and syntax_predicate is None and prompt_rate == 0:
        raise ValueError("give syntax_ids or syntax_predicate (or both), or prompt_rate > 0: SyRM needs a "
                         "definition of syntax tokens")

    is_syntax = torch.zeros_like(response)
    if syntax_ids is not None:
        try:
            ids = torch.as_tensor(syntax_ids if isinstance(syntax_ids, Tensor) else list(syntax_ids), device=device)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError("syntax_ids must be an iterable of integer token ids") from None
        if ids.numel() and (ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool):
            raise TypeError(f"syntax_ids must be integer token ids, got dtype {ids.dtype}")
        if ids.numel():
            is_syntax = torch.isin(input_ids, ids.reshape(-1).to(device=device, dtype=input_ids.dtype))
    if syntax_predicate is not None:
        if not callable(syntax_predicate):
            raise TypeError(f"syntax_predicate must be callable, got {type(syntax_predicate).__name__}")
        flags = syntax_predicate(input_ids)
        flags = _check_bool_like(flags, "syntax_predicate(input_ids)", input_ids.shape, device)
        is_syntax = is_syntax | flags

    if prompt_rate > 0:
        B, L = input_ids.shape
        index = torch.arange(B * L, device=device, dtype=torch.int64).reshape(B, L)
        is_syntax = is_syntax | (uniform(fold_seed(seed, _PROMPT_STREAM), index) < prompt_rate)

    syntax = is_syntax & prompt & ~response
    eligible = response | syntax
    if variant == "core":
        n_resp = response.sum(dim=1, keepdim=True).to(torch.float64)
        alpha = n_resp / eligible.sum(dim=1, keepdim=True).clamp(min=1).to(torch.float64)
    weight = torch.where(response, alpha, 0.0) + torch.where(syntax, 1.0 - alpha, 0.0)
    return SyRMWeights(eligible=eligible, weight=weight.to(torch.float32))


def _token_scale(masked_tokens: MaskedTokens, groups: SyRMWeights, response_mask: Tensor, empty_group: str) -> Tensor:
    """s_bi of :func:`syrm_loss` as a (B, L) float32 tensor, after checking the arguments."""
    if not isinstance(masked_tokens, MaskedTokens):
        raise TypeError(f"masked_tokens must be the MaskedTokens of mask_tokens, got {type(masked_tokens).__name__}")
    if not isinstance(groups, SyRMWeights):
        raise TypeError(f"groups must be the SyRMWeights of syrm_weights, got {type(groups).__name__}")
    check_choice(empty_group, "empty_group", EMPTY_GROUP)
    B = masked_tokens.eligible_count.shape[0]
    L = masked_tokens.masked.shape[1]
    device = masked_tokens.masked.device
    eligible = _check_bool_like(groups.eligible, "groups.eligible", (B, L), device)
    weight = groups.weight
    if not isinstance(weight, Tensor) or not weight.dtype.is_floating_point:
        raise TypeError("groups.weight must be a floating-point tensor")
    if tuple(weight.shape) != (B, L) or weight.device != device:
        raise ValueError(f"groups.weight must have shape {(B, L)} on {device}, "
                         f"got {tuple(weight.shape)} on {weight.device}")
    response = _check_bool_like(response_mask, "response_mask", (B, L), device) & eligible
    syntax = eligible & ~response

    weight = weight.to(torch.float32)
    n_resp = response.sum(dim=1, keepdim=True)
    n_syn = syntax.sum(dim=1, keepdim=True)
    size = torch.where(response, n_resp, n_syn).clamp(min=1).to(torch.float32)
    scale = torch.where(eligible, weight / size, 0.0)
    if empty_group == "renormalize":
        # weight of each group present (alpha, 1 - alpha: read back from the weights themselves)
        w_resp = torch.where(response, weight, 0.0).amax(dim=1, keepdim=True)
        w_syn = torch.where(syntax, weight, 0.0).amax(dim=1, keepdim=True)
        total = w_resp + w_syn  # alpha + (1 - alpha) = 1 when both groups are present: left alone
        safe = torch.where(total > 0, total, 1.0)
        factor = torch.where((n_resp > 0) & (n_syn > 0), 1.0, torch.where(total > 0, 1.0 / safe, 0.0))
        scale = scale * factor
    return scale


def syrm_loss(
    token_ce: Tensor,
    masked_tokens: MaskedTokens,
    *,
    groups: SyRMWeights,
    response_mask: Tensor,
    reduction: str = "mean",
    empty_group: str = "renormalize",
) -> Tensor:
    """l = alpha * L_resp + (1 - alpha) * L_syntax per sequence, then reduced.

    ``token_ce`` (R, L): per-token cross-entropy -log p(x0_i | x_t) for the R rows of
    ``masked_tokens`` (B rows, or 2B with MIRROR); only masked positions are read (others may hold
    anything, even inf). ``masked_tokens`` must come from ``mask_tokens(..., eligible=
    groups.eligible)``. ``groups`` from :func:`syrm_weights` for the same B input rows, with its
    ``response_mask``. (To avoid materialising the logits, use :func:`syrm_coefficients` with the
    fused :func:`masked_cross_entropy` instead.)

    Exactly: with P_resp, P_syn the group sizes of sequence b (response tokens, syntax tokens),
    w the mask weights and rho the row weights of ``masked_tokens``,

        l_b = sum_{rows r of b} rho_r * sum_i w_ri * CE_ri * s_bi,
        s_bi = alpha / P_resp (response token), (1 - alpha) / P_syn (syntax token), 0 otherwise,

    i.e. each group's loss is the standard MDM loss normalised by its own size (an unbiased
    estimate of the group's mean CE), and the groups are mixed with weights alpha, 1 - alpha.

    ``empty_group``: a sequence may lack one group (a prompt with no syntax token). With
    ``"renormalize"`` (default) the weights of the groups present are rescaled to sum to 1, so
    such a sequence gets plain L_resp (and with no syntax token anywhere SyRM reduces exactly to
    the standard loss); with ``"zero"`` the missing L is 0 (the sequence then counts alpha * L_resp).
    A sequence with no eligible token, or only tokens of a group with weight 0, has l_b = 0.

    ``reduction``: ``"mean"`` over the B sequences, ``"sum"``, or ``"none"`` for the (B,) vector.
    Computed in float32 whatever the dtype of ``token_ce``; differentiable in ``token_ce``.

    Examples:
        >>> import torch
        >>> from diffkernels.mdm import mask_tokens, syrm_loss, syrm_weights
        >>> ids = torch.tensor([[1, 7, 2, 8, 9]])
        >>> response = torch.tensor([[False, False, False, True, True]])
        >>> groups = syrm_weights(ids, response, syntax_ids=[1, 2])
        >>> masked = mask_tokens(ids, 1.0, seed=0, mask_id=0, eligible=groups.eligible)  # p = 1: all eligible masked
        >>> token_ce = torch.full((1, 5), 2.0)  # CE 2 at every token
        >>> syrm_loss(token_ce, masked, groups=groups, response_mask=response)  # 0.5 * 2 + 0.5 * 2
        tensor(2.)
    """
    check_choice(reduction, "reduction", REDUCTIONS)
    scale = _token_scale(masked_tokens, groups, response_mask, empty_group)
    masked = masked_tokens.masked
    if not isinstance(token_ce, Tensor) or not token_ce.dtype.is_floating_point:
        got = token_ce.dtype if isinstance(token_ce, Tensor) else type(token_ce).__name__
        raise TypeError(f"token_ce must be a floating-point tensor, got {got}")
    if token_ce.shape != masked.shape or token_ce.device != masked.device:
        raise ValueError(f"token_ce must have the shape {tuple(masked.shape)} of masked_tokens.masked on "
                         f"{masked.device}, got {tuple(token_ce.shape)} on {token_ce.device}")
    B = scale.shape[0]
    ce = torch.where(masked, token_ce.to(torch.float32), 0.0)
    src = masked_tokens.source_row
    per_row = (masked_tokens.weights * ce * scale[src]).sum(dim=1) * masked_tokens.row_weight
    per_seq = torch.zeros(B, dtype=torch.float32, device=masked.device).index_add(0, src, per_row)
    if reduction == "none":
        return per_seq
    return per_seq.sum() if reduction == "sum" else per_seq.mean()


def syrm_coefficients(
    masked_tokens: MaskedTokens,
    *,
    groups: SyRMWeights,
    response_mask: Tensor,
    reduction: str = "mean",
    empty_group: str = "renormalize",
) -> Tensor:
    """Per-token coefficients (R, L) float32 with sum(coef * CE) = ``syrm_loss(CE, ...)``.

    coef_ri = rho_r * w_ri * s_bi (/ B for ``reduction="mean"``; ``"sum"`` leaves it out), zero
    wherever the token is not masked. Feed them to the fused cross-entropy, which only computes
    logits where coef != 0::

        coef = syrm_coefficients(masked, groups=groups, response_mask=response_mask)
        loss = masked_cross_entropy(ids[masked.source_row], coef, hidden=h, lm_head_weight=W)

    Same arguments and definitions as :func:`syrm_loss` (no ``"none"`` reduction: the fused
    loss is a scalar).

    Examples:
        >>> import torch
        >>> from diffkernels.mdm import mask_tokens, masked_cross_entropy, syrm_coefficients, syrm_loss, syrm_weights
        >>> ids = torch.tensor([[1, 7, 2, 8, 9]])
        >>> response = torch.tensor([[False, False, False, True, True]])
        >>> groups = syrm_weights(ids, response, syntax_ids=[1, 2])
        >>> masked = mask_tokens(ids, 0.7, seed=3, mask_id=0, eligible=groups.eligible)
        >>> coef = syrm_coefficients(masked, groups=groups, response_mask=response)
        >>> logits = torch.randn(1, 5, 16)
        >>> fused = masked_cross_entropy(ids[masked.source_row], coef, logits=logits)
        >>> ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids, reduction="none")
        >>> bool(torch.allclose(fused, syrm_loss(ce, masked, groups=groups, response_mask=response)))
        True
    """
    check_choice(reduction, "reduction", ("mean", "sum"))
    scale = _token_scale(masked_tokens, groups, response_mask, empty_group)
    src = masked_tokens.source_row
    coef = masked_tokens.weights * scale[src] * masked_tokens.row_weight[:, None]
    coef = torch.where(masked_tokens.masked, coef, 0.0)
    return coef / scale.shape[0] if reduction == "mean" else coef
