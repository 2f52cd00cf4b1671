"""The masked cross-entropy primitive masked_ce_rows (the Triton kernel, diffkernels/triton/masked_ce.py,
and its plain-PyTorch reference) and the op's Triton path.

Against float64 references: the row kernel alone (fp32, bf16, fp16; odd V not a multiple of the
block; targets in the first and last columns; coef = 0 rows, which must never be read; -inf
logits; in-place and separate gradients; chunk rows mapped to tokens), and masked_cross_entropy
with the Triton backend forced (interpreter on CPU) in both forms, with and without bias, one and
several chunks. Plus an ahead-of-time compile of the kernel for sm_90, as tests/test_triton_compile.py
does for the other kernels.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

import diffkernels  # noqa: E402
from diffkernels.mdm.loss import masked_cross_entropy  # noqa: E402
from diffkernels.ops import masked_ce as op  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"  # Triton runs CPU tensors in the interpreter (conftest)
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def kernel():
    from diffkernels.triton.masked_ce import masked_ce_rows

    return masked_ce_rows


def reference(x, targets, coef):
    """float64 CE per row (0 where coef == 0) and coef * (softmax - onehot) (0 rows where coef == 0)."""
    xd = x.double()
    logp = torch.log_softmax(xd, dim=1)
    active = coef != 0
    ce = torch.where(active, -logp.gather(1, targets[:, None]).squeeze(1), 0.0)
    g = logp.exp() * coef.double()[:, None]
    g[torch.arange(x.shape[0], device=x.device), targets] -= coef.double()
    g[~active] = 0
    return ce, g


def rel_err(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


def make_rows(gen, n, V, dtype, scale=3.0):
    x = (torch.randn(n, V, generator=gen, dtype=torch.float64) * scale).to(dtype)
    targets = torch.randint(0, V, (n,), generator=gen)
    targets[0] = V - 1  # the last column (in the last, partial block)
    targets[1 % n] = 0
    coef = torch.rand(n, generator=gen, dtype=torch.float64).to(torch.float32) + 0.1
    coef[n // 2] = 0.0
    if n > 4:
        coef[n - 2] = -0.7  # any nonzero weight
    return x, targets, coef


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("V,block", [(23, 8), (37, 16), (1000, 128), (1003, None), (5, 64)])
def test_all_rows_against_float64(gen, dtype, V, block):
    n = 7
    x, targets, coef = make_rows(gen, n, V, dtype)
    x[n // 2] = float("nan")  # a row without a loss: never read
    ce = torch.full((n,), 123.0)
    grad = torch.full((n, V), 7.0, dtype=dtype)
    ce, grad, x, targets, coef = (t.to(DEVICE) for t in (ce, grad, x, targets, coef))
    kernel()(x, targets, coef, ce, grad=grad, block=block)
    x_ref = x.clone()
    x_ref[n // 2] = 0
    ce_ref, g_ref = reference(x_ref, targets, coef)
    assert ce.dtype == torch.float32 and grad.dtype == dtype
    assert rel_err(ce, ce_ref) <= 2e-6, "CE"  # from the same rounded logits: float32 arithmetic only
    assert rel_err(grad, g_ref) <= TOL[dtype], "grad"
    assert ce[n // 2] == 0 and (grad[n // 2] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("want_grad", [True, False])
def test_chunk_rows_in_place(gen, dtype, want_grad):
    """HAS_ROWS: buffer row i is token rows[i]; the gradient overwrites the logits buffer."""
    N, V = 12, 45
    x_all, targets, coef = make_rows(gen, N, V, dtype)
    rows = torch.nonzero(coef != 0).squeeze(1)
    buf = x_all[rows].clone()
    ce = torch.zeros(N)
    buf, targets, coef, ce, rows_d = (t.to(DEVICE) for t in (buf, targets, coef, ce, rows))
    logits = buf.clone()
    kernel()(buf, targets, coef, ce, rows=rows_d, grad=buf if want_grad else None, block=16)
    ce_ref, g_ref = reference(logits, targets[rows_d], coef[rows_d])
    assert rel_err(ce[rows_d], ce_ref) <= 2e-6
    inactive = torch.ones(N, dtype=torch.bool, device=DEVICE)
    inactive[rows_d] = False
    assert (ce[inactive] == 0).all()  # untouched
    if want_grad:
        assert rel_err(buf, g_ref) <= TOL[dtype]
    else:
        assert torch.equal(buf, logits)


def test_negative_infinity_logits(gen):
    """-inf logits (a vocabulary entry switched off) get probability 0; a whole first block of
    -inf must not turn the running sum into NaN."""
    n, V = 4, 40
    x, targets, coef = make_rows(gen, n, V, torch.float32)
    x[:, :16] = float("-inf")  # the first two blocks of 8 of every row
    x[2, 30] = float("-inf")
    targets = torch.randint(16, V, (n,), generator=gen)
    targets[2] = 31
    ce, grad = torch.empty(n), torch.empty(n, V)
    x, targets, coef, ce, grad = (t.to(DEVICE) for t in (x, targets, coef, ce, grad))
    kernel()(x, targets, coef, ce, grad=grad, block=8)
    ce_ref, g_ref = reference(x, targets, coef)
    assert torch.isfinite(ce).all() and torch.isfinite(grad).all()
    assert rel_err(ce, ce_ref) <= 2e-6 and rel_err(grad, g_ref) <= 2e-5
    assert (grad[:, :16] == 0).all()


def test_gradient_of_large_logits_is_accurate_to_a_few_ulps(gen):
    """softmax = exp(x - max) / s: the kernel used exp(x - lse), whose rounding error grows with |lse|
    (about 1e-5 relative at logits of a few hundred, in float32)."""
    n, V = 16, 7
    x, targets, coef = make_rows(gen, n, V, torch.float32, scale=300.0)
    ce, grad = torch.empty(n), torch.empty(n, V)
    x, targets, coef, ce, grad = (t.to(DEVICE) for t in (x, targets, coef, ce, grad))
    kernel()(x, targets, coef, ce, grad=grad)
    _, g_ref = reference(x, targets, coef)
    u = 2.0**-24
    bound = 8 * u * coef.abs().double()[:, None] + 4 * u * g_ref.abs()
    assert ((grad.double() - g_ref).abs() <= bound).all()


def test_target_outside_vocabulary_gives_nan_not_a_stray_read(gen):
    n, V = 3, 20
    x, targets, coef = make_rows(gen, n, V, torch.float32)
    coef[:] = 1.0
    targets[1] = V  # one past the end
    targets[2] = -1
    ce = torch.empty(n)
    x, targets, coef, ce = (t.to(DEVICE) for t in (x, targets, coef, ce))
    kernel()(x, targets, coef, ce, block=8)
    assert torch.isfinite(ce[0]) and torch.isnan(ce[1]) and torch.isnan(ce[2])


def bits(t):
    """t's bits, so that NaN equals NaN."""
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_masked_ce_rows_contract(gen, backend, dtype):
    """The primitive as diffkernels/ops/_kernels.py defines it, for the Triton kernel and the
    plain-PyTorch reference alike: every row (rows with coef 0 never read: CE 0, zero gradient) or
    chunk rows mapped to tokens; x unchanged unless it is the gradient buffer."""
    from diffkernels.ops import _kernels

    masked_ce_rows = _kernels.kernels_for(backend).masked_ce_rows
    n, V = 9, 37
    x, targets, coef = make_rows(gen, n, V, dtype)
    x[n // 2] = float("nan")  # coef 0: never read
    x, targets, coef = x.to(DEVICE), targets.to(DEVICE), coef.to(DEVICE)
    x_clean = x.clone()
    x_clean[n // 2] = 0
    ce_ref, g_ref = reference(x_clean, targets, coef)
    before = x.clone()

    ce, grad = torch.full((n,), 5.0, device=DEVICE), torch.full((n, V), 7.0, dtype=dtype, device=DEVICE)
    masked_ce_rows(x, targets, coef, ce, grad=grad)
    assert torch.equal(bits(x), bits(before))
    assert rel_err(ce, ce_ref) <= 2e-6 and ce[n // 2] == 0
    assert rel_err(grad, g_ref) <= TOL[dtype] and (grad[n // 2] == 0).all()

    ce_only = torch.full((n,), 5.0, device=DEVICE)
    masked_ce_rows(x, targets, coef, ce_only)
    assert torch.equal(ce_only, ce) and torch.equal(bits(x), bits(before))

    rows = torch.nonzero(coef != 0).squeeze(1)
    buf, ce_rows = x[rows].clone(), torch.full((n,), 5.0, device=DEVICE)
    masked_ce_rows(buf, targets, coef, ce_rows, rows=rows, grad=buf)
    assert torch.equal(ce_rows[rows], ce[rows]) and ce_rows[n // 2] == 5.0  # other tokens untouched
    assert rel_err(buf, g_ref[rows]) <= TOL[dtype]


def test_chunks_are_balanced():
    assert op.chunks(0, 4) == []
    assert op.chunks(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert op.chunks(9, 4) == [(0, 3), (3, 6), (6, 9)]
    assert op.chunks(8193, 8192) == [(0, 4097), (4097, 8193)]  # never a tiny last chunk
    assert op.chunks(5, 1000) == [(0, 5)]


def test_default_chunk_is_one_chunk_at_the_issue_shapes():
    """~8k masked bf16 tokens at V <= 128256: one chunk on the Triton path (no grad-W accumulation)."""
    for V in (32000, 128256):
        assert op.chunk_tokens(0, V, torch.bfloat16, True) >= 8300
    assert op.chunk_tokens(7, 128256, torch.bfloat16, True) == 7
    # the plain-PyTorch path counts the float32 copy of bf16 logits
    assert op.chunk_tokens(0, 1000, torch.bfloat16, False) == op.CHUNK_BYTES // (6 * 1000)


# --- the op with the Triton backend forced --------------------------------------------------------


def problem(gen, dtype, N=30, H=16, V=53, bias=True):
    hidden = torch.randn(N, H, generator=gen, dtype=torch.float64).to(dtype)
    weight = (torch.randn(V, H, generator=gen, dtype=torch.float64) / H**0.5 * 3).to(dtype)
    b = (torch.randn(V, generator=gen, dtype=torch.float64) * 0.5).to(dtype) if bias else None
    targets = torch.randint(0, V, (N,), generator=gen)
    targets[0] = V - 1
    coef = torch.where(torch.rand(N, generator=gen) < 0.5, torch.rand(N, generator=gen, dtype=torch.float64) / N, 0.0)
    coef[0] = 1.0 / N
    out = [t.to(DEVICE).requires_grad_(t.is_floating_point() and t is not coef) if t is not None else None
           for t in (hidden, weight, b, targets, coef)]
    return out


def reference_loss(hidden, weight, bias, targets, coef):
    logits = hidden.double() @ weight.double().t()
    if bias is not None:
        logits = logits + bias.double()
    ce = -torch.log_softmax(logits, dim=1).gather(1, targets[:, None]).squeeze(1)
    return (coef.double() * torch.where(coef != 0, ce, 0.0)).sum()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("chunk", [0, 4, 5])
@pytest.mark.parametrize("bias", [False, True])
def test_hidden_form_triton_path(gen, dtype, chunk, bias):
    hidden, weight, b, targets, coef = problem(gen, dtype, bias=bias)
    inputs = [t for t in (hidden, weight, b) if t is not None]
    with diffkernels.use_backend("triton"):
        loss = masked_cross_entropy(targets, coef, hidden=hidden, lm_head_weight=weight, lm_head_bias=b,
                                    chunk_size=chunk)
    expected = reference_loss(hidden, weight, b, targets, coef)
    assert loss.dtype == torch.float32
    tol = 2e-5 if dtype == torch.float32 else 3e-2
    assert rel_err(loss.detach(), expected.detach()) <= tol
    grads = torch.autograd.grad(3.0 * loss, inputs)
    expected_grads = torch.autograd.grad(3.0 * expected, inputs)
    for g, e, x in zip(grads, expected_grads, inputs):
        assert g.dtype == x.dtype
        assert rel_err(g, e) <= tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_logits_form_triton_path(gen, dtype):
    """One kernel over every row: rows without a loss are never read (NaN there is harmless)."""
    N, V = 20, 37
    logits = (torch.randn(N, V, generator=gen, dtype=torch.float64) * 2).to(dtype)
    targets = torch.randint(0, V, (N,), generator=gen)
    targets[1] = V - 1
    coef = torch.where(torch.rand(N, generator=gen) < 0.5, 0.1, 0.0).to(torch.float32)
    coef[1] = 0.3
    poisoned = logits.clone()
    poisoned[coef == 0] = float("nan")
    poisoned, targets, coef = poisoned.to(DEVICE).requires_grad_(), targets.to(DEVICE), coef.to(DEVICE)
    with diffkernels.use_backend("triton"):
        loss = masked_cross_entropy(targets, coef, logits=poisoned)
    clean = logits.to(DEVICE).requires_grad_()
    expected = (coef.double() * torch.where(
        coef != 0, -torch.log_softmax(clean.double(), 1).gather(1, targets[:, None]).squeeze(1), 0.0)).sum()
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    assert rel_err(loss.detach(), expected.detach()) <= 2e-6
    (g,) = torch.autograd.grad(loss, poisoned)
    (e,) = torch.autograd.grad(expected, clean)
    assert g.dtype == dtype and torch.isfinite(g).all() and (g[coef == 0] == 0).all()
    assert rel_err(g, e) <= tol


def test_triton_and_torch_paths_agree(gen):
    hidden, weight, b, targets, coef = problem(gen, torch.float32, N=40, V=61)
    out = {}
    for backend in ("triton", "torch"):
        with diffkernels.use_backend(backend):
            loss = masked_cross_entropy(targets, coef, hidden=hidden, lm_head_weight=weight, lm_head_bias=b, chunk_size=7)
        out[backend] = (loss.detach(), *torch.autograd.grad(loss, (hidden, weight, b)))
    for a, e in zip(out["triton"], out["torch"]):
        assert rel_err(a, e) <= 1e-5


def test_weight_grad_accumulation_modes(gen):
    """Every accumulation mode gives sum_c d_c^T h_c (float32 accumulation)."""
    V, H, dtype = 9, 6, torch.bfloat16
    parts = [(torch.randn(V, 5, generator=gen).to(dtype), torch.randn(5, H, generator=gen).to(dtype)) for _ in range(3)]
    exact = sum(a.double() @ b.double() for a, b in parts)
    for n_chunks in (1, 3):
        acc = op.WeightGrad(V, H, dtype, torch.device("cpu"), n_chunks)
        assert acc.mode == ("direct" if n_chunks == 1 else "add_fp32")  # no out_dtype GEMM on CPU
        use = parts[:n_chunks]
        for a, b in use:
            acc.add(a, b)
        got = acc.result()
        assert got.dtype == dtype
        want = sum(a.double() @ b.double() for a, b in use)
        # Each chunk's bf16 product and the final bf16 result are rounded once (2^-9 relative each),
        # so elementwise |got - want| <= 2^-9 (sum_c |P_c| + |sum_c P_c|) <= 2^-8 sum_c |a_c| |b_c|;
        # a max-relative bound would fail when chunks cancel.
        bound = sum(a.double().abs() @ b.double().abs() for a, b in use)
        assert ((got.double() - want).abs() <= 2 ** -8 * bound).all()
    assert exact.abs().max() > 0
    assert not op.gemm_accumulates_in_fp32("cpu", torch.bfloat16)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_gemm_fp32_accumulation_mode_on_cuda(gen):
    V, H, dtype = 64, 32, torch.bfloat16
    parts = [(torch.randn(V, 16, generator=gen).to(dtype).cuda(), torch.randn(16, H, generator=gen).to(dtype).cuda())
             for _ in range(4)]
    acc = op.WeightGrad(V, H, dtype, torch.device("cuda"), 4)
    for a, b in parts:
        acc.add(a, b)
    want = sum(a.double() @ b.double() for a, b in parts)
    assert rel_err(acc.result(), want) <= 2 ** -8


# --- ahead-of-time compile for an H100 ------------------------------------------------------------


def compile_for_sm90():
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from diffkernels.triton import masked_ce

    target = GPUTarget("cuda", 90, 32)
    for dtype in ("bf16", "fp16", "fp32"):
        for has_rows in (True, False):
            for want_grad in (True, False):
                sig = {"x_ptr": f"*{dtype}", "g_ptr": f"*{dtype}", "rows_ptr": "*i64", "targets_ptr": "*i64",
                       "coef_ptr": "*fp32", "ce_ptr": "*fp32", "V": "i32", "stride_x": "i64", "stride_g": "i64",
                       "HAS_ROWS": "constexpr", "WANT_GRAD": "constexpr", "BLOCK": "constexpr"}
                k = triton.compile(ASTSource(fn=masked_ce.masked_ce_kernel, signature=sig, constexprs={
                    "HAS_ROWS": has_rows, "WANT_GRAD": want_grad, "BLOCK": masked_ce.MAX_BLOCK}),
                    target=target, options={"num_warps": 8})
                assert k.asm["ptx"]


def test_kernel_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
            "import test_masked_ce as t; t.compile_for_sm90()")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    if out.returncode != 0 and "ptxas" in out.stderr and "not found" in out.stderr.lower():
        pytest.skip("Triton's bundled ptxas is unavailable here")
    assert out.returncode == 0, out.stderr[-4000:]
