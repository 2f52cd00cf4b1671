"""What the engines work on: a block of queries, a chunk of data rows, and the engine interface.

An engine computes the result of one :class:`QueryBlock` (a posterior partial, or knn's nearest
rows) from the data, which :class:`~.streaming.DataSource` feeds it one :class:`Chunk` at a time.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, fields
from typing import Optional, Protocol, TypeVar

import torch
from torch import Tensor

from .fp32_gemm import screen_error_factor, screen_operand

__all__ = ["QueryBlock", "Chunk", "ScreenRows", "screen_center", "tile_buffer", "BlockEngine", "RowSource", "gather_rows"]

R = TypeVar("R", covariant=True)


@dataclass
class QueryBlock:
    """Per-query inputs of one block of b queries, float64 on the compute device.

    The logit of data row y for query x is -||x - alpha y||^2 * inv_two_var + bias, minus infinity
    for the row numbered ``exclude`` (-1: none). knn uses x and xsq only (alpha = 1).
    """

    x: Tensor  # (b, D) the queries
    ax: Tensor  # (b, D) alpha x
    xsq: Tensor  # (b,) ||x||^2
    alpha: Tensor  # (b,)
    inv_two_var: Tensor  # (b,) 1 / (2 sigma^2)
    bias: Optional[Tensor] = None  # (b,) added to every logit of the query
    exclude: Optional[Tensor] = None  # (b,) int64 number of the row to drop (-1: none)

    @classmethod
    def of(cls, x: Tensor, sigma: Optional[Tensor] = None, alpha: Optional[Tensor] = None,
           bias: Optional[Tensor] = None, exclude: Optional[Tensor] = None) -> "QueryBlock":
        """The block of float64 queries ``x`` (b, D) with per-query (b,) sigma (default 1) and alpha (default 1)."""
        ones = torch.ones_like(x[:, 0])
        alpha = ones if alpha is None else alpha
        sigma = ones if sigma is None else sigma
        return cls(x=x, ax=x * alpha[:, None], xsq=x.square().sum(dim=1), alpha=alpha, inv_two_var=0.5 / sigma.square(),
                   bias=bias, exclude=exclude)

    @property
    def size(self) -> int:
        return self.x.shape[0]

    def select(self, rows) -> "QueryBlock":
        """The block of the queries ``rows`` (a slice or an index tensor)."""
        return QueryBlock(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[rows]
                             for f in fields(self)})


def gather_rows(y: Tensor, index: Tensor, device: torch.device, shift: Optional[Tensor] = None,
                scale: float = 1.0) -> Tensor:
    """(y[index] - shift) / scale in float64 on ``device`` (y may live elsewhere, e.g. in host memory)."""
    if y.device != index.device:
        rows = y[index.to(y.device)].to(device=device, dtype=torch.float64)
    else:
        rows = y[index].to(torch.float64)
    if shift is not None:
        rows.sub_(shift)  # indexing made a copy: safe in place
    return rows if scale == 1.0 else rows.mul_(1.0 / scale)


class RowSource(Protocol):
    """Data rows that can be gathered by number (a :class:`Chunk` or a whole data source)."""

    storage_device: torch.device  # where the rows are stored

    def gather(self, index: Tensor, device: torch.device) -> Tensor: ...


def tile_buffer(buffer: Optional[Tensor], shape: tuple[int, int], like: Tensor) -> tuple[Tensor, Tensor]:
    """(buffer, a contiguous float32 view of ``shape`` into it): the screen's output tile, reused from
    chunk to chunk (a fresh tile of several MiB per chunk costs as much in page faults as a GEMM pass)."""
    need = shape[0] * shape[1]
    if buffer is None or buffer.numel() < need:
        buffer = torch.empty(need, dtype=torch.float32, device=like.device)
    return buffer, buffer[:need].view(shape)


def screen_center(points: Tensor) -> Optional[Tensor]:
    """A float32 point to subtract from queries and data before the screening GEMM, or None.

    Distances do not change under a common shift, but the screen's error bound scales with the norms
    it multiplies: data far from the origin (images in [0, 255]: a mean of ~128 in every pixel) would
    widen it by (offset / spread)^2. The mean of the block's ``points`` (b, D) float64 is used when it
    dominates their spread around it (the subtraction costs one pass over each chunk).
    """
    if points.shape[0] == 0:
        return None
    mean = points.mean(dim=0)
    if float(mean.square().sum()) <= 4.0 * float((points - mean).square().sum(dim=1).mean()):
        return None
    return mean.float()


@dataclass
class ScreenRows:
    """Data rows (float32, possibly less a center) as the screening GEMM reads them: the right operand,
    the float32 squared norms (the bias row of :func:`~.fp32_gemm.screen_distances`), and an upper
    bound on every row's norm."""

    operand: Tensor
    ysq: Tensor
    max_norm: Tensor

    @classmethod
    def of(cls, y32: Tensor) -> "ScreenRows":
        norms = torch.linalg.vector_norm(y32, dim=1)  # one fast pass: norms, not products and sums
        D = y32.shape[1]
        # The float32 norm is within gamma(D) of the truth (squared), less up to D 2^-149 where float32
        # squares underflow (tiny rows); inf or NaN where float32 overflows.
        top = norms.max().double() if norms.numel() else norms.new_zeros((), dtype=torch.float64)
        max_norm = ((top.square() + D * 2.0**-148) * (1.0 + screen_error_factor(D))).sqrt()
        return cls(screen_operand(y32, left=False), norms.square_(), max_norm)


class Chunk:
    """One chunk of data rows on the queries' device, in its stored dtype; the float64 copy (for the
    float64 engine) and the screening views (float32 rows and squared norms) are made on first use."""

    def __init__(self, rows: Tensor, start: int, first_index: int):
        # start: position of the first row in the data; first_index: its number for QueryBlock.exclude.
        self.rows, self.start, self.first_index, self.n = rows, start, first_index, rows.shape[0]
        self.storage_device = rows.device
        self._centred: Optional[tuple[Tensor, "ScreenRows"]] = None

    @functools.cached_property
    def y(self) -> Tensor:
        return self.rows.to(torch.float64)

    @functools.cached_property
    def ysq(self) -> Tensor:  # one reduction pass (a norm) rather than a product and a sum
        return torch.linalg.vector_norm(self.y, dim=1).square_()

    @functools.cached_property
    def y32(self) -> Tensor:
        return self.rows.to(torch.float32)

    @functools.cached_property
    def _screen_uncentred(self) -> "ScreenRows":
        return ScreenRows.of(self.y32)

    def screen_rows(self, center: Optional[Tensor] = None) -> "ScreenRows":
        """The chunk's rows as the screen reads them, less ``center`` (a float32 (D,) vector; None: 0).
        The last center's rows are kept, for the other query blocks that share it."""
        if center is None:
            return self._screen_uncentred
        if self._centred is None or self._centred[0] is not center:
            self._centred = (center, ScreenRows.of(self.y32 - center))
        return self._centred[1]

    @property
    def screen_operand(self) -> Tensor:
        return self._screen_uncentred.operand

    @property
    def ysq32(self) -> Tensor:  # squared norms for the screen only: their rounding is in its error bound
        return self._screen_uncentred.ysq.double()

    @property
    def max_norm(self) -> Tensor:
        return self._screen_uncentred.max_norm

    def gather(self, index: Tensor, device: torch.device) -> Tensor:
        """Rows ``index`` (positions in this chunk) in float64."""
        return gather_rows(self.y, index, device)

    def mask_excluded(self, logits: Tensor, block: QueryBlock, fill: float = float("-inf")) -> None:
        """Set the logit of each query's excluded row to ``fill`` (-inf; +inf for distances) where that row
        is in this chunk (in place)."""
        if block.exclude is None:
            return
        local = block.exclude - self.first_index
        # At most one excluded column per query; queries without one rewrite column 0 unchanged (no host sync).
        hit, col = (local >= 0) & (local < self.n), local.clamp(0, self.n - 1)
        current = logits.gather(1, col[:, None])
        logits.scatter_(1, col[:, None], torch.where(hit[:, None], fill, current))


class BlockEngine(Protocol[R]):
    """The interface of every engine: built for one :class:`QueryBlock` and a
    :class:`~.streaming.DataSource`, given every chunk of that source once (in order) by
    :meth:`~.streaming.DataSource.feed`, then asked for its result."""

    def add(self, chunk: Chunk) -> None: ...

    def result(self) -> R: ...
