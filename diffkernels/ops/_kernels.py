"""One table from backend name to the module that implements the sparse-MSE primitives.

Each backend module offers ``sparse_mse_fwd``, ``sparse_mask`` and ``scale_rows_`` with the same
meaning (see diffkernels/reference/sparse_mse.py for the plain-PyTorch definition).
"""

from __future__ import annotations

import torch

from .. import _backend, _native
from ..reference import sparse_mse as _ref


class _Torch:
    sparse_mse_fwd = staticmethod(_ref.sparse_mse_fwd)
    scale_rows_ = staticmethod(_ref.scale_rows_)

    @staticmethod
    def sparse_mask(seed, B, C, R, mask_ratio, device):
        return _ref.keep_mask(B, C, R, mask_ratio, seed, device).contiguous()


class _Cpp:
    @staticmethod
    def sparse_mse_fwd(pred, target, mask_ratio, seed, channels, grad_scale):
        return _native.ops().sparse_mse_fwd(pred, target, mask_ratio, seed, channels, grad_scale)

    @staticmethod
    def sparse_mask(seed, B, C, R, mask_ratio, device):
        return _native.ops().sparse_mask(seed, B, C, R, mask_ratio)

    @staticmethod
    def scale_rows_(grad, factor):
        _native.ops().scale_rows_(grad, factor.contiguous())


def for_device(device: torch.device):
    name = _backend.select(device)
    if name == "triton":
        from ..triton import sparse_mse as triton_kernels

        return triton_kernels
    if name == "cpp":
        return _Cpp
    return _Torch
