"""The screen-and-refine engine (``precision="auto"``): one fp32-accurate GEMM per chunk instead of
two float64 ones, and a proof per query that what it drops is negligible.

Phase 1, screen (every chunk): the fp32-accurate GEMM (:mod:`.fp32_gemm`) gives every logit to
within a bound E that follows from the GEMM's rounding; each query keeps its SCREEN_TOP + 1 best
screened rows over all chunks. Phase 2, refine (once per query block, after the last chunk): the
SCREEN_TOP best rows of each query are recomputed exactly, in float64 by direct differences
(:func:`~.float64_engine.exact_rows_partial`); the query is proven when every other row is below the
best by more than NEGLIGIBLE_NATS (e^-40 each) also after the error bound, and the rows dropped that
way cannot move the variance. Unproven queries (a posterior spread over more than SCREEN_TOP rows,
i.e. larger sigma, or norms outside the screen's float32 range) are recomputed by the float64
engine over all the data. A block judges the screen by its first chunk; if too many of its queries
fail the proof there, the whole block uses the float64 engine from that chunk on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .blocks import Chunk, QueryBlock, tile_buffer
from .float64_engine import Float64Engine, exact_rows_partial
from .fp32_gemm import screen_distances, screen_operand, screen_sq_error
from .partials import PosteriorPartial, empty_partial, patch_partial
from .streaming import DataSource, merge_best

__all__ = ["ScreenEngine", "screen_chunk", "proven", "SCREEN_TOP", "NEGLIGIBLE_NATS", "PROBE_MIN_QUERIES",
           "MAX_FALLBACK_FRACTION"]

# Rows per query recomputed exactly, and the margin below the best logit beyond which a row is
# dropped (e^-40 = 4e-18 of the best row's weight).
SCREEN_TOP = 16
NEGLIGIBLE_NATS = 40.0
# A block of at least this many queries judges the screen by its first chunk: if too many of its
# queries fail the proof there (a spread posterior at this sigma), the block uses the float64 engine
# from that chunk on.
PROBE_MIN_QUERIES = 8
# Screening a chunk costs ~1/4 (GPU) to ~1/3 (CPU) of the float64 engine, plus top-k and gathers;
# past this fraction of fallen-back queries it no longer pays, and the block switches to float64.
MAX_FALLBACK_FRACTION = 0.15


@dataclass
class ScreenQueries:
    """A query block as the screen reads it. The logit of row y is -alpha^2 ||u - (y - c)||^2 / (2 sigma^2)
    with u = x / alpha - c (c: the screen's center, or 0), so ranking each query's rows needs only
    ||y - c||^2 - 2 u.(y - c): one fused float32 GEMM, no other pass over the tile."""

    operand: Tensor  # u as a screen operand
    u_norm: Tensor  # (b,) ||u||
    usq: Tensor  # (b,) ||u||^2
    center: Optional[Tensor]

    @classmethod
    def of(cls, block: QueryBlock, center: Optional[Tensor]) -> "ScreenQueries":
        u = block.x / block.alpha[:, None]
        if center is not None:
            u = u - center.double()
        norm = torch.linalg.vector_norm(u, dim=1)
        return cls(screen_operand(u.float(), left=True), norm, norm.square(), center)

    def select(self, rows: slice) -> "ScreenQueries":
        return ScreenQueries(self.operand[rows], self.u_norm[rows], self.usq[rows], self.center)


def screen_chunk(block: QueryBlock, q: ScreenQueries, ch: Chunk, tile: Optional[Tensor] = None
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """Screened logits of one chunk: each query's SCREEN_TOP + 1 best (values (b, <= 17), descending;
    their row positions in the data) and the bound E (b,) on every screened logit's error.

    The screened ||u - (y - c)||^2 takes u.(y - c) from one fp32-accurate GEMM and ||y - c||^2 in
    float32, so each logit is within E = alpha^2 gamma(D) (2 ||u|| + M) M / (2 sigma^2) of the truth,
    M = max ||y - c|| (the bias shifts every row of a query alike and is left out). ``tile``: an
    optional (b, n) float32 buffer for the GEMM's output.
    """
    rows = ch.screen_rows(q.center)
    dist = screen_distances(rows.ysq, q.operand, rows.operand, out=tile)
    ch.mask_excluded(dist, block, float("inf"))
    vals, index = dist.topk(min(SCREEN_TOP + 1, ch.n), dim=1, largest=False)
    scale = block.alpha.square() * block.inv_two_var  # logit = -scale * ||u - (y - c)||^2
    logits = vals.double().add_(q.usq[:, None]).clamp_min_(0.0).mul_(-scale[:, None])
    error = screen_sq_error(ch.rows.shape[1], q.u_norm, 1.0, rows.max_norm) * scale
    return logits, index + ch.start, error


def proven(vals: Tensor, error: Tensor) -> Tensor:
    """Whether the SCREEN_TOP best rows hold each query's whole posterior (up to e^-NEGLIGIBLE_NATS).

    ``vals``: the best screened logits (descending), of all rows seen. If the best beats the
    (SCREEN_TOP + 1)-th by more than 2 E + NEGLIGIBLE_NATS, every row outside the top SCREEN_TOP is
    truly more than NEGLIGIBLE_NATS below the best one.
    """
    if vals.shape[1] <= SCREEN_TOP:  # no other rows (unless the screen was out of its range: inf error)
        return torch.isfinite(error)
    ok = vals[:, SCREEN_TOP] + (2.0 * error + NEGLIGIBLE_NATS) < vals[:, 0]
    # Every row excluded: nothing to add (but not rows whose screened distances overflowed: inf error).
    return ok | ((vals[:, 0] == float("-inf")) & torch.isfinite(error))


class ScreenEngine:
    """Screen and refine for one query block (module docstring); ``source`` is read again, by the
    float64 engine, for the queries the refine cannot prove."""

    chunk_outer = True  # DataSource.feed: each chunk to every block in turn

    def __init__(self, block: QueryBlock, source: DataSource, center: Optional[Tensor] = None):
        self.block, self.source = block, source
        self.screen = ScreenQueries.of(block, center)
        self.tile: Optional[Tensor] = None
        # Phase 1 state: each query's best screened logits and their rows, the largest error bound
        # and the largest row norm seen.
        self.cand_val = block.x.new_empty(block.size, 0)
        self.cand_row = torch.zeros_like(block.x, dtype=torch.int64)[:, :0]
        self.error = torch.zeros_like(block.xsq)
        self.max_norm = block.xsq.new_zeros(())
        self.probed = False
        self.fallback: Optional[Float64Engine] = None  # set when the probe sends the block to float64

    def add(self, ch: Chunk) -> None:
        if self.fallback is not None:
            self.fallback.add(ch)
            return
        self.tile, out = tile_buffer(self.tile, (self.block.size, ch.n), self.screen.operand)
        vals, rows, error = screen_chunk(self.block, self.screen, ch, out)
        if not self.probed:  # the first chunk is the probe: a spread posterior on many queries -> float64
            self.probed = True
            if self.block.size >= PROBE_MIN_QUERIES and \
                    1.0 - float(proven(vals, error).double().mean()) > MAX_FALLBACK_FRACTION:
                self.fallback = Float64Engine(self.block)
                self.fallback.add(ch)
                return
        self.cand_val, self.cand_row = merge_best(self.cand_val, self.cand_row, vals, rows, SCREEN_TOP + 1,
                                                  largest=True)
        self.error = torch.maximum(self.error, error)
        self.max_norm = torch.maximum(self.max_norm, ch.screen_rows(self.screen.center).max_norm)

    def result(self) -> PosteriorPartial:
        if self.fallback is not None:
            return self.fallback.result()
        if self.source.n == 0:
            return empty_partial(self.block.size, self.block.x.shape[1], self.block.x.device)
        return self._refine()

    def _refine(self) -> PosteriorPartial:
        """Phase 2: the exact partial of each query's best rows, and the float64 engine over all the
        data for unproven queries.

        Beyond the margin of :func:`proven`, the dropped rows must also be negligible for the variance:
        each weighs at most e^(v_17 - v_1 + 2E) of the best row and lies within 2 max ||y|| of the mean,
        so N of them move the variance by at most N e^(v_17 - v_1 + 2E) (2 max ||y||)^2, which must stay
        below 1e-6 of the variance of the rows kept (a near-delta posterior whose variance comes from a
        flat tail of rows ~50 nats down is not proven by the margin alone).
        """
        vals, rows = self.cand_val, self.cand_row
        top = min(SCREEN_TOP, vals.shape[1])
        part = exact_rows_partial(self.block, self.source, rows[:, :top], vals[:, :top] > float("-inf"))
        ok = proven(vals, self.error)
        if vals.shape[1] > SCREEN_TOP:
            dropped = self.source.n * (vals[:, SCREEN_TOP] - vals[:, 0] + 2.0 * self.error).exp() \
                * (2.0 * self.max_norm).square()
            kept = part.finalize().variance
            ok &= (dropped <= 1e-6 * kept) | (vals[:, SCREEN_TOP] == float("-inf"))
        unproven = ~ok
        if int(unproven.sum()):  # one host sync per block
            index = unproven.nonzero().squeeze(1)
            exact = Float64Engine(self.block.select(index))
            self.source.feed([exact])
            part = patch_partial(part, index, exact.result())
        return part
