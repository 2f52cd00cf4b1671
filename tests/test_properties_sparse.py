"""Property-based tests (hypothesis) of sparse supervision: sparse_mse_loss, SparseMSELoss,
sparse_mask, diffkernels.rng.uniform and fold_seed.

Random shapes (with 0- and 1-sized dims), dtypes, non-contiguous views, seeds at the edges of their
range (numpy integers too), extreme values and NaN/Inf placement, on the C++ and reference backends
(Triton in the interpreter on tiny shapes). Every example is checked against an independent float64
oracle written here (its own Philox in numpy; masks bit-exact), or must raise a clear error.

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
from diffkernels import reference as ref
from diffkernels.rng import uniform

BACKENDS = ["cpp", "torch"]


def examples(fraction: float):
    """A share of the profile's examples (for the slow Triton interpreter and the oracles' heavy cases)."""
    return settings(max_examples=max(2, int(settings.default.max_examples * fraction)))


# --- an independent oracle: Philox4x32-10 in numpy uint64 arithmetic --------------------------------

MASK32 = 0xFFFFFFFF
SCALE = np.float32(4.6566127342e-10)


def philox_np(counter, key):
    """Textbook Philox4x32-10: counter (4 arrays of uint32 values), key (2 ints). uint32*uint32 < 2**64 is exact."""
    c0, c1, c2, c3 = (np.asarray(c, dtype=np.uint64) & np.uint64(MASK32) for c in counter)
    k0, k1 = np.uint64(key[0] & MASK32), np.uint64(key[1] & MASK32)
    for _ in range(10):
        p0 = c0 * np.uint64(0xD2511F53)
        p1 = c2 * np.uint64(0xCD9E8D57)
        c0, c1, c2, c3 = ((p1 >> np.uint64(32)) ^ c1 ^ k0, p1 & np.uint64(MASK32),
                          (p0 >> np.uint64(32)) ^ c3 ^ k1, p0 & np.uint64(MASK32))
        k0 = (k0 + np.uint64(0x9E3779B9)) & np.uint64(MASK32)
        k1 = (k1 + np.uint64(0xBB67AE85)) & np.uint64(MASK32)
    return c0, c1, c2, c3


def uniform_oracle(seed: int, index: np.ndarray) -> np.ndarray:
    """U(seed, i): word i % 4 of Philox((c lo, c hi, 0, 0), (seed lo, seed hi)), c = i // 4, folded to
    [0, 2**31) as x if x >= 0 else ~x (x read as int32), times SCALE in float32."""
    s = int(seed) % (1 << 64)
    index = np.asarray(index, dtype=np.uint64)
    c = index >> np.uint64(2)
    words = philox_np((c & np.uint64(MASK32), c >> np.uint64(32), np.zeros_like(c), np.zeros_like(c)),
                      (s & MASK32, s >> 32))
    w = np.choose((index & np.uint64(3)).astype(np.int64), words).astype(np.int64)
    signed = np.where(w >= 1 << 31, w - (1 << 32), w)
    folded = np.where(signed < 0, -signed - 1, signed)
    return folded.astype(np.float32) * SCALE


def mask_oracle(shape, mask_ratio: float, seed: int, granularity: str) -> np.ndarray:
    """keep[b, c, r] = U(seed, b * R + r) >= float32(mask_ratio); C = shape[1] for pixels, else 1."""
    B = shape[0]
    n = math.prod(shape[1:])
    C = shape[1] if granularity == "pixel" else 1
    R = n // C if C else 0
    u = uniform_oracle(seed, np.arange(B * R)).reshape(B, 1, R)
    return np.broadcast_to(u >= np.float32(mask_ratio), (B, C, R)).reshape(shape)


def loss_oracle(pred, target, weight, mask_ratio, seed, granularity, normalize, reduction, upstream):
    """(loss, |loss| bound for the tolerance, grad pred, grad weight) in float64 from the definitions.

    Gradients are written out (not autograd) so masked-out NaNs give exactly 0, as documented.
    """
    B = pred.shape[0]
    n = math.prod(pred.shape[1:])
    keep = torch.from_numpy(mask_oracle(tuple(pred.shape), mask_ratio, seed, granularity).copy()).reshape(B, n)
    d = pred.detach().double().reshape(B, n) - target.detach().double().reshape(B, n)
    sq = torch.where(keep, d * d, 0.0).sum(dim=1)
    if normalize == "expected":
        Z = torch.full((B,), n * (1.0 - mask_ratio), dtype=torch.float64)
    elif normalize == "all":
        Z = torch.full((B,), float(n), dtype=torch.float64)
    else:
        Z = keep.sum(dim=1).clamp(min=1).double()
    w = torch.ones(B, dtype=torch.float64) if weight is None else weight.detach().double()
    per = sq / Z * w
    per_abs = sq / Z * w.abs()
    if reduction == "none":
        loss, bound, g = per, per_abs, upstream.double()
    elif reduction == "sum":
        loss, bound, g = per.sum(), per_abs.sum(), upstream.double().expand(B)
    else:
        loss, bound, g = per.mean(), per_abs.mean(), upstream.double().expand(B) / B
    grad_pred = torch.where(keep, 2.0 * d, 0.0) * (g * w / Z)[:, None]
    grad_weight = g * sq / Z
    return loss, bound, grad_pred.reshape(pred.shape), grad_weight


# --- tolerances --------------------------------------------------------------------------------------

UNIT = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def assert_close(actual, expected, rel, atol, what, scale=None):
    """|actual - expected| <= rel * scale + atol elementwise (scale defaults to |expected|); where the
    expected value is not finite in actual's dtype the actual one must be the same (NaN where NaN, inf
    of that sign: a float64 value beyond the dtype's range overflows when stored)."""
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    stored = e.to(actual.dtype).double()
    e = torch.where(torch.isfinite(stored), e, stored)
    assert a.shape == e.shape, (what, a.shape, e.shape)
    scale = e.abs() if scale is None else scale.double()
    same = (a == e) | (a.isnan() & e.isnan())
    near = torch.isfinite(e) & ((a - e).abs() <= rel * scale + atol)
    bad = ~(same | near)
    assert not bool(bad.any()), f"{what}: actual {a[bad][:4].tolist()} expected {e[bad][:4].tolist()}"


# --- strategies --------------------------------------------------------------------------------------

EDGE_SEEDS = [0, 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1, -1, -(2**63), -(2**64), 2**64,
              2**70 + 5]
SEEDS = st.one_of(
    st.sampled_from(EDGE_SEEDS),
    st.integers(-(2**65), 2**65),
    st.integers(-(2**63), 2**63 - 1).map(np.int64),
    st.integers(0, 2**64 - 1).map(np.uint64),
    st.integers(-(2**31), 2**31 - 1).map(np.int32),
    st.integers(0, 255).map(np.uint8),
)
RATIOS = st.one_of(st.sampled_from([0.0, 0.5, 0.9, 0.98, math.nextafter(1.0, 0.0), 1.0 - 2**-25]),
                   st.floats(0.0, 1.0, exclude_max=True))
DTYPES = st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16])
LAYOUTS = st.sampled_from(["contiguous", "transposed", "strided"])
# Magnitudes whose squares the accumulation dtype holds (float32 for half/bfloat16/float32).
MAGNITUDE = {torch.float64: [1e-140, 1e-8, 1.0, 1e8, 1e140], torch.float32: [1e-30, 1e-8, 1.0, 1e8, 1e15],
             torch.bfloat16: [1e-30, 1e-8, 1.0, 1e8, 1e15], torch.float16: [1e-3, 1.0, 1e2, 1e4]}


@st.composite
def shapes(draw, min_batch=1, min_rest=1, max_numel=96):
    B = draw(st.integers(min_batch, 5))
    rest = draw(st.lists(st.integers(min_rest, 6), min_size=0, max_size=3))
    assume(B * math.prod(rest) <= max_numel)
    return (B, *rest)


def make_tensor(shape, dtype, layout, gen, scale=1.0):
    """Random normal values times ``scale`` in ``dtype``, laid out as requested (same logical shape)."""
    def fill(s):
        return (torch.randn(s, generator=gen, dtype=torch.float64) * scale).to(dtype)

    if layout == "transposed" and len(shape) >= 2:
        return fill((*shape[:-2], shape[-1], shape[-2])).transpose(-1, -2)
    if layout == "strided":
        return fill((2 * shape[0], *shape[1:]))[::2]
    return fill(shape)


# --- the RNG and fold_seed ---------------------------------------------------------------------------


def test_oracle_philox_known_answers():
    """The oracle is the textbook Philox4x32-10 (Random123's known-answer vectors), like the library's."""
    vectors = [((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
               ((MASK32,) * 4, (MASK32, MASK32), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
               ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
                (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]
    for counter, key, expected in vectors:
        assert tuple(int(w) for w in philox_np(counter, key)) == expected
        assert dk.rng.philox4x32(counter, key) == expected


@given(seed=SEEDS, index=st.lists(st.one_of(st.integers(0, 2**63 - 1), st.integers(0, 64)), min_size=0, max_size=40),
       dtype=st.sampled_from([torch.int64, torch.int32]), strided=st.booleans())
def test_uniform_bit_exact(seed, index, dtype, strided):
    if dtype == torch.int32:
        index = [i % 2**31 for i in index]
    idx = torch.tensor(index, dtype=torch.int64).to(dtype)
    if strided:  # a non-contiguous view of the same indices
        idx = torch.stack([idx, torch.zeros_like(idx)], dim=1)[:, 0]
    u = uniform(seed, idx)
    assert u.dtype == torch.float32 and u.shape == idx.shape
    expected = uniform_oracle(seed, np.asarray(index, dtype=np.int64))
    assert np.array_equal(u.numpy(), expected)
    assert bool(((u >= 0) & (u < 1)).all())


@given(seed=SEEDS, bad=st.sampled_from(["negative", "float", "bool"]))
def test_uniform_bad_index(seed, bad):
    if bad == "negative":
        with pytest.raises(ValueError, match="non-negative"):
            uniform(seed, torch.tensor([3, -1]))
    else:
        with pytest.raises(TypeError, match="index"):
            uniform(seed, torch.tensor([1.0]) if bad == "float" else torch.tensor([True]))


def fold_oracle(seed: int, *values: int) -> int:
    s = int(seed) % 2**64
    for v in values:
        v = int(v) % 2**64
        w = philox_np((v & MASK32, v >> 32, 0x5EEDF01D, 1), (s & MASK32, s >> 32))
        s = int(w[0]) | (int(w[1]) << 32)
    return s


@given(seed=SEEDS, values=st.lists(SEEDS, max_size=4))
def test_fold_seed(seed, values):
    out = dk.fold_seed(seed, *values)
    assert type(out) is int and 0 <= out < 2**64
    assert out == fold_oracle(seed, *values)
    # Any representative of the same residues mod 2**64 gives the same seed; folding is sequential.
    assert out == dk.fold_seed(int(seed) % 2**64 - 2**64, *(int(v) % 2**64 for v in values))
    if values:
        assert out == dk.fold_seed(dk.fold_seed(seed, *values[:-1]), values[-1])


@given(bad=st.one_of(st.booleans(), st.floats(allow_nan=True), st.none(), st.text(max_size=3),
                     st.just(torch.tensor(3)), st.just(np.float64(2.0))),
       position=st.sampled_from(["seed", "value"]))
def test_fold_seed_rejects_non_integers(bad, position):
    args = (bad,) if position == "seed" else (5, bad)
    with pytest.raises(TypeError, match="integer"):
        dk.fold_seed(*args)


# --- sparse_mask --------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@given(shape=shapes(min_batch=0, min_rest=0, max_numel=200), ratio=RATIOS, seed=SEEDS,
       granularity=st.sampled_from(["element", "pixel"]))
def test_sparse_mask_bit_exact(backend, shape, ratio, seed, granularity):
    if granularity == "pixel" and len(shape) < 2:
        with pytest.raises(ValueError, match="channel"):
            dk.sparse_mask(shape, ratio, seed, granularity=granularity)
        return
    with dk.use_backend(backend):
        mask = dk.sparse_mask(shape, ratio, seed, granularity=granularity)
    assert mask.dtype == torch.bool and tuple(mask.shape) == shape
    assert np.array_equal(mask.numpy(), mask_oracle(shape, ratio, seed, granularity))
    assert torch.equal(mask, ref.sparse_mask(shape, ratio, seed, granularity))
    if granularity == "pixel" and mask.numel():  # one draw per pixel, shared by the channels
        assert bool((mask == mask[:, :1]).all())


@given(ratio=st.one_of(st.floats(min_value=1.0), st.floats(max_value=-1e-300), st.just(float("nan")),
                       st.just(True), st.just("0.5"), st.none(), st.just(torch.tensor(0.5))),
       seed=SEEDS)
def test_sparse_mask_rejects_bad_ratio(ratio, seed):
    with pytest.raises((TypeError, ValueError), match="mask_ratio"):
        dk.sparse_mask((2, 3), ratio, seed)


@given(shape=st.sampled_from([(), (2, -1), (-3,)]), seed=SEEDS)
def test_sparse_mask_rejects_bad_shape(shape, seed):
    with pytest.raises(ValueError, match="shape"):
        dk.sparse_mask(shape, 0.5, seed)


@examples(0.25)
@given(shape=shapes(min_batch=0, min_rest=0, max_numel=24), ratio=RATIOS, seed=SEEDS,
       granularity=st.sampled_from(["element", "pixel"]))
def test_sparse_mask_triton_bit_exact(shape, ratio, seed, granularity):
    assume(granularity == "element" or len(shape) >= 2)
    with dk.use_backend("triton"):
        mask = dk.sparse_mask(shape, ratio, seed, granularity=granularity)
    assert np.array_equal(mask.numpy(), mask_oracle(shape, ratio, seed, granularity))


# --- sparse_mse_loss against the oracle ---------------------------------------------------------------


@st.composite
def loss_cases(draw, max_numel=96):
    dtype = draw(DTYPES)
    shape = draw(shapes(max_numel=max_numel))
    granularity = draw(st.sampled_from(["element", "pixel"]))
    if len(shape) < 2:
        granularity = "element"
    weight = draw(st.sampled_from([None, "random", "with_zeros", "strided"]))
    return dict(
        dtype=dtype, shape=shape, granularity=granularity, weight=weight,
        weight_dtype=draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16])),
        layout=draw(LAYOUTS), scale=draw(st.sampled_from(MAGNITUDE[dtype])), ratio=draw(RATIOS), seed=draw(SEEDS),
        normalize=draw(st.sampled_from(["expected", "all", "kept"])),
        reduction=draw(st.sampled_from(["mean", "sum", "none"])),
        backward=draw(st.sampled_from(["fused", "recompute"])),
        upstream_one=draw(st.booleans()), data_seed=draw(st.integers(0, 2**31)),
        needs=draw(st.sampled_from(["all", "all", "pred", "target", "weight", "none"])),
    )


def make_weight(case, gen):
    B = case["shape"][0]
    kind, wdtype = case["weight"], case["weight_dtype"]
    if kind is None:
        return None
    w = torch.randn(2 * B, generator=gen, dtype=torch.float64) * 3
    if kind == "with_zeros":
        w[::3] = 0.0
    w = (w[::2] if kind == "strided" else w[:B]).to(wdtype)
    return w.detach().requires_grad_()


def run_and_check(case, pred, target, weight, what="", store_unit=None):
    """sparse_mse_loss and its gradients against the oracle, for an upstream gradient of 1 or random.
    ``store_unit``: the relative error of storing a gradient in the dtype (default: its unit roundoff)."""
    dtype = case["dtype"]
    store_unit = UNIT[dtype] if store_unit is None else store_unit
    opts = dict(granularity=case["granularity"], normalize=case["normalize"], reduction=case["reduction"])
    loss = dk.sparse_mse_loss(pred, target, case["ratio"], case["seed"], weight=weight, backward=case["backward"],
                              **opts)
    assert loss.dtype == torch.promote_types(dtype, torch.float32)
    gen = torch.Generator().manual_seed(case["data_seed"] + 1)
    upstream = torch.ones(loss.shape, dtype=torch.float64) if case["upstream_one"] else \
        torch.rand(loss.shape, generator=gen, dtype=torch.float64) * 2 - 0.5
    upstream = upstream.to(loss.dtype)
    exp_loss, bound, exp_gp, exp_gw = loss_oracle(pred, target, weight, case["ratio"], case["seed"],
                                                   case["granularity"], case["normalize"], case["reduction"],
                                                   upstream)
    n = math.prod(pred.shape[1:])
    acc = acc_dtype(dtype)
    # Loss: each kept term has ~3 roundings of the accumulation dtype (d, d*d, a subnormal square's
    # absolute error below 2**-148 counts per element), the sums are float64, the result is cast once.
    w_max = 1.0 if weight is None else float(weight.detach().double().abs().max())
    z_min = 1.0 if case["normalize"] == "kept" else n * (1.0 - case["ratio"]) if case["normalize"] == "expected" else n
    tiny = n * w_max / z_min * (2.0**-148 if acc == torch.float32 else 2.0**-1070) * pred.shape[0]
    out_tiny = torch.finfo(loss.dtype).smallest_normal * 2.0**-23
    assert_close(loss, exp_loss, 5 * UNIT[acc] + UNIT[loss.dtype], tiny + out_tiny, f"loss{what}", scale=bound)

    named = {"pred": pred, "target": target, "weight": weight}
    named = {k: v for k, v in named.items() if v is not None and v.requires_grad}
    if not named:
        assert not loss.requires_grad
        return loss
    grads = dict(zip(named, torch.autograd.grad(loss, list(named.values()), upstream)))
    sub = torch.finfo(dtype).smallest_normal * UNIT[dtype] * 2  # subnormal spacing of the dtype
    # Gradient: a few roundings in the accumulation dtype, stored in the dtype (twice for fused + upstream != 1).
    rel = 2 * store_unit + 6 * UNIT[acc]
    for name, sign in (("pred", 1.0), ("target", -1.0)):
        if name in grads:
            assert grads[name].dtype == dtype
            assert_close(grads[name], sign * exp_gp, rel, 2 * sub, f"grad {name}{what}")
    if "weight" in grads:
        wd = weight.dtype
        assert grads["weight"].dtype == wd
        w_sub = torch.finfo(wd).smallest_normal * UNIT[wd] * 2
        # An underflowing square (|d| < 2**-75 in float32) is off by < 2**-149 in the row sum.
        g_tiny = n * 2.0**-148 / z_min * float(upstream.double().abs().max()) if acc == torch.float32 else 0.0
        assert_close(grads["weight"], exp_gw, UNIT[wd] + 6 * UNIT[acc], w_sub + g_tiny, f"grad weight{what}")
    return loss


@pytest.mark.parametrize("backend", BACKENDS)
@given(case=loss_cases())
def test_sparse_mse_matches_oracle(backend, case):
    gen = torch.Generator().manual_seed(case["data_seed"])
    needs = case["needs"]  # which inputs require a gradient (all, one of them, or none)
    pred = make_tensor(case["shape"], case["dtype"], case["layout"], gen, case["scale"])
    target = make_tensor(case["shape"], case["dtype"], case["layout"], gen, case["scale"])
    weight = make_weight(case, gen)
    pred.requires_grad_(needs in ("all", "pred"))
    target.requires_grad_(needs in ("all", "target"))
    if weight is not None:
        weight.requires_grad_(needs in ("all", "weight"))
    with dk.use_backend(backend):
        run_and_check(case, pred, target, weight)


@examples(0.25)
@given(case=loss_cases(max_numel=24))
def test_sparse_mse_triton_matches_oracle(case):
    gen = torch.Generator().manual_seed(case["data_seed"])
    pred = make_tensor(case["shape"], case["dtype"], case["layout"], gen, case["scale"]).requires_grad_()
    target = make_tensor(case["shape"], case["dtype"], case["layout"], gen, case["scale"]).requires_grad_()
    # The Triton interpreter converts float32 to bfloat16 by truncation (round toward zero, up to 1 ulp)
    # where GPUs round to nearest.
    store_unit = 2 * UNIT[torch.bfloat16] if case["dtype"] == torch.bfloat16 else None
    with dk.use_backend("triton"):
        run_and_check(case, pred, target, make_weight(case, gen), store_unit=store_unit)


@pytest.mark.parametrize("backend", BACKENDS)
@given(case=loss_cases(max_numel=48))
def test_sparse_mse_layout_invariant(backend, case):
    """A non-contiguous view gives bit for bit the loss and gradients of its contiguous copy."""
    assume(case["layout"] != "contiguous")
    gen = torch.Generator().manual_seed(case["data_seed"])
    pred = make_tensor(case["shape"], case["dtype"], case["layout"], gen, case["scale"])
    target = make_tensor(case["shape"], case["dtype"], case["layout"], gen, case["scale"])
    opts = dict(granularity=case["granularity"], normalize=case["normalize"], reduction=case["reduction"],
                backward=case["backward"])
    results = []
    with dk.use_backend(backend):
        for p, t in ((pred, target), (pred.contiguous(), target.contiguous())):
            p = p.detach().requires_grad_()
            loss = dk.sparse_mse_loss(p, t, case["ratio"], case["seed"], **opts)
            loss.sum().backward()
            results.append((loss.detach(), p.grad))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])


@pytest.mark.parametrize("backend", BACKENDS)
@given(case=loss_cases(max_numel=48), seed_alias=st.sampled_from(["mod", "numpy"]))
def test_sparse_mse_seed_aliases(backend, case, seed_alias):
    """Seeds are taken mod 2**64: s, s +- 2**64 and numpy integers of the same value are one seed."""
    seed = int(case["seed"])
    alias = seed % 2**64 - 2**64 if seed_alias == "mod" else np.uint64(seed % 2**64)
    gen = torch.Generator().manual_seed(case["data_seed"])
    pred = make_tensor(case["shape"], case["dtype"], "contiguous", gen)
    target = make_tensor(case["shape"], case["dtype"], "contiguous", gen)
    with dk.use_backend(backend):
        a = dk.sparse_mse_loss(pred, target, case["ratio"], seed, reduction="none")
        b = dk.sparse_mse_loss(pred, target, case["ratio"], alias, reduction="none")
        assert torch.equal(dk.sparse_mask(case["shape"], 0.5, seed), dk.sparse_mask(case["shape"], 0.5, alias))
    assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
@given(case=loss_cases(max_numel=48))
def test_sparse_mse_module_equals_function(backend, case):
    gen = torch.Generator().manual_seed(case["data_seed"])
    pred = make_tensor(case["shape"], case["dtype"], case["layout"], gen)
    target = make_tensor(case["shape"], case["dtype"], case["layout"], gen)
    weight = make_weight(case, gen)
    opts = dict(granularity=case["granularity"], normalize=case["normalize"], reduction=case["reduction"],
                backward=case["backward"])
    with dk.use_backend(backend):
        crit = dk.SparseMSELoss(case["ratio"], **opts)
        a = crit(pred, target, case["seed"], weight)
        b = dk.sparse_mse_loss(pred, target, case["ratio"], case["seed"], weight=weight, **opts)
    assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
@given(case=loss_cases(max_numel=48),
       poison=st.lists(st.tuples(st.integers(0, 10**6), st.sampled_from([math.nan, math.inf, -math.inf]),
                                 st.sampled_from(["pred", "target"])), min_size=1, max_size=4))
def test_sparse_mse_nonfinite_placement(backend, case, poison):
    """NaN/Inf in kept elements make that sample's loss NaN/inf; in masked-out ones they change nothing
    (loss and gradient as if the element were 0), on every reduction and normalisation."""
    case = dict(case, reduction="none", weight="random" if case["weight"] is not None else None,
                weight_dtype=torch.float64)
    gen = torch.Generator().manual_seed(case["data_seed"])
    pred = make_tensor(case["shape"], case["dtype"], "contiguous", gen)
    target = make_tensor(case["shape"], case["dtype"], "contiguous", gen)
    for pos, value, where in poison:
        (pred if where == "pred" else target).view(-1)[pos % pred.numel()] = value
    weight = make_weight(case, gen)
    if weight is not None:
        weight = weight.detach().abs().add_(0.5).requires_grad_()  # positive: inf stays inf
    with dk.use_backend(backend):
        loss = run_and_check(case, pred.requires_grad_(), target.requires_grad_(), weight)
    keep = torch.from_numpy(mask_oracle(case["shape"], case["ratio"], case["seed"], case["granularity"]).copy())
    B = case["shape"][0]
    bad_kept = (keep & ~torch.isfinite(pred.detach() - target.detach())).reshape(B, -1).any(dim=1)
    assert bool(torch.isfinite(loss[~bad_kept]).all())
    assert not bool(torch.isfinite(loss[bad_kept]).any())


@pytest.mark.parametrize("backend", BACKENDS)
@given(rest=st.lists(st.integers(1, 4), max_size=2), reduction=st.sampled_from(["mean", "sum", "none"]),
       dtype=DTYPES, requires_grad=st.booleans(), seed=SEEDS)
def test_sparse_mse_empty_batch(backend, rest, reduction, dtype, requires_grad, seed):
    """An empty batch: NaN for "mean" (like torch.mean of nothing), 0 for "sum", an empty vector for "none"."""
    pred = torch.zeros((0, *rest), dtype=dtype, requires_grad=requires_grad)
    with dk.use_backend(backend):
        loss = dk.sparse_mse_loss(pred, torch.zeros_like(pred), 0.5, seed, reduction=reduction)
        if requires_grad:
            loss.sum().backward()
            assert pred.grad.shape == pred.shape
    if reduction == "mean":
        assert loss.shape == () and bool(loss.isnan())
    elif reduction == "sum":
        assert loss.shape == () and float(loss.detach()) == 0.0
    else:
        assert loss.shape == (0,)


@pytest.mark.parametrize("backend", BACKENDS)
@given(case=loss_cases(max_numel=48))
def test_sparse_mse_float32_overflow_is_inf(backend, case):
    """Squares beyond float32 (|d| ~ 1e30, float32 accumulation as documented) give +inf losses for
    positive weights, never NaN or a finite wrong value; the gradients stay exact (finite)."""
    case = dict(case, dtype=torch.float32, scale=1e30, weight="random" if case["weight"] else None,
                weight_dtype=torch.float64, reduction="none")
    gen = torch.Generator().manual_seed(case["data_seed"])
    pred = make_tensor(case["shape"], torch.float32, case["layout"], gen, 1e30).requires_grad_()
    target = torch.zeros_like(pred).requires_grad_()
    weight = make_weight(case, gen)
    if weight is not None:
        weight = weight.detach().abs().add_(0.5).requires_grad_()
    with dk.use_backend(backend):
        loss = dk.sparse_mse_loss(pred, target, case["ratio"], case["seed"], weight=weight,
                                  granularity=case["granularity"], normalize=case["normalize"], reduction="none")
        g, = torch.autograd.grad(loss.sum(), pred)
    keep = torch.from_numpy(mask_oracle(case["shape"], case["ratio"], case["seed"], case["granularity"]).copy())
    any_kept = keep.reshape(case["shape"][0], -1).any(dim=1)
    assert bool((loss[any_kept] == math.inf).all()) and bool((loss[~any_kept] == 0).all())
    _, _, exp_gp, _ = loss_oracle(pred, target, weight, case["ratio"], case["seed"], case["granularity"],
                                  case["normalize"], "none", torch.ones(loss.shape, dtype=torch.float64))
    assert_close(g, exp_gp, 2 * UNIT[torch.float32] + 6 * UNIT[torch.float32], 0.0, "grad")


# --- bad input: a clear error naming the argument ---------------------------------------------------


BAD_CALLS = {
    "int pred": (lambda p, t, w: dict(pred=p.long()), TypeError, "pred"),
    "int target": (lambda p, t, w: dict(target=t.int()), TypeError, "target"),
    "shape": (lambda p, t, w: dict(target=t[:, :1]), ValueError, "shape"),
    "dtype": (lambda p, t, w: dict(target=t.double() if p.dtype != torch.float64 else t.float()), TypeError, "dtype"),
    "0-d": (lambda p, t, w: dict(pred=p.sum(), target=t.sum()), ValueError, "batch"),
    "ratio 1": (lambda p, t, w: dict(mask_ratio=1.0), ValueError, "mask_ratio"),
    "ratio nan": (lambda p, t, w: dict(mask_ratio=math.nan), ValueError, "mask_ratio"),
    "ratio bool": (lambda p, t, w: dict(mask_ratio=False), TypeError, "mask_ratio"),
    "seed float": (lambda p, t, w: dict(seed=1.0), TypeError, "seed"),
    "seed bool": (lambda p, t, w: dict(seed=True), TypeError, "seed"),
    "seed None": (lambda p, t, w: dict(seed=None), TypeError, "seed"),
    "weight shape": (lambda p, t, w: dict(weight=w[:, None]), ValueError, "weight"),
    "weight len": (lambda p, t, w: dict(weight=torch.cat([w, w])), ValueError, "weight"),
    "weight int": (lambda p, t, w: dict(weight=w.long()), TypeError, "weight"),
    "granularity": (lambda p, t, w: dict(granularity="channel"), ValueError, "granularity"),
    "normalize": (lambda p, t, w: dict(normalize="none"), ValueError, "normalize"),
    "reduction": (lambda p, t, w: dict(reduction="avg"), ValueError, "reduction"),
    "backward": (lambda p, t, w: dict(backward="twice"), ValueError, "backward"),
    "no elements": (lambda p, t, w: dict(pred=p[:, :0], target=t[:, :0]), ValueError, "elements"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@given(bad=st.sampled_from(sorted(BAD_CALLS)), case=loss_cases(max_numel=24))
def test_sparse_mse_bad_input_raises(backend, bad, case):
    assume(len(case["shape"]) >= 2)
    gen = torch.Generator().manual_seed(case["data_seed"])
    pred = make_tensor(case["shape"], case["dtype"], case["layout"], gen)
    target = make_tensor(case["shape"], case["dtype"], case["layout"], gen)
    weight = torch.rand(case["shape"][0], generator=gen, dtype=torch.float64)
    change, error, name = BAD_CALLS[bad]
    if bad == "shape":
        assume(case["shape"][1] > 1)
    kw = dict(pred=pred, target=target, mask_ratio=case["ratio"], seed=case["seed"], weight=weight)
    kw.update(change(pred, target, weight))
    with dk.use_backend(backend), pytest.raises(error, match=name):
        dk.sparse_mse_loss(kw.pop("pred"), kw.pop("target"), kw.pop("mask_ratio"), kw.pop("seed"), **kw)


@given(ratio=st.one_of(st.floats(1.0), st.floats(max_value=-1e-300), st.just(math.nan), st.just(True)),
       option=st.sampled_from(["granularity", "normalize", "reduction", "backward"]))
def test_sparse_mse_module_bad_options(ratio, option):
    with pytest.raises((TypeError, ValueError), match="mask_ratio"):
        dk.SparseMSELoss(ratio)
    with pytest.raises(ValueError, match=option):
        dk.SparseMSELoss(0.5, **{option: "bogus"})


# --- backward modes ----------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@given(case=loss_cases(max_numel=32))
def test_sparse_mse_second_backward(backend, case):
    """fused: a second backward of the same graph is a clear error; recompute: it accumulates again."""
    gen = torch.Generator().manual_seed(case["data_seed"])
    pred = make_tensor(case["shape"], case["dtype"], case["layout"], gen).requires_grad_()
    target = make_tensor(case["shape"], case["dtype"], case["layout"], gen)
    opts = dict(granularity=case["granularity"], normalize=case["normalize"], reduction=case["reduction"])
    with dk.use_backend(backend):
        loss = dk.sparse_mse_loss(pred, target, case["ratio"], case["seed"], backward=case["backward"], **opts).sum()
        loss.backward(retain_graph=True)
        first = pred.grad.clone()
        if case["backward"] == "fused" and case["dtype"] != torch.float16:  # float16 recomputes
            with pytest.raises(RuntimeError, match="recompute"):
                loss.backward()
        else:
            loss.backward()
            assert torch.equal(pred.grad, first + first)


@pytest.mark.parametrize("backend", BACKENDS)
@given(case=loss_cases(max_numel=32))
def test_sparse_mse_second_order(backend, case):
    """create_graph=True: backward="recompute" gives exact second derivatives (d/dpred <grad_pred, v> =
    2 g w keep v / Z, d/dweight = sum 2 g keep d v / Z); "fused" refuses with a clear error, never a
    silently constant gradient."""
    shape = case["shape"]
    gen = torch.Generator().manual_seed(case["data_seed"])
    pred = make_tensor(shape, torch.float64, case["layout"], gen).requires_grad_()
    target = make_tensor(shape, torch.float64, case["layout"], gen)
    weight = (torch.rand(shape[0], generator=gen, dtype=torch.float64) + 0.5).requires_grad_()
    v = torch.randn(shape, generator=gen, dtype=torch.float64)
    opts = dict(granularity=case["granularity"], normalize=case["normalize"], reduction=case["reduction"])
    with dk.use_backend(backend):
        loss = dk.sparse_mse_loss(pred, target, case["ratio"], case["seed"], weight=weight, backward=case["backward"],
                                  **opts).sum()
        if case["backward"] == "fused":
            with pytest.raises(RuntimeError, match="recompute"):
                torch.autograd.grad(loss, pred, create_graph=True)
            return
        g, = torch.autograd.grad(loss, pred, create_graph=True)
        hv = torch.autograd.grad((g * v).sum(), (pred, weight), allow_unused=True)
    assert hv[0] is not None and hv[1] is not None, "second derivatives silently missing (None = zero)"
    B, n = shape[0], math.prod(shape[1:])
    keep = torch.from_numpy(mask_oracle(shape, case["ratio"], case["seed"], case["granularity"]).copy())
    keep = keep.reshape(B, n).double()  # (a bool tensor times a Python float would be float32)
    Z = {"expected": n * (1.0 - case["ratio"]), "all": float(n)}.get(case["normalize"])
    Z = keep.sum(dim=1).clamp(min=1) if Z is None else torch.full((B,), Z, dtype=torch.float64)
    up = 1.0 / B if case["reduction"] == "mean" else 1.0
    d = (pred - target).detach().reshape(B, n)
    vv = v.reshape(B, n)
    expected_p = (2 * up * weight.detach() / Z)[:, None] * keep * vv
    expected_w = (2 * up * keep * d * vv).sum(dim=1) / Z
    assert_close(hv[0].reshape(B, n), expected_p, 8 * UNIT[torch.float64], 0.0, "d2/dpred2")
    assert_close(hv[1], expected_w, 8 * UNIT[torch.float64], 1e-300, "d2/dpred dweight",
                 scale=(2 * up * keep * (d * vv).abs()).sum(dim=1) / Z)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("example", ["loss scaling", "overflow"])
def test_bug_sparse_mse_fused_float16_rescale(backend, example):
    """float16 with an upstream gradient != 1: "fused" must give the gradient of "recompute" to within
    the documented 1 ulp, also when the gradient for an upstream of 1 would leave float16's range
    (GradScaler's 65536 x tiny per-element gradients; a large gradient scaled down)."""
    if example == "loss scaling":
        gen = torch.Generator().manual_seed(0)
        pred = (torch.randn(8, 3, 64, 64, generator=gen) * 0.01).half()
        ratio, up = 0.9, 65536.0
    else:
        pred, ratio, up = torch.tensor([[40000.0]], dtype=torch.float16), 0.0, 0.25
    grads = []
    with dk.use_backend(backend):
        for backward in ("fused", "recompute"):
            p = pred.clone().requires_grad_()
            (dk.sparse_mse_loss(p, torch.zeros_like(pred), ratio, 1234, backward=backward) * up).backward()
            grads.append(p.grad.double())
    fused, recompute = grads
    assert bool(torch.isfinite(fused).all())
    assert bool(((fused - recompute).abs() <= 2 * UNIT[torch.float16] * 2 * recompute.abs()).all())


def test_bug_reference_sparse_mse_empty_batch():
    pred = torch.zeros(0, 4)
    assert float(ref.sparse_mse_loss(pred, pred, 0.5, 1, reduction="sum")) == 0.0
