"""Triton kernel of mask_tokens (see csrc/mask_tokens.cpp for the row table it reads)."""

import torch
import triton
import triton.language as tl

from .philox import row_tile, tasks_per_row

COUNTERS_PER_PROGRAM = 256


@triton.jit
def mask_tokens_kernel(
    ids_ptr, table_ptr, eligible_ptr, rare_ptr, noisy_ptr, masked_ptr, weight_ptr,
    L, T, plane, seed, mask_id,
    HAS_ELIGIBLE: tl.constexpr, HAS_RARE: tl.constexpr, MIRROR: tl.constexpr, G: tl.constexpr,
):
    pid, b, r, inside, u = row_tile(L, T, seed, G)
    offs = b * L + r
    row = table_ptr + 8 * b
    t1 = tl.load(row + 0)
    t2 = tl.load(row + 1)
    w_single = tl.load(row + 4)
    w_both = tl.load(row + 5)
    if HAS_RARE:
        is_rare = tl.load(rare_ptr + offs, mask=inside, other=0) != 0
        t1 = tl.where(is_rare, tl.load(row + 2), t1)
        t2 = tl.where(is_rare, tl.load(row + 3), t2)
        w_single = tl.where(is_rare, tl.load(row + 6), w_single)
        w_both = tl.where(is_rare, tl.load(row + 7), w_both)
    ok = inside
    if HAS_ELIGIBLE:
        ok = ok & (tl.load(eligible_ptr + offs, mask=inside, other=0) != 0)
    ids = tl.load(ids_ptr + offs, mask=inside, other=0)
    m1 = ok & (u < t1)
    w = w_single
    if MIRROR:
        m2 = ok & (u > t2)
        w = tl.where(m1 & m2, w_both, w_single)
    tl.store(masked_ptr + offs, m1.to(tl.int8), mask=inside)
    tl.store(weight_ptr + offs, tl.where(m1, w, 0.0), mask=inside)
    tl.store(noisy_ptr + offs, tl.where(m1, mask_id, ids).to(ids.dtype), mask=inside)
    if MIRROR:
        tl.store(masked_ptr + plane + offs, m2.to(tl.int8), mask=inside)
        tl.store(weight_ptr + plane + offs, tl.where(m2, w, 0.0), mask=inside)
        tl.store(noisy_ptr + plane + offs, tl.where(m2, mask_id, ids).to(ids.dtype), mask=inside)


def mask_tokens(ids, table, seed: int, mask_id: int, eligible, rare, mirror: bool):
    B, L = ids.shape
    copies = 2 if mirror else 1
    noisy = torch.empty((copies, B, L), dtype=ids.dtype, device=ids.device)
    masked = torch.empty((copies, B, L), dtype=torch.bool, device=ids.device)
    weight = torch.empty((copies, B, L), dtype=torch.float32, device=ids.device)
    T = tasks_per_row(L, COUNTERS_PER_PROGRAM)
    if B * T:
        mask_tokens_kernel[(B * T,)](
            ids, table,
            eligible.view(torch.int8) if eligible is not None else ids,
            rare.view(torch.int8) if rare is not None else ids,
            noisy, masked.view(torch.int8), weight, L, T, B * L, seed, mask_id,
            HAS_ELIGIBLE=eligible is not None, HAS_RARE=rare is not None, MIRROR=mirror, G=COUNTERS_PER_PROGRAM,
        )
    return noisy, masked, weight
