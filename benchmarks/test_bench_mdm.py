"""pytest-benchmark suite for the masked-diffusion LM tools (``diffkernels.mdm``).

    pytest benchmarks/test_bench_mdm.py                      # time the benchmark shapes
    pytest benchmarks/test_bench_mdm.py --benchmark-disable  # CI: each case runs once, on tiny shapes, and is checked

Groups: ``mask_tokens`` (the public API, the backend kernel alone, and the eager ``torch.rand`` +
compare + ``torch.where`` baseline; standard and mirror modes) per (B, L); and
``masked_diffusion_loss`` forward + backward (ours in hidden-state form, eager full logits, eager
gathered logits, Liger-Kernel's fused linear cross-entropy when it installs and runs here) per
(B, L, H, V). Every case checks what it timed -- masks bit-exact against the reference (ours) or
consistent with themselves (eager); loss values equal to the float64 oracle or to ours -- never
speed. The full tables with spreads, ratios, memory and ceilings come from
``benchmarks/bench_mdm.py``.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("pytest_benchmark")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout
from benchmarks.bench_mdm import (  # noqa: E402
    DTYPES,
    LOSS_FNS,
    LOSS_SHAPES,
    LOSS_TOL,
    MASK_SHAPES,
    MODES,
    eager_mask,
    liger_status,
    liger_sum_expected,
    make_loss_inputs,
    row_p,
)
from benchmarks.cli import shape_arg  # noqa: E402
from benchmarks.timing import benchmark_disabled, sync  # noqa: E402
from benchmarks.fixtures import backend  # noqa: E402, F401  (a pytest fixture)

import diffkernels  # noqa: E402
from diffkernels.mdm.masking import mask_tokens  # noqa: E402
from diffkernels.ops import _kernels  # noqa: E402
from diffkernels.ops.mask_tokens import row_table  # noqa: E402
from diffkernels.reference import masked_ce as ref_ce  # noqa: E402
from diffkernels.reference import mask_tokens as ref_mask  # noqa: E402
from diffkernels.rng import seed_to_int64  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# Under --benchmark-disable every case runs once, on tiny shapes (one with odd sizes).
SMALL_MASK_SHAPES = [(4, 64), (3, 37)]
SMALL_LOSS_SHAPES = [(2, 16, 32, 64), (3, 7, 24, 100)]
MASK_METHODS = ("api", "kernel", "eager")
ORACLE_MAX_LOGITS = 2**22  # float64 oracle (with gradients) only for small N x V
SEED = 0x5EED_0000_7E57
MASK_ID = 32000


def pytest_generate_tests(metafunc):
    small = benchmark_disabled(metafunc.config)
    if "mask_method" in metafunc.fixturenames:
        shapes = SMALL_MASK_SHAPES if small else MASK_SHAPES
        params = [pytest.param(m, s, mode, id=f"{m}-{shape_arg(s)}-{mode}")
                  for s in shapes for mode in MODES for m in MASK_METHODS]
        metafunc.parametrize(("mask_method", "shape", "mode"), params)
    elif "loss_method" in metafunc.fixturenames:
        shapes = SMALL_LOSS_SHAPES if small else LOSS_SHAPES[DEVICE.type]
        dtype = "fp32" if (small or DEVICE.type == "cpu") else "bf16"
        params = [pytest.param(m, s, dtype, id=f"{m}-{shape_arg(s)}-{dtype}") for s in shapes for m in LOSS_FNS]
        metafunc.parametrize(("loss_method", "shape", "dtype"), params)


@pytest.fixture(scope="module")
def liger():
    ok, note = liger_status(DEVICE)
    return ok, note


def test_mask_tokens(benchmark, backend, mask_method, shape, mode):
    B, L = shape
    mirror = mode == "mirror"
    gen = torch.Generator().manual_seed(B * 1000 + L)
    ids = torch.randint(0, MASK_ID, (B, L), generator=gen).to(DEVICE)
    p = row_p(B, "stratified", DEVICE)
    benchmark.group = f"mask_tokens {shape_arg(shape)} {mode}"
    benchmark.extra_info.update(device=str(DEVICE), backend=backend if mask_method != "eager" else "torch")
    with diffkernels.use_backend(backend):
        kernels = _kernels.for_device(DEVICE)
    table = row_table(p, 0.0, torch.ones(B, dtype=torch.bool, device=DEVICE) if mirror else None, False)

    if mask_method == "api":
        def step():
            with diffkernels.use_backend(backend):
                mt = mask_tokens(ids, p, SEED, mask_id=MASK_ID, mode=mode)
            sync(DEVICE)
            return mt.noisy_ids, mt.masked, mt.weights
    elif mask_method == "kernel":
        def step():
            out = kernels.mask_tokens(ids, table, seed_to_int64(SEED), MASK_ID, None, None, mirror)
            sync(DEVICE)
            return tuple(t.view(-1, L) for t in out)
    else:
        def step():
            out = eager_mask(ids, p, MASK_ID, mirror)
            sync(DEVICE)
            return out

    noisy, masked, weights = benchmark(step)

    copies = 2 if mirror else 1
    assert noisy.shape == masked.shape == weights.shape == (copies * B, L)
    assert noisy.dtype == ids.dtype and masked.dtype == torch.bool and weights.dtype == torch.float32
    if mask_method == "eager":
        # torch's RNG: another mask; the outputs must be consistent with it.
        rows_p = p.repeat(copies)[:, None]
        assert torch.equal(noisy, torch.where(masked, MASK_ID, ids.repeat(copies, 1)))
        assert torch.equal(weights, torch.where(masked, 1 / rows_p, 0.0))
    else:
        # Ours: bit-exact against the plain-PyTorch reference for this seed.
        rows = torch.ones(B, dtype=torch.bool, device=DEVICE) if mirror else None
        e_noisy, e_masked, e_weights = ref_mask.mask_tokens(ids, p, SEED, mask_id=MASK_ID, mirror=mirror,
                                                            mirror_rows=rows)
        assert torch.equal(noisy, e_noisy.view(-1, L))
        assert torch.equal(masked, e_masked.view(-1, L))
        assert torch.equal(weights, e_weights.view(-1, L))


def test_masked_diffusion_loss(request, benchmark, backend, liger, loss_method, shape, dtype):
    if loss_method.startswith("liger") and not liger[0]:
        pytest.skip(liger[1])
    small = benchmark_disabled(request.config)
    B, L, H, V = shape
    hidden, weight, targets, masks = make_loss_inputs(B, L, H, V, DTYPES[dtype], DEVICE, n_masks=1,
                                                      seed=B * L + H + V)
    mt = masks[0]
    loss_fn = LOSS_FNS[loss_method]
    benchmark.group = f"masked_diffusion_loss fwd+bwd {shape_arg(shape)} {dtype}"
    benchmark.extra_info.update(device=str(DEVICE), masked_fraction=float(mt.masked.float().mean()))

    def step():
        hidden.grad = None
        weight.grad = None
        with diffkernels.use_backend(backend):
            loss = loss_fn(mt, targets, hidden, weight)
            loss.backward()
        sync(DEVICE)
        return loss.detach()

    loss = float(benchmark(step))
    gh, gw = hidden.grad, weight.grad
    assert gh is not None and gw is not None and gh.shape == hidden.shape and gw.shape == weight.shape
    assert math.isfinite(loss) and torch.isfinite(gh).all() and torch.isfinite(gw).all()
    tol = LOSS_TOL[dtype]

    h, w = hidden.detach(), weight.detach()
    if loss_method == "liger_sum":  # a different loss (one uniform weight): compare with ours for it
        with torch.no_grad(), diffkernels.use_backend(backend):
            expected = float(liger_sum_expected(mt, targets, h, w))
        assert loss == pytest.approx(expected, rel=tol)
        return
    if small and B * L * V <= ORACLE_MAX_LOGITS:
        # The float64 oracle: same loss and same gradients.
        h64, w64 = h.double().requires_grad_(True), w.double().requires_grad_(True)
        expected = ref_ce.masked_diffusion_loss(mt, targets, hidden=h64, lm_head_weight=w64)
        expected.backward()
        assert loss == pytest.approx(float(expected.detach()), rel=tol)
        gtol = {"fp32": 1e-4, "bf16": 2e-2}[dtype]
        torch.testing.assert_close(gh.double(), h64.grad, rtol=gtol, atol=gtol * float(h64.grad.abs().max()))
        torch.testing.assert_close(gw.double(), w64.grad, rtol=gtol, atol=gtol * float(w64.grad.abs().max()))
    else:
        # Large shapes: the same loss value as ours.
        with torch.no_grad(), diffkernels.use_backend(backend):
            expected = float(LOSS_FNS["fused"](mt, targets, h, w))
        assert loss == pytest.approx(expected, rel=tol)
