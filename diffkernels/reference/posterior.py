"""Brute-force float64 oracles of the optimal denoiser and of k-nearest neighbours (small data only).

Independent of the streaming implementation: squared distances by direct differences (no expanded
form), one softmax over the whole (M, N) matrix, the variance as sum_n w_n ||y_n - D||^2 (two-pass).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def _as_column(v, M: int) -> Tensor:
    return torch.as_tensor(v, dtype=torch.float64).reshape(-1).expand(M).reshape(M, 1)


def sq_distances(queries: Tensor, data: Tensor, alpha=1.0) -> Tensor:
    """(M, N) ||x_m - alpha_m y_n||^2 by direct differences, float64 (M * N * D memory)."""
    x = queries.double().cpu()
    a = _as_column(alpha.cpu() if isinstance(alpha, Tensor) else alpha, x.shape[0])
    y = data.double().cpu()
    return (x[:, None, :] - a[:, :, None] * y[None, :, :]).square().sum(dim=2)


def posterior_stats(queries: Tensor, data: Tensor, sigma, *, alpha=1.0, exclude_index: Optional[Tensor] = None,
                    logit_bias=None):
    """(mean (M, D), logsumexp (M,), variance (M,)), float64 on the CPU."""
    M = queries.shape[0]
    s = _as_column(sigma.cpu() if isinstance(sigma, Tensor) else sigma, M)
    logits = -sq_distances(queries, data, alpha) / (2.0 * s.square())
    if logit_bias is not None:
        logits = logits + _as_column(logit_bias.cpu() if isinstance(logit_bias, Tensor) else logit_bias, M)
    if exclude_index is not None:
        logits[torch.arange(M), exclude_index.cpu()] = float("-inf")
    lse = torch.logsumexp(logits, dim=1)
    w = (logits - lse[:, None]).exp()
    y = data.double().cpu()
    mean = w @ y
    variance = (w * (y[None, :, :] - mean[:, None, :]).square().sum(dim=2)).sum(dim=1)
    return mean, lse, variance


def knn(queries: Tensor, data: Tensor, k: int):
    """(squared distances (M, k) ascending, indices (M, k)), float64 on the CPU."""
    d = sq_distances(queries, data)
    return torch.topk(d, k, dim=1, largest=False, sorted=True)
