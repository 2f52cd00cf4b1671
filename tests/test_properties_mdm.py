"""Property-based tests (hypothesis) of diffkernels.mdm: mask_tokens (standard/mirror, eligible, ISAD
rare tokens, union weights, mirror_max_t), masked_cross_entropy and masked_diffusion_loss (from logits,
and from hidden states with an LM head with or without bias), the t-samplers and the variance
decomposition.

Random shapes (0- and 1-sized dims), dtypes, non-contiguous views, edge seeds (numpy integers too),
extreme values and NaN/Inf placement, on the C++ and reference backends (Triton in the interpreter on
tiny shapes). Each example is checked against an independent float64 (masks: bit-exact float32)
oracle written here, or must raise a clear error.

CI runs the deterministic "ci" profile of tests/conftest.py. The long search:
    HYPOTHESIS_PROFILE=long python -m pytest tests/test_properties_*.py
"""

import math

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import diffkernels as dk
from diffkernels import mdm
from diffkernels.reference import masked_ce as ref_ce

BACKENDS = ["cpp", "torch"]


def examples(fraction: float):
    """A share of the profile's examples (for the slow Triton interpreter and the heavier cases)."""
    return settings(max_examples=max(2, int(settings.default.max_examples * fraction)))


EDGE_SEEDS = [0, 1, 2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1, -1, -(2**63), 2**64 + 3]
SEEDS = st.one_of(
    st.sampled_from(EDGE_SEEDS),
    st.integers(-(2**65), 2**65),
    st.integers(-(2**63), 2**63 - 1).map(np.int64),
    st.integers(0, 2**64 - 1).map(np.uint64),
    st.integers(0, 255).map(np.uint8),
)

UNIT = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
F32 = np.float32


def acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def assert_within(actual, expected, bound, what):
    """|actual - expected| <= bound elementwise; where expected is not finite, actual must equal it."""
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    bound = torch.as_tensor(bound, dtype=torch.float64).expand_as(e) if not isinstance(bound, torch.Tensor) \
        else bound.double().expand_as(e)
    assert a.shape == e.shape, (what, a.shape, e.shape)
    same = (a == e) | (a.isnan() & e.isnan())
    near = torch.isfinite(e) & ((a - e).abs() <= bound)
    bad = ~(same | near)
    assert not bool(bad.any()), (f"{what}: actual {a[bad][:4].tolist()} expected {e[bad][:4].tolist()} "
                                 f"bound {bound[bad][:4].tolist()}")


# --- the RNG oracle (independent of diffkernels.rng: textbook Philox4x32-10 in numpy) -----------------

MASK32 = 0xFFFFFFFF


def uniform_oracle(seed: int, index: np.ndarray) -> np.ndarray:
    s = int(seed) % (1 << 64)
    i = np.asarray(index, dtype=np.uint64)
    c = i >> np.uint64(2)
    c0, c1 = c & np.uint64(MASK32), c >> np.uint64(32)
    c2 = c3 = np.zeros_like(c)
    k0, k1 = np.uint64(s & MASK32), np.uint64(s >> 32)
    for _ in range(10):
        p0, p1 = c0 * np.uint64(0xD2511F53), c2 * np.uint64(0xCD9E8D57)
        c0, c1, c2, c3 = ((p1 >> np.uint64(32)) ^ c1 ^ k0, p1 & np.uint64(MASK32),
                          (p0 >> np.uint64(32)) ^ c3 ^ k1, p0 & np.uint64(MASK32))
        k0, k1 = (k0 + np.uint64(0x9E3779B9)) & np.uint64(MASK32), (k1 + np.uint64(0xBB67AE85)) & np.uint64(MASK32)
    w = np.choose((i & np.uint64(3)).astype(np.int64), (c0, c1, c2, c3)).astype(np.int64)
    signed = np.where(w >= 1 << 31, w - (1 << 32), w)
    return np.where(signed < 0, -signed - 1, signed).astype(np.float32) * F32(4.6566127342e-10)


# --- mask_tokens ------------------------------------------------------------------------------------


def mask_oracle(ids, p32, seed, mask_id, eligible, mirror, mirror_rows, rare_flags, rare_delta, union):
    """(noisy, masked, weights) (copies, B, L) from the definitions, in float32 numpy arithmetic."""
    B, L = ids.shape
    u = uniform_oracle(seed, np.arange(B * L)).reshape(B, L)
    p = np.broadcast_to(p32.reshape(B, 1), (B, L))
    with np.errstate(divide="ignore", over="ignore"):  # 1 / p of a tiny or zero float32 p is inf, as in float32
        q = np.minimum(p + F32(rare_delta), F32(1.0))
        pt = np.where(rare_flags, q, p) if rare_flags is not None else p
        ok = eligible if eligible is not None else np.ones((B, L), dtype=bool)
        m1 = ok & (u < pt)
        copies = [m1]
        rows = np.broadcast_to((mirror_rows if mirror_rows is not None else np.ones(B, bool)).reshape(B, 1), (B, L))
        if mirror:
            copies.append(ok & rows & (u > F32(1.0) - pt))
        w_one = F32(1.0) / pt
        if mirror and union:
            pi = np.minimum(F32(2.0) * pt, F32(1.0))
            w = np.where(copies[0] & copies[1], np.where(rows, F32(1.0) / pi, w_one),
                         np.where(rows, F32(2.0) / pi, w_one))
        else:
            w = w_one
    noisy = np.stack([np.where(m, mask_id, ids) for m in copies])
    weights = np.stack([np.where(m, w, F32(0.0)).astype(np.float32) for m in copies])
    return noisy, np.stack(copies), weights


@st.composite
def mask_cases(draw, max_numel=80):
    B = draw(st.integers(0, 5))
    L = draw(st.integers(0, 9))
    assume(B * L <= max_numel)
    dtype = draw(st.sampled_from([torch.int64, torch.int32]))
    info = torch.iinfo(dtype)
    extremes = [0, 1, info.max, info.min, info.max - 1]
    ids = draw(st.lists(st.one_of(st.integers(0, 6), st.sampled_from(extremes)), min_size=B * L, max_size=B * L))
    p_kind = draw(st.sampled_from(["float", "numpy", "tensor"]))
    p_values = draw(st.lists(st.one_of(st.floats(0.0, 1.0, exclude_min=True),
                                       st.sampled_from([1.0, 0.5, 1e-30, 1e-45, 0.999999, 2.0**-24])),
                             min_size=max(B, 1), max_size=max(B, 1)))
    rare = draw(st.one_of(st.none(), st.lists(st.one_of(st.integers(0, 6), st.sampled_from(
        [info.max, info.min, 2**32 + 3, -(2**32) + 3, 2**31, 2**63 - 1, 2**64 + 1])), max_size=4)))
    mode = draw(st.sampled_from(["standard", "mirror"]))
    return dict(
        B=B, L=L, dtype=dtype, ids=ids, p_kind=p_kind, p_values=p_values,
        p_dtype=draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16])),
        p_strided=draw(st.booleans()), seed=draw(SEEDS),
        mask_id=draw(st.one_of(st.integers(7, 1000), st.sampled_from([info.max, info.min, -1]))),
        eligible=draw(st.sampled_from([None, "random", "none", "strided"])), eligible_seed=draw(st.integers(0, 99)),
        mode=mode, rare=rare, rare_as_tensor=draw(st.booleans()),
        rare_delta=draw(st.sampled_from([0.0, 0.25, 1.0, 0.5 + 2**-30])) if rare is not None else 0.0,
        union=draw(st.booleans()) if mode == "mirror" else False,
        mirror_max_t=draw(st.sampled_from([None, 0.9, 1.0, 0.3])) if mode == "mirror" else None,
        transposed=draw(st.booleans()),
    )


def build_mask_inputs(case):
    B, L = case["B"], case["L"]
    ids = torch.tensor(case["ids"], dtype=torch.int64).reshape(B, L).to(case["dtype"])
    if case["transposed"]:  # the same values through a non-contiguous view
        ids = ids.t().contiguous().t()
    gen = torch.Generator().manual_seed(case["eligible_seed"])
    eligible = None
    if case["eligible"] == "random":
        eligible = torch.rand(B, L, generator=gen) < 0.7
    elif case["eligible"] == "none":
        eligible = torch.zeros(B, L, dtype=torch.bool)
    elif case["eligible"] == "strided":
        eligible = (torch.rand(B, 2 * L, generator=gen) < 0.7)[:, ::2]
    values = case["p_values"][:B]
    if case["p_kind"] == "float":
        p = values[0] if B else 0.5
    elif case["p_kind"] == "numpy":
        p = np.float64(values[0] if B else 0.5)
    else:
        p = torch.tensor(values + values, dtype=torch.float64).to(case["p_dtype"])
        p = p[::2] if case["p_strided"] else p[:B]
    rare = case["rare"]
    if rare is not None and case["rare_as_tensor"]:
        rare = torch.tensor([r for r in rare if -(2**63) <= r < 2**63], dtype=torch.int64)
    return ids, p, eligible, rare


def p_float32(p, B):
    if isinstance(p, torch.Tensor):
        return p.to(torch.float32).numpy()
    return np.full(B, F32(float(p)), dtype=np.float32)


def call_mask(case, ids, p, eligible, rare):
    return mdm.mask_tokens(ids, p, case["seed"], mask_id=case["mask_id"], eligible=eligible, mode=case["mode"],
                           mirror_max_t=case["mirror_max_t"], rare=rare, rare_delta=case["rare_delta"],
                           union_weights=case["union"])


def expected_error(case, ids, p, eligible):
    """The documented error (type, text) for this input, or None when it is valid."""
    info = torch.iinfo(case["dtype"])
    if not info.min <= case["mask_id"] <= info.max:
        return ValueError, "mask_id"
    B = case["B"]
    if isinstance(p, torch.Tensor):
        p32 = p.to(torch.float32)
        if B and not bool(((p32 > 0) & (p32 <= 1)).all()):
            return ValueError, "p must lie"
    elif not 0.0 < float(p) <= 1.0:
        return ValueError, "p must lie"
    collides = ids == case["mask_id"]
    if eligible is not None:
        collides &= eligible
    if bool(collides.any()):
        return ValueError, "mask_id"
    return None


def check_mask_case(case):
    ids, p, eligible, rare = build_mask_inputs(case)
    B, L = case["B"], case["L"]
    error = expected_error(case, ids, p, eligible)
    if error is not None:
        with pytest.raises(error[0], match=error[1]):
            call_mask(case, ids, p, eligible, rare)
        return
    out = call_mask(case, ids, p, eligible, rare)
    p32 = p_float32(p, B)
    mirror = case["mode"] == "mirror"
    rows = None
    if mirror and case["mirror_max_t"] is not None:
        rows = p32 < F32(case["mirror_max_t"])  # a float32 comparison, like every threshold
    rare_flags = None
    if rare is not None:
        values = rare.tolist() if isinstance(rare, torch.Tensor) else list(rare)
        rare_flags = np.isin(ids.numpy().astype(np.int64), np.array([v for v in values if -(2**63) <= v < 2**63],
                                                                    dtype=np.int64))
    noisy, masked, weights = mask_oracle(ids.numpy(), p32, case["seed"], case["mask_id"],
                                         None if eligible is None else eligible.numpy(), mirror, rows, rare_flags,
                                         case["rare_delta"], case["union"])
    copies = 2 if mirror else 1
    assert out.noisy_ids.dtype == ids.dtype and out.noisy_ids.shape == (copies * B, L)
    assert np.array_equal(out.noisy_ids.numpy(), noisy.reshape(copies * B, L))
    assert np.array_equal(out.masked.numpy(), masked.reshape(copies * B, L))
    assert out.weights.dtype == torch.float32
    assert np.array_equal(out.weights.numpy(), weights.reshape(copies * B, L))  # bit for bit
    count = eligible.sum(dim=1) if eligible is not None else torch.full((B,), L)
    assert torch.equal(out.eligible_count, count.to(torch.int64))
    assert torch.equal(out.source_row, torch.arange(B).repeat(copies))
    assert np.array_equal(out.p.numpy(), np.tile(p32, copies))
    if not mirror:
        expected_rw = np.ones(B, dtype=np.float32)
    elif rows is None:
        expected_rw = np.full(2 * B, 0.5, dtype=np.float32)
    else:
        expected_rw = np.concatenate([np.where(rows, 0.5, 1.0), np.where(rows, 0.5, 0.0)]).astype(np.float32)
    assert np.array_equal(out.row_weight.numpy(), expected_rw)


@pytest.mark.parametrize("backend", BACKENDS)
@given(case=mask_cases())
def test_mask_tokens_matches_oracle(backend, case):
    with dk.use_backend(backend):
        check_mask_case(case)


@examples(0.25)
@given(case=mask_cases(max_numel=24))
def test_mask_tokens_triton_matches_oracle(case):
    with dk.use_backend("triton"):
        check_mask_case(case)


@pytest.mark.parametrize("backend", BACKENDS)
@given(case=mask_cases(), alias=st.sampled_from(["mod", "numpy"]))
def test_mask_tokens_seed_aliases(backend, case, alias):
    """Seeds are taken mod 2**64: equal residues and numpy integers give the same mask."""
    ids, p, eligible, rare = build_mask_inputs(case)
    assume(expected_error(case, ids, p, eligible) is None)
    seed = int(case["seed"])
    other = seed % 2**64 - 2**64 if alias == "mod" else np.uint64(seed % 2**64)
    with dk.use_backend(backend):
        a = call_mask(case, ids, p, eligible, rare)
        b = call_mask(dict(case, seed=other), ids, p, eligible, rare)
    assert torch.equal(a.masked, b.masked) and torch.equal(a.weights, b.weights)


BAD_MASK_CALLS = {
    "float ids": (dict(input_ids=torch.zeros(2, 3)), TypeError, "input_ids"),
    "1-d ids": (dict(input_ids=torch.zeros(3, dtype=torch.long)), ValueError, "input_ids"),
    "3-d ids": (dict(input_ids=torch.zeros(1, 2, 3, dtype=torch.long)), ValueError, "input_ids"),
    "p zero": (dict(p=0.0), ValueError, "p"),
    "p above one": (dict(p=1.5), ValueError, "p"),
    "p nan": (dict(p=math.nan), ValueError, "p"),
    "p bool": (dict(p=True), TypeError, "p"),
    "p str": (dict(p="0.5"), TypeError, "p"),
    "p tensor nan": (dict(p=torch.tensor([0.5, math.nan])), ValueError, "p"),
    "p tensor neg": (dict(p=torch.tensor([0.5, -0.1])), ValueError, "p"),
    "p tensor shape": (dict(p=torch.tensor([0.5, 0.5, 0.5])), ValueError, "p"),
    "p int tensor": (dict(p=torch.tensor([1, 1])), TypeError, "p"),
    "p underflows float32": (dict(p=torch.tensor([0.5, 1e-50], dtype=torch.float64)), ValueError, "p"),
    "mask_id bool": (dict(mask_id=True), TypeError, "mask_id"),
    "mask_id float": (dict(mask_id=9.0), TypeError, "mask_id"),
    "mask_id too big": (dict(mask_id=2**63), ValueError, "mask_id"),
    "mask_id collides": (dict(mask_id=1), ValueError, "mask_id"),
    "eligible int": (dict(eligible=torch.ones(2, 3, dtype=torch.long)), TypeError, "eligible"),
    "eligible shape": (dict(eligible=torch.ones(3, 2, dtype=torch.bool)), ValueError, "eligible"),
    "mode": (dict(mode="antithetic"), ValueError, "mode"),
    "seed float": (dict(seed=1.5), TypeError, "seed"),
    "seed None": (dict(seed=None), TypeError, "seed"),
    "rare float": (dict(rare=[1.5]), TypeError, "rare"),
    "rare float tensor": (dict(rare=torch.tensor([1.0])), TypeError, "rare"),
    "rare_delta": (dict(rare=[1], rare_delta=1.5), ValueError, "rare_delta"),
    "rare_delta nan": (dict(rare=[1], rare_delta=math.nan), ValueError, "rare_delta"),
    "union standard": (dict(union_weights=True), ValueError, "union_weights"),
    "max_t standard": (dict(mirror_max_t=0.5), ValueError, "mirror_max_t"),
    "max_t zero": (dict(mode="mirror", mirror_max_t=0.0), ValueError, "mirror_max_t"),
    "max_t nan": (dict(mode="mirror", mirror_max_t=math.nan), ValueError, "mirror_max_t"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@given(bad=st.sampled_from(sorted(BAD_MASK_CALLS)), seed=SEEDS)
def test_mask_tokens_bad_input_raises(backend, bad, seed):
    change, error, name = BAD_MASK_CALLS[bad]
    kw = dict(input_ids=torch.tensor([[1, 2, 3], [4, 5, 6]]), p=0.5, seed=seed, mask_id=99)
    kw.update(change)
    with dk.use_backend(backend), pytest.raises(error, match=name):
        mdm.mask_tokens(kw.pop("input_ids"), kw.pop("p"), kw.pop("seed"), **kw)


# --- masked cross-entropy: oracle and tolerances ------------------------------------------------------


def ce_oracle(logits64, targets, coef64):
    """(loss, per-token CE, d loss / d logits) in float64; tokens with coef == 0 contribute nothing."""
    active = coef64 != 0
    x = torch.where(active[:, None], logits64, 0.0)  # rows without a loss are never read
    t = torch.where(active, targets, 0)
    lse = torch.logsumexp(x, dim=1)
    ce = torch.where(active, lse - x.gather(1, t[:, None]).squeeze(1), 0.0)
    soft = torch.softmax(x, dim=1)
    onehot = torch.zeros_like(x).scatter_(1, t[:, None], 1.0)
    grad = torch.where(active[:, None], coef64[:, None] * (soft - onehot), 0.0)
    return (coef64 * ce).sum(), ce, grad


@st.composite
def ce_cases(draw, max_tokens=40, max_vocab=24):
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]))
    lead = draw(st.lists(st.integers(0, 5), min_size=1, max_size=2))
    N = math.prod(lead)
    assume(N <= max_tokens)
    return dict(
        dtype=dtype, lead=tuple(lead), V=draw(st.integers(1, max_vocab)), H=draw(st.integers(0, 6)),
        bias=draw(st.booleans()), coef=draw(st.sampled_from(["mixed", "all", "none", "tiny", "negative"])),
        scale=draw(st.sampled_from([1e-3, 1.0, 8.0, 60.0] if dtype == torch.float16 else [1e-3, 1.0, 8.0, 300.0])),
        chunk=draw(st.sampled_from([None, 1, 2, 3, 1000])), layout=draw(st.sampled_from(["contiguous", "transposed"])),
        targets_dtype=draw(st.sampled_from([torch.int64, torch.int32])),
        upstream=draw(st.sampled_from([1.0, 0.5, -2.0])),
        data_seed=draw(st.integers(0, 2**31)),
    )


def ce_inputs(case, gen):
    lead, V, dtype = case["lead"], case["V"], case["dtype"]
    N = math.prod(lead)
    targets = torch.randint(0, V, lead, generator=gen).to(case["targets_dtype"])
    coef = torch.rand(lead, generator=gen, dtype=torch.float64) + 0.1
    if case["coef"] == "mixed":
        coef = torch.where(torch.rand(lead, generator=gen) < 0.5, coef, 0.0)
    elif case["coef"] == "none":
        coef = torch.zeros(lead, dtype=torch.float64)
    elif case["coef"] == "tiny":
        coef = coef * 1e-30
    elif case["coef"] == "negative":
        coef = coef - 0.6
    # tokens without a loss: any target, even out of range (never read)
    targets = torch.where(coef != 0, targets, torch.full_like(targets, -100))
    coef = coef.to(dtype if dtype != torch.float16 else torch.float32)
    return N, targets, coef


def transposed(x):
    """x with the same values through a non-contiguous (transposed) view."""
    return x.transpose(-1, -2).contiguous().transpose(-1, -2) if x.dim() >= 2 else x


@pytest.mark.parametrize("backend", BACKENDS)
@given(case=ce_cases())
def test_masked_ce_logits_matches_oracle(backend, case):
    with dk.use_backend(backend):
        check_ce_logits(case)


@examples(0.25)
@given(case=ce_cases(max_tokens=12, max_vocab=12))
def test_masked_ce_logits_triton_matches_oracle(case):
    with dk.use_backend("triton"):
        check_ce_logits(case)


def check_ce_logits(case):
    gen = torch.Generator().manual_seed(case["data_seed"])
    dtype = case["dtype"]
    N, targets, coef = ce_inputs(case, gen)
    logits = (torch.randn(*case["lead"], case["V"], generator=gen, dtype=torch.float64) * case["scale"]).to(dtype)
    if case["layout"] == "transposed":
        logits = transposed(logits)
    logits.requires_grad_()
    loss = mdm.masked_cross_entropy(targets, coef, logits=logits, chunk_size=case["chunk"])
    acc = acc_dtype(dtype)
    assert loss.dtype == acc and loss.shape == ()
    x64 = logits.detach().double().reshape(N, case["V"])
    c64 = coef.double().reshape(N)
    exp_loss, ce, exp_grad = ce_oracle(x64, targets.reshape(N).long(), c64)
    u = UNIT[acc]
    # CE of a token: lse and x_t each within a few ulps of the accumulation dtype.
    mag = x64.abs().amax(dim=1) + math.log(case["V"]) + 1.0
    bound = (c64.abs() * (8 * u * mag + 4 * u * ce.abs())).sum() + 4 * u * (c64 * ce).abs().sum()
    assert_within(loss, exp_loss, bound, "loss")
    if N:
        g, = torch.autograd.grad(loss, logits, torch.tensor(case["upstream"], dtype=loss.dtype))
        assert g.dtype == dtype and g.shape == logits.shape
        up = abs(case["upstream"])
        e = exp_grad * case["upstream"]
        sub = torch.finfo(dtype).smallest_normal * UNIT[dtype] * 2
        gbound = up * c64.abs()[:, None] * 8 * u + 2 * UNIT[dtype] * e.abs() + sub
        assert_within(g.reshape(N, case["V"]), e, gbound, "grad logits")


def hidden_inputs(case, gen):
    dtype, H, V = case["dtype"], case["H"], case["V"]
    N, targets, coef = ce_inputs(case, gen)
    s = math.sqrt(case["scale"] / max(H, 1))  # logits of about the case's scale
    hidden = (torch.randn(*case["lead"], H, generator=gen, dtype=torch.float64) * s).to(dtype)
    weight = (torch.randn(V, H, generator=gen, dtype=torch.float64) * s).to(dtype)
    bias = (torch.randn(V, generator=gen, dtype=torch.float64)).to(dtype) if case["bias"] else None
    if case["layout"] == "transposed":
        hidden, weight = transposed(hidden), transposed(weight)
    return N, targets, coef, hidden, weight, bias


def check_ce_hidden(case):
    gen = torch.Generator().manual_seed(case["data_seed"])
    dtype, V, H = case["dtype"], case["V"], case["H"]
    N, targets, coef, hidden, weight, bias = hidden_inputs(case, gen)
    leaves = [hidden.requires_grad_(), weight.requires_grad_()] + ([bias.requires_grad_()] if bias is not None else [])
    loss = mdm.masked_cross_entropy(targets, coef, hidden=hidden, lm_head_weight=weight, lm_head_bias=bias,
                                    chunk_size=case["chunk"])
    acc = acc_dtype(dtype)
    assert loss.dtype == acc
    h64, w64 = hidden.detach().double().reshape(N, H), weight.detach().double()
    b64 = bias.detach().double() if bias is not None else torch.zeros(V, dtype=torch.float64)
    x64 = h64 @ w64.T + b64
    c64 = coef.double().reshape(N)
    exp_loss, ce, d = ce_oracle(x64, targets.reshape(N).long(), c64)
    u, ud = UNIT[acc], UNIT[dtype]
    # Logits come from a GEMM in the input dtype (float32 accumulation), rounded to the dtype.
    absx = h64.abs() @ w64.abs().T + b64.abs()
    logit_err = (absx * ((H + 4) * u + ud)).amax(dim=1) if V else torch.zeros(N)
    mag = absx.amax(dim=1) + math.log(V) + 1.0
    bound = (c64.abs() * (2 * logit_err + 8 * u * mag + 4 * u * ce.abs())).sum() + 4 * u * (c64 * ce).abs().sum()
    assert_within(loss, exp_loss, bound, "loss")
    if not N:
        return
    up = case["upstream"]
    grads = torch.autograd.grad(loss, leaves, torch.tensor(up, dtype=loss.dtype))
    # d = coef (softmax - onehot): off by the logits' error (softmax moves by <= 2 err per entry) and a
    # few u, stored in the dtype; then two GEMMs in the dtype with float32 accumulation.
    d_err = c64.abs()[:, None] * (2 * logit_err[:, None] + 8 * u) + ud * d.abs()
    e_h = d @ w64
    b_h = d_err @ w64.abs() + (d.abs() @ w64.abs()) * (2 * ud + (V + 4) * u)
    e_w = d.T @ h64
    b_w = d_err.T @ h64.abs() + (d.abs().T @ h64.abs()) * (2 * ud + (N + 4) * u)
    sub = torch.finfo(dtype).smallest_normal * ud * 2
    assert grads[0].dtype == dtype and grads[1].dtype == dtype
    assert_within(grads[0].reshape(N, H), up * e_h, 2 * abs(up) * b_h + sub, "grad hidden")
    assert_within(grads[1], up * e_w, 2 * abs(up) * b_w + sub, "grad lm_head_weight")
    if bias is not None:
        e_b, b_b = d.sum(dim=0), d_err.sum(dim=0) + d.abs().sum(dim=0) * (2 * ud + (N + 4) * u)
        assert grads[2].dtype == dtype
        assert_within(grads[2], up * e_b, 2 * abs(up) * b_b + sub, "grad lm_head_bias")


@pytest.mark.parametrize("backend", BACKENDS)
@given(case=ce_cases())
def test_masked_ce_hidden_matches_oracle(backend, case):
    with dk.use_backend(backend):
        check_ce_hidden(case)


@pytest.mark.parametrize("source", ["logits", "hidden"])
def test_bug_masked_ce_noncontiguous_cpp(source):
    """A transposed view of logits / hidden (the default CPU backend): backward must work like the
    contiguous copy, not fail inside the C++ kernel ("take contiguous tensors; grad is not")."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, generator=gen).t()  # (2, 3), non-contiguous
    weight = torch.randn(4, 3, generator=gen)
    targets, coef = torch.tensor([0, 1]), torch.tensor([1.0, 0.5])
    grads = []
    for inp in (x, x.contiguous()):
        inp = inp.clone() if inp.is_contiguous() else inp.detach()
        inp.requires_grad_()
        with dk.use_backend("cpp"):
            kw = dict(logits=inp) if source == "logits" else dict(hidden=inp, lm_head_weight=weight)
            mdm.masked_cross_entropy(targets, coef, **kw).backward()
        grads.append(inp.grad)
    assert torch.allclose(grads[0], grads[1], rtol=1e-6, atol=1e-7)


@examples(0.25)
@given(case=ce_cases(max_tokens=12, max_vocab=12))
def test_masked_ce_hidden_triton_matches_oracle(case):
    with dk.use_backend("triton"):
        check_ce_hidden(case)


@pytest.mark.parametrize("backend", BACKENDS)
@given(case=ce_cases(max_tokens=24), poison=st.sampled_from([math.nan, math.inf, -math.inf]),
       where=st.sampled_from(["inactive row", "active non-target", "active target"]))
def test_masked_ce_nonfinite_logits(backend, case, poison, where):
    """Rows of tokens without a loss are never read (NaN/Inf there change nothing, gradient 0);
    NaN in a token with a loss makes the loss NaN; -inf at a non-target logit is a valid (masked)
    vocabulary entry; -inf at the target gives CE = +inf."""
    gen = torch.Generator().manual_seed(case["data_seed"])
    dtype = case["dtype"]
    N, targets, coef = ce_inputs(dict(case, coef="mixed"), gen)
    V = case["V"]
    active = (coef != 0).reshape(N)
    logits = (torch.randn(N, V, generator=gen, dtype=torch.float64)).to(dtype)
    flat_t = targets.reshape(N)
    if where == "inactive row":
        assume(bool((~active).any()))
        row = int((~active).nonzero()[0])
        logits[row] = poison
    else:
        assume(bool(active.any()))
        row = int(active.nonzero()[0])
        col = int(flat_t[row])
        if where == "active non-target":
            assume(V > 1)
            col = (col + 1) % V
        logits[row, col] = poison
    logits = logits.reshape(*case["lead"], V).requires_grad_()
    with dk.use_backend(backend):
        loss = mdm.masked_cross_entropy(targets, coef, logits=logits, chunk_size=case["chunk"])
        g, = torch.autograd.grad(loss, logits)
    loss, g = loss.detach(), g.reshape(N, V)
    c64 = coef.double().reshape(N)
    if where == "inactive row":
        clean = logits.detach().reshape(N, V).clone()
        clean[row] = 0
        exp_loss, _, _ = ce_oracle(clean.double(), flat_t.long(), c64)
        assert math.isfinite(float(loss)) and bool(torch.isfinite(g).all())
        assert bool((g[row] == 0).all())
        assert abs(float(loss) - float(exp_loss)) <= 1e-3 * (float(exp_loss.abs()) + 1.0)
    elif math.isnan(poison):
        assert math.isnan(float(loss))
    elif where == "active non-target" and poison == -math.inf:
        assert math.isfinite(float(loss)) and float(g[row, (int(flat_t[row]) + 1) % V]) == 0.0
    elif where == "active target" and poison == -math.inf:
        if V == 1:  # the whole row is -inf: NaN, like log_softmax
            assert math.isnan(float(loss))
        else:  # a zero-probability target: CE = +inf
            assert float(loss) == math.inf
    else:  # +inf logit of a token with a loss: CE is NaN (inf - inf) or inf; never a finite number
        assert not math.isfinite(float(loss))


BAD_CE_CALLS = {
    "neither": (lambda k: dict(logits=None), ValueError, "logits"),
    "both": (lambda k: dict(hidden=torch.zeros(3, 2), lm_head_weight=torch.zeros(4, 2)), ValueError, "logits"),
    "float targets": (lambda k: dict(targets=k["targets"].float()), TypeError, "targets"),
    "int coef": (lambda k: dict(coef=k["coef"].long()), TypeError, "coef"),
    "coef shape": (lambda k: dict(coef=k["coef"][:2]), ValueError, "coef"),
    "logits shape": (lambda k: dict(logits=k["logits"][:2]), ValueError, "logits"),
    "int logits": (lambda k: dict(logits=k["logits"].long()), TypeError, "logits"),
    "empty vocab": (lambda k: dict(logits=k["logits"][:, :0]), ValueError, "V"),
    "target too big": (lambda k: dict(targets=torch.tensor([4, 0, 1])), ValueError, "targets"),
    "target negative": (lambda k: dict(targets=torch.tensor([-1, 0, 1])), ValueError, "targets"),
    "chunk negative": (lambda k: dict(chunk_size=-2), (TypeError, ValueError), "chunk_size"),
    "chunk float": (lambda k: dict(chunk_size=2.5), (TypeError, ValueError), "chunk_size"),
}
BAD_HIDDEN_CALLS = {
    "no weight": (dict(lm_head_weight=None), (TypeError, ValueError), "lm_head_weight"),
    "weight shape": (dict(lm_head_weight=torch.zeros(4, 3)), ValueError, "lm_head_weight"),
    "weight dtype": (dict(lm_head_weight=torch.zeros(4, 2, dtype=torch.float64)), (TypeError, ValueError),
                     "lm_head_weight"),
    "bias shape": (dict(lm_head_bias=torch.zeros(5)), ValueError, "lm_head_bias"),
    "bias dtype": (dict(lm_head_bias=torch.zeros(4, dtype=torch.float64)), (TypeError, ValueError), "lm_head_bias"),
    "bias int": (dict(lm_head_bias=torch.zeros(4, dtype=torch.long)), (TypeError, ValueError), "lm_head_bias"),
    "bias meta": (dict(lm_head_bias=torch.zeros(4, device="meta")), (ValueError, RuntimeError), "lm_head_bias"),
    "weight meta": (dict(lm_head_weight=torch.zeros(4, 2, device="meta")), (ValueError, RuntimeError),
                    "lm_head_weight"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@given(bad=st.sampled_from(sorted(BAD_CE_CALLS) + sorted(BAD_HIDDEN_CALLS)))
def test_masked_ce_bad_input_raises(backend, bad):
    kw = dict(targets=torch.tensor([3, 0, 1]), coef=torch.tensor([1.0, 0.0, 2.0]), logits=torch.zeros(3, 4))
    if bad in BAD_CE_CALLS:
        change, error, name = BAD_CE_CALLS[bad]
        kw.update(change(kw))
    else:
        change, error, name = BAD_HIDDEN_CALLS[bad]
        kw.update(logits=None, hidden=torch.zeros(3, 2), lm_head_weight=torch.zeros(4, 2))
        kw.update(change)
    with dk.use_backend(backend), pytest.raises(error, match=name):
        mdm.masked_cross_entropy(kw.pop("targets"), kw.pop("coef"), **kw)


# --- masked_diffusion_loss against the float64 reference ----------------------------------------------


@st.composite
def mdl_cases(draw):
    mode = draw(st.sampled_from(["standard", "mirror"]))
    normalizer = draw(st.sampled_from(["row", "batch", "global"]))
    return dict(
        B=draw(st.integers(0, 4)), L=draw(st.integers(0, 7)), V=draw(st.integers(1, 12)), H=draw(st.integers(1, 5)),
        dtype=draw(st.sampled_from([torch.float32, torch.float64])), mode=mode, normalizer=normalizer,
        source=draw(st.sampled_from(["logits", "hidden", "hidden+bias"])), importance=draw(st.booleans()),
        eligible=draw(st.booleans()), p=draw(st.floats(0.05, 1.0)), seed=draw(SEEDS),
        row_clamp=draw(st.sampled_from([None, 0.0, 0.5, 3.0])) if normalizer == "row" else None,
        num_tokens=draw(st.sampled_from([1.0, 7.0, 1e-3])) if normalizer == "global" else None,
        chunk=draw(st.sampled_from([None, 1, 3])), data_seed=draw(st.integers(0, 2**31)),
        union=draw(st.booleans()) if mode == "mirror" else False,
        mirror_max_t=draw(st.sampled_from([None, 0.5])) if mode == "mirror" else None,
        rare=draw(st.sampled_from([None, [0, 2]])),
    )


def _mdl_inputs(case, gen):
    B, L, V, H, dtype = case["B"], case["L"], case["V"], case["H"], case["dtype"]
    ids = torch.randint(0, V, (B, L), generator=gen)
    eligible = torch.rand(B, L, generator=gen) < 0.7 if case["eligible"] else None
    p = torch.rand(B, generator=gen, dtype=torch.float64) * (1 - case["p"]) + case["p"]  # per-row rates
    masked = mdm.mask_tokens(ids, p, case["seed"], mask_id=V, eligible=eligible, mode=case["mode"],
                             union_weights=case["union"], mirror_max_t=case["mirror_max_t"], rare=case["rare"],
                             rare_delta=0.3 if case["rare"] else 0.0)
    R = masked.noisy_ids.shape[0]
    importance = torch.rand(B, generator=gen, dtype=torch.float64) * 2 if case["importance"] else None
    kw = {}
    if case["source"] == "logits":
        kw["logits"] = (torch.randn(R, L, V, generator=gen, dtype=torch.float64) * 3).to(dtype).requires_grad_()
    else:
        kw["hidden"] = torch.randn(R, L, H, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
        kw["lm_head_weight"] = torch.randn(V, H, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
        if case["source"] == "hidden+bias":
            kw["lm_head_bias"] = torch.randn(V, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    return ids, masked, importance, kw


@pytest.mark.parametrize("backend", BACKENDS)
@given(case=mdl_cases())
def test_masked_diffusion_loss_matches_reference(backend, case):
    gen = torch.Generator().manual_seed(case["data_seed"])
    with dk.use_backend(backend):
        ids, masked, importance, kw = _mdl_inputs(case, gen)
    opts = dict(importance=importance, normalizer=case["normalizer"], num_tokens=case["num_tokens"],
                row_clamp=case["row_clamp"])
    leaves = list(kw.values())
    expected = ref_ce.masked_diffusion_loss(masked, ids, **opts, **kw)
    if case["row_clamp"] is not None and case["B"]:
        # Keep clear of the clamp's discontinuity: rounding may decide a sequence sitting right at it.
        with torch.no_grad():
            free = ref_ce.masked_diffusion_loss(masked, ids, **dict(opts, row_clamp=None), **kw)
        assume(abs(float(free) - case["row_clamp"]) > 1e-3 or case["B"] > 1)
    with dk.use_backend(backend):
        loss = mdm.masked_diffusion_loss(masked, ids, chunk_size=case["chunk"], **opts, **kw)
    u = UNIT[acc_dtype(case["dtype"])]
    assert loss.dtype == acc_dtype(case["dtype"])
    if not case["B"] or not case["L"]:
        assert float(loss.detach()) == 0.0  # documented: an empty batch gives 0
        return
    # Tokens' coefficients sum to O(1) for "row"/"batch"; |CE| <= ~|logits| + log V.
    coef_sum = float((masked.weights.double().sum()) * (2 if importance is not None else 1))
    scale = coef_sum / (case["num_tokens"] if case["normalizer"] == "global" else 1.0) + 1.0
    tol = 64 * u * scale * (30 + case["H"] * 10)
    assert abs(float(loss.detach()) - float(expected.detach())) <= tol, (loss, expected)
    if not expected.requires_grad or not loss.requires_grad:
        return
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    exp_grads = torch.autograd.grad(expected, leaves, allow_unused=True)
    for name, g, e in zip(kw, grads, exp_grads):
        e = torch.zeros_like(leaves[0]) if e is None else e
        g = torch.zeros_like(e) if g is None else g
        assert g.shape == e.shape
        assert float((g.double() - e.double()).abs().max()) <= tol, name


def test_bug_masked_diffusion_loss_empty_batch_row_clamp():
    ids = torch.zeros(0, 5, dtype=torch.long)
    masked = mdm.mask_tokens(ids, 0.5, 0, mask_id=9)
    loss = mdm.masked_diffusion_loss(masked, ids, logits=torch.zeros(0, 5, 10), row_clamp=1.0)
    assert float(loss) == 0.0  # documented: an empty batch gives 0


# --- t-samplers ---------------------------------------------------------------------------------------


@st.composite
def samplers(draw, kinds=("uniform", "stratified", "lowdisc", "clipped", "ppots")):
    kind = draw(st.sampled_from(kinds))
    if kind == "uniform":
        return mdm.Uniform()
    if kind == "stratified":
        return mdm.Stratified(draw(st.one_of(st.none(), st.integers(1, 6))), reweight=draw(st.booleans()))
    if kind == "lowdisc":
        return mdm.LowDiscrepancy()
    if kind == "clipped":
        a = draw(st.floats(0.0, 0.9))
        return mdm.Clipped(a, draw(st.floats(a + 1e-3, 1.0)))
    K = draw(st.integers(2, 8))
    inner = sorted(set(draw(st.lists(st.floats(1e-3, 1 - 1e-3), min_size=K - 2, max_size=K - 2))))
    knots = [0.0] + inner + [1.0]
    values = draw(st.lists(st.one_of(st.floats(1e-3, 1e3), st.just(0.0)), min_size=len(knots), max_size=len(knots)))
    mix = draw(st.sampled_from([0.0, 0.05, 1.0]))
    assume(sum(values) > 0)
    if mix == 0.0:
        assume(min(values) > 0)
    stratify = draw(st.booleans())
    k = draw(st.one_of(st.none(), st.integers(1, 4))) if stratify else None
    return mdm.PPOTSSampler(knots, values, mix=mix, stratify=stratify, k=k)


@given(sampler=samplers(), n=st.integers(1, 6), world=st.integers(1, 3), micro=st.integers(1, 3), seed=SEEDS,
       dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]))
def test_sampler_slices_and_range(sampler, n, world, micro, seed, dtype):
    """Every rank/micro-batch slice is a slice of the one global draw; t in [0, 1), weights finite > 0."""
    G = n * world * micro
    k = getattr(sampler, "k", None)
    if k is not None and k > G:
        with pytest.raises(ValueError, match="k"):
            sampler.sample_global(G, seed)
        return
    t, w = sampler.sample_global(G, seed, dtype=dtype)
    assert t.dtype == dtype and w.dtype == dtype and t.shape == (G,) and w.shape == (G,)
    assert bool(((t >= 0) & (t < 1)).all()), t
    assert bool((torch.isfinite(w) & (w > 0)).all()), w
    parts = [sampler.sample(n, seed, rank=r, world_size=world, micro_batch=m, num_micro_batches=micro, dtype=dtype)
             for r in range(world) for m in range(micro)]
    assert torch.equal(torch.cat([p[0] for p in parts]), t)
    assert torch.equal(torch.cat([p[1] for p in parts]), w)
    # The same seed mod 2**64 (Python or numpy integer) draws the same batch.
    t2, w2 = sampler.sample_global(G, np.uint64(int(seed) % 2**64), dtype=dtype)
    assert torch.equal(t, t2) and torch.equal(w, w2)
    if isinstance(sampler, mdm.Clipped):
        t64, _ = sampler.sample_global(G, seed, dtype=torch.float64)
        assert bool(((t64 >= sampler.t_min) & (t64 <= sampler.t_max)).all())


@given(k=st.one_of(st.none(), st.integers(1, 12)), G=st.integers(1, 40), seed=SEEDS, reweight=st.booleans())
def test_stratified_counts_and_weights(k, G, seed, reweight):
    """Each of the k strata gets G // k or G // k + 1 draws; with reweight each stratum's weights sum
    to G / k exactly (the weighted mean is the stratified estimator), else all weights are 1."""
    sampler = mdm.Stratified(k, reweight=reweight)
    kk = sampler.num_strata(G)
    if kk > G:
        with pytest.raises(ValueError, match="k"):
            sampler.sample_global(G, seed)
        return
    t, w = sampler.sample_global(G, seed, dtype=torch.float64)
    stratum = torch.clamp((t * kk).floor().long(), max=kk - 1)
    counts = torch.bincount(stratum, minlength=kk)
    assert int(counts.min()) >= G // kk and int(counts.max()) <= G // kk + 1
    if reweight:
        mass = torch.zeros(kk, dtype=torch.float64).index_add_(0, stratum, w)
        assert torch.allclose(mass, torch.full((kk,), G / kk, dtype=torch.float64), rtol=1e-12)
    else:
        assert bool((w == 1).all())


@given(sampler=samplers(kinds=("ppots",)), seed=SEEDS, G=st.integers(1, 30),
       u=st.lists(st.floats(0.0, 1.0, exclude_max=True), min_size=1, max_size=20))
def test_ppots_density_is_consistent(sampler, seed, G, u):
    """icdf inverts cdf, the density integrates to 1 and is >= mix, and each weight is the stratum
    weight over the density at the sampled t."""
    u = torch.tensor(u, dtype=torch.float64)
    t = sampler.icdf(u)
    assert bool(((t >= 0) & (t <= 1)).all())
    assert torch.allclose(sampler.cdf(t), u, rtol=0, atol=1e-9)
    grid = torch.linspace(0, 1, 20001, dtype=torch.float64)
    pdf = sampler.pdf(grid)
    assert abs(float(torch.trapezoid(pdf, grid)) - 1.0) < 1e-3
    assert float(pdf.min()) >= sampler.mix * (1 - 1e-9)
    if sampler.k is not None and sampler.k > G:
        return
    t, w = sampler.sample_global(G, seed, dtype=torch.float64)
    base = w * sampler.pdf(t)  # the stratum weight
    if not sampler.stratify:
        assert torch.allclose(base, torch.ones_like(base), rtol=1e-12)
    else:  # each stratum of the uniforms u = cdf(t) carries a total weight of G / k
        k = sampler.k if sampler.k is not None else max(1, math.isqrt(G))
        stratum = (sampler.cdf(t) * k).floor().long().clamp(0, k - 1)
        mass = torch.zeros(k, dtype=torch.float64).index_add_(0, stratum, base)
        assert torch.allclose(mass, torch.full((k,), G / k, dtype=torch.float64), rtol=1e-9)


BAD_SAMPLE_CALLS = {
    "n zero": (dict(n=0), ValueError, "n"),
    "n float": (dict(n=2.0), TypeError, "n"),
    "n bool": (dict(n=True), TypeError, "n"),
    "rank too big": (dict(rank=2, world_size=2), ValueError, "rank"),
    "rank negative": (dict(rank=-1), ValueError, "rank"),
    "world zero": (dict(world_size=0), ValueError, "world_size"),
    "micro too big": (dict(micro_batch=1), ValueError, "micro_batch"),
    "dtype int": (dict(dtype=torch.int64), TypeError, "dtype"),
    "seed float": (dict(seed=1.0), TypeError, "seed"),
    "seed None": (dict(seed=None), TypeError, "seed"),
}


@given(sampler=samplers(), bad=st.sampled_from(sorted(BAD_SAMPLE_CALLS)))
def test_sampler_bad_input_raises(sampler, bad):
    change, error, name = BAD_SAMPLE_CALLS[bad]
    kw = dict(n=3, seed=5)
    kw.update(change)
    with pytest.raises(error, match=name):
        sampler.sample(kw.pop("n"), kw.pop("seed"), **kw)


@given(args=st.sampled_from([
    (mdm.Stratified, dict(k=0), ValueError, "k"), (mdm.Stratified, dict(k=2.0), TypeError, "k"),
    (mdm.Stratified, dict(reweight=1), TypeError, "reweight"),
    (mdm.Clipped, dict(t_min=0.5, t_max=0.5), ValueError, "t_min"),
    (mdm.Clipped, dict(t_min=-0.1, t_max=0.5), ValueError, "t_min"),
    (mdm.Clipped, dict(t_min=0.1, t_max=math.nan), ValueError, "t_max"),
    (mdm.PPOTSSampler, dict(knots=[0.0, 1.0], values=[1.0, -1.0]), ValueError, "values"),
    (mdm.PPOTSSampler, dict(knots=[0.0, 0.5], values=[1.0, 1.0]), ValueError, "knots"),
    (mdm.PPOTSSampler, dict(knots=[0.0, 1.0], values=[0.0, 0.0]), ValueError, "values"),
    (mdm.PPOTSSampler, dict(knots=[0.0, 1.0], values=[0.0, 1.0]), ValueError, "mix"),
    (mdm.PPOTSSampler, dict(knots=[0.0, 1.0], values=[1.0, math.nan]), ValueError, "values"),
    (mdm.PPOTSSampler, dict(knots=[0.0, 1.0], values=[1.0, 1.0], mix=1.5), ValueError, "mix"),
    (mdm.PPOTSSampler, dict(knots=[0.0, 1.0], values=[1.0, 1.0], k=2), ValueError, "k"),
]))
def test_sampler_bad_construction_raises(args):
    cls, kw, error, name = args
    with pytest.raises(error, match=name):
        cls(**kw)


# --- variance decomposition ----------------------------------------------------------------------------


def components_oracle(y: np.ndarray):
    """A, B, C and delete-one jackknife standard errors by brute force (an explicit loop), float64."""
    if y.ndim == 3:
        y = y[..., None]

    def estimate(y):
        n_x, n_t, n_m = y.shape[:3]
        cell = y.mean(axis=2)
        s_a = np.mean(((y - cell[:, :, None]) ** 2).sum(axis=(2, 3)) / (n_m - 1))
        ex = cell.mean(axis=1)
        s_b = np.mean(((cell - ex[:, None]) ** 2).sum(axis=(1, 2)) / (n_t - 1))
        s_c = ((ex - ex.mean(axis=0)) ** 2).sum() / (n_x - 1)
        A, B, C = s_a, s_b - s_a / n_m, s_c - s_b / n_t
        return np.array([A, B, C, A + B + C])

    full = estimate(y)
    n = y.shape[0]
    loo = np.stack([estimate(np.delete(y, i, axis=0)) for i in range(n)])
    se = np.sqrt((n - 1) / n * ((loo - loo.mean(axis=0)) ** 2).sum(axis=0))
    return full, se


@given(n_x=st.integers(3, 6), n_t=st.integers(2, 4), n_m=st.integers(2, 4), D=st.sampled_from([None, 1, 3]),
       scales=st.tuples(*[st.sampled_from([0.0, 1e-8, 1.0, 1e8]) for _ in range(3)]),
       offset=st.sampled_from([0.0, 1e6, -1e12]), dtype=st.sampled_from([torch.float64, torch.float32]),
       data_seed=st.integers(0, 2**31))
def test_nested_variance_components_matches_brute_force(n_x, n_t, n_m, D, scales, offset, dtype, data_seed):
    gen = torch.Generator().manual_seed(data_seed)
    shape = (n_x, n_t, n_m) + (() if D is None else (D,))
    sx, st_, sm = scales
    extra = (1,) * (len(shape) - 3)
    y = (offset + sx * torch.randn(n_x, 1, 1, *extra, generator=gen, dtype=torch.float64)
         + st_ * torch.randn(n_x, n_t, 1, *extra, generator=gen, dtype=torch.float64)
         + sm * torch.randn(shape, generator=gen, dtype=torch.float64)).expand(shape).to(dtype)
    est = mdm.nested_variance_components(y)
    full, se = components_oracle(y.double().numpy())
    values = np.array([est.A, est.B, est.C, est.total])
    ses = np.array([est.A_se, est.B_se, est.C_se, est.total_se])
    # Deviations from means of values of magnitude ``mag`` carry float64 rounding errors ~ n ulp(mag);
    # squared, they move every term by ~2 |deviation| eps + eps^2.
    eps = 16 * max(n_x, n_t, n_m) * 2.0**-52 * float(y.double().abs().max())
    vscale = max(float(np.abs(full).max()), eps**2)
    tol = 8 * (2 * math.sqrt(vscale) * eps + eps**2) + 1e-12 * vscale
    assert np.all(np.abs(values - full) <= tol), (values, full, tol)
    assert np.all(np.abs(ses - se) <= 4 * math.sqrt(n_x) * tol), (ses, se, tol)
    assert (est.n_x, est.n_t, est.n_m) == (n_x, n_t, n_m)


@given(bad=st.sampled_from(["nan", "inf", "int", "small n_x", "small n_t", "small n_m", "2-d", "5-d", "list"]))
def test_nested_variance_components_bad_input(bad):
    y = torch.randn(4, 3, 2, dtype=torch.float64)
    error, name = ValueError, "samples"
    if bad in ("nan", "inf"):
        y[1, 2, 0] = math.nan if bad == "nan" else math.inf
        name = "finite"
    elif bad == "int":
        y, error = y.long(), TypeError
    elif bad == "small n_x":
        y, name = y[:2], "n_x"
    elif bad == "small n_t":
        y, name = y[:, :1], "n_t"
    elif bad == "small n_m":
        y, name = y[:, :, :1], "n_m"
    elif bad == "2-d":
        y = y[:, :, 0]
    elif bad == "5-d":
        y = y[..., None, None]
    else:
        y, error = y.tolist(), TypeError
    with pytest.raises(error, match=name):
        mdm.nested_variance_components(y)


@examples(0.5)
@given(n_x=st.integers(3, 4), n_t=st.integers(2, 3), n_m=st.integers(2, 3), seed=SEEDS,
       sampler=st.sampled_from(["uniform", "clipped"]), N=st.integers(1, 5))
def test_variance_decomposition_driver(n_x, n_t, n_m, seed, sampler, N):
    """A loss that does not depend on the mask has A = 0 exactly; the reported values are the loss times
    the sampler weight at the reported (example, t), and the components are those of the raw sample."""
    data = torch.arange(N, dtype=torch.float64) * 0.5
    t_sampler = mdm.Uniform() if sampler == "uniform" else mdm.Clipped(0.2, 0.6)

    def loss_fn(x, t, mask_seed, mask_mode):
        assert isinstance(mask_seed, int) and 0 <= mask_seed < 2**64 and mask_mode == "standard"
        return float(x) + 3.0 * t

    est = mdm.variance_decomposition(loss_fn, data, t_sampler=t_sampler, n_x=n_x, n_t=n_t, n_m=n_m, seed=seed,
                                     progress=False)
    assert est.A == 0.0 and est.A_se == 0.0
    expected = (data[est.indices][:, None] + 3.0 * est.t) * est.weight
    assert torch.equal(est.values, expected[:, :, None].expand(n_x, n_t, n_m))
    again = mdm.nested_variance_components(est.values)
    assert (again.A, again.B, again.C, again.C_se) == (est.A, est.B, est.C, est.C_se)
    if sampler == "clipped":
        assert bool(((est.t >= 0.2) & (est.t <= 0.6)).all())
    repeat = mdm.variance_decomposition(loss_fn, data, t_sampler=t_sampler, n_x=n_x, n_t=n_t, n_m=n_m,
                                        seed=np.uint64(int(seed) % 2**64), progress=False)
    assert torch.equal(repeat.values, est.values)


@examples(0.5)
@given(n_x=st.integers(3, 4), n_t=st.integers(2, 3), n_m=st.integers(2, 3), P=st.integers(1, 4), seed=SEEDS,
       projections=st.sampled_from([None, 1, 3]), data_seed=st.integers(0, 2**31))
def test_variance_decomposition_gradients(n_x, n_t, n_m, P, seed, projections, data_seed):
    """grad=True: for l = t * <params, x> the gradient t x does not depend on the mask, so its A is 0
    (also projected: the sketch is linear), and the components are those of the gradients themselves."""
    gen = torch.Generator().manual_seed(data_seed)
    data = torch.randn(5, P, generator=gen, dtype=torch.float64)
    params = torch.randn(P, generator=gen, dtype=torch.float64, requires_grad=True)

    def loss_fn(x, t, mask_seed, mask_mode):
        return t * (params * x).sum()

    est = mdm.variance_decomposition(loss_fn, data, n_x=n_x, n_t=n_t, n_m=n_m, seed=seed, grad=True, params=[params],
                                     num_projections=projections, progress=False)
    assert est.grad is not None and est.projected == (projections is not None)
    assert est.grad_dim == (P if projections is None else projections)
    assert abs(est.grad.A) <= 1e-12 * (abs(est.grad.B) + abs(est.grad.C) + 1e-300)
    if projections is None:
        grads = (data[est.indices][:, None, None, :] * est.t[:, :, None, None]).expand(n_x, n_t, n_m, P)
        again = mdm.nested_variance_components(grads)
        for name in ("A", "B", "C", "total", "C_se"):
            assert getattr(est.grad, name) == pytest.approx(getattr(again, name), rel=1e-9, abs=1e-15), name
