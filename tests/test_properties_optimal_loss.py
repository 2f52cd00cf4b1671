"""Property-based tests (hypothesis) of diffkernels.optimal_loss: posterior_mean (both precision
engines), posterior_partial + merge_partials, knn, memorization, the J* estimators (full, snis, dol,
cdol) and the conversions.

Random shapes (0- and 1-sized dims), dtypes of the stored data, non-contiguous views, edge seeds
(numpy integers too), data and noise scales from 1e-30 to 1e30, NaN/Inf placement. Each example is
checked against an independent brute-force float64 oracle written here, against an exact invariance
(power-of-two scaling, seed aliases, estimators that coincide), or must raise a clear error.

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
from diffkernels import optimal_loss as ol

EPS = 2.0**-52
PRECISIONS = ["auto", "float64"]


def examples(fraction: float):
    """A share of the profile's examples (for the heavier estimator runs)."""
    return settings(max_examples=max(2, int(settings.default.max_examples * fraction)))


SEEDS = st.one_of(
    st.sampled_from([0, 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1, -1, 2**64, -(2**64) + 5]),
    st.integers(-(2**65), 2**65),
    st.integers(0, 2**64 - 1).map(np.uint64),
    st.integers(-(2**63), 2**63 - 1).map(np.int64),
)


def transposed(x):
    """x with the same values through a non-contiguous (transposed) view."""
    return x.t().contiguous().t()


# --- the posterior: oracle and tolerances ---------------------------------------------------------------


def posterior_oracle(x, y, sigma, alpha, exclude=None, row_bias=None):
    """(mean, logsumexp, variance, logits) in float64 by direct differences and one softmax (small data);
    ``row_bias`` (N,) is added to every query's logit of that row."""
    x, y = x.double(), y.double()
    d2 = (x[:, None, :] - alpha[:, None, None] * y[None, :, :]).square().sum(dim=2)
    logits = -d2 / (2.0 * sigma[:, None] ** 2)
    if row_bias is not None:
        logits = logits + row_bias[None, :]
    if exclude is not None:
        hit = exclude >= 0
        logits[hit, exclude[hit]] = -math.inf
    lse = torch.logsumexp(logits, dim=1)
    # softmax subtracts the largest logit and divides by the sum: weights summing to 1 within an ulp
    # (exp(logits - lse) is off by ~ulp(|logit|) relative, which moves the mean of near-duplicates).
    w = torch.softmax(logits, dim=1)
    mean = w @ y
    var = (w * (y[None] - mean[:, None]).square().sum(dim=2)).sum(dim=1)
    return mean, lse, var, logits


def posterior_tolerances(x, y, sigma, alpha, logits, lse, mean):
    """Per-query bounds (mean, logsumexp, variance) from float64 rounding: squared distances are
    exact to ~D ulps of their size, so a logit L is off by ~4 D eps |L| (plus eps of the terms it
    cancels); the weights then move by that much relative, and the mean and variance with them."""
    D = x.shape[1]
    y = y.double()
    finite = torch.isfinite(logits)
    heavy = finite & (logits >= lse[:, None] - 60.0)  # the rows that carry the posterior
    L = torch.where(heavy, logits.abs(), 0.0).amax(dim=1) + 1.0
    # the expanded form ||x||^2 + a^2 ||y||^2 - 2 a x.y of the tail rows, in nats
    big = (x.double().square().sum(dim=1) + alpha.square() * y.square().sum(dim=1).max()) / (2 * sigma**2)
    err_logit = 16 * D * EPS * (L + big) + 1e-13
    spread = (y[None] - mean[:, None]).abs().amax(dim=(1, 2)).nan_to_num(0.0)
    scale = y.abs().max()
    tol_mean = 4 * err_logit * spread + 64 * EPS * (scale + spread)
    tol_lse = 2 * err_logit + 8 * EPS * lse.abs().nan_to_num(0.0)
    return tol_mean, tol_lse, err_logit, spread


def check_posterior(mean, lse, var, x, y, sigma, alpha, exclude=None, what="", row_bias=None):
    e_mean, e_lse, e_var, logits = posterior_oracle(x, y, sigma, alpha, exclude, row_bias)
    tol_mean, tol_lse, err_logit, spread = posterior_tolerances(x, y, sigma, alpha, logits, e_lse, e_mean)
    none_left = torch.isinf(e_lse)  # every row excluded: documented NaN mean, -inf logsumexp
    assert bool(torch.isnan(mean[none_left]).all()) and bool((lse[none_left] == -math.inf).all()), what
    ok = ~none_left
    dm = (mean[ok].double() - e_mean[ok]).abs().amax(dim=1)
    assert bool((dm <= tol_mean[ok] + 2.0**-23 * e_mean[ok].abs().amax(dim=1) * (mean.dtype == torch.float32)).all()), \
        (what, dm, tol_mean)
    assert bool(((lse[ok] - e_lse[ok]).abs() <= tol_lse[ok]).all()), (what, lse, e_lse)
    # "auto" drops rows proven below 1e-6 of the variance kept (the refine step's criterion). The
    # oracle's own mean is off by ~ulps of |y| (delta), which its variance sees as (2 spread + delta) delta.
    delta = 8 * EPS * float(y.double().abs().max())
    tol_var = (2e-6 * e_var[ok] + 8 * err_logit[ok] * spread[ok] ** 2 + 256 * EPS * spread[ok] ** 2
               + x.shape[1] * (2 * spread[ok] + delta) * delta)
    assert bool(((var[ok] - e_var[ok]).abs() <= tol_var).all()), (what, var, e_var, tol_var)


@st.composite
def posterior_cases(draw, max_rows=40):
    M = draw(st.integers(0, 12))
    N = draw(st.integers(1, max_rows))
    D = draw(st.integers(1, 6))
    return dict(
        M=M, N=N, D=D, scale=draw(st.sampled_from([1e-30, 1e-8, 1.0, 1e8, 1e30])),
        rel_sigma=draw(st.sampled_from([2e-3, 0.05, 0.5, 3.0, 1e3])),
        sigma_kind=draw(st.sampled_from(["float", "tensor"])), alpha=draw(st.sampled_from([None, 1.0, 0.5, "tensor"])),
        query_kind=draw(st.sampled_from(["near", "far", "duplicate"])),
        data_dtype=draw(st.sampled_from([torch.float64, torch.float32, torch.bfloat16, torch.float16])),
        query_dtype=draw(st.sampled_from([torch.float64, torch.float32, torch.bfloat16])),
        duplicates=draw(st.booleans()), exclude=draw(st.booleans()),
        chunk=draw(st.sampled_from([None, 1, 3, 7])), precision=draw(st.sampled_from(PRECISIONS)),
        layout=draw(st.sampled_from(["contiguous", "transposed"])), data_seed=draw(st.integers(0, 2**31)),
    )


def posterior_inputs(case):
    gen = torch.Generator().manual_seed(case["data_seed"])
    M, N, D, scale = case["M"], case["N"], case["D"], case["scale"]
    dtype = case["data_dtype"]
    if dtype == torch.float16:
        scale = min(max(scale, 1e-2), 1e3)  # float16 holds neither 1e-30 nor 1e30
    y = torch.randn(N, D, generator=gen, dtype=torch.float64) * scale
    if case["duplicates"] and N > 1:  # exact and near duplicates
        y[N // 2] = y[0]
        y[-1] = y[0] * (1 + 1e-12)
    y = y.to(dtype)
    y64 = y.double()
    sigma = case["rel_sigma"] * scale
    src = torch.randint(N, (M,), generator=gen)
    if case["query_kind"] == "near":
        x = y64[src] + sigma * torch.randn(M, D, generator=gen, dtype=torch.float64)
    elif case["query_kind"] == "far":
        x = torch.randn(M, D, generator=gen, dtype=torch.float64) * scale * 3
    else:
        x = y64[src].clone()
    x = x.to(case["query_dtype"])
    if case["sigma_kind"] == "tensor":
        sigma = sigma * (0.5 + torch.rand(M, generator=gen, dtype=torch.float64))
    alpha = case["alpha"]
    if alpha == "tensor":
        alpha = 0.5 + torch.rand(M, generator=gen, dtype=torch.float64)
    exclude = None
    if case["exclude"]:
        exclude = torch.where(torch.rand(M, generator=gen) < 0.3, -1, src)
    if case["layout"] == "transposed":
        x, y = transposed(x), transposed(y)
    return x, y, sigma, alpha, exclude


def as_vec(v, M):
    return (v.double() if isinstance(v, torch.Tensor) else torch.full((M,), float(v), dtype=torch.float64))


@given(case=posterior_cases())
def test_posterior_mean_matches_oracle(case):
    x, y, sigma, alpha, exclude = posterior_inputs(case)
    kw = {} if alpha is None else dict(alpha=alpha)
    mean, lse, var = dk.posterior_mean(x, y, sigma, exclude_index=exclude, return_stats=True,
                                       chunk_size=case["chunk"], precision=case["precision"], **kw)
    M = case["M"]
    assert mean.dtype == torch.promote_types(x.dtype, torch.float32) and mean.shape == (M, case["D"])
    assert lse.dtype == torch.float64 and var.dtype == torch.float64 and lse.shape == var.shape == (M,)
    check_posterior(mean, lse, var, x, y, as_vec(sigma, M), as_vec(1.0 if alpha is None else alpha, M), exclude)


@given(case=posterior_cases(), parts=st.lists(st.tuples(st.integers(1, 40), st.sampled_from([None, 0.0, -1.5, 3.0])),
                                             min_size=1, max_size=4), order=st.randoms())
def test_merged_partials_equal_the_whole(case, parts, order):
    """posterior_partial over disjoint row ranges (with index_offset for exclude_index and a per-range
    logit_bias, as cDOL's source row has), merged in any order with empty partials in between,
    finalises to the posterior over all rows with those biases."""
    x, y, sigma, alpha, exclude = posterior_inputs(case)
    M, N, D = case["M"], case["N"], case["D"]
    bounds, start = [], 0
    for size, bias in parts:
        if start >= N:
            break
        bounds.append((start, min(N, start + size), bias))
        start += size
    if start < N:
        bounds.append((start, N, None))
    row_bias = torch.zeros(N, dtype=torch.float64)
    for a, b, bias in bounds:
        row_bias[a:b] = bias or 0.0
    kw = {} if alpha is None else dict(alpha=alpha)
    pieces = [ol.posterior_partial(x, y[a:b], sigma, exclude_index=exclude, index_offset=a, chunk_size=case["chunk"],
                                   logit_bias=bias, precision=case["precision"], **kw) for a, b, bias in bounds]
    pieces.append(ol.empty_partial(M, D, x.device))
    order.shuffle(pieces)
    stats = ol.merge_partials(*pieces).finalize()
    check_posterior(stats.mean, stats.logsumexp, stats.variance, x, y, as_vec(sigma, M),
                    as_vec(1.0 if alpha is None else alpha, M), exclude, "merged", row_bias)


@given(k=st.integers(-2, 40), case=posterior_cases())
def test_knn_matches_brute_force(k, case):
    x, y, _, _, _ = posterior_inputs(case)
    N = case["N"]
    if not 1 <= k <= min(32, N):
        with pytest.raises(ValueError, match="k"):
            dk.knn(x, y, k, precision=case["precision"])
        return
    d, idx = dk.knn(x, y, k, chunk_size=case["chunk"], precision=case["precision"])
    M = case["M"]
    assert d.shape == idx.shape == (M, k) and idx.dtype == torch.int64
    assert d.dtype == torch.promote_types(x.dtype, torch.float32)
    exact = (x.double()[:, None, :] - y.double()[None]).square().sum(dim=2)  # (M, N) direct differences
    if not M:
        return
    assert bool(((idx >= 0) & (idx < N)).all())
    assert all(len(set(row)) == k for row in idx.tolist())  # k distinct rows
    got = exact.gather(1, idx)
    tol = 8 * case["D"] * EPS * (exact.amax(dim=1, keepdim=True) + x.double().square().sum(dim=1, keepdim=True))
    # float32 output (float32 queries): rounded once, and squares below float32's range flush to 0
    f32 = d.dtype == torch.float32
    stored = got.to(d.dtype).double()
    out_round = 2.0**-23 * got + 2.0**-149 if f32 else 0.0
    # the distances are those of the rows (inf where the square overflows float32)
    assert bool(((d.double() == stored) | ((d.double() - stored).abs() <= tol + out_round)).all())
    assert bool((got[:, 1:] >= got[:, :-1] - tol).all())  # ascending
    kth = torch.sort(exact, dim=1).values[:, k - 1:k]
    assert bool((got <= kth + tol).all())  # no row outside is nearer than one inside


@pytest.mark.parametrize("precision", PRECISIONS)
@given(M=st.integers(0, 5), D=st.integers(1, 4), N=st.integers(1, 6), where=st.sampled_from(["query", "data"]),
       value=st.sampled_from([math.nan, math.inf, -math.inf]), data_seed=st.integers(0, 2**31))
def test_posterior_nonfinite_inputs(precision, M, D, N, where, value, data_seed):
    """NaN or Inf in a query or a data row is a ValueError naming the argument, in posterior_mean and
    knn alike (M = 0 queries read no data: empty results)."""
    assume(M > 0)
    gen = torch.Generator().manual_seed(data_seed)
    x = torch.randn(M, D, generator=gen, dtype=torch.float64)
    y = torch.randn(N, D, generator=gen, dtype=torch.float64)
    if where == "query":
        x[0, 0] = value
    else:
        y[0, 0] = value
    name = "queries" if where == "query" else "data"
    with pytest.raises(ValueError, match=f"{name} must be finite"):
        dk.posterior_mean(x, y, 0.7, return_stats=True, precision=precision)
    with pytest.raises(ValueError, match=f"{name} must be finite"):
        dk.knn(x, y, 1, precision=precision)


BAD_POSTERIOR_CALLS = {
    "sigma zero": (dict(sigma=0.0), ValueError, "sigma"),
    "sigma negative tensor": (dict(sigma=torch.tensor([1.0, -1.0])), ValueError, "sigma"),
    "sigma nan": (dict(sigma=math.nan), ValueError, "sigma"),
    "sigma inf": (dict(sigma=math.inf), ValueError, "sigma"),
    "sigma shape": (dict(sigma=torch.ones(3)), ValueError, "sigma"),
    "sigma str": (dict(sigma="1"), TypeError, "sigma"),
    "alpha zero": (dict(alpha=0.0), ValueError, "alpha"),
    "alpha nan tensor": (dict(alpha=torch.tensor([1.0, math.nan])), ValueError, "alpha"),
    "int queries": (dict(queries=torch.zeros(2, 3, dtype=torch.long)), TypeError, "queries"),
    "int data": (dict(data=torch.zeros(4, 3, dtype=torch.long)), TypeError, "data"),
    "1-d queries": (dict(queries=torch.zeros(3)), ValueError, "queries"),
    "columns": (dict(data=torch.zeros(4, 2)), ValueError, "D"),
    "no columns": (dict(queries=torch.zeros(2, 0), data=torch.zeros(4, 0)), ValueError, "D"),
    "no rows": (dict(data=torch.zeros(0, 3)), ValueError, "N"),
    "exclude float": (dict(exclude_index=torch.zeros(2)), TypeError, "exclude_index"),
    "exclude shape": (dict(exclude_index=torch.zeros(3, dtype=torch.long)), ValueError, "exclude_index"),
    "exclude range": (dict(exclude_index=torch.tensor([0, 4])), ValueError, "exclude_index"),
    "chunk": (dict(chunk_size=0), ValueError, "chunk_size"),
    "precision": (dict(precision="float32"), ValueError, "precision"),
}


@given(bad=st.sampled_from(sorted(BAD_POSTERIOR_CALLS)))
def test_posterior_bad_input_raises(bad):
    change, error, name = BAD_POSTERIOR_CALLS[bad]
    kw = dict(queries=torch.zeros(2, 3), data=torch.randn(4, 3), sigma=1.0)
    kw.update(change)
    with pytest.raises(error, match=name):
        dk.posterior_mean(kw.pop("queries"), kw.pop("data"), kw.pop("sigma"), **kw)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("scale,sigma", [(1.0, 1e-200), (1e200, 1e199), (1e-160, 1e-161)])
def test_bug_posterior_mean_float64_range(precision, scale, sigma):
    """Finite inputs beyond float64's squares (sigma < ~1e-154 x the distances, |data| > ~1e154 or
    < ~1e-154): the delta / scale-equivariant answer, or a clear ValueError, never a silent NaN."""
    gen = torch.Generator().manual_seed(0)
    y = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    x = y[:2] + 0.01 * torch.randn(2, 3, generator=gen, dtype=torch.float64)
    try:
        mean = dk.posterior_mean(x * scale, y * scale, sigma, precision=precision)
    except ValueError as exc:
        assert "sigma" in str(exc) or "range" in str(exc)
        return
    expected = dk.posterior_mean(x, y, sigma / scale, precision=precision) * scale
    assert torch.allclose(mean, expected, rtol=1e-12, atol=0)


# --- memorization ---------------------------------------------------------------------------------------


@given(M=st.integers(1, 8), N=st.integers(2, 12), shape=st.sampled_from([(3,), (2, 2), (1, 2, 3)]),
       kind=st.sampled_from(["uint8 numpy", "float tensor", "float numpy", "int tensor"]),
       copies=st.integers(0, 3), threshold=st.sampled_from([1 / 3, 0.5, 1.0, 1e-9]),
       transpose=st.booleans(), data_seed=st.integers(0, 2**31))
def test_memorization_matches_brute_force(M, N, shape, kind, copies, threshold, transpose, data_seed):
    gen = torch.Generator().manual_seed(data_seed)
    train = torch.randint(0, 256, (N, *shape), generator=gen)
    samples = torch.randint(0, 256, (M, *shape), generator=gen)
    for i in range(min(copies, M)):  # exact copies, near copies and duplicated training images
        samples[i] = train[i % N]
        if i == 1:
            train[(i + 1) % N] = train[i % N]
    D = math.prod(shape)

    def convert(t):
        if kind == "uint8 numpy":
            return t.numpy().astype(np.uint8)
        if kind == "float numpy":
            return t.numpy().astype(np.float32)
        if kind == "int tensor":
            return t.to(torch.int32)
        t = t.float()
        return t.reshape(t.shape[0], -1).t().contiguous().t() if transpose else t

    res = ol.memorization(convert(samples), convert(train), threshold)
    dist = ((samples.reshape(M, 1, D).double() - train.reshape(1, N, D).double()).square().sum(dim=2) / D).sqrt()
    srt = dist.sort(dim=1).values
    d1, d2 = srt[:, 0], srt[:, 1]
    ratio = torch.where(d2 > 0, d1 / d2.clamp_min(1e-300), 0.0)
    assert torch.allclose(res.d1, d1, rtol=1e-12, atol=0) and torch.allclose(res.d2, d2, rtol=1e-12, atol=0)
    assert torch.allclose(res.ratio, ratio, rtol=1e-12, atol=0)
    near = (ratio - threshold).abs() <= 1e-9  # a flag at the threshold may go either way by rounding
    assert torch.equal(res.memorized[~near], (ratio < threshold)[~near])
    assert res.fraction == pytest.approx(float(res.memorized.double().mean()))
    assert torch.allclose(dist.gather(1, res.nearest[:, None]).squeeze(1), d1, rtol=1e-12, atol=0)


@given(bad=st.sampled_from(["nan sample", "inf train", "threshold 0", "threshold nan", "threshold bool", "one train",
                            "sizes", "empty samples"]))
def test_memorization_bad_input_raises(bad):
    samples, train, threshold = torch.rand(3, 4) * 255, torch.rand(5, 4) * 255, 1 / 3
    name = {"nan sample": "NaN", "inf train": "NaN", "one train": "train", "sizes": "size",
            "empty samples": "empty"}.get(bad, "threshold")
    if bad == "nan sample":
        samples[1, 2] = math.nan
    elif bad == "inf train":
        train[3, 0] = math.inf
    elif bad == "threshold 0":
        threshold = 0.0
    elif bad == "threshold nan":
        threshold = math.nan
    elif bad == "threshold bool":
        threshold = True
    elif bad == "one train":
        train = train[:1]
    elif bad == "sizes":
        train = train[:, :3]
    else:
        samples = samples[:0]
    with pytest.raises(ValueError, match=name):
        ol.memorization(samples, train, threshold)


# --- the J* estimators ------------------------------------------------------------------------------------


@st.composite
def curve_cases(draw):
    N = draw(st.integers(1, 12))
    estimator = draw(st.sampled_from(["full", "snis", "dol", "cdol"]))
    L = draw(st.integers(1, N)) if estimator != "full" else None
    return dict(
        N=N, D=draw(st.integers(1, 4)), estimator=estimator, L=L,
        C=draw(st.sampled_from([None, 1.0, 7.5])) if estimator == "cdol" else None,
        M=draw(st.integers(1, 70)), seed=draw(SEEDS),
        sigmas=draw(st.lists(st.sampled_from([2e-3, 0.05, 0.7, 20.0]), min_size=1, max_size=3)),
        scale=draw(st.sampled_from([1e-30, 1.0, 1e30])), precision=draw(st.sampled_from(PRECISIONS)),
        data_seed=draw(st.integers(0, 2**31)),
    )


def run_curve(case, data, sigmas, **over):
    kw = dict(estimator=case["estimator"], num_queries=case["M"], subset_size=case["L"], C=case["C"],
              seed=case["seed"], precision=case["precision"], progress=False)
    kw.update(over)
    return ol.estimate_curve(data, sigmas, **kw)


def curve_data(case):
    gen = torch.Generator().manual_seed(case["data_seed"])
    return torch.randn(case["N"], case["D"], generator=gen, dtype=torch.float64) * case["scale"]


@examples(0.75)
@given(case=curve_cases(), k=st.integers(-20, 20))
def test_curve_power_of_two_scaling_is_exact(case, k):
    """Scaling data and noise levels by 2**k scales every J* and standard error by 4**k exactly (the
    same draws; every product and sum scales exactly), and the seed is taken mod 2**64."""
    data = curve_data(case)
    sigmas = np.array(case["sigmas"]) * case["scale"]
    base = run_curve(case, data, sigmas)
    scaled = run_curve(case, data * 2.0**k, sigmas * 2.0**k, seed=np.uint64(int(case["seed"]) % 2**64))
    for field in ("j_star", "stderr", "j_star_ab", "stderr_ab"):
        a, b = getattr(base, field), getattr(scaled, field)
        assert np.allclose(b, a * 4.0**k, rtol=1e-12, atol=0, equal_nan=True), (field, a, b)
    if case["estimator"] == "full":
        assert np.all(base.j_star >= 0)  # the posterior-variance form
    assert base.num_data == case["N"] and base.dim == case["D"] and base.num_queries == case["M"]


@examples(0.75)
@given(case=curve_cases())
def test_curve_single_row_is_zero(case):
    """One data row (or N copies of it): the posterior is a point mass, so J* = 0 for every estimator."""
    row = curve_data(case)[:1]
    data = row.expand(case["N"], -1).clone()
    res = run_curve(case, data, np.array(case["sigmas"]) * case["scale"])
    tol = 1e-12 * case["scale"]**2 * case["D"]
    assert np.all(np.abs(res.j_star) <= tol) and np.all(np.abs(res.j_star_ab) <= tol), res


@examples(0.75)
@given(case=curve_cases(), batch=st.sampled_from([1, 64, 128, 4096]))
def test_curve_estimators_that_coincide(case, batch):
    """With the subset = all rows, SNIS and DOL are the full posterior on the same queries, cDOL with
    C = 1 is DOL; batch_size changes only the rounding; numpy data gives the tensor result."""
    data = curve_data(case)
    sigmas = np.array(case["sigmas"]) * case["scale"]
    base = dict(case, estimator="full", L=None, C=None)
    full = run_curve(base, data, sigmas)
    tol = 1e-9 * (np.abs(full.j_star_ab) + 1e-30 + case["scale"]**2 * 1e-6)
    other = run_curve(base, data, sigmas, batch_size=batch)
    assert np.all(np.abs(other.j_star - full.j_star) <= 1e-9 * np.abs(full.j_star) + 1e-300)
    assert np.all(np.abs(other.j_star_ab - full.j_star_ab) <= tol)
    numpy_run = run_curve(base, data.numpy(), sigmas)
    assert np.allclose(numpy_run.j_star, full.j_star, rtol=1e-12, atol=0)
    for estimator in ("snis", "dol"):
        sub = run_curve(dict(case, estimator=estimator, L=case["N"], C=None), data, sigmas)
        assert np.all(np.abs(sub.j_star_ab - full.j_star_ab) <= tol), (estimator, sub.j_star_ab, full.j_star_ab)
    L = case["L"] or case["N"]
    dol = run_curve(dict(case, estimator="dol", L=L, C=None), data, sigmas)
    cdol = run_curve(dict(case, estimator="cdol", L=L, C=1.0), data, sigmas)
    assert np.array_equal(dol.j_star, cdol.j_star)


@examples(0.5)
@given(case=curve_cases(), shift=st.sampled_from([1.0, 1e3, -1e6]))
def test_curve_shift_invariant(case, shift):
    """J* depends on the data only through differences of rows: a common offset c changes it only by
    rounding (values of size |c| lose ~ulp(c) in each difference)."""
    data = curve_data(case)
    sigmas = np.array(case["sigmas"]) * case["scale"]
    c = shift * case["scale"]
    base = run_curve(case, data, sigmas)
    moved = run_curve(case, data + c, sigmas)
    D = case["D"]
    tol = 256 * D * EPS * (1 + abs(shift)) * (np.abs(base.j_star_ab) + case["scale"]**2 * D)
    assert np.all(np.abs(moved.j_star_ab - base.j_star_ab) <= tol), (base.j_star_ab, moved.j_star_ab, tol)
    assert np.all(np.abs(moved.j_star - base.j_star) <= tol), (base.j_star, moved.j_star, tol)


BAD_CURVE_CALLS = {
    "estimator": (dict(estimator="mc"), ValueError, "estimator"),
    "sigma zero": (dict(sigmas=[0.1, 0.0]), ValueError, "sigmas"),
    "sigma nan": (dict(sigmas=[math.nan]), ValueError, "sigmas"),
    "sigma empty": (dict(sigmas=[]), ValueError, "sigmas"),
    "queries zero": (dict(num_queries=0), ValueError, "num_queries"),
    "queries float": (dict(num_queries=3.0), TypeError, "num_queries"),
    "subset missing": (dict(estimator="snis"), ValueError, "subset_size"),
    "subset too big": (dict(estimator="dol", subset_size=9), ValueError, "subset_size"),
    "subset with full": (dict(subset_size=2), ValueError, "subset_size"),
    "C with dol": (dict(estimator="dol", subset_size=2, C=2.0), ValueError, "C"),
    "C zero": (dict(estimator="cdol", subset_size=2, C=0.0), ValueError, "C"),
    "C inf": (dict(estimator="cdol", subset_size=2, C=math.inf), ValueError, "C"),
    "seed float": (dict(seed=1.0), TypeError, "seed"),
    "batch zero": (dict(batch_size=0), ValueError, "batch_size"),
    "nan data": (dict(data="nan"), ValueError, "NaN"),
    "empty data": (dict(data="empty"), ValueError, "empty"),
    "1-d data": (dict(data="1d"), ValueError, "data"),
    "bool data": (dict(data="bool"), TypeError, "data"),
}


@given(bad=st.sampled_from(sorted(BAD_CURVE_CALLS)))
def test_curve_bad_input_raises(bad):
    change, error, name = BAD_CURVE_CALLS[bad]
    data = torch.randn(5, 3, dtype=torch.float64)
    kw = dict(sigmas=[0.5], num_queries=3, progress=False)
    kw.update(change)
    kind = kw.pop("data", None)
    if kind == "nan":
        data[2, 1] = math.nan
    elif kind == "empty":
        data = data[:0]
    elif kind == "1d":
        data = data[:, 0]
    elif kind == "bool":
        data = data > 0
    with pytest.raises(error, match=name):
        ol.estimate_curve(data, kw.pop("sigmas"), **kw)


# --- conversions ------------------------------------------------------------------------------------------

POSITIVE = st.floats(1e-30, 1e30)


@given(s=st.lists(POSITIVE, min_size=1, max_size=5), sigma_data=st.floats(1e-3, 1e3))
def test_loss_factor_formulas(s, sigma_data):
    s = np.array(s)
    expected = {"x0": np.ones_like(s), "eps": s**-2.0, "score": s**-4.0, "velocity": ((1 + s) / s) ** 2,
                "edm": (s**2 + sigma_data**2) / (s * sigma_data) ** 2}
    for target, value in expected.items():
        got = ol.loss_factor(s, target, sigma_data=sigma_data)
        finite = np.isfinite(value)
        assert np.allclose(got[finite], value[finite], rtol=1e-12, atol=0), target


@given(v=st.floats(1e-8, 1 - 1e-8), t=st.floats(1e-8, 1 - 1e-8))
def test_conversions_round_trip(v, t):
    s = ol.s_from_vp(sigma=v)
    assert np.isclose(s, v / math.sqrt(1 - v * v), rtol=1e-12)
    assert np.isclose(ol.s_from_vp(alpha=math.sqrt(1 - v * v)), s, rtol=1e-6)
    assert np.isclose(ol.flow_t_from_s(ol.s_from_flow(t)), t, rtol=1e-12)
    assert np.isclose(ol.s_from_ve(v), v)


@given(bad=st.sampled_from([0.0, -1.0, math.nan, math.inf]), which=st.sampled_from(["factor", "ve", "flow", "vp"]))
def test_conversions_bad_input(bad, which):
    with pytest.raises(ValueError):
        if which == "factor":
            ol.loss_factor([1.0, bad], "eps")
        elif which == "ve":
            ol.s_from_ve([bad])
        elif which == "flow":
            ol.s_from_flow([bad])
        else:
            ol.s_from_vp(sigma=[bad])
    with pytest.raises(ValueError, match="target"):
        ol.loss_factor([1.0], "v")


@given(a=st.floats(1e-6, 1e6), p=st.floats(-2.0, 3.0), grid=st.lists(st.floats(1e-3, 1e3), min_size=2, max_size=8,
                                                                       unique=True),
       s=st.lists(st.floats(1e-6, 1e6), min_size=1, max_size=6))
def test_interpolate_log_power_laws(a, p, grid, s):
    """Exact at the grid points; exact for a power law inside the grid (geometric interpolation);
    the s^2 law below the grid and a constant above it."""
    grid = np.array(sorted(grid))
    assume(np.all(np.diff(np.log(grid)) > 1e-9))
    j = a * grid**p
    assert np.allclose(ol.interpolate_log(grid, grid, j), j, rtol=1e-9)
    s = np.array(s)
    got = ol.interpolate_log(s, grid, j)
    inside = (s >= grid[0]) & (s <= grid[-1])
    assert np.allclose(got[inside], a * s[inside] ** p, rtol=1e-8)
    below = s < grid[0]
    assert np.allclose(got[below], j[0] * (s[below] / grid[0]) ** 2, rtol=1e-12)
    above = s > grid[-1]
    assert np.allclose(got[above], j[-1], rtol=1e-12)


@given(c=st.floats(1e-20, 1e20))
def test_schedule_losses_of_a_constant(c):
    """A constant J* = c: EDM's schedule gives c E[lambda(s)], flow matching c E[(1 + s)^2 / s^2] over its
    own density; checked against an independent quadrature."""
    sigmas = np.geomspace(1e-3, 1e3, 16)
    j = np.full_like(sigmas, c)
    u = np.linspace(-1.2 - 9.6, -1.2 + 9.6, 400_001)
    sig = np.exp(u)
    dens = np.exp(-0.5 * ((u + 1.2) / 1.2) ** 2) / (1.2 * math.sqrt(2 * math.pi))
    # J*(s) = c above the grid's bottom; below it the s^2 tail of interpolate_log
    jj = np.where(sig < 1e-3, c * (sig / 1e-3) ** 2, c)
    lam = (sig**2 + 0.25) / (sig * 0.5) ** 2
    trapezoid = getattr(np, "trapezoid", None) or np.trapz  # numpy < 2 has only trapz
    expected = float(trapezoid(dens * lam * jj, u))
    assert ol.edm_schedule_loss(sigmas, j) == pytest.approx(expected, rel=1e-6)
