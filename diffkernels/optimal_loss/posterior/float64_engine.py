"""The float64 engine: every product in float64, two GEMMs per data chunk (logits and sums).

Also home of :func:`exact_rows_partial`, the exact partial of a few rows per query by direct
differences, which the screen-and-refine engine uses for its refine phase.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .blocks import Chunk, QueryBlock, RowSource
from .partials import PosteriorPartial, empty_partial, merge_partials
from .streaming import DataSource, slab_elements

__all__ = ["Float64Engine", "chunk_partial", "exact_rows_partial", "EXACT_HEAD"]

# Rows per query and chunk computed by direct differences (the largest weights).
EXACT_HEAD = 4


def exact_rows_partial(block: QueryBlock, rows: RowSource, index: Tensor, valid: Tensor) -> PosteriorPartial:
    """The partial of a few rows per query: ``index`` (b, k) row positions in ``rows``, ``valid`` (b, k).

    Distances relative to a row c near the posterior mass: with offsets o = y - c and x - alpha c both
    direct differences, ||x - alpha y||^2 = ||x - alpha c||^2 + alpha^2 ||o||^2 - 2 alpha <x - alpha c, o>
    rounds at ~1e-16 of those small norms, not of ||x||^2. c starts as the first row of ``index`` (the
    screen's best guess) and is then moved to the row of largest exact logit, so the variance sums are
    taken from the heaviest row (a guess that is off by a near-duplicate would cancel them away).
    """
    x, alpha, inv_two_var, bias = block.x, block.alpha, block.inv_two_var, block.bias
    b, k = index.shape
    D = x.shape[1]
    per = max(1, slab_elements(x.device) // max(1, k * D))  # queries per gathered (per, k, D) slab
    fields = []
    for a in range(0, b, per):
        r = slice(a, a + per)
        idx, a_r = index[r], alpha[r, None]

        gathered = rows.gather(idx, x.device)  # (per, k, D): each row gathered once
        center = gathered[:, 0]
        offsets = gathered - center[:, None, :]

        def exact_logits(center, offsets):
            from_center = x[r] - a_r * center
            off_sq = torch.linalg.vecdot(offsets, offsets)
            cross = torch.bmm(offsets, from_center[:, :, None]).squeeze(2).mul_(2.0 * a_r)
            dist = (from_center.square().sum(dim=1)[:, None] + a_r.square() * off_sq).sub_(cross)
            logits = dist.clamp_min_(0.0).mul_(-inv_two_var[r, None])
            if bias is not None:
                logits.add_(bias[r, None])
            return logits.masked_fill_(~valid[r], float("-inf")), off_sq

        logits, off_sq = exact_logits(center, offsets)
        log_max, best = logits.max(dim=1)
        if bool((best != 0).any()):  # usually the first guess is the heaviest row: nothing to redo
            center = gathered[torch.arange(best.shape[0], device=best.device), best]
            torch.sub(gathered, center[:, None, :], out=offsets)
            off_sq = torch.linalg.vecdot(offsets, offsets)
        seen = log_max > float("-inf")
        w = logits.sub_(torch.where(seen, log_max, 0.0)[:, None]).exp_()
        sum_wy = torch.bmm(w[:, None, :], offsets).squeeze(1)
        fields.append((center, log_max, w.sum(dim=1), sum_wy, (w * off_sq).sum(dim=1)))
    return PosteriorPartial(*(torch.cat(f) for f in zip(*fields)))


def chunk_partial(block: QueryBlock, ch: Chunk, tile: Optional[Tensor] = None,
                  uniform: Optional[tuple[float, float]] = None) -> PosteriorPartial:
    """One data chunk y (n, D) by the float64 engine: logits by one GEMM, (alpha x) y^T; the EXACT_HEAD
    best rows per query recomputed by direct differences; the other rows' sums by a second GEMM, w y.

    The head carries the posterior's largest weights, so small variances (near-duplicate rows) and
    the log-sum-exp come from exact differences; the expanded form's rounding (~1e-16 (||x||^2 +
    a^2 ||y||^2) in the distances, ~1e-16 ||c||^2 per unit weight in the sums) only touches the tail.

    ``tile``: an optional (b, n) float64 buffer for the logits. ``uniform``: (alpha^2, 1 / (2 sigma^2))
    when every query of the block has the same alpha and sigma. The tile is then one addmm,
    g = (alpha x.y - alpha^2 ||y||^2 / 2) / sigma^2, which differs from the logits by a constant per
    query: ranked as it is and exponentiated against its own row maximum in one pass each, with the
    constant applied to the (b,) sums afterwards (no other pass over the tile, no (b, n) temporaries).
    """
    y, ysq = ch.y, ch.ysq
    if uniform is not None:
        return _uniform_chunk_partial(block, ch, tile, *uniform)
    dist = torch.addmm(block.xsq[:, None] + block.alpha.square()[:, None] * ysq[None, :], block.ax, y.T, alpha=-2.0)
    logits = dist.clamp_min_(0.0).mul_(-block.inv_two_var[:, None])
    if block.bias is not None:
        logits.add_(block.bias[:, None])
    ch.mask_excluded(logits, block)
    head_logits, head = logits.topk(min(EXACT_HEAD, y.shape[0]), dim=1)
    part = exact_rows_partial(block, ch, head, head_logits > float("-inf"))
    if head.shape[1] == y.shape[0]:
        return part
    seen = part.log_max > float("-inf")
    w = logits.sub_(torch.where(seen, part.log_max, 0.0)[:, None]).exp_()  # the tile is reused as the weights
    w.scatter_(1, head, 0.0)
    return _add_tail(part, w, ch, torch.ones_like(part.sum_w))


def _add_tail(part: PosteriorPartial, w: Tensor, ch: Chunk, factor: Tensor) -> PosteriorPartial:
    """``part`` (the head) plus the tail rows of weights factor * w (b, n), relative to the head's center."""
    y, ysq, center = ch.y, ch.ysq, part.center
    tail_w = w.sum(dim=1).mul_(factor)
    wy = (w @ y).mul_(factor[:, None])
    # Tail sums relative to the head's center: sum w ||y - c||^2 = sum w ||y||^2 - 2 <c, sum w y> + ||c||^2 sum w.
    tail_wyy = ((w @ ysq).mul_(factor) - 2.0 * (center * wy).sum(dim=1) + tail_w * center.square().sum(dim=1))
    return PosteriorPartial(center, part.log_max, part.sum_w + tail_w, part.sum_wy + wy - tail_w[:, None] * center,
                            part.sum_wyy + tail_wyy.clamp_min(0.0))


def _uniform_chunk_partial(block: QueryBlock, ch: Chunk, tile: Optional[Tensor], alpha_sq: float,
                           inv_two_var: float) -> PosteriorPartial:
    """:func:`chunk_partial` for one alpha and sigma: logit = g - inv_two_var ||x||^2 + bias, with g by one addmm."""
    y, ysq = ch.y, ch.ysq
    g = torch.addmm(ysq[None, :] * (-alpha_sq * inv_two_var), block.ax, y.T, alpha=2.0 * inv_two_var, out=tile)
    ch.mask_excluded(g, block)
    head_g, head = g.topk(min(EXACT_HEAD, y.shape[0]), dim=1)
    part = exact_rows_partial(block, ch, head, head_g > float("-inf"))
    if head.shape[1] == y.shape[0]:
        return part
    g_max = head_g[:, 0]
    shift = torch.where(g_max > float("-inf"), g_max, 0.0)
    w = g.sub_(shift[:, None]).exp_()  # e^(logit - max screened logit), <= 1 up to rounding
    w.scatter_(1, head, 0.0)
    # e^(max screened logit - exact log_max): close to 1 (0 where the head saw no row: no tail either).
    rest = -inv_two_var * block.xsq + (0.0 if block.bias is None else block.bias)
    seen = (part.log_max > float("-inf")) & (g_max > float("-inf"))
    factor = torch.where(seen, (shift + rest - torch.where(seen, part.log_max, 0.0)).exp(), 0.0)
    return _add_tail(part, w, ch, factor)


class Float64Engine:
    """The partial of one query block over all chunks: :func:`chunk_partial` per chunk, merged."""

    def __init__(self, block: QueryBlock, source: Optional[DataSource] = None):
        self.block = block
        self.out: Optional[PosteriorPartial] = None
        a, v = block.alpha, block.inv_two_var
        # One alpha and sigma for the whole block (the usual scalars): one host sync, then no (b, n) temporaries.
        same = a.numel() and bool(((a == a[0]) & (v == v[0])).all())
        self.uniform = (float(a[0]) ** 2, float(v[0])) if same else None
        self.xsq_max = float(block.xsq.max()) if same else 0.0
        self.tile: Optional[Tensor] = None

    def add(self, chunk: Chunk) -> None:
        tile = None
        if self.uniform is not None:
            need = self.block.size * chunk.n
            if self.tile is None or self.tile.numel() < need:
                self.tile = self.block.x.new_empty(need)
            tile = self.tile[:need].view(self.block.size, chunk.n)
        uniform = self.uniform
        if uniform is not None:  # |g| <= inv_two_var (||x||^2 + 2 alpha^2 ||y||^2): must stay far from overflow
            alpha_sq, inv = uniform
            if not inv * (self.xsq_max + 2.0 * alpha_sq * float(chunk.ysq.max())) < 2.0**1000:
                uniform = None
        part = chunk_partial(self.block, chunk, tile if uniform is not None else None, uniform)
        self.out = part if self.out is None else merge_partials(self.out, part)

    def result(self) -> PosteriorPartial:
        if self.out is None:  # no data rows
            return empty_partial(self.block.size, self.block.x.shape[1], self.block.x.device)
        return self.out
