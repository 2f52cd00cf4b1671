"""Token masks for masked diffusion LMs: standard, MIRROR (antithetic), ISAD (docs/METHODS.md section 2)."""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .._validate import check_choice, check_devices, check_on_device, check_real, check_seed
from ..ops import mask_tokens as op

MODES = ("standard", "mirror")
_WHERE = "diffkernels.mdm.mask_tokens"  # names the function in device-side assert messages
_F32_SMALLEST = 2.0**-149  # the smallest positive (subnormal) float32


@dataclass
class MaskedTokens:
    """What ``mask_tokens`` returns. Rows: the B input rows, then (mirror mode) their B second copies.

    noisy_ids (R, L): the input with masked tokens replaced by ``mask_id``.
    masked (R, L) bool: which tokens are masked (the loss is taken there).
    weights (R, L) float32: per-token loss weight, 0 where not masked: 1/p, 1/q for ISAD tokens,
        or the Horvitz-Thompson union weights (2/pi masked in one copy, 1/pi in both).
    row_weight (R,) float32: how much each row counts in the per-sequence average: 1 in standard
        mode; 1/2 for each copy of a mirrored row (the loss is 1/2 (l1 + l2)); 1 and 0 for rows
        whose second copy is switched off by ``mirror_max_t``.
    eligible_count (B,) int64: eligible tokens per input row (the paper's P).
    p (R,) float32: each row's masking probability (in standard mode, the float32 tensor p that
        was passed in, not a copy). source_row (R,) int64: its input row.

    Per-sequence loss (docs/METHODS.md): l_b = sum_rows(row_weight * sum_l weights * CE) / eligible_count.

    Examples:
        >>> import torch
        >>> from diffkernels.mdm import mask_tokens
        >>> m = mask_tokens(torch.tensor([[5, 6, 7, 8]]), 0.5, seed=0, mask_id=0, mode="mirror")
        >>> m.noisy_ids.shape, m.masked.dtype, m.row_weight, m.source_row
        (torch.Size([2, 4]), torch.bool, tensor([0.5000, 0.5000]), tensor([0, 0]))
    """

    noisy_ids: Tensor
    masked: Tensor
    weights: Tensor
    row_weight: Tensor
    eligible_count: Tensor
    p: Tensor
    source_row: Tensor


def _check_p(p, B: int, device) -> Tensor:
    """p as a contiguous (B,) float32 tensor."""
    if not isinstance(p, Tensor):
        p = check_real(p, "p")
        if not (0.0 < p <= 1.0):
            raise ValueError(f"p must lie in (0, 1], got {p}")
        return torch.full((B,), p, dtype=torch.float32, device=device)
    if not p.dtype.is_floating_point:
        raise TypeError(f"p must be a float or a (B,) floating tensor, got dtype {p.dtype}")
    if p.shape != (B,):
        raise ValueError(f"p must have shape (B,) = ({B},), got {tuple(p.shape)}")
    if p.device != device:
        raise ValueError(f"p must be on input_ids' device {device}, got {p.device}")
    p = p.to(torch.float32).contiguous()
    # p in (0, 1] <=> clamping to [smallest positive float32, 1] leaves it unchanged (NaN never
    # equals itself): one op fewer than (p > 0) & (p <= 1) on the GPU, where each is a launch.
    check_on_device((p.clamp(_F32_SMALLEST, 1.0) == p).all(), "p must lie in (0, 1]", _WHERE)
    return p


_INT64 = torch.iinfo(torch.int64)
_RARE_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint16, torch.uint32)


def _rare_ids(rare, device) -> Optional[Tensor]:
    """The rare token ids as an integer tensor on ``device`` (None if there are none), in their own
    dtype: torch.isin then compares them with the ids in a common dtype, so an id that the ids'
    dtype cannot represent never matches (it is not cast to it, where it would wrap around)."""
    if isinstance(rare, Tensor):
        if rare.device != device:
            raise ValueError(f"rare must be on input_ids' device {device}, got {rare.device}")
        ids = rare
    else:
        if isinstance(rare, (str, bytes)) or not hasattr(rare, "__iter__"):
            raise TypeError(f"rare must be a collection of integer token ids, got {type(rare).__name__}")
        try:
            ids = torch.as_tensor(rare)
        except (RuntimeError, TypeError, OverflowError, ValueError):  # ids beyond int64, or not numbers
            ids = _rare_ids_beyond_int64(rare)
        if ids.numel() == 0:
            return None
    if ids.dtype not in _RARE_DTYPES:
        raise TypeError(f"rare must hold integer token ids (int8 to int64, uint8 to uint32), got dtype {ids.dtype}")
    if ids.numel() == 0:
        return None
    ids = ids.reshape(-1)
    if ids.dtype in (torch.uint16, torch.uint32):  # isin does not promote these with signed types
        ids = ids.to(torch.int64)
    # built here, so it may be copied to the GPU without the blocking copy's stream sync
    return ids if ids.device == device else ids.to(device, non_blocking=True)


def _rare_ids_beyond_int64(rare) -> Tensor:
    """A collection of Python ints some of which int64 cannot hold: those can never occur in
    input_ids and are dropped."""
    values = list(rare)
    if any(isinstance(v, bool) or not isinstance(v, numbers.Integral) for v in values):
        raise TypeError("rare must be a collection of integer token ids")
    return torch.tensor([int(v) for v in values if _INT64.min <= int(v) <= _INT64.max], dtype=torch.int64)


def mask_tokens(
    input_ids: Tensor,
    p,
    seed: int,
    *,
    mask_id: int,
    eligible: Optional[Tensor] = None,
    mode: str = "standard",
    mirror_max_t: Optional[float] = None,
    rare=None,
    rare_delta: float = 0.0,
    union_weights: bool = False,
) -> MaskedTokens:
    """Mask the eligible tokens of each row with probability p (one Philox uniform per token).

    Token (b, l) draws u = U(seed, b * L + l) (diffkernels.rng). Copy 1 masks it iff u < p_b;
    with ``mode="mirror"`` copy 2 masks it iff u > 1 - p_b (MIRROR: same u, so each copy is exactly
    a standard mask and for p <= 1/2 the two are disjoint). ``mirror_max_t``: only rows with
    p_b < mirror_max_t get a second copy (the paper's tau = 0.9; p = (1 - eps) t + eps ~ t); the
    others keep an all-unmasked copy 2 with row_weight 0, so shapes never depend on the data.
    ``eligible`` (B, L) bool excludes prompt and padding. ``rare``: token ids (ISAD) masked with
    q = min(1, p + rare_delta) and weighted 1/q: a collection of ints or an integer tensor on
    input_ids' device; an id that input_ids' dtype cannot hold never matches, and an empty ``rare``
    means no rare tokens. ``union_weights`` (mirror only): Horvitz-Thompson weights of the union of
    the two masks. All thresholds and weights are float32. B = 0 or L = 0 give empty results.
    Meta tensors are rejected outside fake-tensor tracing.

    The masks are bit-identical across the Triton, C++ and reference backends. The check that
    eligible tokens do not already equal ``mask_id`` runs on CPU tensors only (it would need a
    host sync on the GPU).

    Examples:
        >>> import torch
        >>> from diffkernels.mdm import mask_tokens
        >>> ids = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])
        >>> m = mask_tokens(ids, 0.5, seed=0, mask_id=0)
        >>> m.noisy_ids
        tensor([[ 5,  0,  7,  8,  0, 10],
                [11,  0,  0, 14,  0, 16]])
        >>> m.weights  # 1/p at the masked tokens
        tensor([[0., 2., 0., 0., 2., 0.],
                [0., 2., 2., 0., 2., 0.]])

        MIRROR: a second copy of each row from the same uniforms (at p = 1/2, the complement).

        >>> m = mask_tokens(ids, 0.5, seed=0, mask_id=0, mode="mirror")
        >>> m.noisy_ids
        tensor([[ 5,  0,  7,  8,  0, 10],
                [11,  0,  0, 14,  0, 16],
                [ 0,  6,  0,  0,  9,  0],
                [ 0, 12, 13,  0, 15,  0]])
        >>> m.row_weight, m.source_row
        (tensor([0.5000, 0.5000, 0.5000, 0.5000]), tensor([0, 1, 0, 1]))

        Per-row rates (e.g. p = t from a t-sampler) and a prompt that is never masked:

        >>> p = torch.tensor([0.3, 0.8])
        >>> prompt = torch.tensor([True, True, False, False, False, False])
        >>> m = mask_tokens(ids, p, seed=1, mask_id=0, eligible=~prompt.expand(2, 6))
        >>> bool(m.masked[:, :2].any()), m.eligible_count
        (False, tensor([4, 4]))
    """
    if not isinstance(input_ids, Tensor) or input_ids.dtype not in (torch.int32, torch.int64):
        got = input_ids.dtype if isinstance(input_ids, Tensor) else type(input_ids).__name__
        raise TypeError(f"input_ids must be an int32 or int64 tensor of token ids, got {got}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must have shape (B, L), got {tuple(input_ids.shape)}")
    B, L = input_ids.shape
    device = input_ids.device
    seed = check_seed(seed)
    check_choice(mode, "mode", MODES)
    if isinstance(mask_id, bool) or not isinstance(mask_id, numbers.Integral):
        raise TypeError(f"mask_id must be an integer (Python int or numpy integer), got {type(mask_id).__name__}")
    mask_id = int(mask_id)
    info = torch.iinfo(input_ids.dtype)
    if not info.min <= mask_id <= info.max:
        raise ValueError(f"mask_id {mask_id} does not fit in input_ids' dtype {input_ids.dtype}")
    if eligible is not None:
        if not isinstance(eligible, Tensor) or eligible.dtype != torch.bool:
            raise TypeError("eligible must be a bool tensor shaped like input_ids")
        if eligible.shape != input_ids.shape or eligible.device != device:
            raise ValueError(f"eligible must have input_ids' shape {tuple(input_ids.shape)} and device {device}, "
                             f"got {tuple(eligible.shape)} on {eligible.device}")
    rare_delta = check_real(rare_delta, "rare_delta")
    if not (0.0 <= rare_delta <= 1.0):
        raise ValueError(f"rare_delta must lie in [0, 1], got {rare_delta!r}")
    if not isinstance(union_weights, bool):
        raise TypeError(f"union_weights must be a bool, got {type(union_weights).__name__}")
    mirror = mode == "mirror"
    if not mirror and (union_weights or mirror_max_t is not None):
        raise ValueError("union_weights and mirror_max_t apply to mode='mirror' only")
    if mirror_max_t is not None:
        mirror_max_t = check_real(mirror_max_t, "mirror_max_t")
        if not (0.0 < mirror_max_t <= 1.0):
            raise ValueError(f"mirror_max_t must lie in (0, 1], got {mirror_max_t}")
    check_devices({"input_ids": input_ids, "eligible": eligible, "p": p if isinstance(p, Tensor) else None})
    p = _check_p(p, B, device)
    ids = input_ids.contiguous()
    eligible = eligible.contiguous() if eligible is not None else None
    rare_ids = _rare_ids(rare, device) if rare is not None else None
    rare_flags = torch.isin(ids, rare_ids) if rare_ids is not None else None
    # Which rows get a second copy: all (True), none (False: standard mode) or, with mirror_max_t,
    # those in a (B,) bool tensor.
    copy2 = p < mirror_max_t if mirror and mirror_max_t is not None else mirror
    if input_ids.is_cpu:
        collides = ids == mask_id
        if eligible is not None:
            collides &= eligible
        check_on_device(~collides.any(), f"mask_id {mask_id} already occurs among the eligible tokens of input_ids",
                        _WHERE)

    # The q columns are read for rare tokens only; without any, q = p spares their ops.
    table = op.row_table(p, float(rare_delta) if rare_flags is not None else 0.0, copy2, union_weights)
    noisy, masked, weights = op.mask_tokens(ids, table, seed, mask_id, eligible, rare_flags, mirror)
    copies = 2 if mirror else 1
    if not mirror:
        row_weight = torch.ones(B, dtype=torch.float32, device=device)
    elif copy2 is True:
        row_weight = torch.full((2 * B,), 0.5, dtype=torch.float32, device=device)
    else:
        second = torch.where(copy2, 0.5, 0.0).to(torch.float32)
        row_weight = torch.cat([1 - second, second])
    eligible_count = eligible.sum(dim=1) if eligible is not None else torch.full((B,), L, dtype=torch.int64, device=device)
    source = torch.arange(B, device=device)
    return MaskedTokens(
        noisy_ids=noisy.view(copies * B, L),
        masked=masked.view(copies * B, L),
        weights=weights.view(copies * B, L),
        row_weight=row_weight,
        eligible_count=eligible_count,
        p=torch.cat([p, p]) if mirror else p,  # cat, not repeat: a fraction of the host time
        source_row=torch.cat([source, source]) if mirror else source,
    )
