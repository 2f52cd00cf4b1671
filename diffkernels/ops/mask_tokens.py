"""``diffkernels::mask_tokens``: counter-RNG token masks for masked diffusion LMs (METHODS.md section 2)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._validate import check_fake_devices, eager_fast_path
from . import _kernels

MIRROR_DISABLED = 2.0  # a copy-2 threshold no uniform in [0, 1) exceeds


def row_table(p: Tensor, rare_delta: float, mirror_rows: Optional[Tensor], union_weights: bool) -> Tensor:
    """Per-row thresholds and weights, (B, 8) float32, in float32 arithmetic (see csrc/mask_tokens.cpp).

    Columns: [p, 1 - p, q, 1 - q, w_single(p), w_both(p), w_single(q), w_both(q)] with
    q = min(1, p + rare_delta); the copy-2 threshold is MIRROR_DISABLED for rows without copy 2
    (``mirror_rows`` None: no row has one).
    """
    return _row_table(p.to(torch.float32), rare_delta, False if mirror_rows is None else mirror_rows, union_weights)


def _row_table(p: Tensor, rare_delta: float, copy2, union_weights: bool) -> Tensor:
    """``row_table`` of float32 ``p``; ``copy2``: True (every row has copy 2), False (none) or (B,) bool.

    Few tensor ops (three in the common cases): at small shapes each costs about as much as the kernel.
    """
    q = p if rare_delta == 0.0 else torch.clamp(p + rare_delta, max=1.0)  # q = p for valid p <= 1
    t2_p, single_p, both_p = _columns(p, copy2, union_weights)
    t2_q, single_q, both_q = (t2_p, single_p, both_p) if q is p else _columns(q, copy2, union_weights)
    if copy2 is False:
        t2_p = t2_q = torch.full_like(p, MIRROR_DISABLED)
    return torch.stack([p, t2_p, q, t2_q, single_p, both_p, single_q, both_q], dim=1)


def _columns(x: Tensor, copy2, union_weights: bool):
    """(copy-2 threshold, w_single, w_both) of rows masked with probability x; threshold None if
    no row has copy 2. ``reciprocal`` is 1 / x correctly rounded, like the reference's division."""
    if copy2 is False:
        inv = x.reciprocal()
        return None, inv, inv
    t2 = torch.rsub(x, 1.0)  # 1 - x, without Tensor.__rsub__'s Python wrapper
    if union_weights:
        both = torch.clamp(2 * x, max=1.0).reciprocal()  # 1 / pi, pi = P(masked in either copy)
        single = 2 * both  # 2 / pi, bit for bit (a power-of-2 scaling is exact)
    else:
        single = both = x.reciprocal()
    if copy2 is not True:  # per row: rows without copy 2 keep the standard threshold and weights
        t2 = torch.where(copy2, t2, MIRROR_DISABLED)
        if union_weights:
            inv = x.reciprocal()
            single, both = torch.where(copy2, single, inv), torch.where(copy2, both, inv)
    return t2, single, both


def mask_tokens_op(ids: Tensor, table: Tensor, seed: int, mask_id: int, eligible: Optional[Tensor],
                   rare: Optional[Tensor], mirror: bool) -> tuple[Tensor, Tensor, Tensor]:
    """The op: in plain eager mode the kernel directly, else (torch.compile, fake tensors, ...) the custom op."""
    if eager_fast_path(ids, table, eligible, rare):
        return _kernels.for_device(ids.device).mask_tokens(ids, table, seed, mask_id, eligible, rare, mirror)
    return _mask_tokens(ids, table, seed, mask_id, eligible, rare, mirror)


@torch.library.custom_op("diffkernels::mask_tokens", mutates_args=())
def _mask_tokens(ids: Tensor, table: Tensor, seed: int, mask_id: int, eligible: Optional[Tensor],
                 rare: Optional[Tensor], mirror: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(noisy ids, masked, weights), each (copies, B, L)."""
    return _kernels.for_device(ids.device).mask_tokens(ids, table, seed, mask_id, eligible, rare, mirror)


@_mask_tokens.register_fake
def _(ids, table, seed, mask_id, eligible, rare, mirror):
    check_fake_devices("diffkernels::mask_tokens", ids, table, eligible, rare)
    shape = (2 if mirror else 1, *ids.shape)
    return ids.new_empty(shape), ids.new_empty(shape, dtype=torch.bool), ids.new_empty(shape, dtype=torch.float32)
