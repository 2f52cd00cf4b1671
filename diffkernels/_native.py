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

The cache (``$DIFFKERNELS_CACHE``, else ``~/.cache/diffkernels``) holds one directory per build
key: a hash of the sources, the compiler flags, torch's version and C++ ABI, and the Python and
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

import hashlib
import json
import os
import platform
import shlex
import shutil
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

import torch

from . import _build_record

_PREBUILT_DIR = Path(__file__).resolve().parent  # where setup.py puts _C*.so and its build record
_CSRC = Path(__file__).resolve().parent.parent / "csrc"
_PACKAGED_CSRC = Path(__file__).resolve().parent / "csrc"  # where a wheel carries the sources
SOURCES = ("sparse_mse.cpp", "mask_tokens.cpp")
HEADERS = ("philox.h", "row_tiles.h")
CUDA_SOURCES = ("sparse_mse_cuda.cu", "mask_tokens_cuda.cu")
CUDA_HEADERS = ("cuda_common.cuh",)
NAMESPACE = "diffkernels_native"

LOCK_TIMEOUT_S = 600.0  # default wait for another process's build: longer than a CUDA build
_LAYOUT = "2"  # part of the build key: bump when the cache's layout changes

_lock = threading.Lock()
_state: dict[str, object] = {
    "loaded": False, "error": None, "how": None, "cuda": False, "cuda_error": None, "path": None,
    "prebuilt_refused": None}


class NativeUnavailable(Exception):
    """Why the native library cannot be had here, phrased for the user: what happened, how to fix it."""


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
    _state["path"] = str(lib)


def _jit_build(with_cuda: bool) -> Path:
    """Load the cached library for these sources, building and publishing it first if needed."""
    src = _csrc_dir()
    if src is None:
        raise NativeUnavailable("the csrc/ sources are not shipped with this installation: reinstall diffkernels")
    name = _lib_name(src, with_cuda)
    root = cache_dir()
    final = root / name
    lib = final / f"{name}.so"
    problem = _check_cached(lib)
    if problem is None:  # the common case: no lock, no writes (a read-only cache works)
        _load_cached(lib)
        return final
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
            return final
        _build_and_publish(name, src, root, with_cuda, damaged)
        return final
    finally:
        os.close(fd)  # releases the flock


def _build_and_publish(name: str, src: Path, root: Path, with_cuda: bool, damaged: str | None) -> None:
    """Build in a private directory, then rename it into place (the caller holds the build lock)."""
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
    _state["path"] = str(lib)
    final = root / name
    try:
        _write_checksum(lib)
        os.chmod(build, 0o755)  # mkdtemp's 0700 would hide a shared cache from other users
        if final.exists():  # a damaged earlier build: move it aside first (rename cannot replace a directory)
            old = root / f".old-{name}-{os.getpid()}"
            os.rename(final, old)
            shutil.rmtree(old, ignore_errors=True)
        os.rename(build, final)
        _state["path"] = str(final / f"{name}.so")
    except OSError as exc:  # the kernels are loaded; only the cache entry is lost
        print(f"diffkernels: the compiled kernels could not be saved in the cache ({exc}); this process uses "
              "them, the next one will compile again", file=sys.stderr, flush=True)


def _summary(exc: BaseException) -> str:
    """The compiler's error lines (or the last line) of a failed build, for a one-line status."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    # The compiler's diagnostics ("x.cpp:1:10: fatal error: ..."), not ninja's echo of the command.
    picked = ([line for line in lines if "error:" in line.lower()] or
              [line for line in lines if "error" in line.lower()] or lines[-1:])
    return f"{type(exc).__name__}: " + " | ".join(line[:300] for line in picked[:3])


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
