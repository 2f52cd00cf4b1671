"""``diffkernels::mask_tokens``: counter-RNG token masks for masked diffusion LMs (METHODS.md section 2)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _kernels

MIRROR_DISABLED = 2.0  # a copy-2 threshold no uniform in [0, 1) exceeds


def row_table(p: Tensor, rare_delta: float, mirror_rows: Optional[Tensor], union_weights: bool) -> Tensor:
    """Per-row thresholds and weights, (B, 8) float32, in float32 arithmetic (see csrc/mdm_mask.cpp).

    Columns: [p, 1 - p, q, 1 - q, w_single(p), w_both(p), w_single(q), w_both(q)] with
    q = min(1, p + rare_delta); the copy-2 threshold is MIRROR_DISABLED for rows without copy 2.
    """
    p = p.to(torch.float32)
    one = torch.ones((), dtype=torch.float32, device=p.device)
    q = torch.minimum(p + torch.tensor(rare_delta, dtype=torch.float32, device=p.device), one)
    columns = []
    for x in (p, q):
        t2 = torch.full_like(x, MIRROR_DISABLED) if mirror_rows is None else torch.where(mirror_rows, one - x, MIRROR_DISABLED)
        columns += [x, t2]
    for x in (p, q):
        single = both = one / x
        if mirror_rows is not None and union_weights:
            pi = torch.minimum(2 * x, one)  # probability of landing in the union of the two masks
            single = torch.where(mirror_rows, 2 / pi, single)
            both = torch.where(mirror_rows, one / pi, both)
        columns += [single, both]
    return torch.stack(columns, dim=1).contiguous()


@torch.library.custom_op("diffkernels::mask_tokens", mutates_args=())
def _mask_tokens(ids: Tensor, table: Tensor, seed: int, mask_id: int, eligible: Optional[Tensor],
                 rare: Optional[Tensor], mirror: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(noisy ids, masked, weights), each (copies, B, L)."""
    return _kernels.for_device(ids.device).mask_tokens(ids, table, seed, mask_id, eligible, rare, mirror)


@_mask_tokens.register_fake
def _(ids, table, seed, mask_id, eligible, rare, mirror):
    shape = (2 if mirror else 1, *ids.shape)
    return ids.new_empty(shape), ids.new_empty(shape, dtype=torch.bool), ids.new_empty(shape, dtype=torch.float32)
