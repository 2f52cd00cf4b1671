"""Argument checks of the posterior functions, and the float64 range they compute exactly in.

Every check raises a ValueError or TypeError naming the argument; bad values would otherwise give a
silent wrong answer (a NaN, or a row that is silently not excluded).
"""

from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
from torch import Tensor

from ..._validate import check_not_meta

__all__ = ["PRECISIONS", "check_inputs", "check_device", "check_chunk_size", "check_precision", "check_exclude",
           "check_index_offset", "check_data_shift", "per_query", "largest_magnitude", "check_data_finite",
           "choose_scale", "check_sigma_range", "check_logits_in_range", "SAFE_MAGNITUDE"]

PRECISIONS = ("auto", "float64")


def check_device(x: Tensor, name: str) -> None:
    check_not_meta(x, name)


def check_inputs(queries: Tensor, data: Tensor) -> None:
    for x, name, shape in ((queries, "queries", "(M, D)"), (data, "data", "(N, D)")):
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        check_device(x, name)
        if not x.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
        if x.dim() != 2:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(x.shape)}")
    if queries.shape[1] != data.shape[1]:
        raise ValueError("queries and data must have the same number of columns D, "
                         f"got {queries.shape[1]} and {data.shape[1]}")
    if queries.shape[1] == 0:
        raise ValueError("queries and data have no columns (D = 0)")


def per_query(value, name: str, M: int, device, positive: bool = True) -> Tensor:
    """A finite scalar or (M,) tensor as a float64 (M,) tensor on ``device``, checked (one host sync
    for a tensor: a non-finite or non-positive value would otherwise give a silent wrong answer)."""
    if isinstance(value, Tensor):
        check_device(value, name)
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


def check_chunk_size(chunk_size) -> Optional[int]:
    if chunk_size is None:
        return None
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral):
        raise TypeError(f"chunk_size must be an int or None, got {type(chunk_size).__name__}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return int(chunk_size)


def check_precision(precision: Optional[str], device: torch.device) -> str:
    """The engine: ``None`` means "auto" on the CPU and "float64" on CUDA."""
    if precision is None:
        # The 3xTF32 screening is implemented for CUDA but not yet verified on a GPU: until the GPU
        # pass has run its accuracy tests there, CUDA keeps the float64 engine unless asked.
        return "auto" if device.type == "cpu" else "float64"
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS} or None, got {precision!r}")
    return precision


def check_exclude(exclude_index, M: int, device, upper: Optional[int] = None) -> Optional[Tensor]:
    """exclude_index as int64 on ``device``: shape (M,), values >= -1 (-1: none) and < ``upper`` if given."""
    if exclude_index is None:
        return None
    if not isinstance(exclude_index, Tensor) or exclude_index.dtype not in (torch.int32, torch.int64):
        raise TypeError("exclude_index must be an int32/int64 tensor of shape (M,)")
    check_device(exclude_index, "exclude_index")
    if exclude_index.shape != (M,):
        raise ValueError(f"exclude_index must have shape (M,) = ({M},), got {tuple(exclude_index.shape)}")
    if M:  # one host sync: an index out of range would silently exclude nothing
        lo, hi = int(exclude_index.min()), int(exclude_index.max())
        if lo < -1 or (upper is not None and hi >= upper):
            allowed = f"[-1, {upper})" if upper is not None else ">= -1"
            raise ValueError(f"exclude_index values must be {allowed} (-1: exclude nothing), "
                             f"got {lo if lo < -1 else hi}")
    return exclude_index.to(device=device, dtype=torch.int64)


def check_index_offset(index_offset) -> int:
    if isinstance(index_offset, bool) or not isinstance(index_offset, numbers.Integral) or index_offset < 0:
        raise ValueError(f"index_offset must be an int >= 0, got {index_offset!r}")
    return int(index_offset)


def check_data_shift(data_shift, D: int, device) -> Optional[Tensor]:
    """data_shift as a finite float64 (D,) tensor on ``device``, or None."""
    if data_shift is None:
        return None
    if not isinstance(data_shift, Tensor) or not data_shift.dtype.is_floating_point:
        raise TypeError("data_shift must be a floating-point tensor of shape (D,)")
    check_device(data_shift, "data_shift")
    if data_shift.shape != (D,):
        raise ValueError(f"data_shift must have shape (D,) = ({D},), got {tuple(data_shift.shape)}")
    shift = data_shift.to(device=device, dtype=torch.float64)
    if not bool(torch.isfinite(shift).all()):
        raise ValueError("data_shift must be finite")
    return shift


# --- the float64 range ------------------------------------------------------------------------
#
# The engines square distances and norms and multiply them by 1 / (2 sigma^2). With every value of
# the queries and the data within SAFE_MAGNITUDE (or zero) no square overflows, and differences of
# distinct values do not square into float64's subnormals (where they would lose their digits).
# Outside it, queries, data and sigma are divided by a power of two (exact), which leaves the logits
# unchanged, and the results are scaled back.

SAFE_MAGNITUDE = (2.0**-400, 2.0**400)


def largest_magnitude(x: Tensor, name: str) -> float:
    """max |x| (0 for an empty x); ValueError naming ``name`` if x holds NaN or Inf (one host sync)."""
    if x.numel() == 0:
        return 0.0
    largest = float(x.abs().amax())
    if not math.isfinite(largest):
        raise ValueError(f"{name} must be finite (found NaN or Inf)")
    return largest


def check_data_finite(largest: Optional[Tensor], name: str = "data") -> float:
    """The largest |value| a :class:`~.streaming.DataSource` read, as a float; ValueError if not finite."""
    if largest is None:
        return 0.0
    value = float(largest)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite (found NaN or Inf)")
    return value


def choose_scale(largest: float) -> float:
    """1.0 if ``largest`` (the largest |value| of queries and data) is 0 or within SAFE_MAGNITUDE, else
    the power of two 2^e that brings it into [0.5, 1) (e clamped to float64's normal exponents)."""
    lo, hi = SAFE_MAGNITUDE
    if largest == 0.0 or lo <= largest <= hi:
        return 1.0
    return math.ldexp(1.0, min(max(math.frexp(largest)[1], -1021), 1023))


def check_sigma_range(sigma: Tensor, scale: float) -> None:
    """ValueError if 1 / (2 (sigma / scale)^2) overflows float64 for some query (one host sync)."""
    inv = 0.5 / (sigma / scale).square()
    if not bool(torch.isfinite(inv).all()):
        m = int((~torch.isfinite(inv)).nonzero()[0, 0])
        raise ValueError(f"sigma = {float(sigma[m])!r} (query {m}) is out of float64's range: 1 / sigma^2 overflows "
                         f"relative to the scale of the queries and data ({scale:g}); at such a sigma the posterior "
                         "is the nearest data row (knn)")


def check_logits_in_range(log_max: Tensor, sigma: Tensor, n_rows: int, exclude: Optional[Tensor],
                          first_index: int) -> None:
    """ValueError where a query had a data row but even its largest logit overflowed to -inf: sigma is
    too small for its distances to the data (the posterior's normaliser is below float64's range)."""
    empty = ~(log_max > float("-inf"))  # -inf or NaN
    if n_rows == 0:
        return
    if n_rows == 1 and exclude is not None:  # its only row excluded: no row, nothing to normalise
        empty &= exclude != first_index
    if bool(empty.any()):
        m = int(empty.nonzero()[0, 0])
        raise ValueError(f"sigma = {float(sigma[m])!r} (query {m}) is out of float64's range for the distance from "
                         "the query to the data: every logit -||x - alpha y||^2 / (2 sigma^2) is below -1.8e308; at "
                         "such a sigma the posterior is the nearest data row (knn)")
