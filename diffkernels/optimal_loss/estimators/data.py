"""The data as the estimators see it: checked, centred on its mean, checksummed, and read by rows
or in chunks whether it is a tensor on any device, a numpy array / memmap, or a shard of a dataset
spread over ``torch.distributed`` ranks.

:class:`LocalRows` is what this process holds; :class:`Dataset` is the whole dataset as seen from
this process (its rows, or its shard plus the process group), with the two operations every
estimator needs: ``rows`` (gather rows by global index) and ``partial`` (softmax statistics over all
rows or a subset).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import Tensor

from ..._validate import check_not_meta
from ..distributed import all_merge_partials, gather_rows, on_all_ranks, shard_layout
from ..posterior import PosteriorPartial, merge_partials, posterior_partial

__all__ = ["as_2d", "data_checksum", "LocalRows", "Dataset", "HOST_CHUNK_ELEMENTS", "SCAN_ELEMENTS_CPU",
           "SCAN_ELEMENTS_CUDA", "COLUMN_SALT", "ROW_SALT"]

HOST_CHUNK_ELEMENTS = 1 << 25  # numpy data is read in chunks of this many elements (128 MiB of float32)
SCAN_ELEMENTS_CPU = 1 << 16  # the data pass (finiteness, mean, checksum) in cache-sized pieces
SCAN_ELEMENTS_CUDA = 1 << 24

_F64 = torch.float64


def as_2d(data, name: str = "data"):
    """(N, ...) tensor or numpy array -> (N, D) view, checked; errors name the argument ``name``."""
    if isinstance(data, Tensor):
        check_not_meta(data, name)
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


# --- the data checksum ----------------------------------------------------------------------

_MIX1 = 0xBF58476D1CE4E5B9 - (1 << 64)  # splitmix64's multipliers, as signed int64
_MIX2 = 0x94D049BB133111EB - (1 << 64)
_LOW32 = (1 << 32) - 1
COLUMN_SALT, ROW_SALT = 0x636F6C, 0x726F77


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
    columns = _mix64(torch.arange(D, dtype=torch.int64, device=device) + COLUMN_SALT)
    per_row = _mix64(rows.contiguous().view(torch.int64).bitwise_xor(columns)).sum(dim=1)
    keys = _mix64(torch.arange(first_row, first_row + n, dtype=torch.int64, device=device) + ROW_SALT)
    return int(_mix64(per_row.bitwise_xor_(keys)).sum()) % (1 << 64)


# --- this process's rows -----------------------------------------------------------------------


class LocalRows:
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


# --- the whole dataset -------------------------------------------------------------------------


class Dataset:
    """The whole dataset as seen by this process: its rows, or its shard plus the process group.

    Everything an estimator needs goes through two operations, ``rows`` (gather rows by global
    index) and ``partial`` (softmax statistics over all rows or a subset), which a distributed
    dataset completes across ranks (see :mod:`diffkernels.optimal_loss.distributed`). Both work on
    the rows less the dataset's mean ``center`` (the same on every rank).
    """

    def __init__(self, local: LocalRows, group=None, precision: Optional[str] = None, checksum: bool = True):
        self.local = local
        self.group = group
        self.precision = precision
        self.D = local.D
        if group is None:
            self.offset, self.N = 0, local.n
        else:
            self.offset, self.N = shard_layout(local.n, local.D, local.device, group)
        # Every rank scans its rows; the sums and checksums are combined in rank order, so every rank
        # gets the same mean and fingerprint (and a bad shard raises on every rank).
        scans = on_all_ranks(lambda: local.scan(self.offset, checksum), group, gather=True)
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
            part = all_merge_partials(part, self.group)
        return part
