"""t-samplers for masked diffusion LMs (diffkernels.mdm.samplers): unbiasedness of the weighted
estimator, seeding and slicing over ranks and micro-batches, StraTS's strata, and P-POTS from the
grid estimate through the fit to the sampler."""

import math
import random
import sys

import pytest
import torch

from diffkernels.mdm import samplers as S
from diffkernels.mdm.samplers import (
    Clipped,
    EPRFit,
    LowDiscrepancy,
    PPOTSGrid,
    PPOTSSampler,
    Stratified,
    Uniform,
    estimate_ppots_grid,
    fit_epr,
)

F64 = torch.float64

# f, integral over [0, 1]
INTEGRANDS = {
    "one": (lambda t: torch.ones_like(t), 1.0),
    "t": (lambda t: t, 0.5),
    "t2": (lambda t: t * t, 1.0 / 3.0),
    "exp": (torch.exp, math.e - 1.0),
    "inv": (lambda t: 1.0 / (t + 0.1), math.log(11.0)),
}

# A density of the P-POTS family with a bump at 0 and growth towards 1 (unnormalised parameters).
TRUE_EPR = dict(a=2.0, r=1.5, b=0.5, q=3.0, A=0.3, kappa=1.2, m=2.5)
PEAKED_EPR = dict(a=0.2, r=2.0, b=6.0, q=14.0, A=0.5, kappa=1.5, m=3.0)


@pytest.fixture(autouse=True)
def one_thread():
    """The tensors here are tiny (hundreds of elements) and the tests call ops thousands of times;
    on a busy machine each OpenMP parallel region can then cost a scheduler tick (milliseconds)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def epr_unnormalised(t, a, r, b, q, A, kappa, m):
    return torch.sqrt(a * t**r + b * (1 - t) ** q + A**2 * torch.exp(2 * kappa * t**m))


def epr_fit(params) -> EPRFit:
    return EPRFit(**params, kl=0.0, r2=1.0, success=True, restarts=0)


def noisy_grid(rng: random.Random, T=20) -> PPOTSGrid:
    t = torch.linspace(1 / T, 1 - 1 / T, T - 1, dtype=F64)
    w = (1 + 5 * torch.exp(-8 * t)) * torch.tensor([1 + 0.1 * rng.random() for _ in range(T - 1)], dtype=F64)
    return PPOTSGrid(t=t, g=w, v=torch.zeros_like(w), w=w)


def fresh_seed() -> int:
    return random.getrandbits(64)


SAMPLER_FACTORIES = {
    "uniform": lambda: Uniform(),
    "stratified_sqrt": lambda: Stratified(),
    "stratified_k7": lambda: Stratified(7),
    "stratified_k7_noreweight": lambda: Stratified(7, reweight=False),
    "low_discrepancy": lambda: LowDiscrepancy(),
    "ppots_fit": lambda: PPOTSSampler.from_fit(epr_fit(PEAKED_EPR)),
    "ppots_fit_mix": lambda: PPOTSSampler.from_fit(epr_fit(TRUE_EPR), mix=0.3),
    "ppots_grid": lambda: PPOTSSampler.from_grid(noisy_grid(random.Random())),
    "ppots_grid_stratified": lambda: PPOTSSampler.from_grid(noisy_grid(random.Random()), stratify=True),
    "ppots_fit_stratified_k9": lambda: PPOTSSampler.from_fit(epr_fit(PEAKED_EPR), mix=0.1, stratify=True, k=9),
}
ALL_SAMPLERS = {**SAMPLER_FACTORIES, "clipped": lambda: Clipped(0.2, 0.7)}


def batch_estimates(sampler, f, batches=150, G=500, dtype=F64):
    """Per-batch estimates mean_i f(t_i) w_i over independent global batches (in float64)."""
    base = fresh_seed()
    est = []
    for b in range(batches):
        t, w = sampler.sample_global(G, base + b, dtype=dtype)
        est.append((f(t.double()) * w.double()).mean())
    return torch.stack(est)


# --- unbiasedness -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(SAMPLER_FACTORIES))
def test_weighted_mean_is_the_integral(name):
    sampler = SAMPLER_FACTORIES[name]()
    base = fresh_seed()
    draws = [sampler.sample_global(500, base + b, dtype=F64) for b in range(150)]
    for fname, (f, exact) in INTEGRANDS.items():
        est = torch.stack([(f(t) * w).mean() for t, w in draws])
        se = float(est.std() / math.sqrt(len(est)))
        err = abs(float(est.mean()) - exact)
        assert err <= 5 * se + 1e-10, f"{name}, f={fname}: |{float(est.mean())} - {exact}| > 5 * {se}"


def test_float32_output_is_also_unbiased():
    # the default dtype: t is rounded to float32, the weight comes from the float64 draw
    est = batch_estimates(PPOTSSampler.from_fit(epr_fit(PEAKED_EPR)), INTEGRANDS["exp"][0], batches=100,
                           dtype=torch.float32)
    assert abs(float(est.mean()) - (math.e - 1)) <= 5 * float(est.std()) / 10 + 1e-6


def test_clipped_has_its_documented_bias():
    t_min, t_max = 0.2, 0.7
    sampler = Clipped(t_min, t_max)
    for fname, (f, _) in INTEGRANDS.items():
        est = batch_estimates(sampler, f, batches=60)
        fine = torch.linspace(t_min, t_max, 20001, dtype=F64)
        window_mean = float(torch.trapezoid(f(fine), fine)) / (t_max - t_min)
        assert abs(float(est.mean()) - window_mean) <= 5 * float(est.std()) / math.sqrt(60) + 1e-10, fname
    # ... which is not the integral over [0, 1]
    est = batch_estimates(sampler, INTEGRANDS["t"][0], batches=20)
    assert abs(float(est.mean()) - 0.45) < 0.01 and abs(float(est.mean()) - 0.5) > 0.03
    t, w = sampler.sample(1000, fresh_seed(), dtype=F64)
    assert float(t.min()) >= t_min and float(t.max()) < t_max and bool((w == 1).all())


def test_stratification_reduces_variance():
    f = INTEGRANDS["exp"][0]
    var_uniform = float(batch_estimates(Uniform(), f, batches=100).var())
    var_strat = float(batch_estimates(Stratified(), f, batches=100).var())
    var_ld = float(batch_estimates(LowDiscrepancy(), f, batches=100).var())
    # sqrt(G) = 22 strata: the variance of a smooth f drops by about k^2
    assert var_strat < var_uniform / 50
    assert var_ld < var_strat / 50


# --- seeds, slicing, shapes -------------------------------------------------------------------


@pytest.mark.parametrize("name", list(ALL_SAMPLERS))
def test_same_seed_same_draw_and_different_seed_different_draw(name):
    sampler = ALL_SAMPLERS[name]()
    seed = fresh_seed()
    t1, w1 = sampler.sample(64, seed, rank=1, world_size=2)
    t2, w2 = sampler.sample(64, seed, rank=1, world_size=2)
    assert torch.equal(t1, t2) and torch.equal(w1, w2)
    t3, _ = sampler.sample(64, seed + 1, rank=1, world_size=2)
    assert not torch.equal(t1, t3)
    t4, _ = sampler.sample(64, seed, rank=0, world_size=2)  # another rank: another slice
    assert not torch.equal(t1, t4)


@pytest.mark.parametrize("name", list(ALL_SAMPLERS))
def test_slices_concatenate_to_the_global_draw(name):
    sampler = ALL_SAMPLERS[name]()
    seed = fresh_seed()
    n, world, micro = 7, 3, 2
    t_all, w_all = sampler.sample_global(n * world * micro, seed)
    parts = [sampler.sample(n, seed, rank=r, world_size=world, micro_batch=m, num_micro_batches=micro)
             for r in range(world) for m in range(micro)]
    assert torch.equal(torch.cat([p[0] for p in parts]), t_all)
    assert torch.equal(torch.cat([p[1] for p in parts]), w_all)
    # a plain single-process call is the whole global batch
    t_one, w_one = sampler.sample(n * world * micro, seed)
    assert torch.equal(t_one, t_all) and torch.equal(w_one, w_all)


def test_global_stratification_spans_ranks():
    # 4 ranks x 2 micro-batches x 8 = 64 draws, k = 8: each stratum holds exactly 8 of them
    seed = fresh_seed()
    t = torch.cat([Stratified().sample(8, seed, rank=r, world_size=4, micro_batch=m, num_micro_batches=2)[0]
                   for r in range(4) for m in range(2)])
    counts = torch.bincount((t.double() * 8).floor().long(), minlength=8)
    assert counts.tolist() == [8] * 8


DEVICES = ["cpu", torch.device("cpu"), "meta"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("name", list(ALL_SAMPLERS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_shapes_dtypes_range(name, dtype):
    sampler = ALL_SAMPLERS[name]()
    t, w = sampler.sample(33, fresh_seed(), rank=2, world_size=3, dtype=dtype)
    assert t.shape == (33,) and w.shape == (33,)
    assert t.dtype == dtype and w.dtype == dtype and t.device.type == "cpu"
    assert float(t.min()) >= 0 and float(t.max()) < 1
    assert bool((w > 0).all()) and bool(torch.isfinite(w).all())


@pytest.mark.parametrize("device", DEVICES, ids=str)
def test_device(device):
    for factory in ALL_SAMPLERS.values():
        t, w = factory().sample(10, fresh_seed(), device=device)
        assert t.device.type == torch.device(device).type and w.device.type == torch.device(device).type
    if torch.device(device).type != "meta":  # the draw does not depend on the device
        seed = fresh_seed()
        assert torch.equal(Uniform().sample(9, seed, device=device)[0].cpu(), Uniform().sample(9, seed)[0])


def test_t_rounding_up_to_one_is_kept_below_one():
    # a density concentrated at t -> 1: bfloat16 would round many draws up to 1.0
    sampler = PPOTSSampler([0.0, 0.99, 1.0], [1e-9, 1e-9, 1.0])
    t, _ = sampler.sample(2000, fresh_seed(), dtype=torch.bfloat16)
    assert float(t.max()) < 1.0 and float(t.min()) >= 0.98


# --- Stratified -------------------------------------------------------------------------------


@pytest.mark.parametrize("G,k", [(50, 7), (500, None), (64, 8), (10, 10), (10, 1), (1, None)])
def test_stratified_counts_and_weights(G, k):
    sampler = Stratified(k)
    kk = sampler.num_strata(G)
    assert kk == (k if k is not None else math.isqrt(G))
    t, w = sampler.sample_global(G, fresh_seed(), dtype=F64)
    stratum = (t * kk).floor().long()
    counts = torch.bincount(stratum, minlength=kk)
    base, extra = divmod(G, kk)
    assert sorted(counts.tolist()) == [base] * (kk - extra) + [base + 1] * extra
    assert torch.allclose(w, G / (kk * counts[stratum].double()), rtol=0, atol=1e-12)
    assert abs(float(w.sum()) - G) < 1e-9
    if extra == 0:
        assert bool((w == 1).all())
    # the weighted mean is exactly the stratified estimator sum_s (1/k) mean_{i in s} f(t_i)
    f = torch.exp(t)
    per_stratum = torch.zeros(kk, dtype=F64).index_add_(0, stratum, f) / counts
    assert abs(float((f * w).mean()) - float(per_stratum.mean())) < 1e-12


def test_stratified_remainder_goes_to_random_strata():
    heavy = set()
    for _ in range(20):
        t, w = Stratified(7).sample_global(50, fresh_seed(), dtype=F64)  # 50 = 7 * 7 + 1
        heavy.add(int((t[w < 1] * 7).floor()[0]))
    assert len(heavy) >= 3
    t, w = Stratified(7, reweight=False).sample_global(50, fresh_seed())
    assert bool((w == 1).all())


def test_low_discrepancy_one_draw_per_stratum():
    G = 97
    t, w = LowDiscrepancy().sample(G, fresh_seed(), dtype=F64)
    assert torch.bincount((t * G).floor().long(), minlength=G).tolist() == [1] * G
    assert bool((w == 1).all())
    assert not bool((t[1:] > t[:-1]).all())  # shuffled


# --- P-POTS: the sampler ----------------------------------------------------------------------


def test_ppots_from_fit_density():
    fit = epr_fit(TRUE_EPR)
    sampler = PPOTSSampler.from_fit(fit)
    x = torch.linspace(0, 1, 1001, dtype=F64)
    fine = torch.linspace(0, 1, 100001, dtype=F64)
    z = float(torch.trapezoid(epr_unnormalised(fine, **TRUE_EPR), fine))
    assert torch.allclose(sampler.pdf(x), epr_unnormalised(x, **TRUE_EPR) / z, rtol=1e-5)
    assert abs(float(sampler.cdf(1.0)) - 1) < 1e-12 and float(sampler.cdf(0.0)) == 0.0
    assert float(sampler.pdf(-0.1)) == 0.0 and float(sampler.pdf(1.1)) == 0.0
    u = torch.rand(1000, dtype=F64)
    assert torch.allclose(sampler.cdf(sampler.icdf(u)), u, rtol=0, atol=1e-12)
    mixed = PPOTSSampler.from_fit(fit, mix=0.25)
    assert torch.allclose(mixed.pdf(x), 0.75 * sampler.pdf(x) + 0.25, rtol=1e-10)
    uniform = PPOTSSampler.from_fit(fit, mix=1.0)
    assert torch.allclose(uniform.pdf(x), torch.ones_like(x))


def test_ppots_from_grid_is_piecewise_linear_with_flat_ends():
    grid = noisy_grid(random.Random())
    sampler = PPOTSSampler.from_grid(grid)
    ratio = sampler.pdf(grid.t) / grid.w
    assert torch.allclose(ratio, ratio[0].expand_as(ratio), rtol=1e-12)
    assert float(sampler.pdf(0.0)) == pytest.approx(float(sampler.pdf(grid.t[0])), rel=1e-12)
    assert float(sampler.pdf(0.5 * grid.t[0])) == pytest.approx(float(sampler.pdf(grid.t[0])), rel=1e-12)
    assert float(sampler.pdf(1.0)) == pytest.approx(float(sampler.pdf(grid.t[-1])), rel=1e-12)
    mid = 0.5 * (grid.t[3] + grid.t[4])
    assert float(sampler.pdf(mid)) == pytest.approx(0.5 * float(sampler.pdf(grid.t[3]) + sampler.pdf(grid.t[4])))
    fine = torch.linspace(0, 1, 200001, dtype=F64)
    assert float(torch.trapezoid(sampler.pdf(fine), fine)) == pytest.approx(1.0, abs=1e-8)


def test_ppots_weight_is_one_over_the_sampled_density():
    sampler = PPOTSSampler.from_fit(epr_fit(PEAKED_EPR), mix=0.05)
    t, w = sampler.sample(4000, fresh_seed(), dtype=F64)
    assert torch.allclose(w, 1.0 / sampler.pdf(t), rtol=1e-12)
    assert float(w.max()) <= 1 / 0.05 + 1e-9  # mixing bounds the weights


def test_ppots_without_importance_weights_is_the_documented_biased_objective():
    """importance_weights=False: the same t as the unbiased sampler, weight 1 (or the stratum weight),
    so the weighted mean estimates E_{t~p}[f(t)] = integral f p, not integral f."""
    weighted = PPOTSSampler.from_fit(epr_fit(PEAKED_EPR), mix=0.05)
    plain = PPOTSSampler.from_fit(epr_fit(PEAKED_EPR), mix=0.05, importance_weights=False)
    seed = fresh_seed()
    t1, w1 = weighted.sample(4000, seed, dtype=F64)
    t0, w0 = plain.sample(4000, seed, dtype=F64)
    assert torch.equal(t0, t1) and torch.equal(w0, torch.ones_like(w0))
    assert not torch.allclose(w1, torch.ones_like(w1))
    n = 200_000
    t, w = plain.sample(n, seed, dtype=F64)
    f = lambda x: x * x  # noqa: E731
    fine = torch.linspace(0, 1, 200001, dtype=F64)
    biased = float(torch.trapezoid(f(fine) * plain.pdf(fine), fine))  # float64 reference of E_p[f]
    se = float((f(t) * w).std()) / math.sqrt(n)
    assert float((f(t) * w).mean()) == pytest.approx(biased, abs=5 * se)
    assert abs(biased - 1 / 3) > 20 * se  # and that is measurably not the ELBO's integral of f
    # with stratification: the stratum weights stay (they correct the allocation), 1/p goes
    G, k = 10, 3
    ts, ws = PPOTSSampler.from_fit(epr_fit(TRUE_EPR), stratify=True, k=k, importance_weights=False).sample_global(G, seed)
    tw, ww = PPOTSSampler.from_fit(epr_fit(TRUE_EPR), stratify=True, k=k).sample_global(G, seed)
    p = PPOTSSampler.from_fit(epr_fit(TRUE_EPR)).pdf(ts.double())
    assert torch.equal(ts, tw) and torch.allclose(ws.double(), ww.double() * p, rtol=1e-6)
    assert sorted(set(ws.tolist())) == pytest.approx(sorted({G / (k * 4), G / (k * 3)}))
    assert "importance_weights=False" in repr(plain) and "importance_weights" not in repr(weighted)
    with pytest.raises(TypeError, match="importance_weights"):
        PPOTSSampler([0.0, 1.0], [1.0, 1.0], importance_weights=1)


def test_ppots_reference_recipe_clamps_each_sequence_at_10():
    """The documented recipe (t ~ p, weight 1, row_clamp=10) against a plain float64 computation."""
    from diffkernels.mdm import mask_tokens, masked_diffusion_loss

    B, L, V, MASK = 6, 9, 7, 6
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, V - 1, (B, L), generator=gen)
    logits = (torch.randn(B, L, V, generator=gen, dtype=F64) * 6).float()
    t, w = PPOTSSampler.from_fit(epr_fit(TRUE_EPR), importance_weights=False).sample(B, 11)
    assert torch.equal(w, torch.ones(B))
    p = (1 - 1e-3) * t + 1e-3
    masked = mask_tokens(ids, p, 11, mask_id=MASK)
    loss = masked_diffusion_loss(masked, ids, logits=logits, row_clamp=10.0)
    ce = torch.nn.functional.cross_entropy(logits.double().transpose(1, 2), ids, reduction="none")
    per_seq = (masked.masked.double() * ce / p.double()[:, None]).sum(1) / L
    assert (per_seq > 10).any() and (per_seq < 10).any()  # the clamp is exercised both ways
    assert float(loss) == pytest.approx(float(per_seq.clamp(max=10.0).mean()), rel=1e-5)


@pytest.mark.parametrize("make", [
    lambda: PPOTSSampler.from_fit(epr_fit(PEAKED_EPR)),
    lambda: PPOTSSampler.from_grid(noisy_grid(random.Random()), mix=0.2),
    lambda: PPOTSSampler.from_fit(epr_fit(TRUE_EPR), stratify=True),
], ids=["fit", "grid_mix", "fit_stratified"])
def test_ppots_samples_follow_the_pdf(make):
    sampler = make()
    n, bins = 100_000, 40
    t, _ = sampler.sample(n, fresh_seed(), dtype=F64)
    edges = torch.linspace(0, 1, bins + 1, dtype=F64)
    expected = n * (sampler.cdf(edges[1:]) - sampler.cdf(edges[:-1]))
    observed = torch.histc(t, bins=bins, min=0, max=1).double()
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    assert chi2 < (bins - 1) + 8 * math.sqrt(2 * (bins - 1)), chi2  # p < 1e-8 under the null
    ts, _ = torch.sort(t)
    ks = float((torch.arange(1, n + 1, dtype=F64) / n - sampler.cdf(ts)).abs().max())
    assert ks < 3 / math.sqrt(n), ks


def test_ppots_weighted_estimator_beats_uniform_for_a_loss_shaped_like_p():
    # loss = C p(t) (1 + 0.1 z): importance weighting by 1/p leaves only the z noise
    sampler = PPOTSSampler.from_fit(epr_fit(PEAKED_EPR))
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed % 2**63)

    def loss(t):
        return 3.0 * sampler.pdf(t) * (1 + 0.1 * torch.randn(t.shape, generator=gen, dtype=F64))

    t, w = sampler.sample(100_000, seed, dtype=F64)
    tu, wu = Uniform().sample(100_000, seed, dtype=F64)
    est_ppots, est_uniform = loss(t) * w, loss(tu) * wu
    assert float(est_ppots.mean()) == pytest.approx(3.0, rel=0.01)
    assert float(est_uniform.mean()) == pytest.approx(3.0, rel=0.05)
    assert float(est_ppots.var()) < 0.05 * float(est_uniform.var())


# --- P-POTS: the grid estimate ----------------------------------------------------------------


def g_true(t):
    return 1.0 + 2.0 * t


def v_true(t):
    return 0.5 + 4.0 * (1.0 - t) ** 2


def synthetic_loss(example, t, seed):
    """g(t) + e_x + sqrt(v(t)) z: mean over masks g(t) + e_x, variance over masks v(t)."""
    return g_true(t) + float(example) + math.sqrt(v_true(t)) * random.Random(seed).gauss(0.0, 1.0)


def test_estimate_ppots_grid_recovers_g_and_v():
    T, a, c = 11, 20, 20
    examples = torch.empty(40, dtype=F64).uniform_(-0.2, 0.2)
    grid = estimate_ppots_grid(synthetic_loss, examples, T=T, a=a, c=c, seed=fresh_seed(), progress=False)
    assert torch.allclose(grid.t, torch.linspace(1 / T, 1 - 1 / T, T - 1, dtype=F64))
    v = v_true(grid.t)
    # g_hat - g = the mean offset of the chosen examples (the same at every t) + mask noise
    offset = grid.g - g_true(grid.t)
    assert bool(((offset - offset.mean()).abs() <= 5 * torch.sqrt(v / (a * c)) + 1e-12).all())
    assert abs(float(offset.mean())) <= 0.2
    # v_hat: mean of a unbiased variances, each with relative s.d. sqrt(2 / (c - 1))
    rel_sd = math.sqrt(2 / (c - 1) / a)
    ratio = grid.v / v
    assert bool(((ratio - 1).abs() <= 5 * rel_sd).all()), ratio
    assert abs(float(ratio.mean()) - 1) <= 5 * rel_sd / math.sqrt(T - 1)
    assert torch.allclose(grid.w, torch.sqrt(grid.g**2 + grid.v))


def test_estimate_ppots_grid_calls_and_determinism():
    calls = []

    def loss_fn(example, t, seed):
        calls.append((example, t, seed))
        return torch.tensor(synthetic_loss(example, t, seed), dtype=F64)  # a 0-d tensor is accepted

    examples = list(range(100, 130))
    seed = fresh_seed()
    grid = estimate_ppots_grid(loss_fn, examples, T=6, a=4, c=3, seed=seed, progress=False)
    assert len(calls) == 5 * 4 * 3
    assert len({s for _, _, s in calls}) == len(calls)  # a fresh mask for every evaluation
    per_t = {}
    for ex, t, _ in calls:
        per_t.setdefault(t, set()).add(ex)
    assert sorted(per_t) == pytest.approx(grid.t.tolist())
    chosen = next(iter(per_t.values()))
    assert len(chosen) == 4 and all(s == chosen for s in per_t.values())  # the same examples at every t
    again = estimate_ppots_grid(synthetic_loss, examples, T=6, a=4, c=3, seed=seed, progress=False)
    for field in ("t", "g", "v", "w"):
        assert torch.equal(getattr(grid, field), getattr(again, field))
    other = estimate_ppots_grid(synthetic_loss, examples, T=6, a=4, c=3, seed=seed + 1, progress=False)
    assert not torch.equal(grid.g, other.g)


def test_estimate_ppots_grid_progress_bar(capsys):
    estimate_ppots_grid(synthetic_loss, [0.0, 0.1], T=3, a=2, c=2, progress=True)
    assert "P-POTS grid" in capsys.readouterr().err


# --- P-POTS: the fit --------------------------------------------------------------------------


def test_fit_epr_recovers_a_known_density():
    pytest.importorskip("scipy")
    t = torch.linspace(1 / 70, 1 - 1 / 70, 69, dtype=F64)
    w = epr_unnormalised(t, **TRUE_EPR) * 7.3  # the scale is irrelevant
    fit = fit_epr(PPOTSGrid(t=t, g=w, v=torch.zeros_like(w), w=w), restarts=4, seed=fresh_seed())
    assert fit.kl < 1e-6 and fit.r2 > 0.9999 and fit.restarts == 4
    for name in ("a", "b", "A", "kappa", "r", "q", "m"):
        assert math.isfinite(getattr(fit, name)) and getattr(fit, name) >= 0
    assert fit.m > 1
    x = torch.linspace(0, 1, 2001, dtype=F64)
    assert float(torch.trapezoid(fit.pdf(x), x)) == pytest.approx(1.0, abs=1e-6)
    truth = epr_unnormalised(x, **TRUE_EPR)
    truth = truth / float(torch.trapezoid(truth, x))
    assert float((fit.pdf(x) / truth - 1).abs().max()) < 0.02
    assert set(fit.params) == {"a", "b", "A", "kappa", "r", "q", "m"}


def test_fit_epr_on_noisy_estimates():
    pytest.importorskip("scipy")
    t = torch.linspace(1 / 70, 1 - 1 / 70, 69, dtype=F64)
    truth = epr_unnormalised(t, **PEAKED_EPR)
    w = truth * (1 + 0.03 * torch.randn(69, dtype=F64))
    fit = fit_epr(PPOTSGrid(t=t, g=w, v=torch.zeros_like(w), w=w), restarts=4, seed=fresh_seed())
    assert fit.kl < 2e-3 and fit.r2 > 0.98
    p = fit.pdf(t)
    assert float((p / p.sum() / (truth / truth.sum()) - 1).abs().max()) < 0.1


def test_ppots_end_to_end_reduces_variance():
    """Grid estimate -> fit -> sampler, for a loss whose masking noise explodes at small t (as the
    1/t-weighted MDM loss does): the weighted estimator has a lower variance than uniform t."""
    pytest.importorskip("scipy")

    def g(t):
        return 1.0 - 0.5 * t

    def v(t):
        return 0.5 / (t + 0.01)

    def loss_fn(example, t, seed):
        return g(t) + math.sqrt(v(t)) * random.Random(seed).gauss(0.0, 1.0)

    seed = fresh_seed()
    grid = estimate_ppots_grid(loss_fn, [None] * 16, T=30, a=16, c=16, seed=seed, progress=False)
    fit = fit_epr(grid, restarts=4, seed=seed)
    assert fit.r2 > 0.6  # a = c = 16 leaves visible noise on the grid; the variance is the point
    samplers = {"fit": PPOTSSampler.from_fit(fit, mix=0.05), "grid": PPOTSSampler.from_grid(grid, mix=0.05)}
    gen = torch.Generator().manual_seed(seed % 2**63)
    n = 200_000

    def weighted_losses(sampler):
        t, w = sampler.sample(n, seed, dtype=F64)
        return (g(t) + torch.sqrt(v(t)) * torch.randn(n, generator=gen, dtype=F64)) * w

    var_uniform = float(weighted_losses(Uniform()).var())
    # variances: uniform int (g^2 + v) - (int g)^2 = 2.33; optimal (int sqrt(g^2 + v))^2 - (int g)^2 = 1.69
    assert var_uniform == pytest.approx(2.33, rel=0.1)
    for name, sampler in samplers.items():
        est = weighted_losses(sampler)
        assert float(est.mean()) == pytest.approx(0.75, abs=6 * float(est.std()) / math.sqrt(n)), name
        assert 1.6 < float(est.var()) < 0.9 * var_uniform, name


def test_fit_epr_without_scipy(monkeypatch):
    monkeypatch.setitem(sys.modules, "scipy", None)
    monkeypatch.setitem(sys.modules, "scipy.optimize", None)
    grid = noisy_grid(random.Random())
    with pytest.raises(ImportError, match="pip install scipy"):
        fit_epr(grid)
    PPOTSSampler.from_grid(grid).sample(4, 0)  # the raw-grid sampler does not need scipy


# --- bad arguments ----------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(n=0), ValueError, "n must be >= 1"),
    (dict(n=-3), ValueError, "n must be >= 1"),
    (dict(n=2.0), TypeError, "n must be a Python int"),
    (dict(n=True), TypeError, "n must be a Python int"),
    (dict(seed=1.5), TypeError, "seed must be an integer"),
    (dict(seed=None), TypeError, "seed must be an integer"),
    (dict(world_size=0), ValueError, "world_size must be >= 1"),
    (dict(rank=-1), ValueError, "rank must be >= 0"),
    (dict(rank=2, world_size=2), ValueError, "rank must be < world_size=2"),
    (dict(num_micro_batches=0), ValueError, "num_micro_batches must be >= 1"),
    (dict(micro_batch=3, num_micro_batches=3), ValueError, "micro_batch must be < num_micro_batches=3"),
    (dict(dtype=torch.int64), TypeError, "dtype must be a floating-point"),
    (dict(dtype="float32"), TypeError, "dtype must be a floating-point"),
])
def test_sample_bad_arguments(kwargs, exc, match):
    args = dict(n=4, seed=0)
    args.update(kwargs)
    n, seed = args.pop("n"), args.pop("seed")
    for factory in ALL_SAMPLERS.values():
        with pytest.raises(exc, match=match):
            factory().sample(n, seed, **args)


def test_constructor_bad_arguments():
    with pytest.raises(ValueError, match="k must be >= 1"):
        Stratified(0)
    with pytest.raises(TypeError, match="k must be a Python int"):
        Stratified(2.0)
    with pytest.raises(TypeError, match="reweight must be a bool"):
        Stratified(2, reweight=1)
    with pytest.raises(ValueError, match=r"k must be <= the global batch size G=6"):
        Stratified(7).sample(3, 0, world_size=2)
    with pytest.raises(ValueError, match=r"k must be <= the global batch size G=6"):
        PPOTSSampler.from_grid(noisy_grid(random.Random()), stratify=True, k=7).sample(6, 0)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        Uniform().sample_global(0, 0)
    for t_min, t_max, exc, match in [(0.5, 0.5, ValueError, "t_min must be < t_max"),
                                     (0.6, 0.2, ValueError, "t_min must be < t_max"),
                                     (-0.1, 0.5, ValueError, "t_min must lie in"),
                                     (0.0, 1.5, ValueError, "t_max must lie in"),
                                     (float("nan"), 0.5, ValueError, "t_min must lie in"),
                                     ("0", 0.5, TypeError, "t_min must be a Python float")]:
        with pytest.raises(exc, match=match):
            Clipped(t_min, t_max)
    fit, grid = epr_fit(TRUE_EPR), noisy_grid(random.Random())
    for mix in (-0.1, 1.1, float("nan")):
        with pytest.raises(ValueError, match="mix must lie in"):
            PPOTSSampler.from_fit(fit, mix=mix)
        with pytest.raises(ValueError, match="mix must lie in"):
            PPOTSSampler.from_grid(grid, mix=mix)
    with pytest.raises(ValueError, match="needs stratify=True"):
        PPOTSSampler.from_fit(fit, k=4)
    with pytest.raises(TypeError, match="fit must be an EPRFit"):
        PPOTSSampler.from_fit(grid)
    with pytest.raises(TypeError, match="grid must be a PPOTSGrid"):
        PPOTSSampler.from_grid(fit)
    with pytest.raises(ValueError, match="knots must increase strictly from 0 to 1"):
        PPOTSSampler([0.1, 1.0], [1.0, 1.0])
    with pytest.raises(ValueError, match="knots must increase strictly from 0 to 1"):
        PPOTSSampler([0.0, 0.5, 0.5, 1.0], [1.0, 1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="same length"):
        PPOTSSampler([0.0, 1.0], [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="values must be non-negative"):
        PPOTSSampler([0.0, 1.0], [1.0, -1.0])
    with pytest.raises(ValueError, match="must not all be zero"):
        PPOTSSampler([0.0, 1.0], [0.0, 0.0])
    with pytest.raises(ValueError, match="use mix > 0"):
        PPOTSSampler([0.0, 0.5, 1.0], [0.0, 1.0, 1.0])
    PPOTSSampler([0.0, 0.5, 1.0], [0.0, 1.0, 1.0], mix=0.1)  # fine with a floor
    with pytest.raises(ValueError, match="finite"):
        PPOTSSampler([0.0, 1.0], [1.0, float("inf")])


def test_grid_bad_arguments():
    t = torch.tensor([0.25, 0.5, 0.75])
    w = torch.ones(3)
    with pytest.raises(ValueError, match="same length"):
        PPOTSGrid(t, w, w, torch.ones(2))
    with pytest.raises(ValueError, match="strictly increasing inside"):
        PPOTSGrid(torch.tensor([0.5, 0.25, 0.75]), w, w, w)
    with pytest.raises(ValueError, match="strictly increasing inside"):
        PPOTSGrid(torch.tensor([0.0, 0.5, 0.75]), w, w, w)
    with pytest.raises(ValueError, match="one-dimensional"):
        PPOTSGrid(t[None], w[None], w[None], w[None])
    with pytest.raises(ValueError, match="finite"):
        PPOTSGrid(t, w, w, torch.tensor([1.0, float("nan"), 1.0]))
    zero = PPOTSGrid(t, w, w, torch.tensor([1.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match="use mix > 0"):
        PPOTSSampler.from_grid(zero)
    PPOTSSampler.from_grid(zero, mix=0.1)
    with pytest.raises(ValueError, match="grid.w must be positive"):
        fit_epr(zero)
    with pytest.raises(ValueError, match="restarts must be >= 1"):
        fit_epr(PPOTSGrid(t, w, w, w), restarts=0)
    with pytest.raises(TypeError, match="grid must be a PPOTSGrid"):
        fit_epr((t, w))

    ex = [0.0, 0.1, 0.2]
    for kwargs, exc, match in [(dict(T=1), ValueError, "T must be >= 2"), (dict(a=0), ValueError, "a must be >= 1"),
                               (dict(c=1), ValueError, "c must be >= 2"),
                               (dict(a=4), ValueError, r"a must be <= len\(examples\)=3"),
                               (dict(seed="0"), TypeError, "seed must be an integer")]:
        with pytest.raises(exc, match=match):
            estimate_ppots_grid(synthetic_loss, ex, **{"T": 4, "a": 2, "c": 2, "progress": False, **kwargs})
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        estimate_ppots_grid(None, ex, T=4, a=2, c=2, progress=False)
    with pytest.raises(TypeError, match="examples must support len"):
        estimate_ppots_grid(synthetic_loss, iter(ex), T=4, a=2, c=2, progress=False)
    with pytest.raises(ValueError, match="loss_fn returned nan"):
        estimate_ppots_grid(lambda e, t, s: float("nan"), ex, T=4, a=2, c=2, progress=False)
    with pytest.raises(TypeError, match="loss_fn must return a float"):
        estimate_ppots_grid(lambda e, t, s: "1", ex, T=4, a=2, c=2, progress=False)
    with pytest.raises(TypeError, match="loss_fn must return a float"):
        estimate_ppots_grid(lambda e, t, s: torch.ones(2), ex, T=4, a=2, c=2, progress=False)


def test_public_names():
    import diffkernels.mdm as mdm
    from diffkernels.mdm import ppots

    for module in (S, ppots):
        for name in module.__all__:
            assert getattr(mdm, name) is getattr(module, name)
    for name in ppots.__all__:  # P-POTS stays importable from the samplers module
        assert getattr(S, name) is getattr(ppots, name)
