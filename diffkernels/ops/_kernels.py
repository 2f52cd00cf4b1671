"""The backend table: for each backend, the implementation of each kernel primitive.

Every backend implements the primitives of ``Kernels`` with one meaning, defined by their
plain-PyTorch versions in diffkernels/reference/ (which are the ``torch`` backend). Per primitive
(``TABLE``), the backends run:

* ``sparse_mse_fwd``, ``sparse_mask``: triton/sparse_mse.py, csrc/sparse_mse_cuda.cu (cuda),
  csrc/sparse_mse.cpp (cpp), reference/sparse_mse.py (torch);
* ``scale_rows_``: triton/scale_rows.py, csrc/sparse_mse_cuda.cu, csrc/sparse_mse.cpp (the native
  library registers it with the sparse loss), reference/scale_rows.py;
* ``mask_tokens``: triton/mask_tokens.py, csrc/mask_tokens_cuda.cu, csrc/mask_tokens.cpp,
  reference/mask_tokens.py;
* ``masked_ce_rows``: triton/masked_ce.py and reference/masked_ce.py only. There is no C++ or CUDA
  kernel for it (the masked cross-entropy's GEMMs are cuBLAS/BLAS): ``cpp`` runs the reference,
  ``cuda`` the Triton kernel (the reference where Triton is not installed).

``kernels_for(name)`` gives a backend's primitives, ``for_device(device)`` those of the backend
that runs on ``device`` (diffkernels._backend). Each implementation is imported on first use:
Triton modules must not be imported before TRITON_INTERPRET is set, nor the native library
loaded before a native backend is wanted.
"""

from __future__ import annotations

import importlib
from typing import Optional, Protocol, cast

import torch
from torch import Tensor

from .. import _backend, _native


class Kernels(Protocol):
    """The primitives of one backend. float16/bfloat16/float32 inputs accumulate in float32,
    float64 inputs in float64 (``masked_ce_rows``: float32 in the Triton kernel)."""

    def sparse_mse_fwd(self, pred: Tensor, target: Tensor, mask_ratio: float, seed: int, channels: int,
                       grad_scale: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """For contiguous pred, target of B rows viewed as (B, channels, R), with the keep-mask
        ``sparse_mask(seed, B, channels, R, mask_ratio)``: the per-row sums of keep * (pred - target)**2
        (B,) float64, the kept counts (B,) int64 and, with ``grad_scale`` (B,) in the accumulation
        dtype, ``grad_scale[b] * keep * (pred - target)`` in pred's dtype (else an empty tensor)."""
        ...

    def sparse_mask(self, seed: int, B: int, C: int, R: int, mask_ratio: float, device: torch.device) -> Tensor:
        """The (B, C, R) contiguous bool keep-mask U(seed, b * R + r) >= mask_ratio (diffkernels.rng),
        one draw per (b, r) shared by the C channels."""
        ...

    def scale_rows_(self, grad: Tensor, factor: Tensor) -> None:
        """grad[b] *= factor[b] in place for a contiguous grad; rows whose factor is exactly 1 are not touched."""
        ...

    def mask_tokens(self, ids: Tensor, table: Tensor, seed: int, mask_id: int, eligible: Optional[Tensor],
                    rare: Optional[Tensor], mirror: bool) -> tuple[Tensor, Tensor, Tensor]:
        """(noisy ids, masked, weights), each (copies, B, L), of contiguous (B, L) ids with the
        (B, 8) float32 row table of diffkernels.ops.mask_tokens.row_table and optional (B, L) bool
        eligible / rare flags; one uniform U(seed, b * L + l) per token."""
        ...

    def masked_ce_rows(self, x: Tensor, targets: Tensor, coef: Tensor, ce_out: Tensor, *,
                       rows: Optional[Tensor] = None, grad: Optional[Tensor] = None) -> None:
        """Cross-entropy of the rows of logits ``x`` (n, V), unit stride along V, written to ``ce_out``,
        and with ``grad`` (n, V, possibly ``x`` itself) ``coef * (softmax - onehot)`` in grad's dtype.
        ``rows=None``: row i is token i and rows with coef 0 are never read (CE 0, zero gradient);
        ``rows`` (n,) int64: row i is token ``rows[i]``. Token t's target, coefficient and CE slot
        are ``targets[t]``, ``coef[t]``, ``ce_out[t]``. ``x`` is left unchanged unless it is ``grad``."""
        ...


_REF = "reference.masked_ce:masked_ce_rows"
_TRITON_CE = "triton.masked_ce:masked_ce_rows"

# primitive -> backend -> where its implementation is: "module:function" under diffkernels, or
# "native:op" for torch.ops.diffkernels_native.op (one library: the op dispatches on the tensors'
# device to the C++ or the CUDA kernel); a tuple: the first that imports.
TABLE: dict[str, dict[str, str | tuple[str, ...]]] = {
    "sparse_mse_fwd": {"triton": "triton.sparse_mse:sparse_mse_fwd", "cuda": "native:sparse_mse_fwd",
                       "cpp": "native:sparse_mse_fwd", "torch": "reference.sparse_mse:sparse_mse_fwd"},
    "sparse_mask": {"triton": "triton.sparse_mse:sparse_mask", "cuda": "ops._kernels:sparse_mask_cuda",
                    "cpp": "ops._kernels:sparse_mask_cpp", "torch": "reference.sparse_mse:keep_mask"},
    "scale_rows_": {"triton": "triton.scale_rows:scale_rows_", "cuda": "native:scale_rows_",
                    "cpp": "ops._kernels:scale_rows_cpp", "torch": "reference.scale_rows:scale_rows_"},
    "mask_tokens": {"triton": "triton.mask_tokens:mask_tokens", "cuda": "native:mask_tokens",
                    "cpp": "native:mask_tokens", "torch": "reference.mask_tokens:mask_tokens_fwd"},
    "masked_ce_rows": {"triton": _TRITON_CE, "cuda": (_TRITON_CE, _REF), "cpp": _REF, "torch": _REF},
}


def sparse_mask_cpp(seed: int, B: int, C: int, R: int, mask_ratio: float, device: torch.device) -> Tensor:
    return _native.ops().sparse_mask(seed, B, C, R, mask_ratio)  # the CPU op: no device argument


def scale_rows_cpp(grad: Tensor, factor: Tensor) -> None:
    _native.ops().scale_rows_(grad, factor.contiguous())  # the CPU op takes a contiguous factor


def sparse_mask_cuda(seed: int, B: int, C: int, R: int, mask_ratio: float, device: torch.device) -> Tensor:
    # No tensor argument to dispatch on: the CUDA-only op takes the device.
    return _native.ops().sparse_mask_cuda(seed, B, C, R, mask_ratio, torch.device(device))


def _resolve(where: str | tuple[str, ...]):
    if isinstance(where, tuple):
        for i, option in enumerate(where):
            try:
                return _resolve(option)
            except ImportError:
                if i == len(where) - 1:
                    raise
    module, name = where.split(":")
    if module == "native":
        return getattr(_native.ops(), name)
    return getattr(importlib.import_module(f"diffkernels.{module}"), name)


class _Binding:
    """One backend's primitives, each looked up in TABLE on first use and then kept as an attribute."""

    def __init__(self, name: str):
        self.name = name

    def __getattr__(self, primitive: str):
        if primitive not in TABLE:
            raise AttributeError(f"{primitive!r} is not a kernel primitive; they are {sorted(TABLE)}")
        implementation = _resolve(TABLE[primitive][self.name])
        setattr(self, primitive, implementation)  # later look-ups skip __getattr__
        return implementation

    def __repr__(self) -> str:
        return f"<diffkernels {self.name} kernels>"


_BINDINGS = {name: _Binding(name) for name in _backend.BACKENDS}


def kernels_for(name: str) -> Kernels:
    """The primitives of backend ``name`` (it is not checked that they can run here)."""
    if name not in _BINDINGS:
        raise ValueError(f"unknown backend {name!r}; choose one of {_backend.BACKENDS}")
    return cast(Kernels, _BINDINGS[name])


def for_device(device: torch.device) -> Kernels:
    """The primitives of the backend that runs on ``device`` (forced, or the default)."""
    return cast(Kernels, _BINDINGS[_backend.select(device)])
