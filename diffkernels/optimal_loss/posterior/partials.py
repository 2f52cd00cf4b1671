"""Mergeable softmax statistics: :class:`PosteriorPartial`, :func:`merge_partials` and the
normalised :class:`PosteriorStats`.

A partial holds, per query, sums over some data rows relative to a reference point inside the
posterior mass (a data row), so small variances of near-duplicate rows are differences of small
numbers, never of two large ones; partials over disjoint rows merge exactly in any order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

__all__ = ["PosteriorPartial", "PosteriorStats", "merge_partials", "empty_partial", "cat_partials",
           "patch_partial", "unscale_partial"]


@dataclass
class PosteriorPartial:
    """Unnormalised softmax statistics of a set of queries over some of the data rows.

    All float64. Per query m (M rows), relative to a reference point ``center[m]`` (a data row):
    ``log_max`` the largest logit seen (``-inf`` if no row was seen), ``sum_w`` = sum_n e^(logit - log_max),
    ``sum_wy`` = sum_n e^(...) (y_n - center), ``sum_wyy`` = sum_n e^(...) ||y_n - center||^2.
    Partials over disjoint sets of rows merge exactly (:func:`merge_partials`) whatever their centers,
    so tiles, chunks, files and ranks can be combined in any order.

    Examples:
        >>> import torch
        >>> from diffkernels.optimal_loss import PosteriorPartial, posterior_partial
        >>> part = posterior_partial(torch.zeros(1, 2), torch.tensor([[1.0, 0.0], [-1.0, 0.0]]), 1.0)
        >>> isinstance(part, PosteriorPartial), part.sum_w  # two rows at equal distance: weights 1 + 1
        (True, tensor([2.], dtype=torch.float64))
        >>> part.finalize().mean
        tensor([[0., 0.]], dtype=torch.float64)
    """

    center: Tensor
    log_max: Tensor
    sum_w: Tensor
    sum_wy: Tensor
    sum_wyy: Tensor

    def merge(self, other: "PosteriorPartial") -> "PosteriorPartial":
        return merge_partials(self, other)

    def finalize(self) -> "PosteriorStats":
        """Normalise: the posterior mean, log-sum-exp of the logits and posterior variance (all float64)."""
        total = self.sum_w
        offset = self.sum_wy / total[:, None]  # D(x) - center
        variance = (self.sum_wyy / total - offset.square().sum(dim=1)).clamp_min(0.0)
        return PosteriorStats(mean=self.center + offset, logsumexp=self.log_max + total.log(), variance=variance)

    def to_tuple(self) -> tuple[Tensor, ...]:
        return self.center, self.log_max, self.sum_w, self.sum_wy, self.sum_wyy


@dataclass
class PosteriorStats:
    """mean (M, D): E[x0 | x]; logsumexp (M,): log sum_n e^logit_n; variance (M,): tr Cov[x0 | x].

    Examples:
        >>> import torch
        >>> from diffkernels.optimal_loss import posterior_partial
        >>> stats = posterior_partial(torch.zeros(1, 1), torch.tensor([[-1.0], [1.0]]), 1.0).finalize()
        >>> stats.mean, stats.variance  # halfway between the rows: mean 0, variance 1
        (tensor([[0.]], dtype=torch.float64), tensor([1.], dtype=torch.float64))
    """

    mean: Tensor
    logsumexp: Tensor
    variance: Tensor


def _shift(p: PosteriorPartial, new_center: Tensor) -> tuple[Tensor, Tensor]:
    """(sum_wy, sum_wyy) of ``p`` relative to ``new_center`` instead of ``p.center`` (exact identity)."""
    delta = p.center - new_center
    sum_wy = p.sum_wy + p.sum_w[:, None] * delta
    sum_wyy = p.sum_wyy + 2.0 * (p.sum_wy * delta).sum(dim=1) + p.sum_w * delta.square().sum(dim=1)
    return sum_wy, sum_wyy


def merge_partials(*parts: PosteriorPartial) -> PosteriorPartial:
    """Combine partials over disjoint data rows into one, exactly (up to float64 rounding).

    The merged center is, per query, the center of the partial with the largest logit: the one
    closest to the posterior mass, so that the shifted sums stay small.

    Examples:
        >>> import torch
        >>> from diffkernels.optimal_loss import empty_partial, merge_partials, posterior_partial
        >>> data, x = torch.randn(8, 2, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)
        >>> a, b = posterior_partial(x, data[:5], 1.0), posterior_partial(x, data[5:], 1.0, index_offset=5)
        >>> whole = posterior_partial(x, data, 1.0).finalize()
        >>> bool(torch.allclose(merge_partials(b, a).finalize().mean, whole.mean))  # any order
        True
        >>> bool(torch.allclose(merge_partials(a, b, empty_partial(3, 2, "cpu")).finalize().mean, whole.mean))
        True
    """
    if not parts:
        raise ValueError("merge_partials needs at least one partial")
    out = parts[0]
    for p in parts[1:]:
        a_wins = out.log_max >= p.log_max
        log_max = torch.maximum(out.log_max, p.log_max)
        center = torch.where(a_wins[:, None], out.center, p.center)
        total_w = torch.zeros_like(out.sum_w)
        total_wy = torch.zeros_like(out.sum_wy)
        total_wyy = torch.zeros_like(out.sum_wyy)
        for q in (out, p):
            # e^(q.log_max - log_max); 0 for a partial that saw no rows (both -inf gives NaN otherwise).
            scale = torch.where(q.log_max == float("-inf"), 0.0, (q.log_max - log_max).exp())
            wy, wyy = _shift(q, center)
            total_w = total_w + scale * q.sum_w
            total_wy = total_wy + scale[:, None] * wy
            total_wyy = total_wyy + scale * wyy
        out = PosteriorPartial(center, log_max, total_w, total_wy, total_wyy)
    return out


def empty_partial(M: int, D: int, device) -> PosteriorPartial:
    """The partial of no rows: merging it changes nothing.

    Examples:
        >>> from diffkernels.optimal_loss import empty_partial
        >>> p = empty_partial(3, 2, "cpu")  # 3 queries, 2 dims, no rows yet
        >>> p.log_max
        tensor([-inf, -inf, -inf], dtype=torch.float64)
    """
    f64 = dict(dtype=torch.float64, device=device)
    return PosteriorPartial(torch.zeros(M, D, **f64), torch.full((M,), float("-inf"), **f64),
                            torch.zeros(M, **f64), torch.zeros(M, D, **f64), torch.zeros(M, **f64))


def cat_partials(parts: Sequence[PosteriorPartial]) -> PosteriorPartial:
    """The partials of consecutive query blocks as one partial of all their queries."""
    if len(parts) == 1:
        return parts[0]
    return PosteriorPartial(*(torch.cat(fields) for fields in zip(*(p.to_tuple() for p in parts))))


def patch_partial(part: PosteriorPartial, index: Tensor, patch: PosteriorPartial) -> PosteriorPartial:
    """``part`` with the queries ``index`` replaced by the rows of ``patch``."""
    return PosteriorPartial(*(full.index_copy(0, index, new) for full, new in zip(part.to_tuple(), patch.to_tuple())))


def unscale_partial(part: PosteriorPartial, scale: float) -> PosteriorPartial:
    """The partial of the data times ``scale`` from that of the data (the logits are unchanged when
    queries, data and sigma are all scaled alike); exact for a power of two short of overflow."""
    return PosteriorPartial(part.center * scale, part.log_max, part.sum_w, part.sum_wy * scale,
                            part.sum_wyy * (scale * scale))
