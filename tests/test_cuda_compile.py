"""The CUDA sources of csrc/: compiled with nvcc on any machine that has it, run where a GPU is.

1. Compile check (no GPU needed): both ``*_cuda.cu`` files are compiled with ``nvcc -c`` for an
   H100 (sm_90) against the installed torch's headers (a CPU build of torch ships the CUDA
   headers too), so the CUDA sources cannot rot on CPU-only CI. Any compiler error, or a warning
   in our own sources, fails the test; without nvcc it is skipped.
2. On a CUDA device with the ``cuda`` backend built: the CUDA primitives against the C++ CPU
   kernels, bit for bit (masks, counts, gradients, token masks) at shapes that exercise every
   path: rows spanning one or many blocks (the last-block-done row sums), 16-byte vector accesses
   and the element-wise fallback (unaligned views, row edges), every dtype. The backend-
   parametrised tests of test_sparse_mse.py / test_mask_tokens.py cover the ops through the API.
"""

import os
import random
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import pytest
import torch

from diffkernels import _backend, _native
from diffkernels.rng import seed_to_int64, uniform

CSRC = Path(__file__).resolve().parent.parent / "csrc"
CUDA_SOURCES = ("sparse_mse_cuda.cu", "mask_tokens_cuda.cu")


def find_nvcc() -> str | None:
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.is_file() else None


def nvcc_command(nvcc: str, source: Path, out: Path) -> list[str]:
    from torch.utils import cpp_extension

    include = [f"-I{p}" for p in cpp_extension.include_paths()] + [f"-I{sysconfig.get_paths()['include']}"]
    torch_include = Path(cpp_extension.include_paths()[0])
    defines = ["-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=diffkernels_compile_check"]
    if not (torch_include / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").is_file():
        # A CPU build of torch lacks this generated header (it only sets export macros).
        defines.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
    flags = list(getattr(cpp_extension, "COMMON_NVCC_FLAGS", []))  # what a real extension build passes
    return [nvcc, "-c", "-std=c++17", "-O3", "-lineinfo", "-gencode=arch=compute_90,code=sm_90",
            "-Xcompiler", "-fPIC", *flags, *defines, *include, str(source), "-o", str(out)]


def test_cuda_sources_compile_for_sm90():
    nvcc = find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (set CUDA_HOME): the CUDA sources are compiled only where a CUDA toolkit is")
    with tempfile.TemporaryDirectory() as tmp:
        procs = {}
        for name in CUDA_SOURCES:  # both at once: each takes ~20-30 s, mostly in the torch headers
            cmd = nvcc_command(nvcc, CSRC / name, Path(tmp) / (name + ".o"))
            procs[name] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        failures = []
        for name, proc in procs.items():
            try:
                output, _ = proc.communicate(timeout=600)
            except subprocess.TimeoutExpired:
                proc.kill()
                output, _ = proc.communicate()
                failures.append(f"{name}: nvcc timed out")
                continue
            ours = [line for line in output.splitlines()
                    if "warning" in line.lower() and "csrc/" in line and "/torch/include/" not in line]
            if proc.returncode != 0:
                errors = [line for line in output.splitlines() if "error" in line.lower()]
                failures.append(f"{name}: nvcc exited with {proc.returncode}:\n" + "\n".join(errors[:20] or
                                                                                             output.splitlines()[-40:]))
            elif ours:
                failures.append(f"{name}: warnings in our sources:\n" + "\n".join(ours[:20]))
            elif not (Path(tmp) / (name + ".o")).is_file():
                failures.append(f"{name}: no object file written")
        assert not failures, "\n\n".join(failures)


# --- on a GPU -------------------------------------------------------------------------------------

def _why_no_cuda_backend() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device"
    return _backend.unavailable("cuda", torch.device("cuda"))


WHY_NO_CUDA = _why_no_cuda_backend()
needs_cuda_backend = pytest.mark.skipif(WHY_NO_CUDA is not None, reason=f"needs the CUDA backend: {WHY_NO_CUDA}")
needs_cpp = pytest.mark.skipif(not _native.load(), reason="the C++ CPU kernels are the oracle here")

LOSS_SHAPES = [  # (shape, channels): one row per block, many blocks per row, ragged rows, pixel masks
    ((3, 5, 7, 9), 5), ((3, 5, 7, 9), 1), ((2, 3, 64, 64), 3), ((2, 3, 64, 64), 1), ((1, 4, 5), 4), ((5, 3), 1),
    ((4, 3, 11, 13), 1), ((1, 70001), 1), ((2, 8195), 1), ((16, 3, 8, 8), 3), ((300, 40), 1), ((3, 3, 17, 19), 3),
    ((8, 3, 256, 256), 1), ((2, 3, 256, 255), 3),
]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def unaligned(x: torch.Tensor, offset: int) -> torch.Tensor:
    """A contiguous copy of x whose data starts `offset` elements into its storage (offset 1: not 16-byte aligned)."""
    if offset == 0:
        return x.contiguous()
    buf = torch.empty(x.numel() + offset, dtype=x.dtype, device=x.device)
    out = buf[offset:].view(x.shape)
    out.copy_(x)
    return out


@needs_cuda_backend
@needs_cpp
def test_cuda_philox_matches_reference():
    rng = random.Random()
    idx = torch.cat([torch.randint(0, 2**20, (3000,)), torch.randint(2**34 - 2000, 2**34 + 2000, (3000,)),
                     torch.tensor([rng.getrandbits(62) for _ in range(3000)])])
    for seed in [0, 1, 2**32 - 1, 2**32, 2**64 - 1, -7] + [rng.getrandbits(64) for _ in range(4)]:
        got = _native.ops().philox_uniform(seed_to_int64(seed), idx.cuda()).cpu()
        assert torch.equal(got, uniform(seed, idx)), seed


@needs_cuda_backend
@needs_cpp
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_sparse_mse_fwd_matches_cpp(dtype):
    ops = _native.ops()
    rng = random.Random()
    g = torch.Generator().manual_seed(rng.getrandbits(32))
    for (shape, C) in LOSS_SHAPES:
        for eta in (0.0, 0.5, 0.98):
            for want_grad in (True, False):
                for offset in (0, 1):
                    p = torch.randn(shape, generator=g).to(dtype)
                    q = torch.randn(shape, generator=g).to(dtype)
                    acc = torch.float64 if dtype == torch.float64 else torch.float32
                    gs = (torch.rand(shape[0], generator=g) + 0.5).to(acc) if want_grad else None
                    seed = seed_to_int64(rng.getrandbits(64))
                    s0, k0, g0 = ops.sparse_mse_fwd(p, q, eta, seed, C, gs)
                    s1, k1, g1 = ops.sparse_mse_fwd(unaligned(p.cuda(), offset), unaligned(q.cuda(), offset), eta,
                                                    seed, C, gs.cuda() if want_grad else None)
                    key = (shape, C, dtype, eta, want_grad, offset)
                    assert torch.equal(k1.cpu(), k0), key
                    rtol = 1e-12 if dtype == torch.float64 else 1e-6
                    assert torch.allclose(s1.cpu(), s0, rtol=rtol, atol=0), (key, s1, s0)
                    assert g1.shape == g0.shape and torch.equal(g1.cpu(), g0), key
                    # Deterministic: the same call gives the same bits.
                    s2, _, _ = ops.sparse_mse_fwd(unaligned(p.cuda(), offset), unaligned(q.cuda(), offset), eta,
                                                  seed, C, gs.cuda() if want_grad else None)
                    assert torch.equal(s1, s2), key


@needs_cuda_backend
def test_cuda_masked_out_nan_is_never_read():
    ops = _native.ops()
    shape, seed = (4, 3, 64, 64), 12345
    keep = ops.sparse_mask_cuda(seed, 4, 1, 3 * 64 * 64, 0.7, torch.device("cuda")).view(shape)
    p, q = torch.randn(shape, device="cuda"), torch.randn(shape, device="cuda")
    pp, qq = p.clone(), q.clone()
    pp[~keep] = float("nan")
    qq[~keep] = float("inf")
    ones = torch.ones(4, device="cuda")
    s1, k1, g1 = ops.sparse_mse_fwd(pp, qq, 0.7, seed, 1, ones)
    s0, k0, g0 = ops.sparse_mse_fwd(p, q, 0.7, seed, 1, ones)
    assert torch.isfinite(s1).all() and torch.equal(s1, s0) and torch.equal(g1, g0) and torch.equal(k1, k0)


@needs_cuda_backend
@needs_cpp
def test_cuda_sparse_mask_matches_cpp():
    ops = _native.ops()
    rng = random.Random()
    for (B, C, R) in [(3, 1, 63), (1, 3, 5), (5, 2, 1000), (2, 1, 40000), (9, 3, 17), (0, 1, 5), (2, 1, 0),
                      (300, 1, 33), (4, 3, 65536)]:
        for eta in (0.0, 0.3, 0.98):
            seed = seed_to_int64(rng.getrandbits(64))
            got = ops.sparse_mask_cuda(seed, B, C, R, eta, torch.device("cuda"))
            assert got.device.type == "cuda" and got.shape == (B, C, R)
            assert torch.equal(got.cpu(), ops.sparse_mask(seed, B, C, R, eta)), (B, C, R, eta)


@needs_cuda_backend
@needs_cpp
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_scale_rows_matches_cpp(dtype):
    ops = _native.ops()
    g = torch.Generator().manual_seed(random.getrandbits(32))
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    for shape in [(3, 5, 7), (4, 1000), (2, 4099), (9, 3), (1, 200000), (300, 77)]:
        for offset in (0, 1):
            base = torch.randn(shape, generator=g).to(dtype)
            f = torch.rand(shape[0], generator=g).to(acc) + 0.5
            f[0] = 1.0
            cpu = base.clone()
            ops.scale_rows_(cpu, f)
            gpu = unaligned(base.cuda(), offset)
            ops.scale_rows_(gpu, f.cuda())
            assert torch.equal(gpu.cpu(), cpu), (shape, dtype, offset)


@needs_cuda_backend
@needs_cpp
def test_cuda_mask_tokens_matches_cpp():
    from diffkernels.ops.mask_tokens import row_table

    ops = _native.ops()
    rng = random.Random()
    g = torch.Generator().manual_seed(rng.getrandbits(32))
    for (B, L) in [(5, 37), (3, 1029), (2, 4096), (1, 1), (7, 8), (6, 100), (64, 4096), (4, 100003)]:
        for dtype in (torch.int64, torch.int32):
            for mirror in (False, True):
                for use_elig, use_rare, offset in [(False, False, 0), (True, True, 0), (True, False, 1),
                                                   (False, True, 1)]:
                    ids = torch.randint(0, 50, (B, L), generator=g, dtype=dtype)
                    p = torch.rand(B, generator=g) * 0.95 + 0.04
                    rows = torch.rand(B, generator=g) < 0.6
                    table = row_table(p, 0.2, rows if mirror else None, mirror)
                    elig = (torch.rand(B, L, generator=g) > 0.25) if use_elig else None
                    rare = torch.isin(ids, torch.tensor([3, 4, 5], dtype=dtype)) if use_rare else None
                    seed = seed_to_int64(rng.getrandbits(64))
                    want = ops.mask_tokens(ids, table, seed, 99, elig, rare, mirror)
                    got = ops.mask_tokens(unaligned(ids.cuda(), offset), table.cuda(), seed, 99,
                                          unaligned(elig.cuda(), offset) if use_elig else None,
                                          unaligned(rare.cuda(), offset) if use_rare else None, mirror)
                    for x, y in zip(got, want):
                        assert x.dtype == y.dtype and torch.equal(x.cpu(), y), (B, L, dtype, mirror, use_elig,
                                                                                 use_rare, offset)


@needs_cuda_backend
def test_cuda_ops_run_on_the_current_stream_and_device():
    """Launches go to the current stream (work queued behind a long kernel is ordered after it)."""
    ops = _native.ops()
    s = torch.cuda.Stream()
    x = torch.randn(64, 4096, device="cuda")
    with torch.cuda.stream(s):
        y = x * 2  # on s
        sq, kept, grad = ops.sparse_mse_fwd(y, torch.zeros_like(y), 0.0, 3, 1, torch.ones(64, device="cuda"))
    s.synchronize()
    torch.testing.assert_close(sq, (y.double() ** 2).sum(1), rtol=1e-6, atol=0)
    assert torch.equal(kept, torch.full((64,), 4096, device="cuda"))
    torch.testing.assert_close(grad, y, rtol=0, atol=0)


def test_cuda_backend_reports_why_not():
    """diffkernels.backends() always says whether the CUDA kernels are there, and why not."""
    import diffkernels as dk

    report = dk.backends()["cuda"]
    assert isinstance(report, str) and report
    if not torch.version.cuda:
        assert "CPU-only" in report
    code = "import diffkernels as dk; print(dk.backends()['cuda'])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "DIFFKERNELS_NO_CUDA": "1"})
    assert out.returncode == 0, out.stderr
    if torch.version.cuda:
        assert "DIFFKERNELS_NO_CUDA" in out.stdout
