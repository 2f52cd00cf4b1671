"""Exact k nearest data rows of each query, with two engines of the same shape as the posterior's.

``KnnFloat64Engine``: squared distances by one float64 GEMM per chunk (expanded form), a running
top-k. ``KnnScreenEngine`` (``precision="auto"``): phase 1 keeps each query's k + KNN_EXTRA + 1
best rows by the fp32-accurate screening GEMM over all chunks; phase 2 recomputes the k + KNN_EXTRA
best by direct differences in float64 and proves that no other row can be nearer than the k-th (the
best screened distance outside them, less its error bound, is still no smaller); unproven queries
are recomputed by the float64 engine over all the data.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .blocks import Chunk, QueryBlock, tile_buffer
from .fp32_gemm import screen_distances, screen_operand, screen_sq_error
from .streaming import DataSource, merge_best, slab_elements

__all__ = ["KnnFloat64Engine", "KnnScreenEngine", "knn_chunk", "KNN_EXTRA"]

KNN_EXTRA = 8  # candidates beyond k per query that the knn screen recomputes exactly


def knn_chunk(block: QueryBlock, ch: Chunk, k: int) -> tuple[Tensor, Tensor]:
    """The float64 engine's k nearest rows of one chunk (unsorted, local indices), by the expanded form."""
    d = torch.addmm(ch.ysq[None, :], block.x, ch.y.T, alpha=-2.0).add_(block.xsq[:, None]).clamp_min_(0.0)
    return torch.topk(d, min(k, ch.n), dim=1, largest=False, sorted=False)


def gathered_sq_distances(x: Tensor, source: DataSource, index: Tensor) -> Tensor:
    """||x_b - y[index[b, j]]||^2 (b, j) in float64 by direct differences, in tile-sized slabs."""
    b, k = index.shape
    per = max(1, slab_elements(x.device) // max(1, k * x.shape[1]))
    out = []
    for a in range(0, b, per):
        diff = source.gather(index[a:a + per], x.device).sub_(x[a:a + per, None, :])
        out.append(torch.linalg.vecdot(diff, diff))
    return torch.cat(out)


class KnnFloat64Engine:
    """The k nearest rows of one query block: (squared distances (b, k) ascending, row numbers (b, k))."""

    def __init__(self, block: QueryBlock, source: DataSource, k: int):
        self.block, self.k = block, k
        self.best_d = block.x.new_empty(block.size, 0)
        self.best_i = torch.zeros_like(block.x, dtype=torch.int64)[:, :0]

    def add(self, ch: Chunk) -> None:
        d, i = knn_chunk(self.block, ch, self.k)
        self.best_d, self.best_i = merge_best(self.best_d, self.best_i, d, i + ch.start, self.k, largest=False)

    def result(self) -> tuple[Tensor, Tensor]:
        return self.best_d, self.best_i


class KnnScreenEngine:
    """Screen and refine for knn (module docstring); the same result as :class:`KnnFloat64Engine`.
    ``center``: a float32 point subtracted from queries and data before the screen (:func:`screen_center`
    of all the queries, shared by every block so that each chunk is centred once)."""

    chunk_outer = True  # DataSource.feed: each chunk to every block in turn

    def __init__(self, block: QueryBlock, source: DataSource, k: int, center: Optional[Tensor] = None):
        self.block, self.source, self.k = block, source, k
        self.candidates = k + KNN_EXTRA
        self.center = center
        self.tile: Optional[Tensor] = None
        x = block.x if self.center is None else block.x - self.center.double()
        self.operand = screen_operand(x.float(), left=True)
        self.x_norm = torch.linalg.vector_norm(x, dim=1)
        self.xsq = self.x_norm.square()
        self.best_d = block.x.new_empty(block.size, 0)
        self.best_i = torch.zeros_like(block.x, dtype=torch.int64)[:, :0]
        self.error = torch.zeros_like(block.xsq)

    def add(self, ch: Chunk) -> None:
        """Phase 1: each query's best screened rows over all chunks, and the screen's error bound e (b,)."""
        keep = self.candidates + 1
        # Ranked in float32 on ||y||^2 - 2 x.y (the fused GEMM's output, no other pass over the tile);
        # only the kept candidates get ||x||^2 added, in float64.
        rows = ch.screen_rows(self.center)
        self.tile, out = tile_buffer(self.tile, (self.block.size, ch.n), self.operand)
        approx = screen_distances(rows.ysq, self.operand, rows.operand, out=out)
        d, i = torch.topk(approx, min(keep, ch.n), dim=1, largest=False, sorted=False)
        d = d.double().add_(self.xsq[:, None])
        self.error = torch.maximum(self.error, screen_sq_error(ch.rows.shape[1], self.x_norm, 1.0, rows.max_norm))
        self.best_d, self.best_i = merge_best(self.best_d, self.best_i, d, i + ch.start, keep, largest=False)

    def result(self) -> tuple[Tensor, Tensor]:
        """Phase 2: exact distances of the candidates; a query is proven when the best screened distance
        outside its k + KNN_EXTRA candidates, less e, is still >= its exact k-th distance."""
        screened, rows = self.best_d, self.best_i
        top = min(self.candidates, rows.shape[1])
        exact = gathered_sq_distances(self.block.x, self.source, rows[:, :top])
        d, pos = torch.topk(exact, self.k, dim=1, largest=False, sorted=True)
        i = rows.gather(1, pos)
        if rows.shape[1] <= self.candidates:
            ok = torch.ones_like(d[:, 0], dtype=torch.bool)
        else:
            ok = screened[:, self.candidates] - self.error >= d[:, -1]
        unproven = ~ok
        if int(unproven.sum()):  # one host sync per block
            index = unproven.nonzero().squeeze(1)
            exact_engine = KnnFloat64Engine(self.block.select(index), self.source, self.k)
            self.source.feed([exact_engine])
            sub_d, sub_i = exact_engine.result()
            d, i = d.index_copy(0, index, sub_d), i.index_copy(0, index, sub_i)
        return d, i
