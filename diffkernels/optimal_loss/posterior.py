"""The optimal denoiser E[x0 | x] over a whole dataset, streamed over the data (METHODS.md section 3).

For a query x and data rows y_n the posterior weights are w_n = softmax_n(-||x - alpha y_n||^2 / (2 sigma^2)),
the denoiser is D(x) = sum_n w_n y_n and the posterior variance is tr Cov = sum_n w_n ||y_n - D(x)||^2.

The precision hazard (METHODS.md section 3): logits are ~1/sigma^2 times squared distances, so at
sigma = 2e-3 times the data scale the expanded-form distances ||x||^2 + ||y||^2 - 2 x.y need ~1e-12
relative accuracy; float32, TF32 or bf16 products lose the O(1) logit differences that decide the
softmax. Two engines, both exact to float64 rounding in what they return:

* ``precision="float64"``: every product in float64 (two GEMMs per data chunk: logits and sums).
* ``precision="auto"`` (screen and refine): one fp32-accurate GEMM per chunk (float32 on the CPU,
  three TF32 tensor-core products on CUDA) gives every logit to within a bound E that follows from
  the GEMM's rounding; per query, the SCREEN_TOP best rows are then recomputed exactly, in float64
  by direct differences, and every other row is provably below the maximum by more than
  NEGLIGIBLE_NATS (e^-40 each), so it is dropped. Where that proof fails for a query (the posterior
  is spread over more rows than SCREEN_TOP, i.e. larger sigma), that query falls back to the float64
  engine for the chunk; a query block where most queries fall back stops screening. Queries and data
  with norms beyond float32's safe range (SCREEN_MAX_NORM) fall back too, and the bound covers float32
  underflow, so tiny data is screened soundly. The win is at small and moderate sigma, where the
  posterior sits on a few rows: one GEMM at fp32 speed instead of two at float64 speed.

The data is streamed in chunks converted on the fly, so memory stays O(M * D + M * chunk) and the data
may be float32, bfloat16 or float16, on the device, in host memory or in a memory-mapped file. Each
partial result keeps its sums relative to a per-query reference point inside the posterior mass (the
chunk's nearest data row), so small variances of near-duplicate data are differences of small numbers,
never of two large ones.
"""

from __future__ import annotations

import functools
import math
import numbers
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import Tensor

Scalar = Union[float, Tensor]

# Elements of one (queries x chunk) float64 logit tile: bounds the memory beyond the outputs.
TILE_ELEMENTS_CUDA = 1 << 25  # 256 MiB of float64
TILE_ELEMENTS_CPU = 1 << 22  # 32 MiB: stays near the CPU's caches

PRECISIONS = ("auto", "float64")
# Screen and refine (precision="auto"): rows per query and chunk recomputed exactly, and the margin
# below the best logit beyond which a row is dropped (e^-40 = 4e-18 of the best row's weight).
SCREEN_TOP = 16
NEGLIGIBLE_NATS = 40.0
# The float64 engine's rows per query and chunk computed by direct differences (the largest weights).
EXACT_HEAD = 4
# Tests set this to run the CUDA path's 3xTF32 splitting on the CPU (TF32 rounding emulated).
_SPLIT_TF32_ON_CPU = False


def screen_error_factor(D: int) -> float:
    """gamma(D): |fp32-accurate a.b - a.b| <= gamma(D) ||a|| ||b|| for the screening GEMM.

    Measured worst cases (float32 BLAS and emulated 3xTF32, D = 64..12288, signed and all-positive
    data): 7 and 21 units of 2^-24. The bound is 2^-24 (256 + D), 10-100x above them and above the
    classical worst case of blocked summation; a loose bound only widens the screening margin.
    """
    return 2.0**-24 * (256 + D)


# The screen's float32 range: with every norm <= SCREEN_MAX_NORM, no product, partial sum or squared
# norm of the float32 GEMM comes near float32's overflow (2^128). Beyond it the screen is not used.
SCREEN_MAX_NORM = 2.0**50


def _screen_sq_error(D: int, a_norm: Tensor, alpha_sq: Tensor, max_norm: Tensor) -> Tensor:
    """Bound on the error of screened squared distances ||a||^2 + alpha^2 ||y||^2 - 2 a.y (per query),
    +inf where the operands leave the screen's float32 range (the query then takes the float64 path).

    Relative part: gamma(D) (2 ||a|| + alpha^2 max ||y||) max ||y||. Absolute part: below 2^-126
    float32 rounds to multiples of 2^-149, so each converted element, product, sum and square may be
    off by 2^-150 more; with norms <= 2^50 that adds < D 2^-97 (1 + alpha^2), bounded by D 2^-96 (1 + alpha^2).
    """
    bound = screen_error_factor(D) * (2.0 * a_norm + alpha_sq * max_norm) * max_norm + D * 2.0**-96 * (1.0 + alpha_sq)
    safe = (a_norm <= SCREEN_MAX_NORM) & (max_norm <= SCREEN_MAX_NORM)  # False for inf and NaN too
    return torch.where(safe, bound, float("inf"))


def _round_tf32(x: Tensor) -> Tensor:
    """float32 rounded to the nearest TF32 value (10 mantissa bits), as tensor cores read it."""
    return ((x.view(torch.int32) + 0x1000) & ~0x1FFF).view(torch.float32)


def _screen_operand(x: Tensor, left: bool) -> Tensor:
    """A float32 GEMM operand prepared for :func:`_screen_products` (made once per query block / chunk).

    CPU: x itself (one float32 GEMM). CUDA (3xTF32): x = hi + lo with hi the TF32 rounding of x, laid
    out as [hi, hi, lo] (left) and [hi, lo, hi] (right) so that one TF32 tensor-core GEMM over a 3x
    longer inner dimension gives hi.hi' + hi.lo' + lo.hi' (the dropped lo.lo' is ~2^-22 relative).
    """
    if x.device.type != "cuda" and not _SPLIT_TF32_ON_CPU:
        return x
    hi = _round_tf32(x)
    lo = _round_tf32(x - hi)
    return torch.cat([hi, hi, lo] if left else [hi, lo, hi], dim=1)


def _screen_products(left: Tensor, right: Tensor) -> Tensor:
    """left @ right.T of two screen operands, accurate to float32 rounding (float32 accumulation)."""
    if left.device.type != "cuda":
        return left @ right.T
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        return left @ right.T
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def _fp32_accurate_mm(a: Tensor, b: Tensor) -> Tensor:
    """a @ b.T (float32 in and out) accurate to float32 rounding: float32 GEMM on the CPU, 3xTF32 on CUDA."""
    return _screen_products(_screen_operand(a, left=True), _screen_operand(b, left=False))


@dataclass
class PosteriorPartial:
    """Unnormalised softmax statistics of a set of queries over some of the data rows.

    All float64. Per query m (M rows), relative to a reference point ``center[m]`` (a data row):
    ``log_max`` the largest logit seen (``-inf`` if no row was seen), ``sum_w`` = sum_n e^(logit - log_max),
    ``sum_wy`` = sum_n e^(...) (y_n - center), ``sum_wyy`` = sum_n e^(...) ||y_n - center||^2.
    Partials over disjoint sets of rows merge exactly (:func:`merge_partials`) whatever their centers,
    so tiles, chunks, files and ranks can be combined in any order.
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
        l = self.sum_w
        offset = self.sum_wy / l[:, None]  # D(x) - center
        variance = (self.sum_wyy / l - offset.square().sum(dim=1)).clamp_min(0.0)
        return PosteriorStats(mean=self.center + offset, logsumexp=self.log_max + l.log(), variance=variance)

    def to_tuple(self) -> tuple[Tensor, ...]:
        return self.center, self.log_max, self.sum_w, self.sum_wy, self.sum_wyy


@dataclass
class PosteriorStats:
    """mean (M, D): E[x0 | x]; logsumexp (M,): log sum_n e^logit_n; variance (M,): tr Cov[x0 | x]."""

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
    """The partial of no rows: merging it changes nothing."""
    f64 = dict(dtype=torch.float64, device=device)
    return PosteriorPartial(torch.zeros(M, D, **f64), torch.full((M,), float("-inf"), **f64),
                            torch.zeros(M, **f64), torch.zeros(M, D, **f64), torch.zeros(M, **f64))


# --- argument handling ------------------------------------------------------------------------


def _per_query(value, name: str, M: int, device, positive: bool = True) -> Tensor:
    """A finite scalar or (M,) tensor as a float64 (M,) tensor on ``device``, checked (one host sync
    for a tensor: a non-finite or non-positive value would otherwise give a silent wrong answer)."""
    if isinstance(value, Tensor):
        _check_device(value, name)
        if value.dim() == 0:
            value = value.reshape(1).expand(M)
        if value.shape != (M,):
            raise ValueError(f"{name} must be a scalar or have shape (M,) = ({M},), got {tuple(value.shape)}")
        if not value.dtype.is_floating_point:
            raise TypeError(f"{name} must be floating point, got {value.dtype}")
        out = value.detach().to(device=device, dtype=torch.float64)
        if not bool(torch.isfinite(out).all()):
            raise ValueError(f"{name} must be finite everywhere")
        if positive and not bool((out > 0).all()):
            raise ValueError(f"{name} must be > 0 everywhere")
        return out
    # numbers.Real: Python and numpy scalars; not bool (a flag passed by mistake) nor str.
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float or a tensor, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if positive and not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return torch.full((M,), value, dtype=torch.float64, device=device)


def _check_device(x: Tensor, name: str) -> None:
    if x.device.type == "meta":
        raise ValueError(f"{name} is a meta tensor: meta tensors are not supported (the result depends on the values)")


def _check_chunk_size(chunk_size) -> Optional[int]:
    if chunk_size is None:
        return None
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral):
        raise TypeError(f"chunk_size must be an int or None, got {type(chunk_size).__name__}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return int(chunk_size)


def _check_inputs(queries: Tensor, data: Tensor) -> None:
    for x, name, shape in ((queries, "queries", "(M, D)"), (data, "data", "(N, D)")):
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        _check_device(x, name)
        if not x.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
        if x.dim() != 2:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(x.shape)}")
    if queries.shape[1] != data.shape[1]:
        raise ValueError(f"queries and data must have the same number of columns D, got {queries.shape[1]} and {data.shape[1]}")
    if queries.shape[1] == 0:
        raise ValueError("queries and data have no columns (D = 0)")


def default_block_sizes(M: int, device: torch.device) -> tuple[int, int]:
    """(queries per block, data rows per chunk): a block x chunk float64 tile of TILE_ELEMENTS.

    Blocks of a few thousand queries keep the chunks long (thousands of rows), so the per-chunk merge
    (a few passes over block x D) stays a small fraction of the two GEMMs (4 block x chunk x D flops).
    """
    if device.type == "cuda":
        tile, block = TILE_ELEMENTS_CUDA, 4096
    else:
        tile, block = TILE_ELEMENTS_CPU, 512
    block = max(1, min(M, block))
    return block, max(256, tile // block)


# --- the streaming kernel ---------------------------------------------------------------------


def _check_precision(precision: Optional[str], device: torch.device) -> str:
    """The engine: ``None`` means "auto" on the CPU and "float64" on CUDA (see below)."""
    if precision is None:
        # The 3xTF32 screening is implemented for CUDA but not yet verified on a GPU: until the GPU
        # pass has run its accuracy tests there, CUDA keeps the float64 engine unless asked.
        return "auto" if device.type == "cpu" else "float64"
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS} or None, got {precision!r}")
    return precision


class _Chunk:
    """One chunk of data rows on the queries' device, in its stored dtype; the float64 copy (for the
    float64 engine) and the screening views (float32 rows and squared norms) are made on first use."""

    def __init__(self, rows: Tensor, start: int, first_index: int):
        # start: position of the first row in ``data``; first_index: its number for exclude_index.
        self.rows, self.start, self.first_index, self.n = rows, start, first_index, rows.shape[0]

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
    def screen_operand(self) -> Tensor:
        return _screen_operand(self.y32, left=False)

    @functools.cached_property
    def ysq32(self) -> Tensor:  # squared norms for the screen only: their rounding is in its error bound
        return torch.linalg.vector_norm(self.y32, dim=1).double().square_()

    @functools.cached_property
    def max_norm(self) -> Tensor:
        """An upper bound on every row's norm: ysq32 is within gamma(D) relative of ||y||^2, less up to
        D 2^-149 where float32 squares underflow (tiny rows); inf or NaN where float32 overflows."""
        D = self.rows.shape[1]
        return ((self.ysq32.max() + D * 2.0**-148) * (1.0 + screen_error_factor(D))).sqrt()

    def exclusion(self, queries: dict):
        """(hit (b,), column (b,)) of each query's excluded row in this chunk, or None."""
        if queries["exclude"] is None:
            return None
        local = queries["exclude"] - self.first_index
        # At most one excluded column per query; queries without one rewrite column 0 unchanged (no host sync).
        return (local >= 0) & (local < self.n), local.clamp(0, self.n - 1)


def _mask_excluded(logits: Tensor, excl) -> None:
    if excl is not None:
        hit, col = excl
        current = logits.gather(1, col[:, None])
        logits.scatter_(1, col[:, None], torch.where(hit[:, None], float("-inf"), current))


def _select(queries: dict, rows) -> dict:
    """The per-query fields of a query block restricted to ``rows`` (a slice or an index tensor)."""
    return {key: None if value is None else value[rows] for key, value in queries.items() if key in _QUERY_FIELDS}


_QUERY_FIELDS = ("x", "ax", "xsq", "alpha", "inv_two_var", "bias", "exclude", "ax_screen", "ax_norm")
# A screening block first tries the screen on up to this many queries (an eighth of the block at
# most) of its first chunk: if too many fall back (a spread posterior at this sigma), the rest of the
# block uses the float64 engine at once.
PROBE_QUERIES = 32
# Screening a chunk costs ~1/4 (GPU) to ~1/3 (CPU) of the float64 engine, plus top-k and gathers;
# past this fraction of fallen-back queries it no longer pays, and the block switches to float64.
MAX_FALLBACK_FRACTION = 0.15


def _check_exclude(exclude_index, M: int, device, upper: Optional[int] = None) -> Optional[Tensor]:
    """exclude_index as int64 on ``device``: shape (M,), values >= -1 (-1: none) and < ``upper`` if given."""
    if exclude_index is None:
        return None
    if not isinstance(exclude_index, Tensor) or exclude_index.dtype not in (torch.int32, torch.int64):
        raise TypeError("exclude_index must be an int32/int64 tensor of shape (M,)")
    _check_device(exclude_index, "exclude_index")
    if exclude_index.shape != (M,):
        raise ValueError(f"exclude_index must have shape (M,) = ({M},), got {tuple(exclude_index.shape)}")
    if M:  # one host sync: an index out of range would silently exclude nothing
        lo, hi = int(exclude_index.min()), int(exclude_index.max())
        if lo < -1 or (upper is not None and hi >= upper):
            allowed = f"[-1, {upper})" if upper is not None else ">= -1"
            raise ValueError(f"exclude_index values must be {allowed} (-1: exclude nothing), got {lo if lo < -1 else hi}")
    return exclude_index.to(device=device, dtype=torch.int64)


@torch.no_grad()
def posterior_partial(
    queries: Tensor,
    data: Tensor,
    sigma: Scalar,
    *,
    alpha: Scalar = 1.0,
    exclude_index: Optional[Tensor] = None,
    index_offset: int = 0,
    logit_bias: Optional[Scalar] = None,
    chunk_size: Optional[int] = None,
    precision: Optional[str] = None,
    data_shift: Optional[Tensor] = None,
) -> PosteriorPartial:
    """Softmax statistics of ``queries`` (M, D) over the rows of ``data`` (N, D), as a mergeable partial.

    Logits: -||x_m - alpha_m y_n||^2 / (2 sigma_m^2) (+ ``logit_bias``, a finite scalar or (M,) added to
    every row of this data, e.g. -log C for cDOL's source row). ``exclude_index`` (M,) int64 drops data
    row ``exclude_index[m]`` for query m; rows are numbered from ``index_offset`` (the position of
    ``data`` in the whole dataset when it is one chunk of it; -1 excludes nothing). ``data_shift`` (D,):
    a vector subtracted from every data row as it is read (the result is that of ``data - data_shift``
    without a copy of the data; e.g. the data mean, so that all sums stay small). ``data`` may live on
    another device than ``queries`` (e.g. host memory): it is moved chunk by chunk. ``precision``:
    "auto" (screen and refine, see the module docstring), "float64", or None (auto on the CPU, float64
    on CUDA); both are exact to float64 rounding. "auto" syncs with the host once per chunk. Not
    differentiable: the result carries no gradient. M = 0 queries give an empty partial.
    """
    _check_inputs(queries, data)
    M, D = queries.shape
    N = data.shape[0]
    device = queries.device
    engine = _check_precision(precision, device)
    sig = _per_query(sigma, "sigma", M, device)
    alp = _per_query(alpha, "alpha", M, device)
    bias = None if logit_bias is None else _per_query(logit_bias, "logit_bias", M, device, positive=False)
    exclude_index = _check_exclude(exclude_index, M, device)
    if isinstance(index_offset, bool) or not isinstance(index_offset, numbers.Integral) or index_offset < 0:
        raise ValueError(f"index_offset must be an int >= 0, got {index_offset!r}")
    shift = None
    if data_shift is not None:
        if not isinstance(data_shift, Tensor) or not data_shift.dtype.is_floating_point:
            raise TypeError("data_shift must be a floating-point tensor of shape (D,)")
        _check_device(data_shift, "data_shift")
        if data_shift.shape != (D,):
            raise ValueError(f"data_shift must have shape (D,) = ({D},), got {tuple(data_shift.shape)}")
        shift = data_shift.to(device=device, dtype=torch.float64)
        if not bool(torch.isfinite(shift).all()):
            raise ValueError("data_shift must be finite")
    block, chunk = default_block_sizes(M, device)
    chunk = _check_chunk_size(chunk_size) or chunk
    if M == 0:
        return empty_partial(0, D, device)

    x = queries.to(torch.float64)
    blocks = []
    for a in range(0, M, block):
        b = slice(a, a + block)
        xb = x[b]
        blk = dict(x=xb, ax=xb * alp[b, None], xsq=xb.square().sum(dim=1), alpha=alp[b],
                   inv_two_var=0.5 / sig[b].square(), bias=None if bias is None else bias[b],
                   exclude=None if exclude_index is None else exclude_index[b],
                   out=None if N else empty_partial(xb.shape[0], D, device), screen=engine == "auto", probe=True)
        if engine == "auto":
            blk.update(ax_screen=_screen_operand(blk["ax"].float(), left=True), ax_norm=blk["ax"].norm(dim=1),
                       cand_val=xb.new_empty(xb.shape[0], 0), cand_row=torch.zeros_like(xb, dtype=torch.int64)[:, :0],
                       error=torch.zeros_like(blk["xsq"]), max_norm=blk["xsq"].new_zeros(()))
        blocks.append(blk)

    def add_chunk(blk, ch: _Chunk):
        if blk["screen"] and blk["probe"]:
            blk["probe"] = False
            size = min(PROBE_QUERIES, blk["x"].shape[0] // 8)
            if size:  # a spread posterior on a few queries of the first chunk: the whole block in float64
                vals, _, error = _screen_chunk(_select(blk, slice(0, size)), ch)
                blk["screen"] = 1.0 - float(_proven(vals, error).double().mean()) <= MAX_FALLBACK_FRACTION
        if blk["screen"]:  # phase 1: keep each query's best screened rows over all chunks
            vals, rows, error = _screen_chunk(blk, ch)
            blk["cand_val"], blk["cand_row"] = _merge_best(blk["cand_val"], blk["cand_row"], vals, rows,
                                                           SCREEN_TOP + 1, largest=True)
            blk["error"] = torch.maximum(blk["error"], error)
            blk["max_norm"] = torch.maximum(blk["max_norm"], ch.max_norm)
        else:
            _add_float64_chunk(blk, ch)

    _stream(data, device, chunk, index_offset, blocks, add_chunk, shift)
    for blk in blocks:
        if blk["screen"] and N:  # phase 2: exact top rows once per block, float64 where unproven
            blk["out"] = _refine(blk, data, N, shift,
                                 lambda sub: _stream(data, device, chunk, index_offset, [sub], _add_float64_chunk, shift))
    parts = [blk["out"] for blk in blocks]
    if len(parts) == 1:
        return parts[0]
    return PosteriorPartial(*(torch.cat(fields) for fields in zip(*(p.to_tuple() for p in parts))))


def _add_float64_chunk(blk: dict, ch: "_Chunk") -> None:
    part = _chunk_partial(blk, ch)
    blk["out"] = part if blk.get("out") is None else merge_partials(blk["out"], part)


def _merge_best(vals: Tensor, rows: Tensor, new_vals: Tensor, new_rows: Tensor, keep: int, largest: bool):
    """The ``keep`` best of two (values, row numbers) sets per query, sorted (the running top-k over chunks)."""
    vals = torch.cat([vals, new_vals], dim=1)
    vals, pos = vals.topk(min(keep, vals.shape[1]), dim=1, largest=largest, sorted=True)
    return vals, torch.cat([rows, new_rows], dim=1).gather(1, pos)


def _stream(data: Tensor, device: torch.device, chunk: int, first_index: int, blocks: list, visit,
            shift: Optional[Tensor] = None) -> None:
    """visit(block, chunk) for every query block and data chunk (less ``shift``, in float64, if given),
    moving each chunk to ``device`` once."""
    def chunks():
        for start in range(0, data.shape[0], chunk):
            rows = data[start:start + chunk].to(device=device, non_blocking=True)
            if shift is not None:
                rows = rows.to(torch.float64) - shift  # a new tensor: the caller's data is never written
            yield _Chunk(rows, start, first_index + start)

    if data.device == device:  # data resident: query blocks outside, so each block streams long chunks
        for blk in blocks:
            for ch in chunks():
                visit(blk, ch)
    else:  # data elsewhere (host memory): move each chunk once and use it for every block
        for ch in chunks():
            for blk in blocks:
                visit(blk, ch)


def _screen_chunk(queries: dict, ch: _Chunk) -> tuple[Tensor, Tensor, Tensor]:
    """Screened logits of one chunk: each query's SCREEN_TOP + 1 best (values (b, <= 17), descending;
    their row positions in ``data``) and the bound E (b,) on every screened logit's error.

    The screening distances ||x||^2 + a^2 ||y||^2 - 2 (a x).y take x.y from one fp32-accurate GEMM and
    ||y||^2 in float32, so each logit is within E = gamma(D) (2 ||a x|| + a^2 max ||y||) max ||y|| /
    (2 sigma^2) of the truth (the bias shifts every row of a query alike and is left out).
    """
    inv_two_var, alpha = queries["inv_two_var"], queries["alpha"]
    products = _screen_products(queries["ax_screen"], ch.screen_operand)
    dist = (queries["xsq"][:, None] + alpha.square()[:, None] * ch.ysq32[None, :]).sub_(products.double(), alpha=2.0)
    del products
    logits = dist.clamp_min_(0.0).mul_(-inv_two_var[:, None])
    _mask_excluded(logits, ch.exclusion(queries))
    error = _screen_sq_error(ch.rows.shape[1], queries["ax_norm"], alpha.square(), ch.max_norm) * inv_two_var
    vals, index = logits.topk(min(SCREEN_TOP + 1, ch.n), dim=1)
    return vals, index + ch.start, error


def _proven(vals: Tensor, error: Tensor) -> Tensor:
    """Whether the SCREEN_TOP best rows hold each query's whole posterior (up to e^-NEGLIGIBLE_NATS).

    ``vals``: the best screened logits (descending), of all rows seen. If the best beats the
    (SCREEN_TOP + 1)-th by more than 2 E + NEGLIGIBLE_NATS, every row outside the top SCREEN_TOP is
    truly more than NEGLIGIBLE_NATS below the best one.
    """
    if vals.shape[1] <= SCREEN_TOP:  # no other rows (unless the screen was out of its range: inf error)
        return torch.isfinite(error)
    proven = vals[:, SCREEN_TOP] + (2.0 * error + NEGLIGIBLE_NATS) < vals[:, 0]
    return proven | (vals[:, 0] == float("-inf"))  # every row excluded: nothing to add


def _refine(blk: dict, data: Tensor, N: int, shift: Optional[Tensor], float64_pass) -> PosteriorPartial:
    """Phase 2 of screen and refine for one query block: the exact partial of each query's best rows,
    and ``float64_pass(sub_block)`` (the float64 engine over all the data) for unproven queries.

    Beyond the margin of :func:`_proven`, the dropped rows must also be negligible for the variance:
    each weighs at most e^(v_17 - v_1 + 2E) of the best row and lies within 2 max ||y|| of the mean, so
    N of them move the variance by at most N e^(v_17 - v_1 + 2E) (2 max ||y||)^2, which must stay below
    1e-6 of the variance of the rows kept (a near-delta posterior whose variance comes from a flat tail
    of rows ~50 nats down is not proven by the margin alone).
    """
    vals, rows = blk["cand_val"], blk["cand_row"]
    top = min(SCREEN_TOP, vals.shape[1])
    part = _exact_rows_partial(blk, data, rows[:, :top], vals[:, :top] > float("-inf"), shift)
    proven = _proven(vals, blk["error"])
    if vals.shape[1] > SCREEN_TOP:
        dropped = N * (vals[:, SCREEN_TOP] - vals[:, 0] + 2.0 * blk["error"]).exp() * (2.0 * blk["max_norm"]).square()
        kept = part.finalize().variance
        proven &= (dropped <= 1e-6 * kept) | (vals[:, SCREEN_TOP] == float("-inf"))
    unproven = ~proven
    if int(unproven.sum()):  # one host sync per block
        index = unproven.nonzero().squeeze(1)
        sub = _select(blk, index)
        float64_pass(sub)
        part = PosteriorPartial(*(full.index_copy(0, index, patch) for full, patch in zip(part.to_tuple(), sub["out"].to_tuple())))
    return part


def _gather_rows(y: Tensor, index: Tensor, device: torch.device, shift: Optional[Tensor] = None) -> Tensor:
    """y[index] (less ``shift`` if given) in float64 on ``device`` (y may live elsewhere, e.g. in host memory)."""
    if y.device != index.device:
        rows = y[index.to(y.device)].to(device=device, dtype=torch.float64)
    else:
        rows = y[index].to(torch.float64)
    return rows if shift is None else rows.sub_(shift)  # indexing made a copy: safe in place


def _exact_rows_partial(queries: dict, y: Tensor, index: Tensor, valid: Tensor,
                        shift: Optional[Tensor] = None) -> PosteriorPartial:
    """The partial of a few rows per query (``index`` (b, k) into y: any float dtype and device; ``valid``
    (b, k)); rows less ``shift`` if given.

    Distances relative to a row c near the posterior mass: with offsets o = y - c and x - alpha c both
    direct differences, ||x - alpha y||^2 = ||x - alpha c||^2 + alpha^2 ||o||^2 - 2 alpha <x - alpha c, o>
    rounds at ~1e-16 of those small norms, not of ||x||^2. c starts as the first row of ``index`` (the
    screen's best guess) and is then moved to the row of largest exact logit, so the variance sums are
    taken from the heaviest row (a guess that is off by a near-duplicate would cancel them away).
    """
    x, alpha, inv_two_var, bias = queries["x"], queries["alpha"], queries["inv_two_var"], queries["bias"]
    b, k = index.shape
    D = y.shape[1]
    tile = TILE_ELEMENTS_CUDA if y.device.type == "cuda" else TILE_ELEMENTS_CPU
    per = max(1, tile // max(1, k * D))  # queries per gathered (per, k, D) float64 slab
    fields = []
    for a in range(0, b, per):
        r = slice(a, a + per)
        idx, a_r = index[r], alpha[r, None]

        def offsets_from(center_index):
            center = _gather_rows(y, center_index, x.device, shift)
            return center, _gather_rows(y, idx, x.device, shift).sub_(center[:, None, :])  # (per, k, D)

        def exact_logits(center, offsets):
            from_center = x[r] - a_r * center
            off_sq = torch.linalg.vecdot(offsets, offsets)
            cross = torch.bmm(offsets, from_center[:, :, None]).squeeze(2).mul_(2.0 * a_r)
            dist = (from_center.square().sum(dim=1)[:, None] + a_r.square() * off_sq).sub_(cross)
            logits = dist.clamp_min_(0.0).mul_(-inv_two_var[r, None])
            if bias is not None:
                logits.add_(bias[r, None])
            return logits.masked_fill_(~valid[r], float("-inf")), off_sq

        center, offsets = offsets_from(idx[:, 0])
        logits, off_sq = exact_logits(center, offsets)
        log_max, best = logits.max(dim=1)
        if bool((best != 0).any()):  # usually the first guess is the heaviest row: no second gather
            center, offsets = offsets_from(idx.gather(1, best[:, None]).squeeze(1))
            off_sq = torch.linalg.vecdot(offsets, offsets)
        seen = log_max > float("-inf")
        w = logits.sub_(torch.where(seen, log_max, 0.0)[:, None]).exp_()
        sum_wy = torch.bmm(w[:, None, :], offsets).squeeze(1)
        fields.append((center, log_max, w.sum(dim=1), sum_wy, (w * off_sq).sum(dim=1)))
    return PosteriorPartial(*(torch.cat(f) for f in zip(*fields)))


def _chunk_partial(queries: dict, ch: _Chunk) -> PosteriorPartial:
    """One data chunk y (n, D) by the float64 engine: logits by one GEMM, (alpha x) y^T; the EXACT_HEAD
    best rows per query recomputed by direct differences; the other rows' sums by a second GEMM, w y.

    The head carries the posterior's largest weights, so small variances (near-duplicate rows) and
    the log-sum-exp come from exact differences; the expanded form's rounding (~1e-16 (||x||^2 +
    a^2 ||y||^2) in the distances, ~1e-16 ||c||^2 per unit weight in the sums) only touches the tail.
    """
    ax, xsq, alpha, inv_two_var, bias = (queries[key] for key in ("ax", "xsq", "alpha", "inv_two_var", "bias"))
    y, ysq = ch.y, ch.ysq
    dist = torch.addmm(xsq[:, None] + alpha.square()[:, None] * ysq[None, :], ax, y.T, alpha=-2.0)
    logits = dist.clamp_min_(0.0).mul_(-inv_two_var[:, None])
    if bias is not None:
        logits.add_(bias[:, None])
    _mask_excluded(logits, ch.exclusion(queries))
    head_logits, head = logits.topk(min(EXACT_HEAD, y.shape[0]), dim=1)
    part = _exact_rows_partial(queries, y, head, head_logits > float("-inf"))
    if head.shape[1] == y.shape[0]:
        return part
    seen = part.log_max > float("-inf")
    w = logits.sub_(torch.where(seen, part.log_max, 0.0)[:, None]).exp_()  # the tile is reused as the weights
    w.scatter_(1, head, 0.0)
    tail_w = w.sum(dim=1)
    wy = w @ y
    center = part.center
    # Tail sums relative to the head's center: sum w ||y - c||^2 = sum w ||y||^2 - 2 <c, sum w y> + ||c||^2 sum w.
    tail_wyy = (w @ ysq - 2.0 * (center * wy).sum(dim=1) + tail_w * center.square().sum(dim=1)).clamp_min(0.0)
    return PosteriorPartial(center, part.log_max, part.sum_w + tail_w, part.sum_wy + wy - tail_w[:, None] * center,
                            part.sum_wyy + tail_wyy)


@torch.no_grad()
def posterior_mean(
    queries: Tensor,
    data: Tensor,
    sigma: Scalar,
    *,
    alpha: Scalar = 1.0,
    exclude_index: Optional[Tensor] = None,
    return_stats: bool = False,
    chunk_size: Optional[int] = None,
    precision: Optional[str] = None,
):
    """The optimal denoiser D(x) = E[x0 | x] for each row of ``queries`` over the rows of ``data``.

    Weights softmax_n(-||x - alpha y_n||^2 / (2 sigma^2)); ``sigma``, ``alpha``: scalars or (M,) tensors;
    ``exclude_index`` (M,) drops one data row per query. Streams over the data (memory O(M D + tile)).
    Returns the mean (M, D) in float32 (float64 for float64 queries); with ``return_stats`` also the
    log-sum-exp of the logits (M,) and the posterior variance tr Cov[x0 | x] (M,), both float64 (at
    small sigma variances fall far below float32's range). A query whose rows are all excluded gets NaN.
    ``precision``: the engine ("auto", "float64", None = auto on the CPU, float64 on CUDA), see
    :func:`posterior_partial`; both agree to float64 rounding. M = 0 queries give empty results.

    Not differentiable: the results never carry a gradient (``requires_grad`` False, no ``grad_fn``),
    even for inputs that require one.
    """
    _check_inputs(queries, data)
    if data.shape[0] == 0:
        raise ValueError("data has no rows (N = 0): the posterior over an empty dataset is undefined")
    _check_exclude(exclude_index, queries.shape[0], queries.device, upper=data.shape[0])
    stats = posterior_partial(queries, data, sigma, alpha=alpha, exclude_index=exclude_index,
                              chunk_size=chunk_size, precision=precision).finalize()
    dtype = torch.promote_types(queries.dtype, torch.float32)
    if not return_stats:
        return stats.mean.to(dtype)
    return stats.mean.to(dtype), stats.logsumexp, stats.variance


KNN_EXTRA = 8  # candidates beyond k per query that the knn screen recomputes exactly


@torch.no_grad()
def knn(queries: Tensor, data: Tensor, k: int, *, chunk_size: Optional[int] = None,
        precision: Optional[str] = None) -> tuple[Tensor, Tensor]:
    """Exact k nearest data rows of each query: (squared distances (M, k) ascending, indices (M, k) int64).

    Streams over query blocks and data chunks; memory O(M k + tile). ``k`` from 1 to min(32, N).
    Distances come back in float32 (float64 for float64 queries). ``precision``: "float64" (float64
    GEMM distances, error ~1e-16 of the squared norms), "auto" (an fp32-accurate GEMM screens, the
    k + KNN_EXTRA best candidates are recomputed by direct differences, and every other row is
    proven farther than the k-th; unproven queries fall back to float64), or None (auto on the CPU,
    float64 on CUDA). Either way ties and near-duplicates are ordered correctly. M = 0 queries give
    empty (0, k) results. Not differentiable: the distances never carry a gradient.
    """
    _check_inputs(queries, data)
    M, N = queries.shape[0], data.shape[0]
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= min(32, N):
        raise ValueError(f"k must be an int in [1, min(32, N) = {min(32, N)}], got {k!r}")
    k = int(k)
    device = queries.device
    engine = _check_precision(precision, device)
    block, chunk = default_block_sizes(M, device)
    chunk = max(_check_chunk_size(chunk_size) or chunk, k)
    dtype = torch.promote_types(queries.dtype, torch.float32)
    if M == 0:
        return queries.new_empty(0, k, dtype=dtype), torch.empty(0, k, dtype=torch.int64, device=device)
    x = queries.to(torch.float64)
    blocks = []
    for a in range(0, M, block):
        xb = x[a:a + block]
        blk = dict(x=xb, xsq=xb.square().sum(dim=1), best_d=xb.new_empty(xb.shape[0], 0),
                   best_i=torch.zeros_like(xb, dtype=torch.int64)[:, :0])
        if engine == "auto":
            blk.update(ax_screen=_screen_operand(xb.float(), left=True), ax_norm=xb.norm(dim=1),
                       error=torch.zeros_like(blk["xsq"]))
        blocks.append(blk)
    candidates = k + KNN_EXTRA

    def add_float64_chunk(blk, ch: _Chunk):
        d, i = _knn_chunk(blk, ch, k)
        blk["best_d"], blk["best_i"] = _merge_best(blk["best_d"], blk["best_i"], d, i + ch.start, k, largest=False)

    def add_chunk(blk, ch: _Chunk):
        if engine != "auto":
            return add_float64_chunk(blk, ch)
        # Phase 1: each query's best screened rows over all chunks.
        d, i = _knn_screen_chunk(blk, ch, candidates + 1)
        blk["error"] = torch.maximum(blk["error"], _knn_screen_error(blk, ch))
        blk["best_d"], blk["best_i"] = _merge_best(blk["best_d"], blk["best_i"], d, i + ch.start, candidates + 1,
                                                   largest=False)

    def float64_pass(sub):
        _stream(data, device, chunk, 0, [sub], add_float64_chunk)

    _stream(data, device, chunk, 0, blocks, add_chunk)
    if engine == "auto":  # phase 2: exact distances of the candidates, float64 where unproven
        for blk in blocks:
            screened, rows = blk["best_d"], blk["best_i"]
            top = min(candidates, rows.shape[1])
            exact = _gathered_sq_distances(blk["x"], data, rows[:, :top])
            d, pos = torch.topk(exact, k, dim=1, largest=False, sorted=True)
            i = rows.gather(1, pos)
            proven = torch.ones_like(d[:, 0], dtype=torch.bool) if rows.shape[1] <= candidates else \
                screened[:, candidates] - blk["error"] >= d[:, -1]
            unproven = ~proven
            if int(unproven.sum()):  # one host sync per block
                index = unproven.nonzero().squeeze(1)
                sub = dict(x=blk["x"][index], xsq=blk["xsq"][index], best_d=d.new_empty(len(index), 0),
                           best_i=i.new_empty(len(index), 0))
                float64_pass(sub)
                d, i = d.index_copy(0, index, sub["best_d"]), i.index_copy(0, index, sub["best_i"])
            blk["best_d"], blk["best_i"] = d, i
    distances = torch.cat([blk["best_d"] for blk in blocks])
    return distances.to(dtype), torch.cat([blk["best_i"] for blk in blocks])


def _knn_chunk(queries: dict, ch: _Chunk, k: int) -> tuple[Tensor, Tensor]:
    """The float64 engine's k nearest rows of one chunk (unsorted, local indices), by the expanded form."""
    x, y = queries["x"], ch.y
    d = torch.addmm(queries["xsq"][:, None] + ch.ysq[None, :], x, y.T, alpha=-2.0).clamp_min_(0.0)
    return torch.topk(d, min(k, ch.n), dim=1, largest=False, sorted=False)


def _knn_screen_chunk(queries: dict, ch: _Chunk, keep: int) -> tuple[Tensor, Tensor]:
    """The ``keep`` smallest screened squared distances of one chunk (unsorted, local indices)."""
    products = _screen_products(queries["ax_screen"], ch.screen_operand)
    approx = (queries["xsq"][:, None] + ch.ysq32[None, :]).sub_(products.double(), alpha=2.0)
    return torch.topk(approx, min(keep, ch.n), dim=1, largest=False, sorted=False)


def _knn_screen_error(queries: dict, ch: _Chunk) -> Tensor:
    """Bound e (b,) on the screened squared distances' error (:func:`_screen_sq_error` with alpha = 1).

    A query is proven when the best screened distance outside its k + KNN_EXTRA candidates, minus e,
    is still >= its exact k-th distance: no other row can be nearer.
    """
    return _screen_sq_error(ch.rows.shape[1], queries["ax_norm"], 1.0, ch.max_norm)


def _gathered_sq_distances(x: Tensor, y: Tensor, index: Tensor) -> Tensor:
    """||x_b - y[index[b, j]]||^2 (b, j) in float64 by direct differences, in tile-sized slabs (y: any device)."""
    b, k = index.shape
    tile = TILE_ELEMENTS_CUDA if x.device.type == "cuda" else TILE_ELEMENTS_CPU
    per = max(1, tile // max(1, k * y.shape[1]))
    out = []
    for a in range(0, b, per):
        diff = _gather_rows(y, index[a:a + per], x.device).sub_(x[a:a + per, None, :])
        out.append(torch.linalg.vecdot(diff, diff))
    return torch.cat(out)
