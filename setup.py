"""Build script: packages csrc/ with the wheel and, when possible, builds it ahead of time.

- Isolated builds (plain `pip install .`) cannot import torch, so they ship the sources only;
  the kernels are JIT-compiled against the installed torch on first use (diffkernels/_native.py).
- `pip install --no-build-isolation .` or `python -m build --wheel --no-isolation` with torch
  installed also builds `diffkernels._C` ahead of time against that torch (portable flags), and
  writes beside it `diffkernels/_build_info.json`: the torch version, C++11 ABI, CUDA version and
  Python it was built for, and a hash of the sources (diffkernels/_build_record.py). At run time
  the library is loaded only where all of these match; under another torch the kernels are
  JIT-compiled for that torch instead, from the sources the wheel carries.
- Where torch is a CUDA build and nvcc is found (torch.utils.cpp_extension.CUDA_HOME), the
  CUDA kernels (csrc/*_cuda.cu) are compiled into the same library (CUDAExtension; target
  architectures: TORCH_CUDA_ARCH_LIST, else the visible GPUs'). If that build fails, the
  CPU-only library is built instead, with a warning; `diffkernels.backends()` then says why
  "cuda" is unavailable. DIFFKERNELS_NO_CUDA=1 skips the CUDA sources.
- DIFFKERNELS_NO_NATIVE=1 skips native code entirely.
"""

import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
CSRC = HERE / "csrc"


def _load_build_record():
    """diffkernels/_build_record.py, by path: importing diffkernels would need it installed."""
    path = HERE / "diffkernels" / "_build_record.py"
    spec = importlib.util.spec_from_file_location("_diffkernels_build_record", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build_record = _load_build_record()


class BuildPyWithSources(build_py):
    """Copy csrc/ into the package so a wheel can JIT-compile the kernels."""

    def run(self):
        super().run()
        target = Path(self.build_lib) / "diffkernels" / "csrc"
        target.mkdir(parents=True, exist_ok=True)
        for src in CSRC.iterdir():
            if src.suffix in build_record.SOURCE_SUFFIXES:
                shutil.copy2(src, target / src.name)


CPP_SOURCES = ["csrc/sparse_mse.cpp", "csrc/mask_tokens.cpp"]
CUDA_SOURCES = ["csrc/sparse_mse_cuda.cu", "csrc/mask_tokens_cuda.cu"]
CXX_FLAGS = ["-O3", "-fopenmp", "-std=c++17", "-ffp-contract=off"]
NVCC_FLAGS = ["-O3", "-std=c++17", "-lineinfo"]  # the same as diffkernels/_native_cache.py


def _flag(name):
    return os.environ.get(name, "0") not in ("", "0", "false", "False")


def _cuda_wanted(torch, cpp_extension):
    if _flag("DIFFKERNELS_NO_CUDA") or not torch.version.cuda or getattr(torch.version, "hip", None):
        return False
    home = cpp_extension.CUDA_HOME
    return bool(home) and os.path.exists(os.path.join(home, "bin", "nvcc")) and all(
        (HERE / f).is_file() for f in CUDA_SOURCES)


def native_extensions():
    if _flag("DIFFKERNELS_NO_NATIVE"):
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError:  # isolated build: JIT on first use instead
        return [], {}
    ext = None
    if _cuda_wanted(torch, cpp_extension):
        try:
            ext = CUDAExtension(
                "diffkernels._C",
                sources=CPP_SOURCES + CUDA_SOURCES,
                extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS},
                extra_link_args=["-fopenmp"],
                py_limited_api=False,
            )
        except Exception as exc:  # noqa: BLE001 -- e.g. CUDA libraries not found: CPU kernels only
            print(f"WARNING: diffkernels: not building the CUDA kernels ({type(exc).__name__}: {exc})", file=sys.stderr)
    if ext is None:
        ext = CppExtension(
            "diffkernels._C",
            sources=CPP_SOURCES,
            extra_compile_args=CXX_FLAGS,
            extra_link_args=["-fopenmp"],
            py_limited_api=False,
        )

    base = BuildExtension.with_options(no_python_abi_suffix=False)

    class BuildWithCpuFallback(base):
        """A failed CUDA build must not cost the CPU kernels: retry without the .cu sources.

        Always relinks (ninja still skips the objects that are up to date, and its header
        dependencies include torch's), so the library never outlives an upgrade of torch, and
        writes the build record beside the library, where it finally lands (the source tree for
        an in-place or editable build).
        """

        def finalize_options(self):
            super().finalize_options()
            self.force = True

        def run(self):
            super().run()
            for ext in self.extensions:
                lib = Path(self.get_ext_fullpath(ext.name))
                record = {**build_record.identity(),
                          "torch_git": getattr(torch.version, "git_version", None),
                          "library": lib.name,
                          "cuda_kernels": any(s.endswith(".cu") for s in ext.sources),
                          "sources_sha256": build_record.sources_digest(CSRC)}
                (lib.parent / build_record.RECORD).write_text(json.dumps(record, indent=1) + "\n")

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:  # noqa: BLE001 -- any compiler or linker failure
                cpp_only = [s for s in ext.sources if not s.endswith(".cu")]
                if len(cpp_only) == len(ext.sources):
                    raise
                print(f"WARNING: diffkernels: the CUDA kernels failed to build ({type(exc).__name__}: {exc}); "
                      "building the C++ CPU kernels alone", file=sys.stderr)
                ext.sources = cpp_only
                ext.libraries = [lib for lib in ext.libraries if "cuda" not in lib and lib != "cudart"]
                ext.library_dirs = [d for d in ext.library_dirs if "cuda" not in d.lower()]
                super().build_extension(ext)

    return [ext], {"build_ext": BuildWithCpuFallback}


ext_modules, cmdclass = native_extensions()
cmdclass["build_py"] = BuildPyWithSources
setup(ext_modules=ext_modules, cmdclass=cmdclass)
