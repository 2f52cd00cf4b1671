"""Argument checks shared by the public functions (each error names the argument), and the test
for the ops' eager fast path."""

from __future__ import annotations

import torch
from torch import Tensor

from .rng import seed_to_int64


def check_float_tensor(x, name: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")


def check_mask_ratio(mask_ratio) -> float:
    if isinstance(mask_ratio, bool) or not isinstance(mask_ratio, (int, float)):
        raise TypeError(f"mask_ratio must be a Python float in [0, 1), got {type(mask_ratio).__name__}")
    mask_ratio = float(mask_ratio)
    if not (0.0 <= mask_ratio < 1.0):  # also rejects NaN
        raise ValueError(f"mask_ratio must lie in [0, 1), got {mask_ratio}")
    return mask_ratio


def check_seed(seed) -> int:
    """Any integer seed (Python int or numpy integer), taken modulo 2**64, as a signed int64."""
    return seed_to_int64(seed)


def check_choice(value, name: str, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


_PLAIN_TENSORS = (Tensor, torch.nn.Parameter)


def eager_fast_path(*tensors) -> bool:
    """Whether an op may call its kernels directly instead of through its ``torch.library`` custom op.

    The custom op's Python dispatcher costs ~100 us a call, more than the kernels at small shapes.
    It is needed only where something intercepts the op: torch.compile, export, make_fx or jit
    tracing, dispatch modes (FakeTensorMode, ...), functorch transforms (vmap, grad) and tensor
    subclasses; plain eager calls on CPU or CUDA tensors skip it. ``None`` entries are ignored.
    """
    if (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack()
            or torch._C._are_functorch_transforms_active() or torch._C._is_tracing()):
        return False
    for t in tensors:
        if t is not None and (type(t) not in _PLAIN_TENSORS or not (t.is_cpu or t.is_cuda)):
            return False
    return True
