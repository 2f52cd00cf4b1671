"""Finding or building the C++ (CPU) and CUDA kernels of csrc/.

Order: a prebuilt library from an ahead-of-time ``setup.py`` build (``diffkernels/_C*.so``),
then a just-in-time build with ninja into a per-user cache, compiled against the torch that
is installed right now (so the ABI always matches). ``DIFFKERNELS_NO_NATIVE=1`` skips both;
the package then runs on the reference backend. Nothing here runs at import time: the first
op that wants a native backend triggers it.

The CUDA sources (``*_cuda.cu``) are compiled into the same library, by nvcc, only where torch
is a CUDA build (``torch.version.cuda``) and a CUDA toolkit is found
(``torch.utils.cpp_extension.CUDA_HOME``); ``DIFFKERNELS_NO_CUDA=1`` leaves them out. If the
CUDA build fails, the CPU-only library is built instead and ``cuda_status()`` says why (the
compiler output is kept in ``cuda_build_error.log`` in the cache directory). The target GPU
architectures are torch's choice: ``TORCH_CUDA_ARCH_LIST`` if set, else the visible GPUs'.
"""

from __future__ import annotations

import glob
import hashlib
import os
import platform
import sys
import threading
import traceback
from pathlib import Path

import torch

_CSRC = Path(__file__).resolve().parent.parent / "csrc"
_PACKAGED_CSRC = Path(__file__).resolve().parent / "csrc"  # where a wheel carries the sources
SOURCES = ("sparse_mse.cpp", "mdm_mask.cpp")
HEADERS = ("philox.h", "row_tiles.h")
CUDA_SOURCES = ("sparse_mse_cuda.cu", "mdm_mask_cuda.cu")
CUDA_HEADERS = ("cuda_common.cuh",)
NAMESPACE = "diffkernels_native"

_lock = threading.Lock()
_state: dict[str, object] = {"loaded": False, "error": None, "how": None, "cuda": False, "cuda_error": None}


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


def _cflags() -> list[str]:
    # No -march=native: the hot loops carry their own AVX2 versions, chosen at run time, so one
    # build serves every x86-64 CPU (and matches the ahead-of-time build of setup.py).
    # -ffp-contract=off keeps a*b+c unfused, as in the reference and Triton kernels.
    return ["-O3", "-fopenmp", "-std=c++17", "-ffp-contract=off"]


def _cuda_cflags() -> list[str]:
    # No -gencode here: torch adds the architectures (TORCH_CUDA_ARCH_LIST, else the visible
    # GPUs'). -lineinfo maps Nsight Compute's counters to source lines at no run-time cost.
    return ["-O3", "-std=c++17", "-lineinfo"]


def _cuda_arch_key() -> str:
    """What decides the GPU architectures torch compiles for (part of the build key)."""
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if arch:
        return f"arch-list:{arch}"
    try:
        if torch.cuda.is_available():
            caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
            return "visible:" + ",".join(f"{a}.{b}" for a, b in caps)
    except Exception:  # a broken driver: let the build itself report it
        pass
    return "torch-default"


def cache_dir() -> Path:
    root = os.environ.get("DIFFKERNELS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "diffkernels"
    )
    return Path(root)


def _build_key(src: Path, with_cuda: bool) -> str:
    h = hashlib.sha256()
    for f in SOURCES + HEADERS:
        h.update((src / f).read_bytes())
    h.update(" ".join(_cflags()).encode())
    h.update(torch.__version__.encode())
    h.update(sys.version.encode())
    h.update(platform.machine().encode())
    if with_cuda:
        from torch.utils import cpp_extension

        for f in CUDA_SOURCES + CUDA_HEADERS:
            h.update(f.encode())
            h.update((src / f).read_bytes())
        h.update(" ".join(_cuda_cflags()).encode())
        h.update(f"cuda {torch.version.cuda} {cpp_extension.CUDA_HOME} {_cuda_arch_key()}".encode())
    return h.hexdigest()[:16]


def _load_prebuilt() -> bool:
    here = Path(__file__).resolve().parent
    for lib in sorted(glob.glob(str(here / "_C*.so"))):
        src = _csrc_dir()
        files = [src / f for f in SOURCES + HEADERS + CUDA_SOURCES + CUDA_HEADERS] if src is not None else []
        if any(f.is_file() and f.stat().st_mtime > os.path.getmtime(lib) for f in files):
            return False  # an in-place build older than the sources (editable install): rebuild by JIT
        try:
            torch.ops.load_library(lib)
            return True
        except (OSError, RuntimeError):
            return False  # built against another torch: fall through to the JIT build
    return False


def _jit_build(with_cuda: bool) -> Path:
    from torch.utils import cpp_extension

    src = _csrc_dir()
    if src is None:
        raise RuntimeError("the csrc/ sources are not shipped with this installation")
    key = _build_key(src, with_cuda)
    name = f"diffkernels_native_{'cuda_' if with_cuda else ''}{key}"
    build = cache_dir() / name
    build.mkdir(parents=True, exist_ok=True)
    if not (build / f"{name}.so").exists():
        what = "the C++ CPU kernels and the CUDA kernels (nvcc; one time, a few minutes)" if with_cuda else (
            "the C++ CPU kernels (one time, under a minute)")
        print(f"diffkernels: compiling {what} into {build}...", file=sys.stderr)
    sources = [str(src / f) for f in SOURCES + (CUDA_SOURCES if with_cuda else ())]
    cpp_extension.load(
        name=name,
        sources=sources,
        extra_cflags=_cflags(),
        extra_cuda_cflags=_cuda_cflags() if with_cuda else None,
        extra_ldflags=["-fopenmp"],
        build_directory=str(build),
        with_cuda=with_cuda,
        is_python_module=False,
        verbose=False,
    )
    return build


def _summary(exc: BaseException) -> str:
    """The compiler's error lines (or the last line) of a failed build, for a one-line status."""
    text = str(exc).strip()
    errors = [line.strip() for line in text.splitlines() if "error" in line.lower() and line.strip()]
    picked = errors[:3] if errors else text.splitlines()[-1:]
    return f"{type(exc).__name__}: " + " | ".join(picked)[:1500]


def _has_cuda_kernels() -> bool:
    """Whether the loaded library registered CUDA kernels (True for a build with the .cu sources)."""
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(f"{NAMESPACE}::sparse_mse_fwd", "CUDA")
                    and torch._C._dispatch_has_kernel_for_dispatch_key(f"{NAMESPACE}::mask_tokens", "CUDA"))
    except Exception:  # private API changed: fall back to the op that exists only in CUDA builds
        return hasattr(getattr(torch.ops, NAMESPACE), "sparse_mask_cuda")


def _build() -> str:
    """JIT-build and load the library, with the CUDA kernels where possible; returns how."""
    why_not = cuda_build_unavailable()
    if why_not is None:
        try:
            _jit_build(with_cuda=True)
            return f"JIT-compiled with the CUDA kernels, cached under {cache_dir()}"
        except Exception as exc:  # nvcc error, missing CUDA libraries...: keep the CPU kernels
            _state["cuda_error"] = f"the CUDA build failed, the CPU kernels were built alone: {_summary(exc)}"
            try:
                log = cache_dir() / "cuda_build_error.log"
                log.write_text(f"{exc}\n\n{traceback.format_exc()}")
                _state["cuda_error"] += f" (full output: {log})"
            except OSError:
                pass
    _jit_build(with_cuda=False)
    return f"JIT-compiled, cached under {cache_dir()}"


def load() -> bool:
    """Load the C++ kernels once; returns whether ``torch.ops.diffkernels_native`` is usable."""
    with _lock:
        if _state["loaded"] or _state["error"] is not None:
            return bool(_state["loaded"])
        if _disabled():
            _state["error"] = "disabled by DIFFKERNELS_NO_NATIVE=1"
            return False
        try:
            if _load_prebuilt():
                _state["how"] = "prebuilt (setup.py)"
            else:
                _state["how"] = _build()
            _state["loaded"] = True
            _state["cuda"] = _has_cuda_kernels()
        except Exception as exc:  # no compiler, no ninja, unwritable cache...: fall back, say why
            _state["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
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
    if _state["how"] == "prebuilt (setup.py)":
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
