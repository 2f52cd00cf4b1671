"""The record of an ahead-of-time build of the kernels (``_build_info.json`` beside ``_C*.so``).

setup.py writes it when it compiles ``diffkernels._C``; ``_native`` loads the library only if the
record matches the torch (version, C++ ABI, CUDA) and the Python running now, and the sources shipped
beside it. Standard library only: setup.py loads this file by path, before diffkernels is installed.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

RECORD = "_build_info.json"
SOURCE_SUFFIXES = (".h", ".cpp", ".cu", ".cuh")  # what csrc/ holds and a wheel carries
IDENTITY = ("torch", "cxx11_abi", "cuda", "python")  # what the library must match to be loaded


def sources_digest(csrc: Path) -> str:
    """sha256 over the names and contents of the kernel sources in ``csrc`` (not their times or path)."""
    h = hashlib.sha256()
    for f in sorted(p for p in Path(csrc).iterdir() if p.suffix in SOURCE_SUFFIXES and p.is_file()):
        h.update(f"{f.name}\0{f.stat().st_size}\0".encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def identity() -> dict:
    """What a compiled library is tied to: the running torch build and Python."""
    import torch

    return {
        "torch": torch.__version__,
        "cxx11_abi": bool(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", False)),
        "cuda": torch.version.cuda,
        "python": sys.implementation.cache_tag,
    }


def mismatch(record: dict) -> str | None:
    """None if a library with this record can be loaded here; else why not, for the user."""
    here = identity()
    built = {key: record.get(key) for key in IDENTITY}
    if built == here:
        return None
    # The torch versions always; the other fields only where they differ (often implied by the version).
    differ = [key for key in IDENTITY[1:] if built[key] != here[key]]

    def describe(d: dict) -> str:
        details = ", ".join(_LABELS[key](d[key]) for key in differ)
        return f"torch {d['torch']}" + (f" ({details})" if details else "")

    return f"the prebuilt kernels were built for {describe(built)}, this is {describe(here)}"


_LABELS = {
    "cxx11_abi": lambda v: "C++11 ABI " + ("on" if v else "off"),
    "cuda": lambda v: f"CUDA {v}" if v else "no CUDA",
    "python": lambda v: f"Python {v}",
}
