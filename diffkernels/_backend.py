"""Which backend runs an op: ``triton`` | ``cuda`` | ``cpp`` | ``torch``.

Defaults (``default``): CUDA tensors -> the CUDA kernels of csrc/ where they are built (compiled
with nvcc into the native library where torch is a CUDA build and nvcc is found), else the Triton
kernels; CPU tensors -> the C++ kernels; anything else, or a backend that is missing -> ``torch``,
the plain-PyTorch reference. ``DIFFKERNELS_BACKEND`` or ``diffkernels.use_backend(name)`` forces
one; a forced backend that cannot run on the given tensors is an error, never a silent fallback.
What each backend runs for each primitive is the table of diffkernels/ops/_kernels.py.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import threading

import torch

from . import _native

BACKENDS = ("triton", "cuda", "cpp", "torch")


class _Override(threading.local):
    name = None  # a class default: reading it costs no failed attribute look-up (the eager fast paths ask per call)


_override = _Override()


def interpreting() -> bool:
    """True when Triton kernels run in the interpreter (on CPU tensors), as in CI."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _triton_installed() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "the triton package is not installed"
    return None


def unavailable(name: str, device: torch.device) -> str | None:
    """Why ``name`` cannot run on ``device``, or None if it can."""
    if name == "torch":
        return None
    if name == "triton":
        why = _triton_installed()
        if why:
            return why
        if device.type == "cuda" or (device.type == "cpu" and interpreting()):
            return None
        return f"Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors), got {device.type}"
    if name == "cpp":
        if device.type != "cpu":
            return f"the C++ kernels take CPU tensors, got {device.type}"
        return None if _native.load() else _native.status()
    if name == "cuda":
        why = _native.cuda_unavailable()  # build-level reasons first: they say what to fix
        if why:
            return why
        if device.type != "cuda":
            return f"the CUDA kernels take CUDA tensors, got {device.type}"
        if not torch.cuda.is_available():
            return "no CUDA device is visible"
        return None
    raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS}")


def forced() -> str | None:
    name = getattr(_override, "name", None) or os.environ.get("DIFFKERNELS_BACKEND") or None
    if name is not None and name not in BACKENDS:
        raise ValueError(f"DIFFKERNELS_BACKEND={name!r} is not one of {BACKENDS}")
    return name


def select(device: torch.device) -> str:
    """The backend that runs an op on tensors of ``device``."""
    name = forced()
    if name is not None:
        why = unavailable(name, device)
        if why:
            raise RuntimeError(f"diffkernels backend {name!r} was requested but cannot run here: {why}")
        return name
    return default(device)


def default(device: torch.device) -> str:
    """The backend used for ``device`` when none is forced.

    CUDA tensors: the CUDA C++ kernels of csrc/ where they are built (measured on an H100, see
    benchmarks/results/h100/cuda_vs_triton_h100.md: sparse_mse 2x faster kernels and 4x less launch
    overhead than Triton; mask_tokens faster per eager call), else the Triton kernels.
    """
    if device.type == "cuda":
        for name in ("cuda", "triton"):
            if unavailable(name, device) is None:
                return name
    if device.type == "cpu" and unavailable("cpp", device) is None:
        return "cpp"
    return "torch"


@contextlib.contextmanager
def use_backend(name: str | None):
    """Force a backend inside a ``with`` block (``None`` restores the defaults); thread-local.

    ``name``: one of ``"triton"``, ``"cuda"``, ``"cpp"``, ``"torch"`` (the plain-PyTorch
    reference). An op whose tensors the forced backend cannot take raises a RuntimeError.

    Examples:
        >>> from diffkernels import sparse_mask, use_backend
        >>> with use_backend("torch"):  # the reference implementation
        ...     reference = sparse_mask((2, 8), 0.5, seed=1)
        >>> bool((reference == sparse_mask((2, 8), 0.5, seed=1)).all())  # the default backend agrees bit for bit
        True
    """
    if name is not None and name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS}")
    previous = getattr(_override, "name", None)
    _override.name = name
    try:
        yield
    finally:
        _override.name = previous


def backends() -> dict:
    """What each backend can do here, and which one runs by default per device.

    Returns a dict: for each backend name, ``"available..."`` or the reason it cannot run; under
    ``"default"``, the backend used per device type; under ``"forced"``, a forced backend if any.

    Examples:
        >>> from diffkernels import backends
        >>> report = backends()
        >>> {"triton", "cuda", "cpp", "torch", "default"} <= set(report)
        True
        >>> report["torch"]
        'available (plain-PyTorch reference)'
        >>> report["default"]["cpu"] in ("cpp", "torch")
        True
    """
    cpu = torch.device("cpu")
    gpu = torch.device("cuda")
    _native.load()
    triton_device = gpu if torch.cuda.is_available() else cpu
    triton_note = " (interpreter, TRITON_INTERPRET=1)" if interpreting() else ""
    report = {
        "triton": unavailable("triton", triton_device) or "available" + triton_note,
        "cuda": unavailable("cuda", gpu) or _native.cuda_status(),
        "cpp": _native.status(),
        "torch": "available (plain-PyTorch reference)",
    }
    report["default"] = {"cpu": default(cpu)}
    if torch.cuda.is_available():
        report["default"]["cuda"] = default(gpu)
    forced_name = forced()
    if forced_name:
        report["forced"] = forced_name
    return report
