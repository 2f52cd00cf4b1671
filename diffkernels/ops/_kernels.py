"""One table from backend name to the implementation of each kernel primitive.

Every backend offers the same primitives with the same meaning; their plain-PyTorch definitions
are in diffkernels/reference/ (sparse_mse.py, mask_tokens.py). Triton modules are imported lazily so
that TRITON_INTERPRET can be set before the first kernel is defined.
"""

from __future__ import annotations

import torch

from .. import _backend, _native
from ..reference import mask_tokens as _ref_mdm
from ..reference import sparse_mse as _ref_sparse


class _Torch:
    sparse_mse_fwd = staticmethod(_ref_sparse.sparse_mse_fwd)
    scale_rows_ = staticmethod(_ref_sparse.scale_rows_)
    mask_tokens = staticmethod(_ref_mdm.mask_tokens_fwd)

    @staticmethod
    def sparse_mask(seed, B, C, R, mask_ratio, device):
        return _ref_sparse.keep_mask(B, C, R, mask_ratio, seed, device).contiguous()


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

    @staticmethod
    def mask_tokens(ids, table, seed, mask_id, eligible, rare, mirror):
        return _native.ops().mask_tokens(ids, table, seed, mask_id, eligible, rare, mirror)


class _Cuda:
    """The CUDA kernels of csrc/*_cuda.cu: the same native ops as _Cpp, dispatched on CUDA tensors."""

    @staticmethod
    def sparse_mse_fwd(pred, target, mask_ratio, seed, channels, grad_scale):
        return _native.ops().sparse_mse_fwd(pred, target, mask_ratio, seed, channels, grad_scale)

    @staticmethod
    def sparse_mask(seed, B, C, R, mask_ratio, device):
        # No tensor argument to dispatch on: the CUDA-only op takes the device.
        return _native.ops().sparse_mask_cuda(seed, B, C, R, mask_ratio, torch.device(device))

    @staticmethod
    def scale_rows_(grad, factor):
        _native.ops().scale_rows_(grad, factor)

    @staticmethod
    def mask_tokens(ids, table, seed, mask_id, eligible, rare, mirror):
        return _native.ops().mask_tokens(ids, table, seed, mask_id, eligible, rare, mirror)


class _Triton:
    @staticmethod
    def sparse_mse_fwd(*args):
        from ..triton import sparse_mse

        return sparse_mse.sparse_mse_fwd(*args)

    @staticmethod
    def sparse_mask(*args):
        from ..triton import sparse_mse

        return sparse_mse.sparse_mask(*args)

    @staticmethod
    def scale_rows_(*args):
        from ..triton import sparse_mse

        return sparse_mse.scale_rows_(*args)

    @staticmethod
    def mask_tokens(*args):
        from ..triton import mask_tokens

        return mask_tokens.mask_tokens(*args)


_BY_NAME = {"triton": _Triton, "cuda": _Cuda, "cpp": _Cpp, "torch": _Torch}


def for_device(device: torch.device):
    return _BY_NAME[_backend.select(device)]
