"""The per-user cache of JIT-built native kernels: build key, checksums, build lock, atomic publish.

One directory per build key (a hash of the sources, the compiler flags, torch's version and C++ ABI,
and the Python and machine tags -- never of the sources' path). A build runs in a private temporary
directory under an OS lock (``flock``) and is published by an atomic rename together with the
library's size and sha256; a cached library is loaded only if it matches that record. Which library
to load, and when, is decided in ``_native``.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

# What the library is built from (in csrc/, or in the package's csrc/ in a wheel).
SOURCES = ("sparse_mse.cpp", "mask_tokens.cpp")
HEADERS = ("philox.h", "row_tiles.h")
CUDA_SOURCES = ("sparse_mse_cuda.cu", "mask_tokens_cuda.cu")
CUDA_HEADERS = ("cuda_common.cuh",)

LOCK_TIMEOUT_S = 600.0  # default wait for another process's build: longer than a CUDA build
_LAYOUT = "2"  # part of the build key: bump when the cache's layout changes


class NativeUnavailable(Exception):
    """Why the native library cannot be had here, phrased for the user: what happened, how to fix it."""


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
    """Hash of everything the library depends on; never of where the sources live."""
    h = hashlib.sha256()
    h.update(f"layout {_LAYOUT}".encode())
    for f in SOURCES + HEADERS:
        h.update(f.encode())
        h.update((src / f).read_bytes())
    h.update(" ".join(_cflags()).encode())
    h.update(f"torch {torch.__version__} {getattr(torch.version, 'git_version', '')}".encode())
    h.update(f"cxx11abi {getattr(torch._C, '_GLIBCXX_USE_CXX11_ABI', '')}".encode())
    h.update(f"{sys.implementation.cache_tag} {sys.platform} {platform.machine()}".encode())
    if with_cuda:
        from torch.utils import cpp_extension

        for f in CUDA_SOURCES + CUDA_HEADERS:
            h.update(f.encode())
            h.update((src / f).read_bytes())
        h.update(" ".join(_cuda_cflags()).encode())
        h.update(f"cuda {torch.version.cuda} {cpp_extension.CUDA_HOME} {_cuda_arch_key()}".encode())
    return h.hexdigest()[:16]


def _lib_name(src: Path, with_cuda: bool) -> str:
    return f"diffkernels_native_{'cuda_' if with_cuda else ''}{_build_key(src, with_cuda)}"


def _checksum_path(lib: Path) -> Path:
    return lib.with_name(lib.name + ".sha256")


def _checksum(lib: Path) -> dict:
    h = hashlib.sha256()
    with open(lib, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return {"size": lib.stat().st_size, "sha256": h.hexdigest()}


def _write_checksum(lib: Path) -> None:
    _checksum_path(lib).write_text(json.dumps(_checksum(lib)) + "\n")


def _check_cached(lib: Path) -> str | None:
    """None if ``lib`` matches its recorded size and sha256; else what is wrong ("missing" if absent)."""
    try:
        if not lib.exists():
            return "missing"
        try:
            want = json.loads(_checksum_path(lib).read_text())
        except FileNotFoundError:
            return f"it has no checksum file {_checksum_path(lib).name}"
        except ValueError:
            return f"its checksum file {_checksum_path(lib).name} is unreadable"
        size = lib.stat().st_size
        if size != want.get("size"):
            return f"{size} bytes instead of {want.get('size')}"
        if _checksum(lib)["sha256"] != want.get("sha256"):
            return "its sha256 does not match"
        return None
    except OSError:
        return "missing"  # replaced while we looked: the locked path below sorts it out


def _lock_timeout() -> float:
    raw = os.environ.get("DIFFKERNELS_LOCK_TIMEOUT", "")
    if not raw:
        return LOCK_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise NativeUnavailable(f"DIFFKERNELS_LOCK_TIMEOUT={raw!r} is not a number of seconds >= 0: fix or unset it")
    return value


def _acquire(fd: int, path: Path, timeout: float) -> None:
    """``flock`` the build lock, waiting at most ``timeout`` s for a build in another process."""
    import fcntl

    def attempt() -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False

    if attempt():
        return
    print(f"diffkernels: waiting for another process that is compiling the kernels (lock {path}; "
          f"at most {timeout:g} s, DIFFKERNELS_LOCK_TIMEOUT)...", file=sys.stderr, flush=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(min(0.2, max(deadline - time.monotonic(), 0.0)))
        if attempt():
            return
    raise NativeUnavailable(
        f"another process held the build lock {path} for over {timeout:g} s: let its build finish and "
        "restart, or raise DIFFKERNELS_LOCK_TIMEOUT")


def _check_toolchain(with_cuda: bool) -> None:
    from torch.utils import cpp_extension

    cxx = os.environ.get("CXX", "c++")  # torch's choice of compiler
    words = shlex.split(cxx)
    if not words or shutil.which(words[0]) is None:
        where = "no C++ compiler (c++) on PATH" if "CXX" not in os.environ else f"CXX={cxx!r} is not found"
        raise NativeUnavailable(f"{where}, so the C++ kernels cannot be compiled: install g++ or clang++ "
                                "(or set CXX to one)")
    if not cpp_extension.is_ninja_available():
        raise NativeUnavailable("ninja is not found on PATH, so the C++ kernels cannot be compiled: "
                                "`pip install ninja`")


def _compile(name: str, src: Path, build: Path, with_cuda: bool) -> None:
    """Compile the library ``build/<name>.so`` with ninja, and load it."""
    from torch.utils import cpp_extension

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


def _load_cached(lib: Path) -> None:
    try:
        torch.ops.load_library(str(lib))
    except (OSError, RuntimeError) as exc:
        raise NativeUnavailable(f"the cached library {lib} does not load ({_summary(exc)}): delete "
                                f"{lib.parent} to rebuild it") from exc


def _load_or_build(src: Path, with_cuda: bool) -> tuple[Path, Path]:
    """Load the cached library for the sources in ``src``, building and publishing it first if needed;
    returns the cache entry's directory and the loaded library."""
    name = _lib_name(src, with_cuda)
    root = cache_dir()
    final = root / name
    lib = final / f"{name}.so"
    problem = _check_cached(lib)
    if problem is None:  # the common case: no lock, no writes (a read-only cache works)
        _load_cached(lib)
        return final, lib
    damaged = None if problem == "missing" else f"the cached library {lib} is damaged ({problem})"
    try:
        _check_toolchain(with_cuda)
        timeout = _lock_timeout()
    except NativeUnavailable as exc:
        raise NativeUnavailable(f"{damaged} and {exc}" if damaged else str(exc)) from None
    lock_path = root / f"{name}.lock"
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        why = damaged or "it holds no build of these kernels"
        raise NativeUnavailable(f"the kernel cache {root} is not writable ({exc.strerror or exc}) and {why}: "
                                "set DIFFKERNELS_CACHE to a writable directory") from exc
    try:
        _acquire(fd, lock_path, timeout)
        problem = _check_cached(lib)  # published by another process while we waited?
        if problem is None:
            _load_cached(lib)
            return final, lib
        return final, _build_and_publish(name, src, root, with_cuda, damaged)
    finally:
        os.close(fd)  # releases the flock


def _build_and_publish(name: str, src: Path, root: Path, with_cuda: bool, damaged: str | None) -> Path:
    """Build in a private directory, then rename it into place (the caller holds the build lock);
    returns the loaded library (in the cache, or in the build directory if publishing failed)."""
    for stale in (*root.glob(f".build-{name}-*"), *root.glob(f".old-{name}-*")):
        shutil.rmtree(stale, ignore_errors=True)  # left by killed builds: nobody else builds this name now
    build = Path(tempfile.mkdtemp(prefix=f".build-{name}-", dir=root))
    what = ("the C++ CPU kernels and the CUDA kernels (one time; nvcc takes several minutes)" if with_cuda else
            "the C++ CPU kernels (one time; 15 s to 2 min, depending on the CPU and its load)")
    doing = f"{damaged}; recompiling" if damaged else "compiling"
    print(f"diffkernels: {doing} {what} into {root / name}...", file=sys.stderr, flush=True)
    try:
        _compile(name, src, build, with_cuda)
    except Exception as exc:
        log = root / ("cuda_build_error.log" if with_cuda else "build_error.log")
        try:
            log.write_text(f"{exc}\n\n{traceback.format_exc()}")
            where = f"; full output in {log}"
        except OSError:
            where = ""
        shutil.rmtree(build, ignore_errors=True)
        raise NativeUnavailable(f"compiling the {'CUDA' if with_cuda else 'C++'} kernels failed "
                                f"({_summary(exc)}{where}): fix the compiler error, or set DIFFKERNELS_NO_NATIVE=1 "
                                "to skip native code") from exc
    lib = build / f"{name}.so"
    final = root / name
    try:
        _write_checksum(lib)
        os.chmod(build, 0o755)  # mkdtemp's 0700 would hide a shared cache from other users
        if final.exists():  # a damaged earlier build: move it aside first (rename cannot replace a directory)
            old = root / f".old-{name}-{os.getpid()}"
            os.rename(final, old)
            shutil.rmtree(old, ignore_errors=True)
        os.rename(build, final)
        return final / f"{name}.so"
    except OSError as exc:  # the kernels are loaded; only the cache entry is lost
        print(f"diffkernels: the compiled kernels could not be saved in the cache ({exc}); this process uses "
              "them, the next one will compile again", file=sys.stderr, flush=True)
        return lib


def _summary(exc: BaseException) -> str:
    """The compiler's error lines (or the last line) of a failed build, for a one-line status."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    # The compiler's diagnostics ("x.cpp:1:10: fatal error: ..."), not ninja's echo of the command.
    picked = ([line for line in lines if "error:" in line.lower()] or
              [line for line in lines if "error" in line.lower()] or lines[-1:])
    return f"{type(exc).__name__}: " + " | ".join(line[:300] for line in picked[:3])
