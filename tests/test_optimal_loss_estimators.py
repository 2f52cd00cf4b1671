"""estimate_curve: each estimator against a brute-force float64 definition, the Gaussian closed form,
the limits in C, reproducibility, streaming from numpy / memmaps, and argument errors.

The brute-force definitions below are written from docs/METHODS.md section 3, per query, with
reference.posterior.posterior_stats or an explicit softmax; only the query draws (the documented RNG
convention: estimators.block_draws) are shared with the implementation.
"""

import math

import numpy as np
import pytest
import torch

from diffkernels.optimal_loss import estimate_curve
from diffkernels.optimal_loss import estimators as E
from diffkernels.optimal_loss.estimators import data as data_module
from diffkernels.optimal_loss.estimators import sampling
from diffkernels.reference.posterior import posterior_stats


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: no OpenMP overhead


def _data(N, D, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, D, generator=g, dtype=torch.float64) * scale


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _brute_level(data, sigma, level, estimator, M, L, C, seed, device="cpu"):
    """Per-query A - B values and (full) posterior variances, and the block of each query.

    A - B about the data mean mu: ||x_src - mu||^2 - ||D - mu||^2 (the documented definition, which
    makes every estimator invariant to shifting the data)."""
    N, D = data.shape
    mu = data.mean(dim=0)
    ab, var, block_of = [], [], []
    for b in range(-(-M // E.QUERY_BLOCK)):
        size = min(E.QUERY_BLOCK, M - b * E.QUERY_BLOCK)
        src, subset, eps = E.block_draws(seed, level, b, size, N, D, L, device)
        eps = eps.cpu()  # the same noise as the run on `device`; the definition is evaluated on the CPU
        x_src = data[src]
        x = x_src + sigma * eps
        if estimator == "full":
            mean, _, v = posterior_stats(x, data, sigma)
            var.append(v)
        elif estimator == "snis":
            mean, _, _ = posterior_stats(x, data[subset], sigma)
        else:  # dol / cdol: the subset without the source row, plus the source row with weight 1/C
            mean = torch.empty_like(x)
            for m in range(size):
                others = subset[subset != src[m]]
                rows = torch.cat([data[others], data[src[m]][None]])
                logits = -(x[m] - rows).square().sum(1) / (2 * sigma**2)
                logits[-1] -= math.log(C)
                w = torch.softmax(logits, 0)
                mean[m] = w @ rows
        ab.append((x_src - mu).square().sum(1) - (mean - mu).square().sum(1))
        block_of.append(torch.full((size,), b))
    return torch.cat(ab), (torch.cat(var) if var else None), torch.cat(block_of)


def _se(values):
    return float(values.std(unbiased=True) / math.sqrt(values.numel()))


def _clustered_se(values, block_of):
    M = values.numel()
    mean = values.mean()
    sums = torch.zeros(int(block_of.max()) + 1, dtype=torch.float64).index_add_(0, block_of, values)
    counts = torch.bincount(block_of).double()
    G = counts.numel()
    return float(math.sqrt(G / (G - 1) * float(((sums - counts * mean) ** 2).sum())) / M)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("estimator", ["full", "snis", "dol", "cdol"])
def test_matches_brute_force_definition(estimator, device):
    data = _data(150, 5, seed=1)
    sigmas = [0.05, 0.4, 3.0]
    M, L, seed = 160, (None if estimator == "full" else 30), 7
    C = 2.5 if estimator == "cdol" else None
    res = estimate_curve(data.to(device), sigmas, estimator=estimator, num_queries=M, subset_size=L, C=C,
                         seed=seed, batch_size=64, progress=False, device=device)
    C_used = {"dol": 1.0, "cdol": 2.5}.get(estimator)
    assert res.C == C_used
    for k, s in enumerate(sigmas):
        ab, var, block_of = _brute_level(data, s, k, estimator, M, L, C_used, seed, device)
        scale = float(data.square().sum(1).mean())
        assert res.j_star_ab[k] == pytest.approx(float(ab.mean()), rel=1e-9, abs=1e-12 * scale)
        if estimator == "full":
            assert res.j_star_var[k] == pytest.approx(float(var.mean()), rel=1e-9, abs=1e-14 * scale)
            assert res.j_star[k] == res.j_star_var[k]
            assert res.stderr_var[k] == pytest.approx(_se(var), rel=1e-6, abs=1e-14 * scale)
            assert res.stderr_ab[k] == pytest.approx(_se(ab), rel=1e-6, abs=1e-12 * scale)
        else:
            assert res.j_star_var is None and res.j_star[k] == res.j_star_ab[k]
            assert res.stderr[k] == pytest.approx(_clustered_se(ab, block_of), rel=1e-6, abs=1e-12 * scale)
    assert res.j_star_per_element == pytest.approx(res.j_star / 5)


def test_gaussian_population_closed_form():
    """N(mu, diag(lambda)), N = 20000, D = 3: J*(s) = sum_j lambda_j s^2 / (lambda_j + s^2) within 2%
    for s well above the nearest-neighbour spacing (~0.05 here)."""
    lam = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    mu = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    data = mu + _data(20000, 3, seed=3) * lam.sqrt()
    sigmas = np.array([0.5, 1.0, 3.0, 10.0])
    res = estimate_curve(data, sigmas, estimator="full", num_queries=512, seed=0, progress=False)
    exact = np.array([float((lam * s**2 / (lam + s**2)).sum()) for s in sigmas])
    np.testing.assert_allclose(res.j_star, exact, rtol=0.02)
    assert (res.stderr < 0.01 * exact).all()  # the variance form is precise
    # The A - B form estimates the same thing, with a larger standard error.
    assert (np.abs(res.j_star_ab - exact) < 0.02 * exact + 4 * res.stderr_ab).all()
    assert (res.stderr_ab > res.stderr).all()


def test_cdol_limits():
    data = _data(800, 4, seed=2)
    kw = dict(num_queries=256, subset_size=8, seed=3, progress=False)
    sigmas = [0.1, 0.5, 2.0]
    dol = estimate_curve(data, sigmas, estimator="dol", **kw)
    cdol1 = estimate_curve(data, sigmas, estimator="cdol", C=1.0, **kw)
    np.testing.assert_array_equal(cdol1.j_star, dol.j_star)
    np.testing.assert_array_equal(cdol1.stderr, dol.stderr)
    snis = estimate_curve(data, sigmas, estimator="snis", **kw)
    # As C grows cDOL moves to SNIS over the same subsets: the source row fades out once log C exceeds
    # its logit lead over the subset rows (~d^2 / 2s^2, hundreds at s = 0.1). In the limit only the
    # ~L/N = 1% of queries whose source was drawn into the subset differ (SNIS keeps it there).
    gaps = np.array([np.abs(estimate_curve(data, sigmas, estimator="cdol", C=C, **kw).j_star - snis.j_star)
                     for C in (1.0, 100.0, 1e4, 1e300)])
    # Monotone up to the Monte-Carlo noise left once the source row has faded (~1e-4 of J* here; the
    # noise draws differ between CPU and CUDA).
    assert (gaps[1:] <= gaps[:-1] + 1e-3 * (gaps[0] + np.abs(snis.j_star))).all()
    assert (gaps[-1] < 0.05 * gaps[0]).all()
    # Default C = 4N/L.
    assert estimate_curve(data, [1.0], estimator="cdol", **kw).C == pytest.approx(4 * 800 / 8)


def test_reproducible_and_batch_independent():
    data = _data(300, 6, seed=4)
    kw = dict(estimator="full", num_queries=200, seed=11, progress=False)
    a = estimate_curve(data, [0.2, 1.0], batch_size=64, **kw)
    b = estimate_curve(data, [0.2, 1.0], batch_size=64, **kw)
    np.testing.assert_array_equal(a.j_star, b.j_star)
    np.testing.assert_array_equal(a.stderr_ab, b.stderr_ab)
    c = estimate_curve(data, [0.2, 1.0], batch_size=4096, **kw)  # same draws, other rounding only
    np.testing.assert_allclose(c.j_star, a.j_star, rtol=1e-12)
    np.testing.assert_allclose(c.j_star_ab, a.j_star_ab, rtol=1e-12)
    d = estimate_curve(data, [0.2, 1.0], batch_size=64, **{**kw, "seed": 12})
    assert not np.array_equal(d.j_star, a.j_star)
    # Levels are independent streams: a level computed alone gives the same number.
    e = estimate_curve(data, [0.2], batch_size=64, **kw)
    assert e.j_star[0] == a.j_star[0]


@pytest.mark.parametrize("estimator", ["full", "cdol"])
def test_both_posterior_engines_give_the_same_curve(estimator):
    """precision="auto" (screen and refine) and "float64" differ only in rounding, at every level."""
    data = _data(300, 6, seed=5)
    kw = dict(estimator=estimator, num_queries=150, seed=3, progress=False, batch_size=64,
              subset_size=None if estimator == "full" else 40)
    sigmas = [1e-3, 0.05, 0.5, 5.0]
    a = estimate_curve(data, sigmas, precision="auto", **kw)
    b = estimate_curve(data, sigmas, precision="float64", **kw)
    np.testing.assert_allclose(a.j_star, b.j_star, rtol=1e-9, atol=1e-14)
    np.testing.assert_allclose(a.j_star_ab, b.j_star_ab, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="precision must be one of"):
        estimate_curve(data, [1.0], precision="fp32", **kw)


@pytest.mark.parametrize("estimator", ["full", "cdol"])
def test_numpy_memmap_and_dtypes_stream(tmp_path, monkeypatch, estimator):
    data = _data(257, 7, seed=5)
    kw = dict(estimator=estimator, num_queries=100, subset_size=None if estimator == "full" else 40, seed=2,
              progress=False)
    ref = estimate_curve(data, [0.3, 2.0], **kw)
    path = tmp_path / "data.npy"
    np.save(path, data.numpy().reshape(257, 7, 1))  # (N, ...) is flattened
    monkeypatch.setattr(data_module, "HOST_CHUNK_ELEMENTS", 7 * 50)  # several host chunks of 50 rows
    mm = np.load(path, mmap_mode="r")
    got = estimate_curve(mm, [0.3, 2.0], **kw)
    np.testing.assert_allclose(got.j_star, ref.j_star, rtol=1e-12)
    np.testing.assert_allclose(got.stderr, ref.stderr, rtol=1e-9)
    # float32 data: the same math on the float32 values.
    d32 = data.float()
    r32 = estimate_curve(d32, [0.3, 2.0], **kw)
    ref32 = estimate_curve(d32.double(), [0.3, 2.0], **kw)
    np.testing.assert_allclose(r32.j_star, ref32.j_star, rtol=1e-12)


def test_result_round_trip(tmp_path):
    res = estimate_curve(_data(100, 3), [0.5, 1.0], num_queries=64, progress=False)
    back = E.CurveResult.from_dict(res.to_dict())
    np.testing.assert_array_equal(back.j_star, res.j_star)
    assert back.estimator == "full" and back.dim == 3 and back.num_data == 100
    res.to_csv(tmp_path / "r.csv")
    lines = (tmp_path / "r.csv").read_text().splitlines()
    assert lines[0].startswith("sigma,j_star,stderr") and len(lines) == 3


def test_subset_sampler_uniform():
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(50)
    for _ in range(2000):
        idx = sampling.sample_subset(50, 5, g)  # the rejection path (4L < N)
        assert idx.numel() == 5 and torch.unique(idx).numel() == 5 and bool((idx[1:] > idx[:-1]).all())
        counts[idx] += 1
    # Each element is in the subset with probability 5/50: 200 expected, sd ~13.4.
    assert (counts - 200).abs().max() < 70
    assert sampling.sample_subset(10, 10, g).tolist() == list(range(10))


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(estimator="nope"), ValueError, "estimator"),
    (dict(estimator="snis", subset_size=21), ValueError, "larger than"),
    (dict(estimator="snis"), ValueError, "needs subset_size"),
    (dict(estimator="snis", subset_size=0), ValueError, "subset_size"),
    (dict(estimator="full", subset_size=5), ValueError, "subset estimators"),
    (dict(estimator="cdol", subset_size=5, C=0.0), ValueError, "C must be"),
    (dict(estimator="cdol", subset_size=5, C=-1.0), ValueError, "C must be"),
    (dict(estimator="cdol", subset_size=5, C=float("inf")), ValueError, "C must be"),
    (dict(estimator="dol", subset_size=5, C=2.0), ValueError, "only to estimator 'cdol'"),
    (dict(sigmas=[0.1, 0.0]), ValueError, "sigmas"),
    (dict(sigmas=[-1.0]), ValueError, "sigmas"),
    (dict(sigmas=[]), ValueError, "sigmas"),
    (dict(sigmas=[float("nan")]), ValueError, "sigmas"),
    (dict(num_queries=0), ValueError, "num_queries"),
    (dict(num_queries=2.5), TypeError, "num_queries"),
    (dict(batch_size=0), ValueError, "batch_size"),
])
def test_bad_arguments(kwargs, exc, match):
    args = dict(sigmas=[0.5], num_queries=8, progress=False)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        estimate_curve(_data(20, 3), args.pop("sigmas"), **args)


def test_bad_data():
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        estimate_curve(torch.randn(10), [1.0], num_queries=4, progress=False)
    with pytest.raises(ValueError, match="empty"):
        estimate_curve(torch.randn(0, 3), [1.0], num_queries=4, progress=False)
    bad = torch.randn(10, 3)
    bad[6, 1] = float("nan")
    with pytest.raises(ValueError, match="row 6"):
        estimate_curve(bad, [1.0], num_queries=4, progress=False)
    with pytest.raises(TypeError, match="numpy array"):
        estimate_curve([[1.0, 2.0]], [1.0], num_queries=4, progress=False)


def _pixel_data(N, D, seed):
    """Image-like data: values in [-1, 1] in steps of 1/8 (as digits scaled to [-1, 1]), a few clusters,
    so that shifts by +10 or +128 are exact in float32."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randint(0, 17, (8, D), generator=g)
    noise = torch.randint(-2, 3, (N, D), generator=g)
    return ((centers[torch.randint(0, 8, (N,), generator=g)] + noise).clamp(0, 16) / 8.0 - 1.0).float()


@pytest.mark.parametrize("estimator", ["full", "snis", "dol", "cdol"])
def test_every_estimator_is_shift_invariant(tmp_path, monkeypatch, estimator):
    """J*(s) depends only on the data's geometry: adding a constant to every pixel (+10, +128) must not
    change any estimate or standard error beyond rounding (uncentred, the subset estimators' A - B
    gained 2 mu . (x_src - D): negative J* and 20-30x standard errors). The shifted values are exact
    in float32, so the only difference is the rounding of the centring, ~1e-16 * 128 per element."""
    data = _pixel_data(400, 16, seed=3)
    kw = dict(estimator=estimator, num_queries=192, subset_size=None if estimator == "full" else 40, seed=5,
              progress=False)
    sigmas = [0.05, 0.5, 2.0]
    base = estimate_curve(data, sigmas, **kw)
    assert (base.j_star > -1e-9).all()
    monkeypatch.setattr(data_module, "HOST_CHUNK_ELEMENTS", 16 * 64)  # the memmap in several host chunks
    for shift in (10.0, 128.0):
        np.save(tmp_path / "shifted.npy", (data + shift).numpy())
        for shifted in (data + shift, np.load(tmp_path / "shifted.npy", mmap_mode="r")):
            got = estimate_curve(shifted, sigmas, checkpoint=tmp_path / f"{shift}.json", **kw)
            for key in ("j_star", "j_star_ab", "stderr", "stderr_ab"):
                np.testing.assert_allclose(getattr(got, key), getattr(base, key), rtol=1e-8, atol=1e-10,
                                           err_msg=f"{key}, shift {shift}")


def test_seed_accepts_any_integer():
    """Every seed goes through check_seed: Python and numpy integers, taken modulo 2**64."""
    data = _data(50, 3)
    kw = dict(num_queries=64, progress=False)
    a = estimate_curve(data, [0.5], seed=-1, **kw)
    b = estimate_curve(data, [0.5], seed=np.uint64(2**64 - 1), **kw)
    c = estimate_curve(data, [0.5], seed=2**64 - 1 + 2**64, **kw)
    assert a.seed == b.seed == c.seed == 2**64 - 1
    assert a.j_star[0] == b.j_star[0] == c.j_star[0]
    assert estimate_curve(data, [0.5], seed=np.int32(7), **kw).j_star[0] == estimate_curve(data, [0.5], seed=7, **kw).j_star[0]
    for bad in (1.5, True, "3"):
        with pytest.raises(TypeError, match="seed"):
            estimate_curve(data, [0.5], seed=bad, **kw)


def test_meta_data_and_device_are_rejected():
    with pytest.raises(ValueError, match="meta tensors are not supported"):
        estimate_curve(torch.randn(10, 3, device="meta"), [1.0], num_queries=4, progress=False)
    with pytest.raises(ValueError, match="meta"):
        estimate_curve(torch.randn(10, 3), [1.0], num_queries=4, progress=False, device="meta")


@pytest.mark.parametrize("estimator", ["full", "cdol"])
def test_common_random_numbers_use_level_zero_draws_at_every_level(estimator):
    """With common_random_numbers every level uses the draws of level 0: J* equals the brute-force
    definition evaluated with those draws at each s, and each level equals an independent run at that
    s alone (whose level 0 has the same draws), so every level's estimate stays unbiased."""
    data = _data(150, 5, seed=6)
    sigmas = [0.1, 0.4, 2.0]
    M, L = 100, (None if estimator == "full" else 20)
    C = None if estimator == "full" else 4.0 * 150 / 20
    kw = dict(estimator=estimator, num_queries=M, subset_size=L, seed=3, progress=False)
    crn = estimate_curve(data, sigmas, common_random_numbers=True, **kw)
    assert crn.common_random_numbers
    for k, s in enumerate(sigmas):
        ab, var, _ = _brute_level(data, s, 0, estimator, M, L, C, seed=3)  # level 0's draws
        expected = var.mean() if estimator == "full" else ab.mean()
        assert crn.j_star[k] == pytest.approx(float(expected), rel=1e-10)
        alone = estimate_curve(data, [s], **kw)  # independent draws; its level 0 is the same
        assert crn.j_star[k] == alone.j_star[0] and crn.stderr[k] == alone.stderr[0]
    # Without the option the levels above 0 use other draws.
    indep = estimate_curve(data, sigmas, **kw)
    assert indep.j_star[0] == crn.j_star[0] and not indep.common_random_numbers
    assert (indep.j_star[1:] != crn.j_star[1:]).all()


def test_common_random_numbers_make_the_curve_smooth():
    """The same eps at every s: J*(s) is a smooth, increasing function of s for one draw, whereas
    independent draws scatter by their standard errors between neighbouring levels."""
    data = _data(400, 4, seed=7)
    sigmas = np.geomspace(0.3, 0.6, 12)
    kw = dict(estimator="full", num_queries=64, seed=0, progress=False)
    crn = estimate_curve(data, sigmas, common_random_numbers=True, **kw)
    assert (np.diff(crn.j_star) > 0).all()
    indep = estimate_curve(data, sigmas, **kw)
    rough = lambda j: np.abs(np.diff(j, 2)).sum()  # noqa: E731
    assert rough(crn.j_star) < 0.2 * rough(indep.j_star)


def test_common_random_numbers_round_trip_and_checkpoint(tmp_path):
    data = _data(100, 3, seed=8)
    kw = dict(estimator="full", num_queries=64, seed=1, progress=False)
    res = estimate_curve(data, [0.5, 1.0], common_random_numbers=True, checkpoint=tmp_path / "c.json", **kw)
    back = E.CurveResult.from_dict(res.to_dict())
    assert back.common_random_numbers and not E.CurveResult.from_dict(
        estimate_curve(data, [0.5], **kw).to_dict()).common_random_numbers
    # The checkpoint records the option: resuming without it is an error naming it.
    with pytest.raises(ValueError, match="common_random_numbers"):
        estimate_curve(data, [0.5, 1.0], checkpoint=tmp_path / "c.json", **kw)
    with pytest.raises(TypeError, match="common_random_numbers"):
        estimate_curve(data, [0.5], common_random_numbers="yes", **kw)
