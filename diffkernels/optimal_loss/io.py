"""Loading datasets for the optimal-loss and memorisation commands: .npy, .npz, .pt, .safetensors, ``digits``.

Every loader returns the data flattened to (N, D) (a view where possible; a ``.npy`` file is
memory-mapped, so it may be larger than memory), after checking it: a readable file of a known
kind, at least 2 dimensions (one row per sample), not empty, real numbers, no NaN or Inf rows.
Problems raise :class:`DataError` with a one-line message naming the file and the problem.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch

__all__ = ["DataError", "load_data", "validate_data", "DIGITS"]

DIGITS = "digits"
_CHUNK_ELEMENTS = 1 << 25


class DataError(ValueError):
    """Unreadable or malformed data (the CLI prints the message and exits with code 2)."""


def _pick(items: dict, key: Optional[str], name: str):
    """The array under ``key``, or the first one."""
    if not items:
        raise DataError(f"{name} contains no arrays")
    if key is None:
        return next(iter(items.values()))
    if key not in items:
        raise DataError(f"{name} has no array named {key!r} (it has: {', '.join(map(str, items))})")
    return items[key]


def _load_digits():
    from ..datasets import load_digits

    try:
        return load_digits().numpy()  # (1797, 1, 8, 8) in [-1, 1]
    except ImportError as exc:
        raise DataError("'digits' needs scikit-learn: pip install scikit-learn") from exc


def _load_file(path: Path, key: Optional[str]):
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return np.load(path, mmap_mode="r", allow_pickle=False)
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            name = _pick({n: n for n in z.files}, key, str(path))
            return z[name]
    if suffix in (".pt", ".pth"):
        obj = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(obj, torch.Tensor):
            if key is not None:
                raise DataError(f"{path} holds a single tensor; --key does not apply")
            return obj
        if isinstance(obj, (list, tuple)):
            obj = {str(i): v for i, v in enumerate(obj)}
        if not isinstance(obj, dict):
            raise DataError(f"{path} holds a {type(obj).__name__}, not a tensor or a dict of tensors")
        tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        return _pick(tensors, key, str(path))
    if suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as exc:
            raise DataError(f"reading {path} needs the safetensors package: pip install safetensors") from exc
        return _pick(load_file(str(path)), key, str(path))
    raise DataError(f"{path}: unknown file type {suffix or '(none)'!r}; use .npy, .npz, .pt, .safetensors or 'digits'")


def validate_data(data, name: str = "data", *, rows=None):
    """Check ``data`` (tensor or numpy array) and flatten it to (N, D); DataError if malformed.

    ``rows``: a function N -> (lo, hi), called once the shape is checked: only rows lo..hi-1 are
    then scanned for NaN / Inf and returned, as (hi - lo, D) (a memory-mapped ``.npy`` file is
    read no further); errors name rows by their index in the whole of ``data``.
    """
    if isinstance(data, torch.Tensor):
        if data.dtype.is_complex or data.dtype == torch.bool:
            raise DataError(f"{name} has dtype {data.dtype}; need real numbers")
    elif isinstance(data, np.ndarray):
        if data.dtype.kind not in "fiu":
            raise DataError(f"{name} has dtype {data.dtype}; need real numbers")
    else:
        raise DataError(f"{name} is a {type(data).__name__}, not an array")
    if data.ndim < 2:
        raise DataError(f"{name} has shape {tuple(data.shape)} (rank {data.ndim}); need (N, ...) with one row "
                        "per sample and at least 2 dimensions")
    N = data.shape[0]
    D = int(np.prod(data.shape[1:]))
    if N == 0 or D == 0:
        raise DataError(f"{name} is empty: shape {tuple(data.shape)}")
    lo, hi = (0, N) if rows is None else rows(N)
    flat = data[lo:hi].reshape(hi - lo, D)
    step = max(1, _CHUNK_ELEMENTS // D)
    for start in range(0, hi - lo, step):
        block = flat[start:start + step]
        if isinstance(block, torch.Tensor):
            bad = (~torch.isfinite(block)).any(dim=1).nonzero().flatten().tolist()
        else:
            bad = np.flatnonzero(~np.isfinite(block).all(axis=1)).tolist() if block.dtype.kind == "f" else []
        if bad:
            raise DataError(f"{name} row {lo + start + bad[0]} contains NaN or Inf")
    return flat


def load_data(spec: str, key: Optional[str] = None, *, rows=None):
    """Load ``spec`` (a file path or ``digits``) as a checked (N, D) numpy array / memmap or tensor.

    ``rows``: only some rows, as in :func:`validate_data`.
    """
    if spec == DIGITS:
        return validate_data(_load_digits(), DIGITS, rows=rows)
    path = Path(spec)
    if not path.exists():
        raise DataError(f"{spec}: no such file")
    if path.is_dir():
        raise DataError(f"{spec} is a directory, not a data file")
    try:
        data = _load_file(path, key)
    except DataError:
        raise
    except Exception as exc:  # numpy / torch / zip / safetensors errors on a damaged or foreign file
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"cannot read {spec}: {msg}") from exc
    return validate_data(data, spec, rows=rows)
