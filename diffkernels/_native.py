"""Finding or building the C++ (CPU) and CUDA kernels of csrc/.

Order: a prebuilt library from an ahead-of-time ``setup.py`` build (``diffkernels/_C*.so``, e.g.
in a wheel), then a just-in-time build with ninja into a per-user cache, compiled against the
torch that is installed right now (so the ABI always matches). The prebuilt library is loaded
only if its build record (``_build_info.json``, see ``_build_record``) names this torch (version,
C++11 ABI, CUDA) and Python, and the sources beside it are the ones it was built from; under
another torch one line on stderr says so and the JIT build takes over. An in-place build of
other sources (an editable install after an edit) is ignored without a word.
``DIFFKERNELS_NO_NATIVE=1`` skips both; the package then runs on the reference backend. Nothing
here runs at import time: the first op that wants a native backend triggers it.

The cache (``$DIFFKERNELS_CACHE``, else ``~/.cache/diffkernels``; kept by ``_native_cache``) holds one
directory per build key: a hash of the sources, the compiler flags, torch's version and C++ ABI, and the Python and
machine tags -- not of the checkout's path, so every checkout or version with the same sources
shares one build. A build runs in a private temporary directory under an OS lock (``flock``,
released by the kernel even when the process is killed) and is published by an atomic rename,
together with the library's size and sha256. A cached library is loaded only if it matches that
record (a truncated file would crash the interpreter inside ``dlopen``), and loading it writes
nothing, so a read-only cache with a finished build works. A process that finds the lock taken
waits for the other build at most ``DIFFKERNELS_LOCK_TIMEOUT`` seconds (default 600). Whenever
the native kernels cannot be had (no compiler, unwritable cache, failed build, lock timeout...)
one line on stderr says why and how to fix it, ``backends()`` reports the same reason, and the
ops run on the plain-PyTorch reference.

The CUDA sources (``*_cuda.cu``) are compiled into the same library, by nvcc, only where torch
is a CUDA build (``torch.version.cuda``) and a CUDA toolkit is found
(``torch.utils.cpp_extension.CUDA_HOME``); ``DIFFKERNELS_NO_CUDA=1`` leaves them out. If the
CUDA build fails, the CPU-only library is built instead and ``cuda_status()`` says why (the
compiler output is kept in ``cuda_build_error.log`` in the cache directory). The target GPU
architectures are torch's choice: ``TORCH_CUDA_ARCH_LIST`` if set, else the visible GPUs'.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from pathlib import Path

import torch

from . import _build_record

# The cache of JIT builds (its names are importable from here as well).
from ._native_cache import (  # noqa: F401
    CUDA_HEADERS,
    CUDA_SOURCES,
    HEADERS,
    LOCK_TIMEOUT_S,
    SOURCES,
    NativeUnavailable,
    _build_key,
    _check_cached,
    _checksum_path,
    _lib_name,
    _load_or_build,
    _lock_timeout,
    _summary,
    _write_checksum,
    cache_dir,
)

_PREBUILT_DIR = Path(__file__).resolve().parent  # where setup.py puts _C*.so and its build record
_CSRC = Path(__file__).resolve().parent.parent / "csrc"
_PACKAGED_CSRC = Path(__file__).resolve().parent / "csrc"  # where a wheel carries the sources
NAMESPACE = "diffkernels_native"

_lock = threading.Lock()
_state: dict[str, object] = {
    "loaded": False, "error": None, "how": None, "cuda": False, "cuda_error": None, "path": None,
    "prebuilt_refused": None}


def _flag(name: str) -> bool:
    return os.environ.get(name, "0") not in ("", "0", "false", "False")


def _disabled() -> bool:
    return _flag("DIFFKERNELS_NO_NATIVE")


def cuda_build_unavailable() -> str | None:
    """Why the CUDA sources cannot be compiled here, or None if they can (nothing is built)."""
    if _flag("DIFFKERNELS_NO_CUDA"):
        return "disabled by DIFFKERNELS_NO_CUDA=1"
    if getattr(torch.version, "hip", None):
        return f"torch {torch.__version__} is a ROCm build; the CUDA kernels need a CUDA build of torch"
    if not torch.version.cuda:
        return f"torch {torch.__version__} is a CPU-only build (torch.version.cuda is None)"
    from torch.utils import cpp_extension

    home = cpp_extension.CUDA_HOME
    if home is None or not os.path.exists(os.path.join(home, "bin", "nvcc")):
        return f"no CUDA toolkit (nvcc) found for torch's CUDA {torch.version.cuda}: set CUDA_HOME"
    src = _csrc_dir()
    if src is None or not all((src / f).is_file() for f in CUDA_SOURCES + CUDA_HEADERS):
        return "the CUDA sources are not shipped with this installation"
    return None


def _csrc_dir() -> Path | None:
    for d in (_CSRC, _PACKAGED_CSRC):
        if all((d / f).is_file() for f in SOURCES + HEADERS):
            return d
    return None


def _load_prebuilt() -> bool:
    """Load setup.py's library if its build record matches this torch and these sources."""
    record_path = _PREBUILT_DIR / _build_record.RECORD
    if not record_path.is_file():
        return False  # no ahead-of-time build (a library without a record is never trusted)
    try:
        record = json.loads(record_path.read_text())
        lib = _PREBUILT_DIR / Path(record["library"]).name
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return _refuse_prebuilt(f"the prebuilt kernels' build record {record_path} is unreadable ({exc})")
    if not lib.is_file():
        return _refuse_prebuilt(f"the prebuilt library {lib} named by {record_path} is missing")
    src = _csrc_dir()
    if src is not None and _build_record.sources_digest(src) != record.get("sources_sha256"):
        return False  # an in-place build of other sources (an editable install after an edit)
    why = _build_record.mismatch(record)
    if why is not None:
        return _refuse_prebuilt(why)
    try:
        torch.ops.load_library(str(lib))
    except (OSError, RuntimeError) as exc:
        return _refuse_prebuilt(f"the prebuilt library {lib} does not load ({_summary(exc)})")
    _state["path"] = str(lib)
    _state["how"] = f"prebuilt by setup.py for torch {record['torch']}: {lib}"
    return True


def _refuse_prebuilt(why: str) -> bool:
    """Say (once, and only if a compile follows) why the prebuilt library is passed over; False."""
    _state["prebuilt_refused"] = why
    if not _jit_cached():
        _say(f"{why}; compiling them for this torch")
    return False


def _jit_cached() -> bool:
    """Whether the JIT build that ``_build`` would load first is already in the cache (nothing is built)."""
    src = _csrc_dir()
    if src is None:
        return False
    try:
        name = _lib_name(src, with_cuda=cuda_build_unavailable() is None)
    except OSError:
        return False
    return _check_cached(cache_dir() / name / f"{name}.so") is None


def _jit_build(with_cuda: bool) -> Path:
    """Load the cached library for these sources, building and publishing it first if needed."""
    src = _csrc_dir()
    if src is None:
        raise NativeUnavailable("the csrc/ sources are not shipped with this installation: reinstall diffkernels")
    final, lib = _load_or_build(src, with_cuda)
    _state["path"] = str(lib)
    return final


def _has_cuda_kernels() -> bool:
    """Whether the loaded library registered CUDA kernels (True for a build with the .cu sources)."""
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(f"{NAMESPACE}::sparse_mse_fwd", "CUDA")
                    and torch._C._dispatch_has_kernel_for_dispatch_key(f"{NAMESPACE}::mask_tokens", "CUDA"))
    except Exception:  # private API changed: fall back to the op that exists only in CUDA builds
        return hasattr(getattr(torch.ops, NAMESPACE), "sparse_mask_cuda")


def _build() -> str:
    """JIT-build (or load from the cache) the library, with the CUDA kernels where possible; returns how."""
    why_not = cuda_build_unavailable()
    if why_not is None:
        try:
            final = _jit_build(with_cuda=True)
            return f"JIT-compiled with the CUDA kernels, cached in {final}"
        except Exception as exc:  # nvcc error, missing CUDA libraries...: keep the CPU kernels
            why = str(exc) if isinstance(exc, NativeUnavailable) else _summary(exc)
            _state["cuda_error"] = f"the CUDA build failed, the CPU kernels were built alone: {why}"
            _say(f"the CUDA kernels are unavailable, CUDA tensors use the Triton kernels: {why}")
    final = _jit_build(with_cuda=False)
    return f"JIT-compiled, cached in {final}"


def _say(message: str) -> None:
    """One line on stderr (a compiler's multi-line output is folded into it)."""
    print("diffkernels: " + " ".join(message.split()), file=sys.stderr, flush=True)


def load() -> bool:
    """Load the C++ kernels once; returns whether ``torch.ops.diffkernels_native`` is usable."""
    with _lock:
        if _state["loaded"] or _state["error"] is not None:
            return bool(_state["loaded"])
        if _disabled():
            _state["error"] = "disabled by DIFFKERNELS_NO_NATIVE=1"
            return False
        try:
            if not _load_prebuilt():
                _state["how"] = _build()
                if _state["prebuilt_refused"]:
                    _state["how"] += f" (the prebuilt library was passed over: {_state['prebuilt_refused']})"
            _state["loaded"] = True
            _state["cuda"] = _has_cuda_kernels()
        except NativeUnavailable as exc:
            _state["error"] = " ".join(str(exc).split())
        except Exception as exc:  # anything unforeseen: still a fallback, never a crash
            _state["error"] = f"loading the native kernels failed ({_summary(exc)})"
        if not _state["loaded"]:
            _say(f"the C++ kernels are unavailable, CPU tensors use the plain-PyTorch reference (slower): "
                 f"{_state['error']}")
        return bool(_state["loaded"])


def status() -> str:
    if _state["loaded"]:
        return f"available ({_state['how']})"
    if _state["error"] is not None:
        return f"unavailable: {_state['error']}"
    return "not loaded yet"


def cuda_unavailable() -> str | None:
    """Why the native library has no CUDA kernels here, or None if it has them (loads it)."""
    if _state["cuda"] and not _flag("DIFFKERNELS_NO_CUDA"):
        return None  # the per-call fast path: no file-system checks
    if _disabled():
        return "native code is disabled by DIFFKERNELS_NO_NATIVE=1"
    build_why = cuda_build_unavailable()
    if not torch.version.cuda or getattr(torch.version, "hip", None) or _flag("DIFFKERNELS_NO_CUDA"):
        return build_why  # no CUDA torch, or CUDA switched off: nothing to load or build
    if not load():
        return f"the native library did not load: {status()}"
    if _state["cuda"]:
        return None  # e.g. a prebuilt library with CUDA kernels, even where nvcc is missing now
    if _state["cuda_error"]:
        return str(_state["cuda_error"])
    if build_why is not None:
        return build_why
    if str(_state["how"]).startswith("prebuilt"):
        return ("the prebuilt diffkernels._C has no CUDA kernels (setup.py built it without nvcc, or its CUDA "
                "build failed): reinstall with `pip install --no-build-isolation -e .` where nvcc is found")
    return "the native library was built without the CUDA kernels"


def cuda_status() -> str:
    why = cuda_unavailable()
    if why is not None:
        return f"unavailable: {why}"
    return f"available (CUDA {torch.version.cuda}; {_state['how']})"


def ops():
    if not load():
        raise RuntimeError(f"the native (C++/CUDA) backend is unavailable: {status()}")
    return getattr(torch.ops, NAMESPACE)
