"""Reference token masking for masked diffusion LMs (docs/METHODS.md section 2), plain PyTorch.

``mask_tokens`` implements the spec directly (the test oracle); ``mask_tokens_fwd`` is the
backend primitive the C++ and Triton kernels implement, driven by the per-row table of
``diffkernels.ops.mask_tokens.row_table``.
"""

from __future__ import annotations

import torch

from ..rng import uniform


def _f32(x, device):
    return torch.as_tensor(x, dtype=torch.float32, device=device)


def mask_tokens(ids, p, seed, *, mask_id, eligible=None, mirror=False, mirror_rows=None, rare=None,
                rare_delta=0.0, union_weights=False):
    """Returns (noisy (C, B, L), masked (C, B, L), weight (C, B, L)) straight from the definitions.

    p: (B,) float32. rare: (B, L) bool flags. mirror_rows: (B,) bool, rows that get copy 2.
    """
    B, L = ids.shape
    dev = ids.device
    u = uniform(seed, torch.arange(B * L, device=dev)).view(B, L)
    p = p.to(torch.float32).view(B, 1).expand(B, L)
    q = torch.minimum(p + _f32(rare_delta, dev), _f32(1.0, dev))
    p_tok = torch.where(rare, q, p) if rare is not None else p
    ok = eligible if eligible is not None else torch.ones(B, L, dtype=torch.bool, device=dev)
    m1 = ok & (u < p_tok)
    copies = [m1]
    if mirror:
        rows = mirror_rows.view(B, 1) if mirror_rows is not None else torch.ones(B, 1, dtype=torch.bool, device=dev)
        m2 = ok & rows & (u > _f32(1.0, dev) - p_tok)
        copies.append(m2)
    weight_one = _f32(1.0, dev) / p_tok  # Horvitz-Thompson weight of a token masked with probability p_tok
    if mirror and union_weights:
        pi = torch.minimum(2 * p_tok, _f32(1.0, dev))  # probability of being in the union of both masks
        single = torch.where(rows, _f32(2.0, dev) / pi, weight_one)
        both = torch.where(rows, _f32(1.0, dev) / pi, weight_one)
        w = torch.where(m1 & m2, both, single)
    else:
        w = weight_one
    noisy = torch.stack([torch.where(m, torch.full_like(ids, mask_id), ids) for m in copies])
    masked = torch.stack(copies)
    weight = torch.stack([torch.where(m, w, _f32(0.0, dev)) for m in copies])
    return noisy, masked, weight


def mask_tokens_fwd(ids, table, seed: int, mask_id: int, eligible, rare, mirror: bool):
    """The backend primitive: thresholds and weights come from the (B, 8) row table."""
    B, L = ids.shape
    u = uniform(seed, torch.arange(B * L, device=ids.device)).view(B, L)
    cols = table.view(B, 8, 1)
    is_rare = rare if rare is not None else torch.zeros(B, L, dtype=torch.bool, device=ids.device)

    def col(k):  # column k for ordinary tokens, column k + 2 for rare ones
        return torch.where(is_rare, cols[:, k + 2], cols[:, k])

    ok = eligible if eligible is not None else torch.ones(B, L, dtype=torch.bool, device=ids.device)
    m1 = ok & (u < col(0))
    copies = [m1, ok & (u > col(1))] if mirror else [m1]
    w = torch.where(copies[0] & copies[-1], col(5), col(4)) if mirror else col(4)
    zero = torch.zeros((), dtype=torch.float32, device=ids.device)
    noisy = torch.stack([torch.where(m, torch.full_like(ids, mask_id), ids) for m in copies])
    weight = torch.stack([torch.where(m, w, zero) for m in copies])
    return noisy, torch.stack(copies), weight
