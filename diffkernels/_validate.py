"""Argument checks shared by the public functions (each error names the argument), the test for the
ops' eager fast path, and the accumulation dtype that every layer uses."""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from .rng import seed_to_int64


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype sums and the gradient scale are kept in: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_float_tensor(x, name: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")


def check_real(value, name: str) -> float:
    """A real number (Python or numpy int/float; not bool, str or tensor) as a Python float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number (int or float), got {type(value).__name__}")
    return float(value)


def check_finite(value, name: str, *, minimum: float = -math.inf, strict: bool = False) -> float:
    """A finite real number >= ``minimum`` (> with ``strict``) as a Python float."""
    value = check_real(value, name)
    if not math.isfinite(value) or value < minimum or (strict and value == minimum):
        bound = f"> {minimum}" if strict else f">= {minimum}"
        raise ValueError(f"{name} must be a finite number {bound}, got {value}")
    return value


_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1


def check_mask_ratio(mask_ratio) -> float:
    if type(mask_ratio) is float and 0.0 <= mask_ratio < 1.0:  # the common case, checked in ~0.1 us
        return mask_ratio
    mask_ratio = check_real(mask_ratio, "mask_ratio")
    if not (0.0 <= mask_ratio < 1.0):  # also rejects NaN
        raise ValueError(f"mask_ratio must lie in [0, 1), got {mask_ratio}")
    return mask_ratio


def check_seed(seed) -> int:
    """Any integer seed (Python int or numpy integer), taken modulo 2**64, as a signed int64."""
    if type(seed) is int and _INT64_MIN <= seed <= _INT64_MAX:  # already its own int64 value
        return seed
    return seed_to_int64(seed)


def check_choice(value, name: str, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_not_meta(x: Tensor, name: str) -> None:
    """Reject a meta tensor where the result depends on the values (meta tensors hold no data)."""
    if x.device.type == "meta":
        raise ValueError(f"{name} is a meta tensor: meta tensors are not supported (the result depends on the values)")


def check_devices(tensors: dict, reference: str | None = None) -> torch.device:
    """All the tensors of ``tensors`` (name -> tensor or None) on one device, that of
    ``tensors[reference]`` (default: the first), and not meta outside tracing; returns the device.

    Checked before an op is dispatched: a tensor on another device would otherwise pick the
    dispatcher's kernel (a meta tensor selects the shape-only fake kernel, whose outputs hold
    uninitialised memory). Meta tensors (as after an empty-weights model init) hold no data, so
    the ops reject them in eager mode; under fake tensors and compile tracing they stay allowed.
    """
    reference = reference or next(iter(tensors))
    device = tensors[reference].device
    for name, t in tensors.items():
        if t is not None and t.device != device:
            raise ValueError(f"{name} must be on the device of {reference} ({device}), got {t.device}")
    if device.type == "meta" and not intercepted():
        raise ValueError(f"{reference} is a meta tensor: meta tensors are not supported (they hold no data; "
                         "materialise the tensors, e.g. load the weights, before calling)")
    return device


def check_fake_devices(op: str, *tensors) -> None:
    """In a fake (shape-only) kernel: every tensor on one device. The dispatcher runs the fake kernel
    for real tensors too when one argument is a meta tensor; it must fail rather than return
    uninitialised memory on the other device."""
    devices = {t.device for t in tensors if t is not None}
    if len(devices) > 1:
        raise ValueError(f"{op}: all tensor arguments must be on one device, got {sorted(map(str, devices))}")


def check_on_device(condition: Tensor, message: str, where: str | None = None) -> None:
    """A data-dependent check: a ValueError for CPU tensors; on the GPU, inside torch.compile or on
    fake tensors an asynchronous device-side assert instead, because reading the result would be a
    host sync (or impossible: a fake tensor holds no data). ``where`` (e.g. the public function)
    prefixes the assert's message, which surfaces far from the call."""
    from torch._subclasses.fake_tensor import is_fake

    if condition.device.type == "cpu" and not torch.compiler.is_compiling() and not is_fake(condition):
        if not bool(condition):
            raise ValueError(message)
    else:
        torch._assert_async(condition, f"{where}: {message}" if where else message)


def intercepted() -> bool:
    """Whether something intercepts the ops: torch.compile, export, make_fx or jit tracing, dispatch
    modes (FakeTensorMode, ...) or functorch transforms (vmap, grad)."""
    return bool(torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack()
                or torch._C._are_functorch_transforms_active() or torch._C._is_tracing())


_PLAIN_TENSORS = (Tensor, torch.nn.Parameter)


def eager_fast_path(*tensors) -> bool:
    """Whether an op may call its kernels directly instead of through its ``torch.library`` custom op.

    The custom op's Python dispatcher costs ~100 us a call, more than the kernels at small shapes.
    It is needed only where something intercepts the op: torch.compile, export, make_fx or jit
    tracing, dispatch modes (FakeTensorMode, ...), functorch transforms (vmap, grad) and tensor
    subclasses; plain eager calls on CPU or CUDA tensors skip it. ``None`` entries are ignored.
    """
    if intercepted():
        return False
    for t in tensors:
        if t is not None and (type(t) not in _PLAIN_TENSORS or not (t.is_cpu or t.is_cuda)):
            return False
    return True
