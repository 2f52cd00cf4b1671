"""variance_decomposition: the nested A/B/C estimator against models whose A, B and C are known in
closed form (loss values, weighted losses, gradients, projected gradients, real masks), its
standard errors against the spread of replications, and bad-input errors."""

import math

import pytest
import torch

from diffkernels.mdm.masking import mask_tokens
from diffkernels.mdm.samplers import Clipped
from diffkernels.mdm.variance import nested_variance_components, variance_decomposition

Z = 4.5  # tolerance in standard errors (several checks per test, random data in every run)


def _normal(seed: int) -> float:
    """The mask noise: one N(0, 1) draw that is a deterministic function of the mask seed."""
    return float(torch.randn(1, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))


def _check(est, truth, names="ABC", z=Z):
    for k in names:
        value, se, target = getattr(est, k), getattr(est, k + "_se"), truth[k]
        assert abs(value - target) <= z * se + 1e-9, (k, value, target, se)


def _seed(gen) -> int:
    return int(torch.randint(0, 2**62, (1,), generator=gen))


# --- loss values ------------------------------------------------------------------------------


def additive_model(sigma_a, beta):
    """l = x + beta (t - 1/2) + sigma_a eps(seed): A = sigma_a^2, B = beta^2/12 (t ~ U(0,1)), C = Var x."""
    def loss_fn(x, t, seed, mask_mode):
        assert mask_mode == "standard"
        return float(x) + beta * (t - 0.5) + sigma_a * _normal(seed)
    return loss_fn


def test_additive_model_known_components(gen):
    sigma_a, beta, sigma_c = 0.7, 3.0, 1.3
    data = torch.randn(5000, generator=gen, dtype=torch.float64) * sigma_c
    est = variance_decomposition(additive_model(sigma_a, beta), data, n_x=200, n_t=8, n_m=4, seed=_seed(gen),
                                 progress=False)
    truth = dict(A=sigma_a**2, B=beta**2 / 12, C=float(data.var(unbiased=False)))
    _check(est, truth)
    assert abs(est.total - sum(truth.values())) <= Z * est.total_se
    assert est.values.shape == (200, 8, 4) and est.t.shape == (200, 8) and est.indices.shape == (200,)
    assert torch.all(est.weight == 1) and torch.all((est.t >= 0) & (est.t < 1))
    assert est.grad is None
    # The raw sample reproduces the estimate, and the loss is l(data[index], t, seed).
    again = nested_variance_components(est.values)
    assert again.A == pytest.approx(est.A) and again.C_se == pytest.approx(est.C_se)
    resid = est.values - data[est.indices][:, None, None] - beta * (est.t[:, :, None] - 0.5)
    assert resid.std().item() == pytest.approx(sigma_a, rel=0.1)


def test_standard_errors_match_the_spread_of_replications(gen):
    """Independent replications: the reported SE is the spread of the estimates (within a factor
    of 2), and the estimates average to the truth (unbiased)."""
    sigma_a, beta, sigma_c = 1.0, 4.0, 1.0
    data = torch.randn(4000, generator=gen, dtype=torch.float64) * sigma_c
    truth = dict(A=sigma_a**2, B=beta**2 / 12, C=float(data.var(unbiased=False)))
    base = _seed(gen)
    reps = [variance_decomposition(additive_model(sigma_a, beta), data, n_x=30, n_t=4, n_m=3, seed=base + r,
                                   progress=False) for r in range(30)]
    for k in "ABC":
        est = torch.tensor([getattr(r, k) for r in reps], dtype=torch.float64)
        se = torch.tensor([getattr(r, k + "_se") for r in reps], dtype=torch.float64)
        spread, reported = float(est.std()), float(se.pow(2).mean().sqrt())
        assert 0.5 < reported / spread < 2.0, (k, reported, spread)
        assert abs(float(est.mean()) - truth[k]) <= Z * spread / math.sqrt(len(reps)), (k, float(est.mean()), truth[k])


class SquareRootSampler:
    """t = u^2 (density 1/(2 sqrt t)), weight 1/p(t) = 2 sqrt(t): an importance sampler."""

    def sample(self, n, seed):
        u = torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        return u * u, 2 * u


def test_weighted_loss_under_importance_sampling(gen):
    """The decomposed value is l * w. With t = u^2, w = 2 sqrt t and l = x + beta (t - 1/2) + sigma_a eps:
    A = 4/3 sigma_a^2, B = E[x^2]/3 + 4 beta E[x]/15 + 11 beta^2/105, C = Var x (E_t of l w is x)."""
    sigma_a, beta = 0.8, 3.0
    data = 1.0 + torch.randn(5000, generator=gen, dtype=torch.float64)
    est = variance_decomposition(additive_model(sigma_a, beta), data, t_sampler=SquareRootSampler(), n_x=200, n_t=8,
                                 n_m=4, seed=_seed(gen), progress=False)
    m1, m2 = float(data.mean()), float((data**2).mean())
    truth = dict(A=4 / 3 * sigma_a**2, B=m2 / 3 + 4 * beta * m1 / 15 + 11 * beta**2 / 105,
                 C=float(data.var(unbiased=False)))
    _check(est, truth)
    assert torch.allclose(est.weight, 2 * est.t.sqrt())


def test_real_masks_standard_and_mirror(gen):
    """l = (1/L) sum_i c_i X_i with the masks of mask_tokens, X_i = m_i / p (standard) or
    (m1_i + m2_i) / (2p) (MIRROR). Every token is eligible, so E[l | x, t] = mean(c): B = 0,
    C = Var_x mean(c), A = E_x[sum c^2] / L^2 * E_t Var X(p), with Var X = (1 - p)/p (standard) and
    (1 - 2p)/(2p) for p <= 1/2, (2p - 1)(2 - 2p)/(4p^2) above (MIRROR)."""
    L, V, eps = 24, 10, 1e-3
    data = [(torch.randint(0, V, (L,), generator=gen), torch.rand(L, generator=gen, dtype=torch.float64) * 2)
            for _ in range(50)]

    def loss_fn(x, t, seed, mask_mode):
        ids, cost = x
        out = mask_tokens(ids[None], (1 - eps) * t + eps, seed, mask_id=V, mode=mask_mode)
        rows = (out.weights.double() * cost).sum(1) * out.row_weight.double()
        return float(rows.sum()) / L

    grid = torch.linspace(0.2, 1.0, 400_001, dtype=torch.float64)
    p = ((1 - eps) * grid + eps)
    mirror_var = torch.where(p <= 0.5, (1 - 2 * p) / (2 * p), (2 * p - 1) * (2 - 2 * p) / (4 * p * p))
    mean_var = {"standard": torch.trapezoid((1 - p) / p, grid) / 0.8, "mirror": torch.trapezoid(mirror_var, grid) / 0.8}
    sum_c2 = sum(float((c**2).sum()) for _, c in data) / len(data)
    means = torch.tensor([float(c.mean()) for _, c in data], dtype=torch.float64)
    seed = _seed(gen)
    got = {}
    for mode in ("standard", "mirror"):
        est = variance_decomposition(loss_fn, data, t_sampler=Clipped(0.2, 1.0), mask_mode=mode, n_x=40, n_t=4,
                                     n_m=4, seed=seed, progress=False)
        _check(est, dict(A=sum_c2 / L**2 * float(mean_var[mode]), B=0.0, C=float(means.var(unbiased=False))))
        got[mode] = est
    # Same seed: same examples and rates for both modes, so the difference is MIRROR's alone.
    assert torch.equal(got["standard"].t, got["mirror"].t)
    assert got["mirror"].A < got["standard"].A


# --- gradients --------------------------------------------------------------------------------


D_W, D_B = (2, 3), 2  # the linear model's parameters: a (2, 3) matrix and a (2,) vector


def linear_setup(gen):
    """l = <theta, z> with z = x + beta (t - 1/2) u + sigma_a eps (8-dim): the gradient is z, so
    A = 8 sigma_a^2, B = beta^2 ||u||^2 / 12, C = sum_d Var x_d; the loss value has
    A = sigma_a^2 ||theta||^2, B = beta^2 <theta, u>^2 / 12, C = Var <theta, x>."""
    P = 8
    sigma_a, beta = 0.6, 2.0
    scales = torch.linspace(0.5, 1.5, P, dtype=torch.float64)
    data = torch.randn(3000, P, generator=gen, dtype=torch.float64) * scales
    u = torch.randn(P, generator=gen, dtype=torch.float64)
    W = torch.randn(*D_W, generator=gen, dtype=torch.float64).requires_grad_()
    b = torch.randn(D_B, generator=gen, dtype=torch.float64).requires_grad_()
    unused = torch.zeros(3, dtype=torch.float64, requires_grad=True)  # gets no gradient: counts as zeros
    calls = []

    def z_of(x, t, seed):
        g = torch.Generator().manual_seed(seed)
        return x + beta * (t - 0.5) * u + sigma_a * torch.randn(P, generator=g, dtype=torch.float64)

    def loss_fn(x, t, seed, mask_mode):
        calls.append((x, t, seed))
        theta = torch.cat([W.reshape(-1), b])
        return (theta * z_of(x, t, seed)).sum()

    theta = torch.cat([W.reshape(-1), b]).detach()
    grad_truth = dict(A=P * sigma_a**2, B=beta**2 * float(u @ u) / 12,
                      C=float(data.var(dim=0, unbiased=False).sum()))
    loss_truth = dict(A=sigma_a**2 * float(theta @ theta), B=beta**2 * float(theta @ u) ** 2 / 12,
                      C=float((data @ theta).var(unbiased=False)))
    return dict(data=data, params=[W, b, unused], loss_fn=loss_fn, calls=calls, z_of=z_of, P=P,
                grad_truth=grad_truth, loss_truth=loss_truth)


def test_gradient_components_linear_model(gen):
    s = linear_setup(gen)
    n_x, n_t, n_m = 100, 4, 3
    est = variance_decomposition(s["loss_fn"], s["data"], n_x=n_x, n_t=n_t, n_m=n_m, seed=_seed(gen), grad=True,
                                 params=s["params"], progress=False)
    assert est.grad_dim == s["P"] + 3 and not est.projected
    _check(est.grad, s["grad_truth"])
    _check(est, s["loss_truth"])
    # The streamed per-example reduction equals the estimator on the full array of gradients,
    # rebuilt independently from the recorded calls (the gradient of <theta, z> is z).
    z = torch.stack([s["z_of"](*c) for c in s["calls"]]).view(n_x, n_t, n_m, s["P"])
    brute = nested_variance_components(torch.cat([z, torch.zeros(n_x, n_t, n_m, 3, dtype=z.dtype)], dim=-1))
    for k in ("A", "B", "C", "total", "A_se", "B_se", "C_se", "total_se"):
        assert getattr(est.grad, k) == pytest.approx(getattr(brute, k), rel=1e-10, abs=1e-12), k


def test_projected_gradients_are_unbiased(gen):
    """Same nested sample, many sketches: the projected estimates average to the exact ones."""
    s = linear_setup(gen)
    kw = dict(n_x=4, n_t=2, n_m=2, seed=_seed(gen), grad=True, params=s["params"], progress=False)
    exact = variance_decomposition(s["loss_fn"], s["data"], **kw).grad
    base = _seed(gen)
    reps = [variance_decomposition(s["loss_fn"], s["data"], num_projections=3, projection_seed=base + r, **kw)
            for r in range(80)]
    assert all(r.projected and r.grad_dim == 3 for r in reps)
    for k in ("A", "B", "C", "total"):
        est = torch.tensor([getattr(r.grad, k) for r in reps], dtype=torch.float64)
        assert abs(float(est.mean()) - getattr(exact, k)) <= Z * float(est.std()) / math.sqrt(len(reps)), k
    # A sketch is a deterministic function of its seed, and the loss values do not depend on it.
    again = variance_decomposition(s["loss_fn"], s["data"], num_projections=3, projection_seed=base, **kw)
    assert again.grad.A == reps[0].grad.A and torch.equal(again.values, reps[0].values)


# --- the estimator on its own -----------------------------------------------------------------


def test_nested_components_match_a_direct_computation(gen):
    """The formulas of docs/METHODS.md section 2.2 and a jackknife by explicit deletion, written out with loops."""
    y = torch.randn(7, 4, 3, generator=gen, dtype=torch.float64) + torch.randn(7, 1, 1, generator=gen,
                                                                                  dtype=torch.float64)

    def direct(y):
        n_x, n_t, n_m = y.shape
        s_a = sum(float(y[i, j].var()) for i in range(n_x) for j in range(n_t)) / (n_x * n_t)
        s_b = sum(float(y[i].mean(1).var()) for i in range(n_x)) / n_x
        s_c = float(y.mean((1, 2)).var())
        A, B, C = s_a, s_b - s_a / n_m, s_c - s_b / n_t
        return [A, B, C, A + B + C]

    full = direct(y)
    loo = torch.tensor([direct(torch.cat([y[:i], y[i + 1:]])) for i in range(7)], dtype=torch.float64)
    se = ((6 / 7) * ((loo - loo.mean(0)) ** 2).sum(0)).sqrt()
    got = nested_variance_components(y)
    for n, k in enumerate(("A", "B", "C", "total")):
        assert getattr(got, k) == pytest.approx(full[n], rel=1e-12)
        assert getattr(got, k + "_se") == pytest.approx(float(se[n]), rel=1e-10)
    # Vectors: the components add up over coordinates.
    v = torch.randn(5, 3, 2, 4, generator=gen, dtype=torch.float64)
    per = [nested_variance_components(v[..., d]) for d in range(4)]
    whole = nested_variance_components(v)
    for k in ("A", "B", "C"):
        assert getattr(whole, k) == pytest.approx(sum(getattr(p, k) for p in per), rel=1e-12)
    # The A and B jackknife is the plain standard error of a mean over examples.
    a_i = y.var(dim=2).mean(dim=1)
    assert got.A_se == pytest.approx(float(a_i.std() / math.sqrt(7)), rel=1e-10)


# --- contract and errors ----------------------------------------------------------------------


def test_mask_mode_pass_through_and_determinism():
    seen = []

    def with_mode(x, t, seed, mask_mode):
        seen.append(mask_mode)
        return float(x) + _normal(seed) + t

    def three_args(x, t, seed):
        return float(x) + _normal(seed) + t

    data = torch.arange(10.0)
    a = variance_decomposition(with_mode, data, mask_mode="mirror", n_x=4, n_t=2, n_m=2, seed=5, progress=False)
    assert set(seen) == {"mirror"} and len(seen) == 16
    b = variance_decomposition(three_args, data, mask_mode=None, n_x=4, n_t=2, n_m=2, seed=5, progress=False)
    assert torch.equal(a.values, b.values)  # same seed: same draws
    c = variance_decomposition(three_args, data, mask_mode=None, n_x=4, n_t=2, n_m=2, seed=6, progress=False)
    assert not torch.equal(b.values, c.values)
    assert "A =" in str(a) and set(a.fractions()) == {"A", "B", "C"}


def test_errors():
    data = torch.arange(10.0)

    def ok(x, t, seed, mask_mode):
        return float(x) + t

    kw = dict(n_x=3, n_t=2, n_m=2, progress=False)
    with pytest.raises(TypeError, match="loss_fn"):
        variance_decomposition(None, data, **kw)
    with pytest.raises(ValueError, match="n_x"):
        variance_decomposition(ok, data, n_x=2, n_t=2, n_m=2)
    with pytest.raises(ValueError, match="n_t"):
        variance_decomposition(ok, data, n_x=3, n_t=1, n_m=2)
    with pytest.raises(ValueError, match="n_m"):
        variance_decomposition(ok, data, n_x=3, n_t=2, n_m=1)
    with pytest.raises(TypeError, match="n_m"):
        variance_decomposition(ok, data, n_x=3, n_t=2, n_m=2.0)
    with pytest.raises(TypeError, match="data"):
        variance_decomposition(ok, iter([1.0, 2.0]), **kw)
    with pytest.raises(ValueError, match="data"):
        variance_decomposition(ok, [], **kw)
    with pytest.raises(TypeError, match="t_sampler"):
        variance_decomposition(ok, data, t_sampler=object(), **kw)
    with pytest.raises(TypeError, match="mask_mode"):
        variance_decomposition(ok, data, mask_mode=1, **kw)
    with pytest.raises(TypeError, match="seed"):
        variance_decomposition(ok, data, seed=1.5, **kw)
    with pytest.raises(ValueError, match="params is required"):
        variance_decomposition(ok, data, grad=True, **kw)
    with pytest.raises(ValueError, match="grad=True only"):
        variance_decomposition(ok, data, num_projections=4, **kw)
    with pytest.raises(TypeError, match=r"params\[0\]"):
        variance_decomposition(ok, data, grad=True, params=[torch.zeros(2)], **kw)
    w = torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match="num_projections"):
        variance_decomposition(ok, data, grad=True, params=[w], num_projections=0, **kw)
    with pytest.raises(TypeError, match="scalar tensor"):
        variance_decomposition(ok, data, grad=True, params=[w], **kw)
    with pytest.raises(ValueError, match="depends on params"):
        variance_decomposition(lambda x, t, s, mask_mode: torch.tensor(1.0), data, grad=True, params=[w], **kw)
    with pytest.raises(ValueError, match="scalar"):
        variance_decomposition(lambda x, t, s, mask_mode: torch.ones(2), data, **kw)
    with pytest.raises(TypeError, match="float"):
        variance_decomposition(lambda x, t, s, mask_mode: "a", data, **kw)
    with pytest.raises(ValueError, match="non-finite"):
        variance_decomposition(lambda x, t, s, mask_mode: float("nan"), data, **kw)

    class Bad:
        def sample(self, n, seed):
            return torch.full((n,), 1.5), torch.ones(n)

    with pytest.raises(ValueError, match="outside"):
        variance_decomposition(ok, data, t_sampler=Bad(), **kw)
    with pytest.raises(ValueError, match=r"shape \(n_x, n_t, n_m\)"):
        nested_variance_components(torch.zeros(3, 2))
    with pytest.raises(TypeError, match="samples"):
        nested_variance_components(torch.zeros(3, 2, 2, dtype=torch.int64))
