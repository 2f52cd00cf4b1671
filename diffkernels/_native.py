"""Finding or building the C++ kernels of csrc/.

Order: a prebuilt library from an ahead-of-time ``setup.py`` build (``diffkernels/_C*.so``),
then a just-in-time build with ninja into a per-user cache, compiled against the torch that
is installed right now (so the ABI always matches). ``DIFFKERNELS_NO_NATIVE=1`` skips both;
the package then runs on the reference backend. Nothing here runs at import time: the first
op that wants the C++ backend triggers it.
"""

from __future__ import annotations

import glob
import hashlib
import os
import platform
import sys
import threading
from pathlib import Path

import torch

_CSRC = Path(__file__).resolve().parent.parent / "csrc"
_PACKAGED_CSRC = Path(__file__).resolve().parent / "csrc"  # where a wheel carries the sources
SOURCES = ("sparse_mse.cpp", "mdm_mask.cpp")
HEADERS = ("philox.h", "row_tiles.h")
NAMESPACE = "diffkernels_native"

_lock = threading.Lock()
_state: dict[str, object] = {"loaded": False, "error": None, "how": None}


def _disabled() -> bool:
    return os.environ.get("DIFFKERNELS_NO_NATIVE", "0") not in ("", "0", "false", "False")


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


def cache_dir() -> Path:
    root = os.environ.get("DIFFKERNELS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "diffkernels"
    )
    return Path(root)


def _build_key(src: Path) -> str:
    h = hashlib.sha256()
    for f in SOURCES + HEADERS:
        h.update((src / f).read_bytes())
    h.update(" ".join(_cflags()).encode())
    h.update(torch.__version__.encode())
    h.update(sys.version.encode())
    h.update(platform.machine().encode())
    return h.hexdigest()[:16]


def _load_prebuilt() -> bool:
    here = Path(__file__).resolve().parent
    for lib in sorted(glob.glob(str(here / "_C*.so"))):
        src = _csrc_dir()
        if src is not None and any((src / f).stat().st_mtime > os.path.getmtime(lib) for f in SOURCES + HEADERS):
            return False  # an in-place build older than the sources (editable install): rebuild by JIT
        try:
            torch.ops.load_library(lib)
            return True
        except (OSError, RuntimeError):
            return False  # built against another torch: fall through to the JIT build
    return False


def _jit_build() -> None:
    from torch.utils import cpp_extension

    src = _csrc_dir()
    if src is None:
        raise RuntimeError("the csrc/ sources are not shipped with this installation")
    key = _build_key(src)
    name = f"diffkernels_native_{key}"
    build = cache_dir() / name
    build.mkdir(parents=True, exist_ok=True)
    if not (build / f"{name}.so").exists():
        print(f"diffkernels: compiling the C++ CPU kernels into {build} (one time, under a minute)...", file=sys.stderr)
    cpp_extension.load(
        name=name,
        sources=[str(src / f) for f in SOURCES],
        extra_cflags=_cflags(),
        extra_ldflags=["-fopenmp"],
        build_directory=str(build),
        is_python_module=False,
        verbose=False,
    )


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
                _jit_build()
                _state["how"] = f"JIT-compiled, cached under {cache_dir()}"
            _state["loaded"] = True
        except Exception as exc:  # no compiler, no ninja, unwritable cache...: fall back, say why
            _state["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
        return bool(_state["loaded"])


def status() -> str:
    if _state["loaded"]:
        return f"available ({_state['how']})"
    if _state["error"] is not None:
        return f"unavailable: {_state['error']}"
    return "not loaded yet"


def ops():
    if not load():
        raise RuntimeError(f"the C++ backend is unavailable: {status()}")
    return getattr(torch.ops, NAMESPACE)
