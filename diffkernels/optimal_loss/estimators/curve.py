"""The J*(s) curve: :func:`estimate_curve` and the computation of one noise level.

See :mod:`diffkernels.optimal_loss.estimators` for the estimators, their draws and standard errors.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from ..._validate import check_seed
from ..distributed import on_all_ranks
from ..posterior import PosteriorPartial, merge_partials
from .checkpoint import CHECKPOINT_FORMAT, atomic_write_json, load_checkpoint
from .data import Dataset, LocalRows, as_2d
from .result import CurveResult
from .sampling import QUERY_BLOCK, block_draws
from .statistics import block_stats, summarise

__all__ = ["estimate_curve", "estimate_level", "source_row_partial", "ESTIMATORS"]

ESTIMATORS = ("full", "snis", "dol", "cdol")

_F64 = torch.float64


# --- argument checks ---------------------------------------------------------------------------


def check_int(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_sigmas(sigmas) -> np.ndarray:
    s = np.asarray(sigmas.detach().cpu() if isinstance(sigmas, Tensor) else sigmas, dtype=np.float64).reshape(-1)
    if s.size == 0:
        raise ValueError("sigmas is empty")
    if not (np.isfinite(s).all() and (s > 0).all()):
        raise ValueError(f"sigmas must be finite and > 0, got {s.tolist()}")
    return s


# --- one noise level ---------------------------------------------------------------------------


def source_row_partial(queries: Tensor, rows: Tensor, sigma: float, log_weight: float) -> PosteriorPartial:
    """The partial of one data row per query (cDOL's source row): logit -||x_m - r_m||^2/(2 s^2) + log_weight.

    Its center is the row itself, so the offset sums are exactly 0 and the weight is e^0 = 1 at
    ``log_max`` = the logit.
    """
    x = queries.to(_F64)
    logit = -(x - rows).square().sum(dim=1) / (2.0 * sigma * sigma) + log_weight
    zeros = torch.zeros_like(logit)
    return PosteriorPartial(rows.clone(), logit, torch.ones_like(logit), torch.zeros_like(rows), zeros)


def estimate_level(ds: Dataset, sigma: float, level: int, *, estimator: str, M: int, L: Optional[int],
                   C: Optional[float], seed: int, batch_blocks: int, device, bar) -> dict:
    """J*(sigma) for one noise level: the per-level dict stored in checkpoints. ``level`` selects the
    draws (the level's index, or 0 for every level with common random numbers)."""
    num_blocks = -(-M // QUERY_BLOCK)
    subset_estimator = estimator != "full"
    # Rows: count, sum, sum of squared deviations; one column per block, each filled once.
    stats_ab = torch.zeros(3, num_blocks, dtype=_F64, device=device)
    stats_var = torch.zeros(3, num_blocks, dtype=_F64, device=device)
    # Subset estimators: one block at a time (each has its own subset). Full: several per data pass.
    step = 1 if subset_estimator else batch_blocks
    for first in range(0, num_blocks, step):
        blocks = range(first, min(first + step, num_blocks))
        draws = [block_draws(seed, level, b, min(QUERY_BLOCK, M - b * QUERY_BLOCK), ds.N, ds.D, L, device)
                 for b in blocks]
        source = torch.cat([d[0] for d in draws])
        eps = torch.cat([d[2] for d in draws])
        sizes = [d[0].numel() for d in draws]
        x_src = ds.rows(source)  # centred on the data mean, as is everything below
        queries = x_src + sigma * eps
        if subset_estimator:
            subset = draws[0][1]
            if estimator == "snis":
                part = ds.partial(queries, sigma, subset=subset)
            else:
                part = ds.partial(queries, sigma, subset=subset, exclude=source)
                part = merge_partials(part, source_row_partial(queries, x_src, sigma, -math.log(C)))
        else:
            part = ds.partial(queries, sigma)
        post = part.finalize()
        # A - B per query: ||x_src - mu||^2 - ||D - mu||^2 as a product of sum and difference (no cancellation).
        ab = ((x_src - post.mean) * (x_src + post.mean)).sum(dim=1)
        cols = slice(blocks.start, blocks.stop)
        stats_ab[:, cols] = block_stats(ab, sizes)
        if not subset_estimator:
            stats_var[:, cols] = block_stats(post.variance, sizes)
        if bar is not None:
            bar.update(len(blocks))
    # The one host transfer of the level.
    ab = stats_ab.cpu().numpy()
    out = {"sigma": sigma}
    out["j_ab"], out["se_ab"] = summarise(*ab, clustered=subset_estimator)
    if not subset_estimator:
        out["j_var"], out["se_var"] = summarise(*stats_var.cpu().numpy(), clustered=False)
    return out


# --- the public function -----------------------------------------------------------------------


@torch.no_grad()
def estimate_curve(
    data,
    sigmas: Union[Sequence[float], np.ndarray, Tensor, float],
    *,
    estimator: str = "full",
    num_queries: int,
    subset_size: Optional[int] = None,
    C: Optional[float] = None,
    seed: int = 0,
    batch_size: Optional[int] = None,
    progress: bool = True,
    checkpoint=None,
    device=None,
    distributed=False,
    precision: Optional[str] = None,
    common_random_numbers: bool = False,
) -> CurveResult:
    """Estimate the optimal x0-loss J*(s) of ``data`` at each noise level in ``sigmas``.

    Args:
        data: (N, ...) tensor (any device, float or integer) or numpy array / ``np.memmap``;
            flattened to (N, D). With ``distributed`` it is this rank's contiguous shard, in rank order.
        sigmas: VE noise levels s > 0 (use s = sigma/alpha for VP, t/(1-t) for flow matching).
        estimator: ``"full"``, ``"snis"``, ``"dol"`` or ``"cdol"`` (see
            :mod:`diffkernels.optimal_loss.estimators`).
        num_queries: queries M per noise level.
        subset_size: L, the subset size of the subset estimators (1 <= L <= N).
        C: cDOL's constant (> 0); default 4N/L. Only for ``"cdol"``.
        seed: the seed of every draw (seeds per level and block are derived from it, see
            :mod:`diffkernels.optimal_loss.estimators`); any integer (Python or numpy), taken modulo 2**64.
        batch_size: queries per pass over the data for ``"full"`` (rounded down to a multiple of
            ``QUERY_BLOCK``, at least one block; default 4096 on CUDA, 1024 on CPU); memory
            ~ 6 * batch_size * D float64 plus the kernel's tile.
        progress: show a tqdm bar (rank 0 only).
        checkpoint: path of a JSON checkpoint written after every noise level and resumed from.
        device: where the math runs (default: the data's device for a tensor, else CUDA if
            available, else CPU).
        distributed: True (default process group) or a ``torch.distributed`` process group to
            shard the data across ranks; every rank must pass the same arguments except ``data``.
        precision: the posterior engine, "auto" (screen and refine), "float64" or None (auto on the
            CPU, float64 on CUDA); see :func:`~diffkernels.optimal_loss.posterior_partial` and
            docs/METHODS.md section 3.3 for what each guarantees.
        common_random_numbers: use the same source rows, subsets and unit noise eps at every noise
            level (queries x = x_n + s eps), so the curve is smooth in s; each level's estimate is
            still unbiased (see :mod:`diffkernels.optimal_loss.estimators`).

    Returns:
        A :class:`~diffkernels.optimal_loss.CurveResult`, one entry per noise level.

    Examples:
        >>> import torch
        >>> from diffkernels.optimal_loss import estimate_curve
        >>> data = torch.randn(64, 2)  # 64 points in 2-d
        >>> curve = estimate_curve(data, [0.1, 1.0, 10.0], num_queries=256, seed=0, progress=False)
        >>> bool(curve.j_star[0] < curve.j_star[1] < curve.j_star[2])  # J* grows with the noise
        True
        >>> total_variance = float(data.var(dim=0, unbiased=False).sum())  # J* as s -> infinity
        >>> bool(abs(curve.j_star[2] - total_variance) < 0.1 * total_variance)
        True
        >>> bool((curve.stderr > 0).all())
        True
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    data = as_2d(data)
    s = check_sigmas(sigmas)
    M = check_int(num_queries, "num_queries", 1)
    seed = check_seed(seed) % (1 << 64)  # any integer; -1 and 2**64 - 1 are the same seed
    if device is None:
        if isinstance(data, Tensor) and data.device.type != "cpu":
            device = data.device
        else:
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "meta":
        raise ValueError("device='meta' is not supported: the estimates depend on the values")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if batch_size is None:
        batch_size = 4096 if device.type == "cuda" else 1024
    batch_size = check_int(batch_size, "batch_size", 1)
    if not isinstance(common_random_numbers, (bool, np.bool_)):
        raise TypeError(f"common_random_numbers must be a bool, got {type(common_random_numbers).__name__}")
    common_random_numbers = bool(common_random_numbers)

    group = None
    if distributed is not False and distributed is not None:
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("distributed=True needs an initialised torch.distributed process group")
        group = dist.group.WORLD if distributed is True else distributed
    local = LocalRows(data, device)
    # One pass over the data: NaN / Inf rows, the mean, and the checksum that a checkpoint records.
    ds = Dataset(local, group, precision, checksum=checkpoint is not None)
    N = ds.N

    if estimator == "full":
        if subset_size is not None:
            raise ValueError("subset_size applies only to the subset estimators (snis, dol, cdol)")
        L = None
    else:
        if subset_size is None:
            raise ValueError(f"estimator {estimator!r} needs subset_size")
        L = check_int(subset_size, "subset_size", 1)
        if L > N:
            raise ValueError(f"subset_size {L} is larger than the number of data rows N = {N}")
    if C is not None and estimator != "cdol":
        raise ValueError(f"C applies only to estimator 'cdol', not {estimator!r}")
    if estimator == "cdol":
        C = 4.0 * N / L if C is None else C
        if isinstance(C, bool) or not isinstance(C, (int, float, np.floating, np.integer)):
            raise TypeError(f"C must be a number, got {type(C).__name__}")
        C = float(C)
        if not (math.isfinite(C) and C > 0):
            raise ValueError(f"C must be finite and > 0, got {C}")
    elif estimator == "dol":
        C = 1.0

    settings = {
        "estimator": estimator, "sigmas": [float(v) for v in s], "num_queries": M, "subset_size": L, "C": C,
        "seed": seed, "num_data": N, "dim": ds.D, "noise_device": device.type, "data": ds.fingerprint,
        "common_random_numbers": common_random_numbers,
    }
    rank = 0 if group is None else torch.distributed.get_rank(group)
    path = None if checkpoint is None else Path(checkpoint)
    done = {}
    if path is not None:
        if group is None:
            done = load_checkpoint(path, settings)
        else:  # rank 0 reads, everyone gets the same levels (the file need not be on a shared disk)
            done = on_all_ranks(lambda: load_checkpoint(path, settings), group, only_rank0=True)

    batch_blocks = max(1, batch_size // QUERY_BLOCK)
    num_blocks = -(-M // QUERY_BLOCK)
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(s) * num_blocks, desc=f"J*(s) {estimator}", unit="block", leave=False)
    levels = {}
    try:
        for k, sigma in enumerate(s):
            if k in done:
                levels[k] = done[k]
                if bar is not None:
                    bar.update(num_blocks)
                continue
            if bar is not None:
                bar.set_postfix(sigma=f"{sigma:.3g}")
            draws = 0 if common_random_numbers else k
            levels[k] = estimate_level(ds, float(sigma), draws, estimator=estimator, M=M, L=L, C=C, seed=seed,
                               batch_blocks=batch_blocks, device=device, bar=bar)
            if path is not None and rank == 0:
                atomic_write_json(path, {"format": CHECKPOINT_FORMAT, "settings": settings,
                                         "levels": {str(i): v for i, v in sorted(levels.items())}})
    finally:
        if bar is not None:
            bar.close()

    col = lambda key: np.array([levels[k][key] for k in range(len(s))], dtype=np.float64)  # noqa: E731
    full = estimator == "full"
    j_ab, se_ab = col("j_ab"), col("se_ab")
    j_var, se_var = (col("j_var"), col("se_var")) if full else (None, None)
    return CurveResult(
        sigmas=s, j_star=j_var if full else j_ab, stderr=se_var if full else se_ab, j_star_ab=j_ab,
        stderr_ab=se_ab, j_star_var=j_var, stderr_var=se_var, estimator=estimator, dim=ds.D, num_data=N,
        num_queries=M, subset_size=L, C=C, seed=seed,
        common_random_numbers=common_random_numbers,
    )
