"""``diffkernels::mask_tokens``: counter-RNG token masks for masked diffusion LMs (the op layer of
``diffkernels.mdm.mask_tokens``, docs/METHODS.md section 2).

``row_table`` turns the per-row probabilities into the thresholds and weights the kernels compare
and select with; ``mask_tokens`` (the entry point of the public function) runs the kernel
directly in plain eager mode and the custom op ``mask_tokens_op`` wherever something intercepts
the op (torch.compile, fake tensors, ...).
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from .._validate import check_fake_devices, eager_fast_path
from . import _kernels

MIRROR_DISABLED = 2.0  # a copy-2 threshold no uniform in [0, 1) exceeds


def row_table(p: Tensor, rare_delta: float, mirror_rows: Union[None, bool, Tensor], union_weights: bool) -> Tensor:
    """Per-row thresholds and weights, (B, 8) float32, in float32 arithmetic (see csrc/mask_tokens.cpp).

    Columns: [p, 1 - p, q, 1 - q, w_single(p), w_both(p), w_single(q), w_both(q)] with
    q = min(1, p + rare_delta); the copy-2 threshold is MIRROR_DISABLED for rows without copy 2.
    ``mirror_rows``: which rows have copy 2: None or False (none), True (all) or a (B,) bool tensor.
    Few tensor ops (three in the common cases): at small shapes each costs about as much as the kernel.
    """
    if p.dtype != torch.float32:
        p = p.to(torch.float32)
    copy2 = False if mirror_rows is None else mirror_rows
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


def mask_tokens(ids: Tensor, table: Tensor, seed: int, mask_id: int, eligible: Optional[Tensor],
                rare: Optional[Tensor], mirror: bool) -> tuple[Tensor, Tensor, Tensor]:
    """The op: in plain eager mode the kernel directly, else (torch.compile, fake tensors, ...) the custom op."""
    if eager_fast_path(ids, table, eligible, rare):
        return _kernels.for_device(ids.device).mask_tokens(ids, table, seed, mask_id, eligible, rare, mirror)
    return mask_tokens_op(ids, table, seed, mask_id, eligible, rare, mirror)


def check_args(ids: Tensor, table: Tensor, eligible: Optional[Tensor], rare: Optional[Tensor]) -> None:
    """What the kernels assume (checked by the custom op and its fake kernel alike): contiguous
    (B, L) int32/int64 ids, a contiguous (B, 8) float32 table, bool flags shaped like ids."""
    torch._check_type(ids.dtype in (torch.int32, torch.int64), lambda: f"ids must be int32 or int64, got {ids.dtype}")
    torch._check_value(ids.dim() == 2 and ids.is_contiguous(),
                       lambda: f"ids must be a contiguous (B, L) tensor, got shape {tuple(ids.shape)}")
    torch._check_type(table.dtype == torch.float32, lambda: f"table must be float32, got {table.dtype}")
    torch._check_value(table.dim() == 2 and table.shape[0] == ids.shape[0] and table.shape[1] == 8
                       and table.is_contiguous(),
                       lambda: f"table must be a contiguous (B, 8) tensor with B = {ids.shape[0]}, "
                               f"got shape {tuple(table.shape)}")
    for name, flags in (("eligible", eligible), ("rare", rare)):
        if flags is not None:
            torch._check_type(flags.dtype == torch.bool, lambda: f"{name} must be bool, got {flags.dtype}")
            torch._check_value(flags.shape == ids.shape and flags.is_contiguous(),
                               lambda: f"{name} must be contiguous and shaped like ids {tuple(ids.shape)}, "
                                       f"got {tuple(flags.shape)}")


@torch.library.custom_op("diffkernels::mask_tokens", mutates_args=())
def mask_tokens_op(ids: Tensor, table: Tensor, seed: int, mask_id: int, eligible: Optional[Tensor],
                   rare: Optional[Tensor], mirror: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(noisy ids, masked, weights), each (copies, B, L)."""
    check_args(ids, table, eligible, rare)
    return _kernels.for_device(ids.device).mask_tokens(ids, table, seed, mask_id, eligible, rare, mirror)


@mask_tokens_op.register_fake
def _(ids, table, seed, mask_id, eligible, rare, mirror):
    check_fake_devices("diffkernels::mask_tokens", ids, table, eligible, rare)
    check_args(ids, table, eligible, rare)
    shape = (2 if mirror else 1, *ids.shape)
    return ids.new_empty(shape), ids.new_empty(shape, dtype=torch.bool), ids.new_empty(shape, dtype=torch.float32)
