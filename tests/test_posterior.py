"""posterior_mean / posterior_partial / knn against the brute-force float64 oracles.

Accuracy targets: posterior mean L2 error <= 1e-4 relative to max(||D||, 0.1 * data norm),
posterior variance <= 1e-3 relative, for sigma from 2e-3 to 1e3 times the data's RMS scale, D up to
12288, on data with near-duplicate rows. The float64 engine lands near 1e-10; the tolerances below are
the targets', so a regression to float32 products would fail them at small sigma.

Both engines run through the accuracy tests: "float64" and "auto" (screen with an fp32-accurate GEMM,
recompute the top rows exactly), the latter also with the CUDA path's 3xTF32 splitting emulated on the
CPU ("auto-3xtf32"). The two engines must agree to float64 rounding, which is far tighter than the
targets: a screening margin that dropped a row worth more than e^-40 would show there.
"""

import math

import pytest
import torch

from conftest import DEVICES
from diffkernels import knn, posterior_mean
from diffkernels.optimal_loss import merge_partials, posterior_partial
from diffkernels.optimal_loss.posterior import float64_engine, fp32_gemm, nearest_neighbours, screen_engine, streaming
from diffkernels.reference import posterior as ref

SIGMAS = (2e-3, 1e-2, 0.1, 1.0, 10.0, 1e3)


def near_duplicate_data(N, D, gen, spread=1e-3):
    """Random rows in which every odd row is a tiny perturbation of the row before it."""
    data = torch.randn(N, D, generator=gen, dtype=torch.float64)
    jitter = spread * torch.rand(N // 2, 1, generator=gen, dtype=torch.float64)
    data[1::2] = data[0::2][: N // 2] + jitter * torch.randn(N // 2, D, generator=gen, dtype=torch.float64)
    return data


def assert_close_to_oracle(mean, lse, var, queries, data, sigma, **kw):
    rm, rl, rv = ref.posterior_stats(queries, data, sigma, **kw)
    scale = torch.maximum(rm.norm(dim=1), 0.1 * data.double().norm(dim=1).mean())
    mean_err = ((mean.double().cpu() - rm).norm(dim=1) / scale).max().item()
    var_err = ((var.double().cpu() - rv).abs() / rv.clamp_min(1e-300)).max().item()
    lse_err = ((lse.double().cpu() - rl).abs() / rl.abs().clamp_min(1.0)).max().item()
    assert mean_err <= 1e-4, f"mean error {mean_err:.2e}"
    assert var_err <= 1e-3, f"variance error {var_err:.2e}"
    assert lse_err <= 1e-6, f"logsumexp error {lse_err:.2e}"


ENGINES = ["float64", "auto", "auto-3xtf32"]


@pytest.fixture
def use_engine(monkeypatch):
    """Selects an engine by name; "auto-3xtf32" emulates the CUDA screening GEMM on the CPU."""
    def select(name):
        monkeypatch.setattr(fp32_gemm, "SPLIT_TF32_ON_CPU", name == "auto-3xtf32")
        return name.split("-")[0]
    return select


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("precision", ENGINES)
@pytest.mark.parametrize("D", [3, 64, 3072])
def test_accuracy_across_noise_levels_with_near_duplicates(device, D, precision, use_engine, gen):
    precision = use_engine(precision)
    N, M = 120, 24
    data = near_duplicate_data(N, D, gen)
    rms = data.square().mean().sqrt()
    src = torch.randint(0, N, (M,), generator=gen)
    for s in SIGMAS:
        sigma = float(s * rms)
        queries = data[src] + sigma * torch.randn(M, D, generator=gen, dtype=torch.float64)
        out = posterior_mean(queries.to(device), data.float().to(device), sigma, return_stats=True, chunk_size=37,
                             precision=precision)
        assert_close_to_oracle(*out, queries, data.float(), sigma)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("precision", ENGINES)
def test_accuracy_at_d_12288(device, precision, use_engine, gen):
    precision = use_engine(precision)
    N, M, D = 16, 4, 12288
    data = near_duplicate_data(N, D, gen)
    src = torch.randint(0, N, (M,), generator=gen)
    for s in (2e-3, 1.0, 1e3):
        queries = data[src] + s * torch.randn(M, D, generator=gen, dtype=torch.float64)
        out = posterior_mean(queries.float().to(device), data.float().to(device), s, return_stats=True,
                             precision=precision)
        assert_close_to_oracle(*out, queries.float(), data.float(), s)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("split", [False, True], ids=["fp32", "3xtf32"])
def test_screen_and_refine_agrees_with_the_float64_engine(device, split, monkeypatch, gen):
    """Per-query sigma in one call: every 10th query log-uniform in [1e-3, 30] (spread posteriors that
    fall back to float64), the others ~1e-3 (proven by the screen), so both paths run in the same
    block chunk after chunk (1/10 stays below the fallback fraction at which a block stops screening);
    with exclusion, alpha, a bias, and data far from the origin (large norms: the screen's error
    bound grows with them)."""
    monkeypatch.setattr(fp32_gemm, "SPLIT_TF32_ON_CPU", split)
    N, M, D = 300, 80, 48
    data = 3.0 + near_duplicate_data(N, D, gen)
    sigma = 1e-3 * (1.0 + torch.rand(M, generator=gen, dtype=torch.float64))
    sigma[::10] = torch.exp(torch.empty(len(sigma[::10]), dtype=torch.float64).uniform_(-7, 3.4, generator=gen))
    sigma[10] = 30.0  # at least one query that certainly falls back
    assert screen_engine.MAX_FALLBACK_FRACTION > 0.1
    alpha = 0.5 + torch.rand(M, generator=gen, dtype=torch.float64)
    src = torch.randint(0, N, (M,), generator=gen)
    queries = alpha[:, None] * data[src] + sigma[:, None] * torch.randn(M, D, generator=gen, dtype=torch.float64)
    bias = torch.randn(M, generator=gen, dtype=torch.float64)
    fallback_queries = []
    real = float64_engine.chunk_partial
    monkeypatch.setattr(float64_engine, "chunk_partial", lambda q, *a: fallback_queries.append(q.size) or real(q, *a))
    args = dict(alpha=alpha.to(device), exclude_index=src.to(device), logit_bias=bias.to(device), chunk_size=64)
    auto = posterior_partial(queries.to(device), data.float().to(device), sigma.to(device), precision="auto", **args)
    assert fallback_queries and all(0 < m < M for m in fallback_queries), "both paths must run in one block"
    exact = posterior_partial(queries.to(device), data.float().to(device), sigma.to(device), precision="float64",
                              **args)
    a, e = auto.finalize(), exact.finalize()
    torch.testing.assert_close(a.mean, e.mean, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(a.logsumexp, e.logsumexp, rtol=1e-12, atol=1e-12)
    # Rows the screen drops weigh < e^-40 of the best one each: the variance may move by up to
    # N e^-40 max ||y - D||^2 ~ 300 * 4e-18 * 400 ~ 5e-13 in absolute terms.
    torch.testing.assert_close(a.variance, e.variance, rtol=1e-7, atol=N * math.exp(-40) * 400)
    assert_close_to_oracle(a.mean, a.logsumexp, a.variance, queries, data.float(), sigma, alpha=alpha,
                           exclude_index=src, logit_bias=bias)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("split", [False, True], ids=["fp32", "3xtf32"])
@pytest.mark.parametrize("D", [64, 3072, 12288])
def test_screening_gemm_error_is_within_its_bound(device, split, D, monkeypatch, gen):
    """The screen's proof rests on |a.b - fp32-accurate a.b| <= gamma(D) ||a|| ||b||; all-positive data
    (no cancellation, the worst case for accumulated rounding) and signed data. On CUDA this measures
    the tensor cores' 3xTF32 (``split`` only matters on the CPU, where it emulates them)."""
    monkeypatch.setattr(fp32_gemm, "SPLIT_TF32_ON_CPU", split)
    for a, b in ((torch.rand(64, D, generator=gen), torch.rand(128, D, generator=gen)),
                 (torch.randn(64, D, generator=gen), torch.randn(128, D, generator=gen))):
        err = (fp32_gemm.fp32_accurate_mm(a.to(device), b.to(device)).double().cpu() - a.double() @ b.double().T).abs()
        scale = a.double().norm(dim=1)[:, None] * b.double().norm(dim=1)[None, :]
        ratio = (err / scale).max().item() / fp32_gemm.screen_error_factor(D)
        assert ratio <= 0.1, f"error at {ratio:.2f} of the bound: the bound has too little margin"


@pytest.mark.parametrize("device", DEVICES)
def test_screen_keeps_the_variance_of_a_delta_posterior_with_a_flat_tail(device, gen):
    """One row at the query and 40 rows ~50 nats down: the margin proof alone would drop 24 of the 40
    rows that make up the whole (tiny) variance; the variance check must send the query to float64."""
    D, r = 8, 3.0
    tail = torch.randn(40, D, generator=gen, dtype=torch.float64)
    tail = r * (1.0 + 1e-3 * torch.rand(40, 1, generator=gen, dtype=torch.float64)) * tail / tail.norm(dim=1, keepdim=True)
    data = torch.cat([torch.zeros(1, D, dtype=torch.float64), tail,
                      10.0 + torch.randn(200, D, generator=gen, dtype=torch.float64)])
    queries = 1e-6 * torch.randn(3, D, generator=gen, dtype=torch.float64)
    sigma = r / 10.0  # r^2 / (2 sigma^2) = 50 nats
    out = posterior_mean(queries.to(device), data.to(device), sigma, return_stats=True, precision="auto")
    assert_close_to_oracle(*out, queries, data, sigma)


def test_precision_is_checked():
    with pytest.raises(ValueError, match="precision must be one of"):
        posterior_mean(torch.randn(2, 3), torch.randn(4, 3), 1.0, precision="tf32")


@pytest.mark.parametrize("device", DEVICES)
def test_per_query_sigma_alpha_and_exclusion(device, gen):
    N, M, D = 90, 17, 8
    data = torch.randn(N, D, generator=gen, dtype=torch.float64)
    sigma = torch.exp(torch.empty(M, dtype=torch.float64).uniform_(-5, 3, generator=gen))
    alpha = torch.rand(M, generator=gen, dtype=torch.float64) + 0.2
    src = torch.randint(0, N, (M,), generator=gen)
    queries = alpha[:, None] * data[src] + sigma[:, None] * torch.randn(M, D, generator=gen, dtype=torch.float64)
    out = posterior_mean(queries.to(device), data.to(device), sigma.to(device), alpha=alpha.to(device),
                         exclude_index=src.to(device), return_stats=True, chunk_size=11)
    assert out[0].dtype == torch.float64
    assert_close_to_oracle(*out, queries, data, sigma, alpha=alpha, exclude_index=src)


def test_partials_merge_exactly_in_any_order(gen):
    N, M, D = 200, 9, 16
    data = near_duplicate_data(N, D, gen)
    queries = data[:M] + 0.01 * torch.randn(M, D, generator=gen, dtype=torch.float64)
    whole = posterior_partial(queries, data, 0.01).finalize()
    cuts = [0, 13, 80, 81, 200]
    parts = [posterior_partial(queries, data[a:b], 0.01, index_offset=a) for a, b in zip(cuts, cuts[1:])]
    for order in (parts, parts[::-1], [parts[2], parts[0], parts[3], parts[1]]):
        merged = merge_partials(*order).finalize()
        torch.testing.assert_close(merged.mean, whole.mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(merged.logsumexp, whole.logsumexp, rtol=1e-12, atol=0)
        torch.testing.assert_close(merged.variance, whole.variance, rtol=1e-9, atol=1e-15)


def test_exclusion_across_chunks_and_logit_bias(gen):
    N, M, D = 50, 6, 5
    data = torch.randn(N, D, generator=gen, dtype=torch.float64)
    src = torch.tensor([0, 7, 8, 49, 25, 7])
    queries = data[src] + 0.3 * torch.randn(M, D, generator=gen, dtype=torch.float64)
    bias = torch.randn(M, generator=gen, dtype=torch.float64)
    part = merge_partials(*[posterior_partial(queries, data[a:a + 8], 0.3, exclude_index=src, index_offset=a,
                                              logit_bias=bias) for a in range(0, N, 8)])
    stats = part.finalize()
    assert_close_to_oracle(stats.mean, stats.logsumexp, stats.variance, queries, data, 0.3, exclude_index=src,
                           logit_bias=bias)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_reduced_precision_storage_is_exact_on_the_stored_values(dtype, gen):
    data = torch.randn(64, 12, generator=gen).to(dtype)
    queries = torch.randn(10, 12, generator=gen)
    out = posterior_mean(queries, data, 0.5, return_stats=True)
    assert out[0].dtype == torch.float32
    assert_close_to_oracle(*out, queries, data.float(), 0.5)


def test_data_on_the_host_streams_to_the_queries_device(gen):
    data = torch.randn(100, 6, generator=gen)
    queries = torch.randn(7, 6, generator=gen)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    a = posterior_mean(queries.to(device), data, 0.7, chunk_size=9)
    b = posterior_mean(queries, data, 0.7)
    assert a.device.type == device
    torch.testing.assert_close(a.cpu(), b, rtol=1e-6, atol=1e-6)


def test_all_rows_excluded_gives_nan_not_a_crash():
    data = torch.randn(1, 3)
    mean = posterior_mean(torch.randn(2, 3), data, 1.0, exclude_index=torch.tensor([0, 0]))
    assert torch.isnan(mean).all()


def test_bad_input_names_the_argument():
    q, d = torch.randn(4, 3), torch.randn(5, 3)
    with pytest.raises(ValueError, match="same number of columns"):
        posterior_mean(q, torch.randn(5, 4), 1.0)
    with pytest.raises(ValueError, match="queries must have shape"):
        posterior_mean(torch.randn(4), d, 1.0)
    with pytest.raises(TypeError, match="data must be a floating-point"):
        posterior_mean(q, torch.ones(5, 3, dtype=torch.int64), 1.0)
    with pytest.raises(ValueError, match="sigma must be > 0"):
        posterior_mean(q, d, 0.0)
    with pytest.raises(ValueError, match="sigma must be a scalar or have shape"):
        posterior_mean(q, d, torch.ones(3))
    with pytest.raises(ValueError, match="alpha must be > 0"):
        posterior_mean(q, d, 1.0, alpha=torch.tensor([1.0, -1.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="exclude_index must have shape"):
        posterior_mean(q, d, 1.0, exclude_index=torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="k must be an int"):
        knn(q, d, 6)
    with pytest.raises(ValueError, match="k must be an int"):
        knn(q, d, 0)
    with pytest.raises(ValueError, match="data has no rows"):
        posterior_mean(q, torch.randn(0, 3), 1.0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("precision", ENGINES)
@pytest.mark.parametrize("k", [1, 2, 7, 32])
def test_knn_matches_brute_force(device, k, precision, use_engine, gen):
    precision = use_engine(precision)
    data = near_duplicate_data(301, 24, gen, spread=1e-6).float()
    queries = torch.cat([data[:5], torch.randn(20, 24, generator=gen)])
    d, i = knn(queries.to(device), data.to(device), k, chunk_size=50, precision=precision)
    rd, ri = ref.knn(queries, data, k)
    torch.testing.assert_close(d.double().cpu(), rd, rtol=1e-6, atol=1e-9)
    # The returned rows really are at the returned distances...
    true_d = ref.sq_distances(queries, data).gather(1, i.cpu())
    torch.testing.assert_close(d.double().cpu(), true_d, rtol=1e-6, atol=1e-9)
    # ...and the indices agree with brute force wherever a distance is not tied within rounding
    # (near-duplicate rows 1e-6 apart are ties), including a tie of the k-th row with the (k+1)-th.
    extended = ref.knn(queries, data, k + 1)[0]
    gaps = (extended[:, 1:] - extended[:, :-1]).abs() > 1e-9
    separated = torch.ones_like(rd, dtype=torch.bool)
    separated[:, 1:] &= gaps[:, : k - 1]
    separated &= gaps[:, :k]
    assert (i.cpu() == ri)[separated].all()


@pytest.mark.parametrize("device", DEVICES)
def test_knn_screen_falls_back_where_it_cannot_prove(device, monkeypatch, gen):
    """40 copies of one row: the screen cannot separate k + KNN_EXTRA candidates from the rest, so
    those queries fall back to float64 (and the others do not); results match the float64 engine."""
    data = torch.randn(200, 16, generator=gen)
    data[100:140] = data[7]
    queries = torch.cat([data[7:8] + 1e-3 * torch.randn(3, 16, generator=gen), torch.randn(9, 16, generator=gen)])
    fallback_queries = []
    real = nearest_neighbours.knn_chunk
    monkeypatch.setattr(nearest_neighbours, "knn_chunk", lambda q, *a: fallback_queries.append(q.size) or real(q, *a))
    d, i = knn(queries.to(device), data.to(device), 3, precision="auto")
    assert fallback_queries and all(0 < m < queries.shape[0] for m in fallback_queries)
    rd, _ = ref.knn(queries, data, 3)
    torch.testing.assert_close(d.double().cpu(), rd, rtol=1e-6, atol=1e-9)
    assert (data[i[:3].cpu()] == data[7]).all()


def pixel_data(N, D, gen):
    """Images at pixel scale: every value near 128 (a spread of 0.5 per pixel), in near-duplicate pairs
    ~1e-2 apart (in norm)."""
    return (128.0 + 0.5 * near_duplicate_data(N, D, gen, spread=2e-2 / D**0.5)).float()


@pytest.mark.parametrize("device", DEVICES)
def test_screens_prove_pixel_scale_data_without_float64(device, monkeypatch, gen):
    """Data far from the origin (pixels around 128): the screens centre queries and data before the
    float32 GEMM, so their error bound follows the data's spread, not its offset, and every query is
    proven without the float64 engine (uncentred, ||y||^2 ~ 1e7 made the bound, ~1e3, wider than every
    gap between rows, ~3e2, here). The results are the exact ones."""
    N, D, M = 600, 512, 24
    data = pixel_data(N, D, gen)
    src = torch.randint(0, N, (M,), generator=gen)
    queries = data[src].double() + 1e-3 * torch.randn(M, D, generator=gen, dtype=torch.float64)
    calls = []
    real_knn, real_partial = nearest_neighbours.knn_chunk, float64_engine.chunk_partial
    monkeypatch.setattr(nearest_neighbours, "knn_chunk", lambda *a: calls.append("knn") or real_knn(*a))
    monkeypatch.setattr(float64_engine, "chunk_partial", lambda *a: calls.append("post") or real_partial(*a))
    d, i = knn(queries.to(device), data.to(device), 4, precision="auto")
    sigma = 0.5
    out = posterior_mean(queries.to(device), data.to(device), sigma, return_stats=True, precision="auto")
    assert calls == []
    rd, ri = ref.knn(queries, data, 4)
    torch.testing.assert_close(d.cpu(), rd, rtol=1e-12, atol=1e-9)
    assert torch.equal(i.cpu(), ri)
    assert_close_to_oracle(*out, queries, data, sigma)


@pytest.mark.parametrize("precision", ["auto", "float64"])
def test_many_query_blocks(precision, gen):
    M = streaming.default_block_sizes(10**9, torch.device("cpu"))[0] * 2 + 3  # three blocks, the last one short
    data = torch.randn(40, 4, generator=gen, dtype=torch.float64)
    queries = torch.randn(M, 4, generator=gen, dtype=torch.float64)
    out = posterior_mean(queries, data, 0.3, return_stats=True, chunk_size=16, precision=precision)
    assert_close_to_oracle(*out, queries, data, 0.3)
    d, i = knn(queries, data, 3, chunk_size=16, precision=precision)
    rd, ri = ref.knn(queries, data, 3)
    torch.testing.assert_close(d, rd, rtol=1e-12, atol=1e-12)
    assert (i == ri).float().mean() > 0.999  # random float64 data: exact ties have probability ~0


# --- the fp32 screen outside float32's range, empty queries, bad input, gradients ----------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("N", [10, 60, 400])
@pytest.mark.parametrize("scale", [1e19, 1e25, 1e-30])
def test_screen_out_of_float32_range_falls_back_to_float64(device, N, scale, gen):
    """Rows with norms beyond ~1.8e19 overflow the float32 screen (squares and products), rows near
    1e-30 underflow it (products below float32's smallest number): precision="auto" must then give the
    float64 engine's (exact) answer, not NaN or a wrong one, for the posterior and for knn."""
    M, D = 40, 8
    data = torch.randn(N, D, generator=gen, dtype=torch.float64) * scale
    data32 = data.float()
    src = torch.randint(0, N, (M,), generator=gen)
    queries = data32[src].double() + 0.01 * scale * torch.randn(M, D, generator=gen, dtype=torch.float64)
    sigma = 0.01 * scale
    out = posterior_mean(queries.float().to(device), data32.to(device), sigma, return_stats=True, precision="auto")
    assert_close_to_oracle(*out, queries.float(), data32, sigma)
    # knn in float64 queries: squared distances ~1e39 overflow a float32 result.
    d, i = knn(queries.to(device), data32.to(device), 3, precision="auto")
    rd, ri = ref.knn(queries, data32, 3)
    torch.testing.assert_close(d.cpu(), rd, rtol=1e-6, atol=0)  # as test_knn_matches_brute_force, scale-free
    assert torch.equal(i.cpu(), ri)


@pytest.mark.parametrize("precision", ["auto", "float64"])
def test_zero_queries_give_empty_results(precision):
    """M = 0 behaves like torch.cdist: empty results of the right shapes and dtypes."""
    q, data = torch.randn(0, 5), torch.randn(30, 5)
    mean, lse, var = posterior_mean(q, data, 0.5, return_stats=True, precision=precision)
    assert mean.shape == (0, 5) and mean.dtype == torch.float32 and lse.shape == (0,) and var.shape == (0,)
    assert posterior_mean(q.double(), data, 0.5, precision=precision).dtype == torch.float64
    part = posterior_partial(q, data, torch.ones(0), exclude_index=torch.zeros(0, dtype=torch.int64),
                             precision=precision)
    assert part.center.shape == (0, 5) and part.sum_w.shape == (0,)
    assert merge_partials(part, part).finalize().mean.shape == (0, 5)
    d, i = knn(q, data, 3, precision=precision)
    assert d.shape == (0, 3) and d.dtype == torch.float32 and i.shape == (0, 3) and i.dtype == torch.int64


def test_meta_tensors_are_rejected():
    meta = dict(device="meta")
    for call in (lambda: posterior_mean(torch.randn(2, 3, **meta), torch.randn(4, 3, **meta), 1.0),
                 lambda: posterior_mean(torch.randn(2, 3), torch.randn(4, 3, **meta), 1.0),
                 lambda: posterior_mean(torch.randn(2, 3), torch.randn(4, 3), torch.ones(2, **meta)),
                 lambda: posterior_partial(torch.randn(2, 3, **meta), torch.randn(4, 3), 1.0),
                 lambda: knn(torch.randn(2, 3, **meta), torch.randn(4, 3, **meta), 2)):
        with pytest.raises(ValueError, match="meta tensors are not supported"):
            call()


@pytest.mark.parametrize("call, exc, match", [
    (lambda q, d: posterior_mean(q, d, 1.0, exclude_index=torch.tensor([0, 5, 1, 2])), ValueError, "exclude_index"),
    (lambda q, d: posterior_mean(q, d, 1.0, exclude_index=torch.tensor([0, -2, 1, 2])), ValueError, "exclude_index"),
    (lambda q, d: posterior_partial(q, d, 1.0, exclude_index=torch.tensor([0, -2, 1, 2])), ValueError, "exclude_index"),
    (lambda q, d: posterior_partial(q, d, 1.0, index_offset=-1), ValueError, "index_offset"),
    (lambda q, d: posterior_mean(q, d, 1.0, chunk_size=0), ValueError, "chunk_size"),
    (lambda q, d: posterior_mean(q, d, 1.0, chunk_size=-3), ValueError, "chunk_size"),
    (lambda q, d: posterior_mean(q, d, 1.0, chunk_size=2.5), TypeError, "chunk_size"),
    (lambda q, d: knn(q, d, 2, chunk_size=0), ValueError, "chunk_size"),
    (lambda q, d: knn(q, d, 2, chunk_size=-3), ValueError, "chunk_size"),
    (lambda q, d: knn(q, d, 2, chunk_size="3"), TypeError, "chunk_size"),
    (lambda q, d: posterior_mean(q, d, "0.5"), TypeError, "sigma"),
    (lambda q, d: posterior_mean(q, d, float("inf")), ValueError, "sigma must be finite"),
    (lambda q, d: posterior_mean(q, d, float("nan")), ValueError, "sigma"),
    (lambda q, d: posterior_mean(q, d, torch.tensor([1.0, float("inf"), 1.0, 1.0])), ValueError, "sigma must be finite"),
    (lambda q, d: posterior_mean(q, d, 1.0, alpha=float("inf")), ValueError, "alpha must be finite"),
    (lambda q, d: posterior_mean(q, d, 1.0, alpha="1"), TypeError, "alpha"),
    (lambda q, d: posterior_partial(q, d, 1.0, logit_bias=float("nan")), ValueError, "logit_bias"),
    (lambda q, d: posterior_partial(q, d, 1.0, data_shift=torch.zeros(4)), ValueError, "data_shift"),
    (lambda q, d: posterior_partial(q, d, 1.0, data_shift=torch.full((3,), float("nan"))), ValueError, "data_shift"),
])
def test_more_bad_input_is_rejected(call, exc, match, gen):
    with pytest.raises(exc, match=match):
        call(torch.randn(4, 3, generator=gen), torch.randn(5, 3, generator=gen))


def test_numpy_scalars_are_accepted(gen):
    np = pytest.importorskip("numpy")
    q, d = torch.randn(4, 3, generator=gen), torch.randn(5, 3, generator=gen)
    expected = posterior_mean(q, d, 0.5, alpha=2.0)
    torch.testing.assert_close(posterior_mean(q, d, np.float32(0.5), alpha=np.int64(2)), expected, rtol=0, atol=0)
    torch.testing.assert_close(knn(q, d, np.int64(2), chunk_size=np.int32(2))[1], knn(q, d, 2)[1], rtol=0, atol=0)


@pytest.mark.parametrize("precision", ["auto", "float64"])
def test_results_carry_no_gradient(precision, gen):
    """posterior_mean, posterior_partial and knn are not differentiable: for inputs that require a
    gradient the results must not claim one (requires_grad False, no grad_fn)."""
    q = torch.randn(6, 4, generator=gen, requires_grad=True)
    data = torch.randn(20, 4, generator=gen, requires_grad=True)
    sigma = torch.full((6,), 0.5, requires_grad=True)
    outs = [*posterior_mean(q, data, sigma, alpha=torch.ones((), requires_grad=True), return_stats=True,
                            precision=precision),
            *posterior_partial(q, data, sigma, precision=precision).to_tuple(),
            knn(q, data, 3, precision=precision)[0]]
    for out in outs:
        assert not out.requires_grad and out.grad_fn is None


@pytest.mark.parametrize("precision", ["auto", "float64"])
def test_data_shift_equals_shifting_the_data(precision, gen):
    """data_shift subtracts a vector from every row as it is read: the oracle on data - shift, with
    data far from the origin (norms ~1e4) and shifted by its mean; the caller's data is not written."""
    N, M, D = 90, 12, 6
    data = 1e3 + near_duplicate_data(N, D, gen)
    shift = data.mean(dim=0)
    centred = data - shift
    queries = centred[:M] + 0.01 * torch.randn(M, D, generator=gen, dtype=torch.float64)
    before = data.clone()
    stats = posterior_partial(queries, data, 0.01, data_shift=shift, chunk_size=32, precision=precision).finalize()
    assert torch.equal(data, before)
    assert_close_to_oracle(stats.mean, stats.logsumexp, stats.variance, queries, centred, 0.01)


# --- each engine alone, on one query block ---------------------------------------------------------


def _one_block(gen, M=20, N=150, D=6, sigma=0.05):
    data = near_duplicate_data(N, D, gen)
    src = torch.randint(0, N, (M,), generator=gen)
    queries = data[src] + sigma * torch.randn(M, D, generator=gen, dtype=torch.float64)
    return queries, data, src


@pytest.mark.parametrize("Engine", [float64_engine.Float64Engine, screen_engine.ScreenEngine])
@pytest.mark.parametrize("sigma", [0.01, 3.0])  # 3.0: spread posteriors, which the screen cannot prove
def test_posterior_engine_alone_matches_the_oracle(Engine, sigma, gen):
    """An engine built for one QueryBlock and fed a DataSource's chunks gives the block's partial."""
    from diffkernels.optimal_loss.posterior.blocks import QueryBlock

    queries, data, src = _one_block(gen, sigma=sigma)
    M = queries.shape[0]
    alpha = 0.5 + torch.rand(M, generator=gen, dtype=torch.float64)
    sig = torch.full((M,), sigma, dtype=torch.float64)
    block = QueryBlock.of(queries, sigma=sig, alpha=alpha, exclude=src)
    source = streaming.DataSource(data.float(), torch.device("cpu"), chunk_rows=40)
    engine = Engine(block, source)
    source.feed([engine])
    stats = engine.result().finalize()
    assert_close_to_oracle(stats.mean, stats.logsumexp, stats.variance, queries, data.float(), sigma, alpha=alpha,
                           exclude_index=src)


@pytest.mark.parametrize("Engine", [nearest_neighbours.KnnFloat64Engine, nearest_neighbours.KnnScreenEngine])
def test_knn_engine_alone_matches_the_oracle(Engine, gen):
    from diffkernels.optimal_loss.posterior.blocks import QueryBlock

    queries, data, _ = _one_block(gen)
    source = streaming.DataSource(data, torch.device("cpu"), chunk_rows=40)
    engine = Engine(QueryBlock.of(queries), source, 5)
    source.feed([engine])
    d, i = engine.result()
    rd, ri = ref.knn(queries, data, 5)
    torch.testing.assert_close(d, rd, rtol=1e-12, atol=1e-12)
    assert torch.equal(i, ri)


# --- float64's range and non-finite values ---------------------------------------------------------


@pytest.mark.parametrize("precision", ["auto", "float64"])
@pytest.mark.parametrize("scale", [1e200, 1e-160, 1e300, 1e-300])
def test_any_data_magnitude_is_exact(precision, scale, gen):
    """Squares of values beyond ~1e154 overflow float64 and below ~1e-154 lose their digits in the
    subnormals: the posterior at (scale x, scale y, scale sigma) must still be scale * that at (x, y,
    sigma) (it was NaN), and knn's indices must not change."""
    queries, data, src = _one_block(gen, M=12, N=40, D=5, sigma=0.1)
    sigma = 0.1
    rm, rl, rv = ref.posterior_stats(queries, data, sigma, exclude_index=src)
    mean, lse, var = posterior_mean(queries * scale, data * scale, sigma * scale, exclude_index=src, return_stats=True,
                                    precision=precision)
    torch.testing.assert_close(mean / scale, rm, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(lse, rl, rtol=1e-10, atol=1e-10)
    expected_var = rv * scale * scale  # inf or 0 where the variance itself leaves float64's range
    if torch.isfinite(expected_var).all() and (expected_var > 1e-290).all():
        torch.testing.assert_close(var, expected_var, rtol=1e-9, atol=0)
    else:
        assert not torch.isnan(var).any()
    d, i = knn(queries * scale, data * scale, 4, precision=precision)
    rd, ri = ref.knn(queries, data, 4)
    assert torch.equal(i, ri)
    assert not torch.isnan(d).any()


@pytest.mark.parametrize("precision", ["auto", "float64"])
def test_sigma_beyond_float64_is_an_error(precision, gen):
    """1/sigma^2 overflowing, or every logit of a query below -1.8e308: a ValueError naming sigma, not NaN."""
    queries, data, _ = _one_block(gen, M=4, N=10, D=3)
    with pytest.raises(ValueError, match="sigma = 1e-200 .* out of float64's range"):
        posterior_mean(queries, data, 1e-200, precision=precision)
    far = queries + 100.0  # squared distances ~1e4: logits ~ -1e4 / 2e-306
    with pytest.raises(ValueError, match="sigma = 1e-153 .*every logit"):
        posterior_mean(far, data, 1e-153, precision=precision)
    posterior_mean(queries, data, 1e-150, precision=precision)  # still representable: no error


@pytest.mark.parametrize("precision", ["auto", "float64"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_values_are_rejected_by_every_function(precision, bad, gen):
    """NaN / Inf in the data or the queries is a ValueError in posterior_mean, posterior_partial and knn
    alike (knn used to skip such rows silently while posterior_mean returned NaN)."""
    queries, data, _ = _one_block(gen, M=5, N=30, D=4)
    bad_data, bad_queries = data.clone(), queries.clone()
    bad_data[17, 2] = bad
    bad_queries[3, 1] = bad
    for name, q, d in (("data", queries, bad_data), ("queries", bad_queries, data)):
        for call in (lambda: posterior_mean(q, d, 0.5, precision=precision),
                     lambda: posterior_partial(q, d, 0.5, precision=precision, chunk_size=8),
                     lambda: knn(q, d, 3, precision=precision, chunk_size=8)):
            with pytest.raises(ValueError, match=f"{name} must be finite"):
                call()
