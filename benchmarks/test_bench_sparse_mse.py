"""pytest-benchmark suite for the fused sparse-supervision loss (forward + backward).

    pytest benchmarks                          # time the realistic shapes (a few minutes)
    pytest benchmarks --benchmark-disable      # CI: each case runs once, on small shapes, and is checked

Methods, grouped per (shape, eta, dtype): the fused op (``diffkernels.sparse_mse_loss`` on the
device's default compiled backend: C++ on CPU, Triton on CUDA -- never the Triton interpreter nor
the reference), the eager baseline written with torch's own RNG, and ``torch.compile`` of that
baseline; plus the two gradient strategies with the backend primitive (A: one pass computing loss
and gradient; B: a pass without gradient, then a second pass writing it). The full tables with
spreads, ratios, memory and ceilings come from ``benchmarks/bench_sparse_mse.py``.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("pytest_benchmark")
# torch.compile's internals warn about torch.jit.script_method on recent torch; not ours.
pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.script_method.*:DeprecationWarning")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout
from benchmarks.bench_sparse_mse import BASE_SEED, DTYPES, ETAS, SHAPES, baseline_loss  # noqa: E402
from benchmarks.cli import shape_arg  # noqa: E402
from benchmarks.timing import benchmark_disabled, sync  # noqa: E402
from benchmarks.fixtures import backend  # noqa: E402, F401  (a pytest fixture)

import diffkernels  # noqa: E402
from diffkernels import reference as ref  # noqa: E402
from diffkernels.ops import _kernels  # noqa: E402
from diffkernels.rng import seed_to_int64  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# Under --benchmark-disable every case runs once: small shapes (one with odd sizes), and
# torch.compile (seconds per compilation on a 2-core CPU) only at eta = 0.98.
SMALL_SHAPES = [(4, 3, 16, 16), (3, 5, 7, 9)]
SMALL_COMPILE_ETAS = [0.98]


def pytest_generate_tests(metafunc):
    small = benchmark_disabled(metafunc.config)
    shapes = SMALL_SHAPES if small else SHAPES
    cases = []
    for shape in shapes:
        for dtype in DTYPES:
            for eta in ETAS:
                cases.append((shape, eta, dtype))
    if "method" in metafunc.fixturenames:
        params = []
        for shape, eta, dtype in cases:
            for method in ("fused", "eager", "compile"):
                if method == "compile" and small and (eta not in SMALL_COMPILE_ETAS or shape != shapes[0]):
                    continue
                params.append(pytest.param(method, shape, eta, dtype,
                                           id=f"{method}-{shape_arg(shape)}-eta{eta}-{dtype}"))
        metafunc.parametrize(("method", "shape", "eta", "dtype"), params)
    elif "strategy" in metafunc.fixturenames:
        params = [pytest.param(s, shape, eta, dtype, id=f"{s}-{shape_arg(shape)}-eta{eta}-{dtype}")
                  for shape, eta, dtype in cases for s in ("A_one_pass", "B_two_pass")]
        metafunc.parametrize(("strategy", "shape", "eta", "dtype"), params)


def _inputs(shape, dtype_name):
    gen = torch.Generator().manual_seed(1234 + math.prod(shape))
    dtype = DTYPES[dtype_name]
    pred = torch.randn(shape, generator=gen).to(device=DEVICE, dtype=dtype).requires_grad_(True)
    target = torch.randn(shape, generator=gen).to(device=DEVICE, dtype=dtype)
    return pred, target


def test_forward_backward(request, benchmark, backend, method, shape, eta, dtype):
    small = benchmark_disabled(request.config)
    pred, target = _inputs(shape, dtype)
    benchmark.group = f"fwd+bwd {shape_arg(shape)} eta={eta} {dtype}"
    benchmark.extra_info.update(device=str(DEVICE), backend=backend if method == "fused" else "torch")
    seed = [BASE_SEED]
    out = {}

    if method == "fused":
        def loss_fn():
            with diffkernels.use_backend(backend):
                return diffkernels.sparse_mse_loss(pred, target, eta, seed[0])
    elif method == "eager":
        def loss_fn():
            return baseline_loss(pred, target, eta)
    else:
        torch._dynamo.reset()
        compiled = torch.compile(baseline_loss, dynamic=False)

        def loss_fn():
            return compiled(pred, target, eta)

    def step():
        pred.grad = None
        seed[0] += 1
        if method == "fused":
            with diffkernels.use_backend(backend):
                loss = loss_fn()
                loss.backward()
        else:
            loss = loss_fn()
            loss.backward()
        out["loss"] = loss
        sync(DEVICE)

    step()  # warm-up (compiles forward and backward for torch.compile)
    benchmark(step)

    loss, grad = out["loss"].detach(), pred.grad
    assert torch.isfinite(loss).all() and grad is not None and torch.isfinite(grad).all()
    assert grad.shape == pred.shape and grad.dtype == pred.dtype
    if method == "fused" and small:
        # The timed op is the real one: same loss and gradient as the float64 oracle for its seed.
        p64 = pred.detach().double().requires_grad_(True)
        expected = ref.sparse_mse_loss(p64, target.double(), eta, seed[0])
        expected.backward()
        torch.testing.assert_close(loss.double().cpu(), expected.detach().cpu(), rtol=1e-5, atol=0)
        tol = {"fp32": 1e-5, "bf16": 2e-2}[dtype]
        torch.testing.assert_close(grad.double().cpu(), p64.grad.cpu(), rtol=tol,
                                   atol=tol * float(p64.grad.abs().max()))
    elif eta == 0.0:
        # With nothing masked the baselines compute the dense MSE, exactly what the fused op computes.
        with torch.no_grad(), diffkernels.use_backend(backend):
            dense = diffkernels.sparse_mse_loss(pred, target, 0.0, 1)
        torch.testing.assert_close(loss.double(), dense.double(), rtol=1e-5, atol=0)
    else:
        # Torch's RNG: another mask, same law. The kept fraction of the gradient is about 1 - eta.
        n = pred.numel()
        kept = int((grad != 0).sum())
        sd = math.sqrt(n * eta * (1 - eta))
        assert abs(kept - n * (1 - eta)) <= 6 * sd + 1, (kept, n, eta)


def test_grad_strategy(benchmark, backend, strategy, shape, eta, dtype):
    """(A) shipped: loss and gradient in one pass; (B) a pass without gradient, then one writing it."""
    pred, target = _inputs(shape, dtype)
    pred = pred.detach()
    with diffkernels.use_backend(backend):
        kernels = _kernels.for_device(DEVICE)
    B = shape[0]
    n = math.prod(shape) // B
    gscale = torch.full((B,), 2.0 / (B * n * (1.0 - eta)), dtype=torch.float32, device=DEVICE)
    seed = seed_to_int64(BASE_SEED)
    benchmark.group = f"grad strategy {shape_arg(shape)} eta={eta} {dtype}"
    benchmark.extra_info.update(device=str(DEVICE), backend=backend)

    if strategy == "A_one_pass":
        def step():
            r = kernels.sparse_mse_fwd(pred, target, eta, seed, 1, gscale)
            sync(DEVICE)
            return r
    else:
        def step():
            sq, kept, _ = kernels.sparse_mse_fwd(pred, target, eta, seed, 1, None)
            _, _, grad = kernels.sparse_mse_fwd(pred, target, eta, seed, 1, gscale)
            sync(DEVICE)
            return sq, kept, grad

    step()
    sq, kept, grad = benchmark(step)
    sq_a, kept_a, grad_a = kernels.sparse_mse_fwd(pred, target, eta, seed, 1, gscale)
    assert torch.equal(sq, sq_a) and torch.equal(kept, kept_a) and torch.equal(grad, grad_a)
    assert grad.shape == pred.shape
