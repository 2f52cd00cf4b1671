"""Compile the Triton kernels for an H100 (sm_90) ahead of time, without a GPU.

CI has no GPU and runs the kernels in the interpreter, which does not catch everything the real
compiler rejects; compiling to PTX/cubin here keeps the GPU path from rotting between GPU passes.
Kernels defined under TRITON_INTERPRET=1 cannot be compiled, so this runs in a subprocess
without it.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest


def compile_all():
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from diffkernels.triton import philox, scale_rows, sparse_mse

    target = GPUTarget("cuda", 90, 32)

    def build(fn, signature, constexprs):
        kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=target)
        assert kernel.asm["ptx"]

    for dtype in ("fp32", "bf16", "fp16", "fp64"):
        acc = "fp64" if dtype == "fp64" else "fp32"
        for want_grad in (True, False):
            build(sparse_mse.sparse_mse_fwd_kernel, {
                "pred_ptr": f"*{dtype}", "target_ptr": f"*{dtype}", "grad_ptr": f"*{dtype}",
                "grad_scale_ptr": f"*{acc}", "sq_ptr": f"*{acc}", "kept_ptr": "*i32", "R": "i64", "C": "i32",
                "T": "i32", "seed": "i64", "eta": "fp32", "WANT_GRAD": "constexpr", "G": "constexpr",
            }, {"WANT_GRAD": want_grad, "G": sparse_mse.COUNTERS_PER_PROGRAM})
        build(scale_rows.scale_rows_kernel, {"grad_ptr": f"*{dtype}", "factor_ptr": f"*{acc}", "n": "i64",
                                             "T": "i32", "BLOCK": "constexpr"}, {"BLOCK": scale_rows.SCALE_BLOCK})
    build(sparse_mse.sparse_mask_kernel, {"out_ptr": "*i8", "R": "i64", "C": "i32", "T": "i32", "seed": "i64",
                                         "eta": "fp32", "G": "constexpr"}, {"G": sparse_mse.COUNTERS_PER_PROGRAM})
    build(philox.uniform_kernel, {"index_ptr": "*i64", "out_ptr": "*fp32", "numel": "i64", "seed": "i64",
                                  "BLOCK": "constexpr"}, {"BLOCK": 1024})


def test_kernels_compile_for_sm90():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # the default; set to silence Triton 3.9's notice
    code = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_triton_compile as t; t.compile_all()"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    if out.returncode != 0 and "ptxas" in out.stderr and "not found" in out.stderr.lower():
        pytest.skip("Triton's bundled ptxas is unavailable here")
    assert out.returncode == 0, out.stderr[-4000:]
