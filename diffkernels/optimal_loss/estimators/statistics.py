"""Means and standard errors of per-query values, kept per query block.

Per block the sum and the sum of squared deviations of the per-query values are kept in float64 on
the device (no host sync inside a level; one transfer at its end) and combined exactly (Chan et
al.). :func:`summarise` gives the standard error over queries, or, ``clustered``, over blocks (for
the subset estimators, whose queries of one block share a subset and so have correlated errors).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from .sampling import QUERY_BLOCK

__all__ = ["block_stats", "summarise"]


def block_stats(values: Tensor, sizes: list[int]) -> Tensor:
    """(3, blocks): count, sum and sum of squared deviations from the block mean of consecutive blocks
    of ``values`` with the given sizes (all QUERY_BLOCK but maybe the last). Float64, no host sync,
    and plain row reductions rather than atomics (index_add_), so CUDA results are bit-reproducible."""
    k = len(sizes)
    padded = values.new_zeros(k * QUERY_BLOCK)
    padded[:values.numel()] = values
    padded = padded.view(k, QUERY_BLOCK)
    count = torch.tensor(sizes, dtype=torch.float64).to(values.device)
    inside = (torch.arange(QUERY_BLOCK, device=values.device)[None, :] < count[:, None]).to(torch.float64)
    total = padded.sum(dim=1)
    m2 = ((padded - (total / count)[:, None]).square() * inside).sum(dim=1)
    return torch.stack([count, total, m2])


def summarise(count: np.ndarray, total: np.ndarray, m2: np.ndarray, clustered: bool) -> tuple[float, float]:
    """Mean and standard error from per-block statistics (Chan et al.'s exact combination)."""
    keep = count > 0
    count, total, m2 = count[keep], total[keep], m2[keep]
    M = count.sum()
    mean = total.sum() / M
    block_mean = total / count
    if clustered and len(count) >= 2:
        G = len(count)
        se = math.sqrt(G / (G - 1) * float(np.sum((count * (block_mean - mean)) ** 2))) / M
    elif M >= 2:
        m2_all = m2.sum() + float(np.sum(count * (block_mean - mean) ** 2))
        se = math.sqrt(m2_all / (M - 1) / M)
    else:
        se = float("nan")
    return float(mean), float(se)
