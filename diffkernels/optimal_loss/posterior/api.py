"""The public functions: :func:`posterior_partial`, :func:`posterior_mean` and :func:`knn`.

Each checks its arguments, cuts the queries into blocks, builds one engine per block (the float64
engine, or screen and refine for ``precision="auto"``), feeds them the data through a
:class:`~.streaming.DataSource`, and then checks what the source read: NaN or Inf in the data is an
error, and values outside the safe float64 range (:data:`~.checks.SAFE_MAGNITUDE`) are recomputed on
queries, data and sigma divided by a power of two, which leaves the logits unchanged.
"""

from __future__ import annotations

import numbers
from typing import Optional, Union

import torch
from torch import Tensor

from .blocks import QueryBlock, screen_center
from .checks import (SAFE_MAGNITUDE, check_chunk_size, check_data_finite, check_data_shift, check_exclude,
                     check_index_offset, check_inputs, check_logits_in_range, check_precision, check_sigma_range,
                     choose_scale, largest_magnitude, per_query)
from .float64_engine import Float64Engine
from .nearest_neighbours import KnnFloat64Engine, KnnScreenEngine
from .partials import PosteriorPartial, cat_partials, empty_partial, unscale_partial
from .screen_engine import ScreenEngine
from .streaming import DataSource, default_block_sizes, screen_chunk_rows

__all__ = ["posterior_partial", "posterior_mean", "knn"]

Scalar = Union[float, Tensor]


def _run(x: Tensor, sigma: Tensor, alpha: Tensor, bias: Optional[Tensor], exclude: Optional[Tensor],
         source: DataSource, engine: str, block: int) -> PosteriorPartial:
    """The partial of float64 queries ``x`` over ``source``: one engine per block of ``block`` queries."""
    center = screen_center(x / alpha[:, None]) if engine == "auto" else None
    engines = []
    for a in range(0, x.shape[0], block):
        b = slice(a, a + block)
        qb = QueryBlock.of(x[b], sigma=sigma[b], alpha=alpha[b], bias=None if bias is None else bias[b],
                           exclude=None if exclude is None else exclude[b])
        engines.append(ScreenEngine(qb, source, center) if engine == "auto" else Float64Engine(qb, source))
    source.feed(engines)
    return cat_partials([e.result() for e in engines])


def _scaled_partial(queries, data, sigma, alpha, exclude_index, index_offset, logit_bias, chunk_size, precision,
                    data_shift) -> tuple[PosteriorPartial, float]:
    """(the partial of queries / scale over (data - data_shift) / scale at sigma / scale, scale): scale
    is 1 unless the values leave the safe float64 range (module docstring)."""
    check_inputs(queries, data)
    M, D = queries.shape
    N = data.shape[0]
    device = queries.device
    engine = check_precision(precision, device)
    sig = per_query(sigma, "sigma", M, device)
    alp = per_query(alpha, "alpha", M, device)
    bias = None if logit_bias is None else per_query(logit_bias, "logit_bias", M, device, positive=False)
    exclude = check_exclude(exclude_index, M, device)
    index_offset = check_index_offset(index_offset)
    shift = check_data_shift(data_shift, D, device)
    # Long chunks (not screen_chunk_rows): the screen judges a block by its first chunk, and a query
    # whose heavy rows lie in a later chunk looks spread there.
    block, chunk = default_block_sizes(M, device)
    chunk = check_chunk_size(chunk_size) or chunk
    if M == 0:
        return empty_partial(0, D, device), 1.0

    x = queries.to(torch.float64)
    x_largest = largest_magnitude(x, "queries")
    if x_largest >= SAFE_MAGNITUDE[0]:  # then the scale is >= 1, and a scaled sigma only smaller
        check_sigma_range(sig, 1.0)
    source = DataSource(data, device, chunk, index_offset, shift)
    part = _run(x, sig, alp, bias, exclude, source, engine, block)
    scale = choose_scale(max(x_largest, check_data_finite(source.largest)))
    check_sigma_range(sig, scale)
    if scale != 1.0:
        source = DataSource(data, device, chunk, index_offset, shift, scale)
        part = _run(x / scale, sig / scale, alp, bias, exclude, source, engine, block)
    check_logits_in_range(part.log_max, sig, N, exclude, index_offset)
    return part, scale


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
    "auto" (screen and refine, see :mod:`diffkernels.optimal_loss.posterior`), "float64", or None
    (auto on the CPU, float64 on CUDA); the guarantee of each is in docs/METHODS.md section 3.3.
    "auto" syncs with the host once per chunk. Not differentiable: the result carries no gradient.
    M = 0 queries give an empty partial.

    Errors: ValueError if the queries or the data contain NaN or Inf (the data is checked as it is
    read), or if sigma is so small against the distances that even a query's largest logit is below
    float64's range. Values beyond ~1e120 or below ~1e-120 are handled exactly by rescaling (a second
    pass over the data); sums that overflow float64 in the result then come out as inf.

    Examples:
        Statistics over two halves of the data merge into those over all of it:

        >>> import torch
        >>> from diffkernels.optimal_loss import merge_partials, posterior_mean, posterior_partial
        >>> data, x = torch.randn(10, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
        >>> parts = [posterior_partial(x, data[:6], 0.5), posterior_partial(x, data[6:], 0.5, index_offset=6)]
        >>> merged = merge_partials(*parts).finalize()
        >>> bool(torch.allclose(merged.mean, posterior_mean(x, data, 0.5)))
        True
    """
    part, scale = _scaled_partial(queries, data, sigma, alpha, exclude_index, index_offset, logit_bias, chunk_size,
                                  precision, data_shift)
    return part if scale == 1.0 else unscale_partial(part, scale)


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

    NaN or Inf in the queries or the data is a ValueError, and so is a sigma too small for float64
    (:func:`posterior_partial`); data of any magnitude is exact (a variance beyond float64's range is inf).

    Not differentiable: the results never carry a gradient (``requires_grad`` False, no ``grad_fn``),
    even for inputs that require one.

    Examples:
        >>> import torch
        >>> from diffkernels import posterior_mean
        >>> data = torch.tensor([[-1.0], [1.0]])  # two training points
        >>> x = torch.tensor([[0.0], [0.5], [3.0]])  # noisy queries
        >>> posterior_mean(x, data, sigma=1.0)  # E[x0 | x] = tanh(x / sigma^2) here
        tensor([[0.0000],
                [0.4621],
                [0.9951]])
        >>> mean, logsumexp, variance = posterior_mean(x, data, sigma=1.0, return_stats=True)
        >>> variance  # tr Cov[x0 | x] = 1 - tanh^2
        tensor([1.0000, 0.7864, 0.0099], dtype=torch.float64)
    """
    check_inputs(queries, data)
    if data.shape[0] == 0:
        raise ValueError("data has no rows (N = 0): the posterior over an empty dataset is undefined")
    check_exclude(exclude_index, queries.shape[0], queries.device, upper=data.shape[0])
    part, scale = _scaled_partial(queries, data, sigma, alpha, exclude_index, 0, None, chunk_size, precision, None)
    stats = part.finalize()
    mean, variance = stats.mean, stats.variance
    if scale != 1.0:  # normalised in the scaled units, so that only values beyond float64 overflow
        mean, variance = mean * scale, variance * scale * scale
    dtype = torch.promote_types(queries.dtype, torch.float32)
    if not return_stats:
        return mean.to(dtype)
    return mean.to(dtype), stats.logsumexp, variance


def _knn_run(x: Tensor, source: DataSource, engine: str, block: int, k: int) -> tuple[Tensor, Tensor]:
    if engine == "auto":
        center = screen_center(x)
        engines = [KnnScreenEngine(QueryBlock.of(x[a:a + block]), source, k, center)
                   for a in range(0, x.shape[0], block)]
    else:
        engines = [KnnFloat64Engine(QueryBlock.of(x[a:a + block]), source, k) for a in range(0, x.shape[0], block)]
    source.feed(engines)
    results = [e.result() for e in engines]
    return torch.cat([d for d, _ in results]), torch.cat([i for _, i in results])


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
    empty (0, k) results. NaN or Inf in the queries or the data is a ValueError (the data is checked
    as it is read); data of any finite magnitude is handled exactly (distances beyond float64's range
    come back as inf). Not differentiable: the distances never carry a gradient.

    Examples:
        >>> import torch
        >>> from diffkernels import knn
        >>> data = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [5.0, 5.0]])
        >>> dist2, index = knn(torch.tensor([[0.9, 0.1]]), data, k=2)
        >>> index, dist2.round(decimals=4)  # squared distances, nearest first
        (tensor([[1, 0]]), tensor([[0.0200, 0.8200]]))
    """
    check_inputs(queries, data)
    M, N = queries.shape[0], data.shape[0]
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= min(32, N):
        raise ValueError(f"k must be an int in [1, min(32, N) = {min(32, N)}], got {k!r}")
    k = int(k)
    device = queries.device
    engine = check_precision(precision, device)
    block, chunk = default_block_sizes(M, device)
    if engine == "auto":
        chunk = screen_chunk_rows(chunk, queries.shape[1], device)
    chunk = max(check_chunk_size(chunk_size) or chunk, k)
    dtype = torch.promote_types(queries.dtype, torch.float32)
    if M == 0:
        return queries.new_empty(0, k, dtype=dtype), torch.empty(0, k, dtype=torch.int64, device=device)
    x = queries.to(torch.float64)
    x_largest = largest_magnitude(x, "queries")
    source = DataSource(data, device, chunk)
    d, i = _knn_run(x, source, engine, block, k)
    scale = choose_scale(max(x_largest, check_data_finite(source.largest)))
    if scale != 1.0:  # distances scale with scale^2: the order, and so the indices, are exact
        d, i = _knn_run(x / scale, DataSource(data, device, chunk, scale=scale), engine, block, k)
        d = d * scale * scale
    return d.to(dtype), i
