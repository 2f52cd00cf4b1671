"""Build script: packages csrc/ with the wheel and, when possible, builds it ahead of time.

- Isolated builds (plain `pip install .`) cannot import torch, so they ship the sources only;
  the kernels are JIT-compiled against the installed torch on first use (diffkernels/_native.py).
- `pip install --no-build-isolation .` with torch installed also builds `diffkernels._C`
  ahead of time against that torch (portable flags). If torch is later upgraded, the stale
  library fails to load and the JIT build takes over.
- DIFFKERNELS_NO_NATIVE=1 skips native code entirely.
"""

import os
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
CSRC = HERE / "csrc"


class BuildPyWithSources(build_py):
    """Copy csrc/ into the package so a wheel can JIT-compile the kernels."""

    def run(self):
        super().run()
        target = Path(self.build_lib) / "diffkernels" / "csrc"
        target.mkdir(parents=True, exist_ok=True)
        for src in CSRC.iterdir():
            if src.suffix in (".h", ".cpp", ".cu", ".cuh"):
                shutil.copy2(src, target / src.name)


def native_extensions():
    if os.environ.get("DIFFKERNELS_NO_NATIVE", "0") not in ("", "0"):
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:  # isolated build: JIT on first use instead
        return [], {}
    ext = CppExtension(
        "diffkernels._C",
        sources=["csrc/sparse_mse.cpp", "csrc/mdm_mask.cpp"],
        extra_compile_args=["-O3", "-fopenmp", "-std=c++17", "-ffp-contract=off"],
        extra_link_args=["-fopenmp"],
        py_limited_api=False,
    )
    return [ext], {"build_ext": BuildExtension.with_options(no_python_abi_suffix=False)}


ext_modules, cmdclass = native_extensions()
cmdclass["build_py"] = BuildPyWithSources
setup(ext_modules=ext_modules, cmdclass=cmdclass)
