"""The random draws of the estimators: each query block's source rows, subset and noise.

Block b of noise level k draws its source rows (and, for the subset estimators, its subset of L
rows, shared by the block's queries) from a CPU generator seeded with
``fold_seed(seed, INDEX_STREAM, k, b)``, and its noise from a generator on the compute device seeded
with ``fold_seed(seed, NOISE_STREAM, k, b)``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ...rng import fold_seed

__all__ = ["QUERY_BLOCK", "INDEX_STREAM", "NOISE_STREAM", "sample_subset", "block_draws"]

QUERY_BLOCK = 64  # queries per RNG block (and per subset for the subset estimators)

# Stream tags folded into the seed so that index and noise draws never share a stream.
INDEX_STREAM = 0x4A53_4958  # "JSIX": source rows and subsets (CPU generator)
NOISE_STREAM = 0x4A53_4E5A  # "JSNZ": the noise eps (generator on the compute device)


def sample_subset(N: int, L: int, gen: torch.Generator) -> Tensor:
    """A uniform random L-subset of range(N), sorted (CPU int64), in O(L) work when L << N.

    The distinct values of i.i.d. uniform draws form a uniform random set given its size, so
    topping up with fresh draws and keeping a random L of them is exactly uniform.
    """
    if 4 * L >= N:
        return torch.randperm(N, generator=gen)[:L].sort().values
    idx = torch.empty(0, dtype=torch.int64)
    while idx.numel() < L:
        extra = torch.randint(N, (L - idx.numel() + 16,), generator=gen)
        idx = torch.unique(torch.cat([idx, extra]))
    keep = torch.randperm(idx.numel(), generator=gen)[:L]
    return idx[keep].sort().values


def block_draws(seed: int, level: int, block: int, size: int, N: int, D: int, L: Optional[int], device):
    """(source rows (size,), subset or None, eps (size, D) float64 on device) of one query block."""
    gen = torch.Generator().manual_seed(fold_seed(seed, INDEX_STREAM, level, block))
    source = torch.randint(N, (size,), generator=gen)
    subset = None if L is None else sample_subset(N, L, gen)
    noise_gen = torch.Generator(device=device).manual_seed(fold_seed(seed, NOISE_STREAM, level, block))
    eps = torch.randn(size, D, generator=noise_gen, device=device, dtype=torch.float64)
    return source, subset, eps
