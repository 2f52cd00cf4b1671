"""Estimators of the optimal loss curve J*(s) of a dataset (METHODS.md section 3).

For data {x_n} (N rows of D elements) and a VE noise level s, queries are x = x_{n_m} + s eps_m with
n_m uniform over the data and eps_m ~ N(0, I). Four estimators of J*(s) = E||x0 - D(x)||^2:

- ``"full"``: the posterior D(x) over all N rows. Reported in two forms, both unbiased:
  the posterior-variance form mean_m tr Cov[x0 | x_m] (the low-variance one, ``j_star_var``) and
  the A - B form mean_m (||x_{n_m}||^2 - ||D(x_m)||^2) (``j_star_ab``).
- ``"snis"``: D over a uniform random subset of L rows (self-normalised importance sampling).
- ``"dol"``: the subset plus the query's source row n_m (counted once: it is excluded from the
  subset when the subset happens to contain it). Biased low.
- ``"cdol"``: as ``"dol"`` with the source row's weight divided by C (its logit gets -log C);
  C = 1 is DOL, C -> infinity is SNIS over the subset without the source row. Default C = 4N/L.
  The subset estimators use the A - B form.

The A of the A - B form is taken over the queries' own source rows, not over the whole dataset:
both terms then share the data noise, and their difference stays accurate at small s where
J* << E||x0||^2. Everything is computed on the data centred on its mean mu (A = ||x_src - mu||^2,
B = ||D - mu||^2; the identity E||x0 - D||^2 = A - B holds about any fixed point), so every
estimator is invariant to adding a constant vector to the data: uncentred, the subset estimators'
A - B picks up 2 mu . (x_src - D), whose mean is not zero for a biased D and whose spread grows with
||mu||. Each query's difference is computed as (x_src - D) . (x_src + D) in float64, centred.

Reproducibility. Queries come in fixed blocks of ``QUERY_BLOCK`` queries. Block b of noise level k
draws its source rows (and, for the subset estimators, its subset of L rows, shared by the block's
queries) from a CPU generator seeded with ``fold_seed(seed, _INDEX_STREAM, k, b)``, and its noise
from a generator on the compute device seeded with ``fold_seed(seed, _NOISE_STREAM, k, b)``. So
noise levels and blocks are independent streams, a level can be recomputed on its own (resume),
``batch_size`` changes only the float rounding, not the draws, and every rank of a distributed run
draws the same queries. With ``common_random_numbers=True`` every level uses the draws of level 0
(the same source rows, subsets and unit noise eps, so x = x_n + s eps moves with s only): each
level's estimate is the one an independent run would give at that s alone (still unbiased), but the
levels' errors are correlated, so the curve is smooth across s and differences between levels are
far more precise; the per-level standard errors are unchanged and do not apply to such differences. The noise differs between CPU and CUDA generators: the same seed on a
GPU gives statistically equivalent, not identical, queries.

Standard errors. Per block the sum and the sum of squared deviations of the per-query values are
kept in float64 on the device (no host sync inside a level; one transfer at its end) and combined
exactly (Chan et al.). ``"full"`` reports the standard error over queries. The subset estimators
report the standard error over blocks (queries of one block share a subset, so their errors are
correlated and the per-query formula would be too small); with a single block they fall back to
the per-query formula.

Data. A tensor on any device (streamed to the compute device tile by tile), or a numpy array /
``np.memmap`` of any size (read in host chunks of ``HOST_CHUNK_ELEMENTS`` elements and streamed
through :func:`posterior_partial`; partials merge exactly). Integer data is converted to float32.
With ``distributed=True`` (see :mod:`.distributed`) ``data`` is this rank's shard. One pass over
the data before the first level rejects NaN / Inf rows and computes the mean mu (summed over all
ranks, so every rank uses the same one) and a checksum of every value (:func:`data_checksum`).

Checkpoints. With ``checkpoint=path`` the results of each finished noise level are written to a
JSON file atomically (temporary file in the same directory, fsync, ``os.replace``), so a crash
never leaves a corrupt file; a later call with the same settings and data loads the finished
levels and computes only the rest, and the result equals an uninterrupted run exactly (JSON keeps
floats exactly). Different settings, different data (the checksum of all values) or a malformed
file are an error.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from .._validate import check_seed
from ..rng import fold_seed
from .posterior import PosteriorPartial, merge_partials, posterior_partial

__all__ = ["CurveResult", "estimate_curve", "ESTIMATORS", "QUERY_BLOCK"]

ESTIMATORS = ("full", "snis", "dol", "cdol")
QUERY_BLOCK = 64  # queries per RNG block (and per subset for the subset estimators)
HOST_CHUNK_ELEMENTS = 1 << 25  # numpy data is read in chunks of this many elements (128 MiB of float32)
CHECKPOINT_FORMAT = "diffkernels.optimal_loss.curve/2"
SCAN_ELEMENTS_CPU = 1 << 16  # the data pass (finiteness, mean, checksum) in cache-sized pieces
SCAN_ELEMENTS_CUDA = 1 << 24

# Stream tags folded into the seed so that index and noise draws never share a stream.
_INDEX_STREAM = 0x4A53_4958  # "JSIX": source rows and subsets (CPU generator)
_NOISE_STREAM = 0x4A53_4E5A  # "JSNZ": the noise eps (generator on the compute device)

_F64 = torch.float64


# --- the result --------------------------------------------------------------------------------


@dataclass
class CurveResult:
    """J*(s) on a grid of noise levels. Totals are sums over the D elements of a sample.

    ``j_star`` / ``stderr``: the recommended estimate (``"full"``: the posterior-variance form;
    subset estimators: the A - B form). ``j_star_ab`` / ``stderr_ab``: the A - B form (all
    estimators). ``j_star_var`` / ``stderr_var``: the posterior-variance form (``"full"`` only, else
    None). ``*_per_element`` properties divide by ``dim``. ``common_random_numbers``: every level used
    the same draws (see :func:`estimate_curve`).
    """

    sigmas: np.ndarray
    j_star: np.ndarray
    stderr: np.ndarray
    j_star_ab: np.ndarray
    stderr_ab: np.ndarray
    j_star_var: Optional[np.ndarray]
    stderr_var: Optional[np.ndarray]
    estimator: str
    dim: int
    num_data: int
    num_queries: int
    subset_size: Optional[int] = None
    C: Optional[float] = None
    seed: int = 0
    extra: dict = field(default_factory=dict)
    common_random_numbers: bool = False

    @property
    def j_star_per_element(self) -> np.ndarray:
        return self.j_star / self.dim

    @property
    def stderr_per_element(self) -> np.ndarray:
        return self.stderr / self.dim

    def to_dict(self) -> dict:
        def arr(a):
            return None if a is None else [float(v) for v in a]

        return {
            "estimator": self.estimator, "dim": self.dim, "num_data": self.num_data,
            "num_queries": self.num_queries, "subset_size": self.subset_size, "C": self.C, "seed": self.seed,
            "sigmas": arr(self.sigmas), "j_star": arr(self.j_star), "stderr": arr(self.stderr),
            "j_star_per_element": arr(self.j_star_per_element), "stderr_per_element": arr(self.stderr_per_element),
            "j_star_ab": arr(self.j_star_ab), "stderr_ab": arr(self.stderr_ab),
            "j_star_var": arr(self.j_star_var), "stderr_var": arr(self.stderr_var),
            **({"common_random_numbers": True} if self.common_random_numbers else {}),
            **({"extra": self.extra} if self.extra else {}),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "CurveResult":
        def arr(key):
            return None if d.get(key) is None else np.asarray(d[key], dtype=np.float64)

        return cls(sigmas=arr("sigmas"), j_star=arr("j_star"), stderr=arr("stderr"), j_star_ab=arr("j_star_ab"),
                   stderr_ab=arr("stderr_ab"), j_star_var=arr("j_star_var"), stderr_var=arr("stderr_var"),
                   estimator=d["estimator"], dim=int(d["dim"]), num_data=int(d["num_data"]),
                   num_queries=int(d["num_queries"]), subset_size=d.get("subset_size"), C=d.get("C"),
                   seed=int(d.get("seed", 0)), extra=d.get("extra", {}),
                   common_random_numbers=bool(d.get("common_random_numbers", False)))

    def to_csv(self, path) -> None:
        """One row per noise level: sigma, J* total and per element with standard errors, both forms."""
        cols = ["sigma", "j_star", "stderr", "j_star_per_element", "stderr_per_element", "j_star_ab", "stderr_ab"]
        values = [self.sigmas, self.j_star, self.stderr, self.j_star_per_element, self.stderr_per_element,
                  self.j_star_ab, self.stderr_ab]
        if self.j_star_var is not None:
            cols += ["j_star_var", "stderr_var"]
            values += [self.j_star_var, self.stderr_var]
        lines = [",".join(cols)]
        for row in zip(*values):
            lines.append(",".join(repr(float(v)) for v in row))
        Path(path).write_text("\n".join(lines) + "\n")


# --- argument checks ---------------------------------------------------------------------------


def _check_int(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_sigmas(sigmas) -> np.ndarray:
    s = np.asarray(sigmas.detach().cpu() if isinstance(sigmas, Tensor) else sigmas, dtype=np.float64).reshape(-1)
    if s.size == 0:
        raise ValueError("sigmas is empty")
    if not (np.isfinite(s).all() and (s > 0).all()):
        raise ValueError(f"sigmas must be finite and > 0, got {s.tolist()}")
    return s


def _as_2d(data, name: str = "data"):
    """(N, ...) tensor or numpy array -> (N, D) view, checked; errors name the argument ``name``."""
    if isinstance(data, Tensor):
        if data.device.type == "meta":
            raise ValueError(f"{name} is a meta tensor: meta tensors are not supported (the result depends on the values)")
        ok_dtype = data.dtype.is_floating_point or not (data.dtype.is_complex or data.dtype == torch.bool)
    elif isinstance(data, np.ndarray):
        ok_dtype = data.dtype.kind in "fiu"
    else:
        raise TypeError(f"{name} must be a torch.Tensor or a numpy array, got {type(data).__name__}")
    if not ok_dtype:
        raise TypeError(f"{name} must be real numbers, got dtype {data.dtype}")
    if data.ndim < 2:
        raise ValueError(f"{name} must have shape (N, ...) with at least 2 dimensions, got {tuple(data.shape)}")
    N = data.shape[0]
    D = int(np.prod(data.shape[1:]))
    if N == 0 or D == 0:
        raise ValueError(f"{name} is empty: shape {tuple(data.shape)}")
    return data.reshape(N, D)


# --- the data checksum -------------------------------------------------------------------------

_MIX1 = 0xBF58476D1CE4E5B9 - (1 << 64)  # splitmix64's multipliers, as signed int64
_MIX2 = 0x94D049BB133111EB - (1 << 64)
_LOW32 = (1 << 32) - 1
_COLUMN_SALT, _ROW_SALT = 0x636F6C, 0x726F77


def _mix64(v: Tensor) -> Tensor:
    """A bijective scramble of int64 values (in place; multiplications wrap mod 2^64): multiply, fold
    the high half into the low half, multiply, so every output bit depends on every input bit."""
    v.mul_(_MIX1)
    v.bitwise_xor_(v.bitwise_right_shift(32).bitwise_and_(_LOW32))  # a logical shift by 32
    return v.mul_(_MIX2)


def data_checksum(rows: Tensor, first_row: int) -> int:
    """64-bit checksum (in [0, 2^64)) of float64 ``rows`` (n, D) that are rows first_row.. of a dataset.

    The sum mod 2^64 of a scramble of each value's bits, its column and its row: exact integer
    arithmetic, so pieces and shards add up to the same number whatever the split, device or
    storage dtype (values are compared as float64); any change of values or order changes it
    except with probability ~2^-64.
    """
    n, D = rows.shape
    device = rows.device
    columns = _mix64(torch.arange(D, dtype=torch.int64, device=device) + _COLUMN_SALT)
    per_row = _mix64(rows.contiguous().view(torch.int64).bitwise_xor(columns)).sum(dim=1)
    keys = _mix64(torch.arange(first_row, first_row + n, dtype=torch.int64, device=device) + _ROW_SALT)
    return int(_mix64(per_row.bitwise_xor_(keys)).sum()) % (1 << 64)


# --- this process's rows -----------------------------------------------------------------------


class _LocalRows:
    """The rows this process holds: a tensor on any device or a numpy array / memmap on the host.

    ``center`` (set by the owner once the whole dataset's mean is known) is subtracted from the rows
    that :meth:`rows` returns; :meth:`chunks` gives the stored rows (posterior_partial subtracts it).
    """

    def __init__(self, data, device: torch.device, name: str = "data"):
        self.is_numpy = isinstance(data, np.ndarray)
        if not self.is_numpy and not data.dtype.is_floating_point:
            data = data.float()  # integer tensors: once here, not per pass
        self.data = data
        self.device = device
        self.name = name
        self.n, self.D = data.shape
        self.center: Optional[Tensor] = None

    def _to_tensor(self, a) -> Tensor:
        """A host numpy block -> a float CPU tensor (copied: memmaps are read-only)."""
        if a.dtype.kind != "f":
            a = a.astype(np.float32)
        return torch.from_numpy(np.array(a, copy=True))

    def chunks(self):
        """(offset, rows) pieces covering all rows; a tensor is one piece (posterior_partial tiles it)."""
        if not self.is_numpy:
            yield 0, self.data
            return
        step = max(1, HOST_CHUNK_ELEMENTS // self.D)
        for start in range(0, self.n, step):
            yield start, self._to_tensor(self.data[start:start + step])

    def rows(self, idx: Tensor) -> Tensor:
        """Rows ``idx`` (CPU int64, local numbering) as float64 on the compute device, less ``center``."""
        if self.is_numpy:
            out = self._to_tensor(self.data[idx.numpy()])
        else:
            out = self.data[idx.to(self.data.device)]
        out = out.to(device=self.device, dtype=_F64)
        return out if self.center is None else out.sub_(self.center)  # indexing made a copy: safe in place

    def scan(self, first_row: int = 0, checksum: bool = True) -> tuple[np.ndarray, int]:
        """One pass over the rows, numbered from ``first_row`` in the whole dataset: (the float64 sum
        of the rows (D,), their :func:`data_checksum` or 0 without ``checksum``); ValueError naming
        the first row with NaN or Inf."""
        on_cuda = not self.is_numpy and self.data.device.type == "cuda"
        step = max(1, (SCAN_ELEMENTS_CUDA if on_cuda else SCAN_ELEMENTS_CPU) // self.D)
        total, code = None, 0
        for start in range(0, self.n, step):
            block = self.data[start:start + step]
            block = (self._to_tensor(block) if self.is_numpy else block).to(_F64)
            bad = ~torch.isfinite(block).all(dim=1)
            if bool(bad.any()):
                first = start + int(bad.nonzero()[0, 0])
                raise ValueError(f"{self.name} row {first} contains NaN or Inf")
            part = block.sum(dim=0)
            total = part if total is None else total + part
            if checksum:
                code = (code + data_checksum(block, first_row + start)) % (1 << 64)
        return total.cpu().numpy(), code


class _Dataset:
    """The whole dataset as seen by this process: its rows, or its shard plus the process group.

    Everything an estimator needs goes through two operations, ``rows`` (gather rows by global
    index) and ``partial`` (softmax statistics over all rows or a subset), which a distributed
    dataset completes across ranks (see :mod:`.distributed`). Both work on the rows less the
    dataset's mean ``center`` (the same on every rank).
    """

    def __init__(self, local: _LocalRows, group=None, precision: Optional[str] = None, checksum: bool = True):
        self.local = local
        self.group = group
        self.precision = precision
        self.D = local.D
        if group is None:
            self.offset, self.N = 0, local.n
        else:
            from .distributed import shard_layout

            self.offset, self.N = shard_layout(local.n, local.D, local.device, group)
        # Every rank scans its rows; the sums and checksums are combined in rank order, so every rank
        # gets the same mean and fingerprint (and a bad shard raises on every rank).
        scans = _on_all_ranks(lambda: local.scan(self.offset, checksum), group, gather=True)
        total = scans[0][0]
        for part, _ in scans[1:]:
            total = total + part
        code = sum(c for _, c in scans) % (1 << 64)
        self.center = torch.as_tensor(total / self.N, dtype=_F64, device=local.device)
        local.center = self.center
        self.fingerprint = f"{self.N}x{self.D}:{code:016x}"

    def rows(self, idx: Tensor) -> Tensor:
        """Rows with global indices ``idx`` (CPU int64), float64 on the compute device, on every rank."""
        if self.group is None:
            return self.local.rows(idx)
        from .distributed import gather_rows

        mine = (idx >= self.offset) & (idx < self.offset + self.local.n)
        out = torch.zeros(idx.numel(), self.D, dtype=_F64, device=self.local.device)
        if bool(mine.any()):
            out[mine.to(out.device)] = self.local.rows(idx[mine] - self.offset)
        return gather_rows(out, self.group)

    def partial(self, queries: Tensor, sigma: float, subset: Optional[Tensor] = None,
                exclude: Optional[Tensor] = None) -> PosteriorPartial:
        """Partial over all rows, or over the rows ``subset`` (sorted global indices, CPU) without,
        for query m, the row ``exclude[m]`` (global index, CPU; -1: none)."""
        if subset is None:
            part = None
            for start, rows in self.local.chunks():  # merged as they come: memory of one partial
                new = posterior_partial(queries, rows, sigma, index_offset=start, precision=self.precision,
                                        data_shift=self.center)
                part = new if part is None else merge_partials(part, new)
        else:
            lo = int(torch.searchsorted(subset, self.offset))
            hi = int(torch.searchsorted(subset, self.offset + self.local.n))
            mine = subset[lo:hi]
            ex = None
            if exclude is not None and mine.numel() > 0:
                # Position of the excluded row among this rank's subset rows, -1 where it is not there.
                pos = torch.searchsorted(mine, exclude).clamp(max=mine.numel() - 1)
                ex = torch.where(mine[pos] == exclude, pos, -1).to(queries.device)
            rows = self.local.rows(mine - self.offset)
            part = posterior_partial(queries, rows, sigma, exclude_index=ex, precision=self.precision)
        if self.group is not None:
            from .distributed import all_merge_partials

            part = all_merge_partials(part, self.group)
        return part


def source_row_partial(queries: Tensor, rows: Tensor, sigma: float, log_weight: float) -> PosteriorPartial:
    """The partial of one data row per query (cDOL's source row): logit -||x_m - r_m||^2/(2 s^2) + log_weight.

    Its center is the row itself, so the offset sums are exactly 0 and the weight is e^0 = 1 at
    ``log_max`` = the logit.
    """
    x = queries.to(_F64)
    logit = -(x - rows).square().sum(dim=1) / (2.0 * sigma * sigma) + log_weight
    zeros = torch.zeros_like(logit)
    return PosteriorPartial(rows.clone(), logit, torch.ones_like(logit), torch.zeros_like(rows), zeros)


# --- sampling ----------------------------------------------------------------------------------


def _sample_subset(N: int, L: int, gen: torch.Generator) -> Tensor:
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


def _block_draws(seed: int, level: int, block: int, size: int, N: int, D: int, L: Optional[int], device):
    """(source rows (size,), subset or None, eps (size, D) float64 on device) of one query block."""
    gen = torch.Generator().manual_seed(fold_seed(seed, _INDEX_STREAM, level, block))
    source = torch.randint(N, (size,), generator=gen)
    subset = None if L is None else _sample_subset(N, L, gen)
    noise_gen = torch.Generator(device=device).manual_seed(fold_seed(seed, _NOISE_STREAM, level, block))
    eps = torch.randn(size, D, generator=noise_gen, device=device, dtype=_F64)
    return source, subset, eps


# --- one noise level ---------------------------------------------------------------------------


def _block_stats(values: Tensor, sizes: list[int]) -> Tensor:
    """(3, blocks): count, sum and sum of squared deviations from the block mean of consecutive blocks
    of ``values`` with the given sizes (all QUERY_BLOCK but maybe the last). Float64, no host sync,
    and plain row reductions rather than atomics (index_add_), so CUDA results are bit-reproducible."""
    k = len(sizes)
    padded = values.new_zeros(k * QUERY_BLOCK)
    padded[:values.numel()] = values
    padded = padded.view(k, QUERY_BLOCK)
    count = torch.tensor(sizes, dtype=_F64).to(values.device)
    inside = (torch.arange(QUERY_BLOCK, device=values.device)[None, :] < count[:, None]).to(_F64)
    total = padded.sum(dim=1)
    m2 = ((padded - (total / count)[:, None]).square() * inside).sum(dim=1)
    return torch.stack([count, total, m2])


def _summarise(count: np.ndarray, total: np.ndarray, m2: np.ndarray, clustered: bool) -> tuple[float, float]:
    """Mean and standard error from per-block statistics (Chan et al.'s exact combination)."""
    keep = count > 0
    count, total, m2 = count[keep], total[keep], m2[keep]
    M = count.sum()
    mean = total.sum() / M
    block_mean = total / count
    if clustered and len(count) >= 2:
        G = len(count)
        se = math.sqrt(G / (G - 1) * float(np.sum((count * (block_mean - mean)) ** 2))) / M
    elif M >= 2:
        m2_all = m2.sum() + float(np.sum(count * (block_mean - mean) ** 2))
        se = math.sqrt(m2_all / (M - 1) / M)
    else:
        se = float("nan")
    return float(mean), float(se)


def _level(ds: _Dataset, sigma: float, level: int, *, estimator: str, M: int, L: Optional[int], C: Optional[float],
           seed: int, batch_blocks: int, device, bar) -> dict:
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
        draws = [_block_draws(seed, level, b, min(QUERY_BLOCK, M - b * QUERY_BLOCK), ds.N, ds.D, L, device)
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
        stats_ab[:, cols] = _block_stats(ab, sizes)
        if not subset_estimator:
            stats_var[:, cols] = _block_stats(post.variance, sizes)
        if bar is not None:
            bar.update(len(blocks))
    # The one host transfer of the level.
    ab = stats_ab.cpu().numpy()
    out = {"sigma": sigma}
    out["j_ab"], out["se_ab"] = _summarise(*ab, clustered=subset_estimator)
    if not subset_estimator:
        out["j_var"], out["se_var"] = _summarise(*stats_var.cpu().numpy(), clustered=False)
    return out


# --- checkpoints -------------------------------------------------------------------------------


def atomic_write_json(path, obj) -> None:
    """Write JSON so that ``path`` always holds either the old or the new complete file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_levels(levels, settings: dict) -> dict:
    """The saved levels as {index: level dict}; ValueError (without the path) if anything is malformed."""
    if not isinstance(levels, dict):
        raise ValueError(f"'levels' is a {type(levels).__name__}, not an object")
    keys = ("sigma", "j_ab", "se_ab") + (("j_var", "se_var") if settings["estimator"] == "full" else ())
    sigmas = settings["sigmas"]
    out = {}
    for name, level in levels.items():
        if not (isinstance(name, str) and name.isdigit() and int(name) < len(sigmas)):
            raise ValueError(f"level {name!r} is not an index into the {len(sigmas)} noise levels")
        if not isinstance(level, dict):
            raise ValueError(f"level {name} is a {type(level).__name__}, not an object")
        for key in keys:
            if not _is_number(level.get(key)):
                raise ValueError(f"level {name} has no number {key!r}")
        if level["sigma"] != sigmas[int(name)]:
            raise ValueError(f"level {name} is for sigma {level['sigma']!r}, not {sigmas[int(name)]!r}")
        out[int(name)] = {key: float(level[key]) for key in keys}
    return out


def _load_checkpoint(path: Path, settings: dict) -> dict:
    """Finished levels {index: level dict} from ``path`` if it exists; ValueError naming the file if it
    is not a checkpoint of this format, is malformed, or was written with other settings or data."""
    if not path.exists():
        return {}
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"checkpoint {path} is not readable JSON ({exc}); delete it to start over") from exc
    fmt = saved.get("format") if isinstance(saved, dict) else None
    if not (isinstance(fmt, str) and fmt.startswith(CHECKPOINT_FORMAT.rsplit("/", 1)[0] + "/")):
        raise ValueError(f"{path} is not a diffkernels optimal-loss checkpoint")
    if fmt != CHECKPOINT_FORMAT:
        raise ValueError(f"checkpoint {path} has format {fmt!r}, this version reads {CHECKPOINT_FORMAT!r}; "
                         "delete it to start over")
    old = saved.get("settings")
    if not isinstance(old, dict):
        raise ValueError(f"checkpoint {path} is malformed: 'settings' is missing or not an object; delete it to start over")
    old = {"common_random_numbers": False, **old}  # files written before the option have independent draws
    if old.get("data") != settings["data"] and all(old.get(k) == v for k, v in settings.items() if k != "data"):
        raise ValueError(f"checkpoint {path} was written for other data (the checksum of the values differs: "
                         f"{old.get('data')!r} != {settings['data']!r}); delete it or use another checkpoint path")
    diff = [f"{k}: {old.get(k)!r} != {v!r}" for k, v in settings.items() if old.get(k) != v]
    if diff:
        raise ValueError(f"checkpoint {path} was written with other settings ({'; '.join(diff)}); "
                         "delete it or use another checkpoint path")
    try:
        return _check_levels(saved.get("levels", {}), settings)
    except ValueError as exc:
        raise ValueError(f"checkpoint {path} is malformed: {exc}; delete it to start over") from None


# --- the public function -----------------------------------------------------------------------


def _on_all_ranks(fn, group, only_rank0: bool = False, gather: bool = False):
    """Run ``fn`` (on rank 0 only if ``only_rank0``) and share its result or its error with every rank,
    so that an error on one rank raises everywhere instead of leaving the others in a collective.
    Returns rank 0's result, or with ``gather`` the list of every rank's results in rank order."""
    if group is None:
        return [fn()] if gather else fn()
    import torch.distributed as dist

    rank = dist.get_rank(group)
    outcome = (None, None)
    if rank == 0 or not only_rank0:
        try:
            outcome = (fn(), None)
        except (ValueError, TypeError) as exc:
            outcome = (None, f"{type(exc).__name__}: {exc}")
    every = [None] * dist.get_world_size(group)
    dist.all_gather_object(every, outcome, group=group)
    errors = [f"rank {r}: {err}" for r, (_, err) in enumerate(every) if err]
    if errors:
        raise ValueError("; ".join(errors))
    return [result for result, _ in every] if gather else every[0][0]




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
        estimator: ``"full"``, ``"snis"``, ``"dol"`` or ``"cdol"`` (module docstring).
        num_queries: queries M per noise level.
        subset_size: L, the subset size of the subset estimators (1 <= L <= N).
        C: cDOL's constant (> 0); default 4N/L. Only for ``"cdol"``.
        seed: the seed of every draw (module docstring: per level and block derived seeds); any
            integer (Python or numpy), taken modulo 2**64.
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
            CPU, float64 on CUDA); see :func:`posterior_partial`. Both are exact to float64 rounding.
        common_random_numbers: use the same source rows, subsets and unit noise eps at every noise
            level (queries x = x_n + s eps), so the curve is smooth in s; each level's estimate is
            still unbiased (module docstring).
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    data = _as_2d(data)
    s = _check_sigmas(sigmas)
    M = _check_int(num_queries, "num_queries", 1)
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
    batch_size = _check_int(batch_size, "batch_size", 1)
    if not isinstance(common_random_numbers, (bool, np.bool_)):
        raise TypeError(f"common_random_numbers must be a bool, got {type(common_random_numbers).__name__}")
    common_random_numbers = bool(common_random_numbers)

    group = None
    if distributed is not False and distributed is not None:
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("distributed=True needs an initialised torch.distributed process group")
        group = dist.group.WORLD if distributed is True else distributed
    local = _LocalRows(data, device)
    # One pass over the data: NaN / Inf rows, the mean, and the checksum that a checkpoint records.
    ds = _Dataset(local, group, precision, checksum=checkpoint is not None)
    N = ds.N

    if estimator == "full":
        if subset_size is not None:
            raise ValueError("subset_size applies only to the subset estimators (snis, dol, cdol)")
        L = None
    else:
        if subset_size is None:
            raise ValueError(f"estimator {estimator!r} needs subset_size")
        L = _check_int(subset_size, "subset_size", 1)
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
            done = _load_checkpoint(path, settings)
        else:  # rank 0 reads, everyone gets the same levels (the file need not be on a shared disk)
            done = _on_all_ranks(lambda: _load_checkpoint(path, settings), group, only_rank0=True)

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
            levels[k] = _level(ds, float(sigma), draws, estimator=estimator, M=M, L=L, C=C, seed=seed,
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
