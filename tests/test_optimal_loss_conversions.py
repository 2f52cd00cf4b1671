"""Conversions, schedule integrals against closed forms with the Gaussian J*, schedule helpers, scaling fits."""

import math

import numpy as np
import pytest
import torch

from diffkernels.optimal_loss import (
    adaptive_density,
    edm_schedule_loss,
    find_s_star,
    fit_offset_power_law,
    fit_scaling_law,
    flow_matching_schedule_loss,
    flow_t_from_s,
    interpolate_log,
    loss_factor,
    loss_weight,
    s_from_flow,
    s_from_ve,
    s_from_vp,
    sample_sigmas,
)
from diffkernels.optimal_loss.conversions import TARGETS

LAM = np.array([0.25, 1.0, 3.0])  # a Gaussian population N(mu, diag(LAM))


def gaussian_j_star(s):
    s = np.asarray(s, dtype=np.float64)[..., None]
    return (LAM * s**2 / (LAM + s**2)).sum(-1)


def test_loss_factors():
    s = np.array([0.01, 0.5, 2.0, 80.0])
    np.testing.assert_allclose(loss_factor(s, "x0"), 1.0)
    np.testing.assert_allclose(loss_factor(s, "eps"), 1 / s**2)
    np.testing.assert_allclose(loss_factor(s, "score"), 1 / s**4)
    # Velocity v = eps - x0 of x_t = (1 - t) x0 + t eps: its error is the x0 error / t.
    t = flow_t_from_s(s)
    np.testing.assert_allclose(loss_factor(s, "velocity"), 1 / t**2)
    # EDM: 1 / c_out^2 with c_out = s sd / sqrt(s^2 + sd^2).
    sd = 0.5
    c_out = s * sd / np.sqrt(s**2 + sd**2)
    np.testing.assert_allclose(loss_factor(s, "edm"), 1 / c_out**2)
    np.testing.assert_allclose(loss_factor(s, "edm", sigma_data=1.0), (s**2 + 1) / s**2)
    np.testing.assert_allclose(loss_factor(s, "vp_score"), (1 + s**2) / s**4)
    np.testing.assert_allclose(loss_factor(s, "vp_v"), (1 + s**2) / s**2)
    with pytest.raises(ValueError, match="target"):
        loss_factor(s, "v")
    with pytest.raises(ValueError, match="> 0"):
        loss_factor([0.0], "eps")


def _conditional_variance(lam, a, b, c0, c1):
    """Var(c0 x0 + c1 eps | a x0 + b eps) summed over the coordinates, x0 ~ N(0, diag(lam)), eps ~ N(0, I):
    the optimal loss of the target c0 x0 + c1 eps, by the Gaussian conditioning formula (no sampling)."""
    var_t = c0**2 * lam + c1**2
    cov = c0 * a * lam + c1 * b
    var_x = a**2 * lam + b**2
    return float(np.sum(var_t - cov**2 / var_x))


@pytest.mark.parametrize("s", [0.003, 0.2, 1.0, 7.0, 300.0])
def test_loss_factor_times_j_star_is_the_exact_target_loss(s):
    """Every target of TARGETS: factor(s) * J*(s) = the optimal loss of that target, computed directly
    for a Gaussian population in float64 from the process's own (x0, eps) -> (x_t, target) maps."""
    j_star = float(gaussian_j_star(s))
    assert _conditional_variance(LAM, 1.0, s, 1.0, 0.0) == pytest.approx(j_star, rel=1e-12)
    t = s / (1 + s)  # flow matching x_t = (1 - t) x0 + t eps
    alpha, sigma = 1 / math.sqrt(1 + s * s), s / math.sqrt(1 + s * s)  # VP, sigma / alpha = s
    sd = 0.5
    c_skip, c_out = sd**2 / (s**2 + sd**2), s * sd / math.sqrt(s**2 + sd**2)
    exact = {  # target -> (a, b, c0, c1): x_t = a x0 + b eps, target = c0 x0 + c1 eps
        "x0": (1.0, s, 1.0, 0.0),
        "eps": (1.0, s, 0.0, 1.0),
        "score": (1.0, s, 0.0, -1.0 / s),  # VE: grad log p(x | x0) = -eps / s
        "velocity": (1 - t, t, -1.0, 1.0),
        "edm": (1.0, s, (1 - c_skip) / c_out, -c_skip * s / c_out),  # F = (x0 - c_skip x) / c_out
        "vp_score": (alpha, sigma, 0.0, -1.0 / sigma),
        "vp_v": (alpha, sigma, -sigma, alpha),  # v = alpha eps - sigma x0
    }
    assert set(exact) == set(TARGETS)
    for target, coef in exact.items():
        want = _conditional_variance(LAM, *coef)
        got = float(loss_factor(s, target, sigma_data=sd)) * j_star
        assert got == pytest.approx(want, rel=1e-9), target
    # VP eps-prediction is VE's eps target: the same factor 1 / s^2.
    assert _conditional_variance(LAM, alpha, sigma, 0.0, 1.0) == pytest.approx(j_star / s**2, rel=1e-9)


def test_noise_level_maps():
    assert s_from_ve(0.3) == pytest.approx(0.3)
    assert s_from_vp(sigma=0.6) == pytest.approx(0.75)
    assert s_from_vp(alpha=0.8) == pytest.approx(0.75)
    assert s_from_flow(0.5) == pytest.approx(1.0)
    assert s_from_flow(0.8) == pytest.approx(4.0)
    np.testing.assert_allclose(flow_t_from_s(s_from_flow([0.1, 0.7])), [0.1, 0.7])
    for bad in (dict(sigma=1.0), dict(alpha=0.0), dict(), dict(sigma=0.5, alpha=0.5)):
        with pytest.raises(ValueError):
            s_from_vp(**bad)
    with pytest.raises(ValueError):
        s_from_flow(1.0)


def test_interpolation_in_log_s():
    grid = np.geomspace(1e-2, 1e2, 9)
    j = gaussian_j_star(grid)
    np.testing.assert_allclose(interpolate_log(grid, grid, j), j)
    mid = np.sqrt(grid[3] * grid[4])  # ln J* linear in ln s: the midpoint gets the geometric mean
    assert interpolate_log(mid, grid, j) == pytest.approx(np.sqrt(j[3] * j[4]))
    j0 = np.where(np.arange(9) < 3, 0.0, j)  # next to a zero: linear in ln s
    assert interpolate_log(np.sqrt(grid[2] * grid[3]), grid, j0) == pytest.approx(0.5 * j[3])
    assert interpolate_log(np.sqrt(grid[0] * grid[1]), grid, j0) == 0.0
    np.testing.assert_allclose(interpolate_log(grid * 1.01, grid, 5.0 * grid**2)[:-1], 5.0 * (grid * 1.01)[:-1] ** 2)
    assert interpolate_log(1e4, grid, j) == pytest.approx(j[-1])  # constant above
    assert interpolate_log(1e-3, grid, j) == pytest.approx(j[0] * 1e-2)  # ~ s^2 below


def test_flow_matching_total_closed_form():
    """Uniform t, velocity loss, Gaussian J*: sum_j integral_0^1 lam / (lam (1 - t)^2 + t^2) dt
    = sum_j sqrt(lam_j) pi / 2."""
    exact = float(np.sum(np.sqrt(LAM)) * math.pi / 2)
    grid = np.geomspace(1e-3, 1e3, 64)
    assert flow_matching_schedule_loss(grid, gaussian_j_star(grid)) == pytest.approx(exact, rel=3e-3)
    fine = np.geomspace(1e-4, 1e4, 2000)
    assert flow_matching_schedule_loss(fine, gaussian_j_star(fine)) == pytest.approx(exact, rel=1e-5)


def test_edm_total_closed_form():
    # With every lam_j = sd^2, lambda(s) J*(s) = D at every s: the total is exactly D.
    sd = 0.5
    grid = np.geomspace(1e-3, 1e3, 64)
    j = 4 * sd**2 * grid**2 / (sd**2 + grid**2)
    assert edm_schedule_loss(grid, j, sigma_data=sd) == pytest.approx(4.0, rel=3e-3)  # interpolation error
    fine = np.geomspace(1e-4, 1e4, 2000)
    j = 4 * sd**2 * fine**2 / (sd**2 + fine**2)
    assert edm_schedule_loss(fine, j, sigma_data=sd) == pytest.approx(4.0, rel=1e-5)
    # General lam: a 1-D Gaussian integral in ln s, by scipy's adaptive quadrature.
    integrate = pytest.importorskip("scipy.integrate")

    def integrand(u):
        s = math.exp(u)
        density = math.exp(-0.5 * ((u + 1.2) / 1.2) ** 2) / (1.2 * math.sqrt(2 * math.pi))
        return density * (s**2 + sd**2) / (s * sd) ** 2 * float(gaussian_j_star(s))

    exact = integrate.quad(integrand, -1.2 - 12 * 1.2, -1.2 + 12 * 1.2, limit=400)[0]
    assert edm_schedule_loss(grid, gaussian_j_star(grid)) == pytest.approx(exact, rel=3e-3)
    fine = np.geomspace(1e-4, 1e4, 2000)
    assert edm_schedule_loss(fine, gaussian_j_star(fine)) == pytest.approx(exact, rel=1e-5)


def test_loss_weight_and_s_star():
    grid = np.geomspace(1e-3, 1e2, 40)
    j = np.where(grid < 0.05, 0.0, gaussian_j_star(grid))  # a dataset's J*: exactly 0 below s*
    s_star = find_s_star(grid, j)
    assert s_star == grid[np.flatnonzero(grid >= 0.05)[0]]
    w = loss_weight(grid, grid, j)
    np.testing.assert_allclose(w[grid >= s_star], 1 / j[grid >= s_star])  # a * 1/J* above s*
    assert (w[grid < s_star] == w[grid < s_star][0]).all()  # capped at w_max = 1/J*(s*) below
    assert w.max() == pytest.approx(1 / j[grid == s_star][0])
    wb = loss_weight(grid, grid, j, a=2.0, w_max=50.0, bump_height=10.0, bump_center=0.01, bump_width=0.3)
    bump = 10.0 * np.exp(-((np.log(grid) - np.log(0.01)) ** 2) / (2 * 0.3**2))
    expected = 2.0 * np.minimum(np.where(j > 0, 1 / np.maximum(j, 1e-300), np.inf), 50.0) + np.where(grid < s_star, bump, 0)
    np.testing.assert_allclose(wb, expected)


def test_adaptive_density_and_sampler():
    grid = np.geomspace(1e-2, 1e2, 30)
    j = gaussian_j_star(grid)
    w = loss_weight(grid, grid, j)
    j_theta = j * 1.1 + 0.01
    p = adaptive_density(grid, w, j_theta, j)
    np.testing.assert_allclose(p * np.trapezoid(w * (j_theta - j), np.log(grid)), w * (j_theta - j), rtol=1e-12)
    assert np.trapezoid(p, np.log(grid)) == pytest.approx(1.0)
    # The order of sigmas is kept.
    np.testing.assert_allclose(adaptive_density(grid[::-1], w[::-1], j_theta[::-1], j[::-1]), p[::-1])
    with pytest.raises(ValueError, match="zero everywhere"):
        adaptive_density(grid, w, j, j)
    # Samples follow the piecewise-linear density in ln s.
    s = sample_sigmas(40000, grid, p, generator=torch.Generator().manual_seed(0))
    assert s.dtype == torch.float32 and s.shape == (40000,)
    u = np.log(s.double().numpy())
    assert u.min() >= np.log(grid[0]) - 1e-6 and u.max() <= np.log(grid[-1]) + 1e-6
    edges = np.log(grid)[::5]
    counts = np.histogram(u, bins=edges)[0] / len(u)
    fine = np.linspace(edges[0], edges[-1], 20001)
    cdf = np.concatenate([[0], np.cumsum(0.5 * np.diff(fine) * (np.interp(fine, np.log(grid), p)[1:] + np.interp(fine, np.log(grid), p)[:-1]))])
    expected = np.diff(np.interp(edges, fine, cdf))
    np.testing.assert_allclose(counts, expected, atol=0.01)


def test_fit_scaling_law_recovers_known_law():
    rng = np.random.default_rng(0)
    F = np.geomspace(1e15, 1e19, 12)
    j_star, beta, alpha = 0.7, 3e4, -0.3
    J = j_star + beta * F**alpha
    fit = fit_scaling_law(F, J, j_star=j_star)
    assert fit.alpha_gap == pytest.approx(alpha, rel=1e-9) and fit.beta_gap == pytest.approx(beta, rel=1e-7)
    assert fit.r2_gap == pytest.approx(1.0, abs=1e-12)
    assert fit.r2 < fit.r2_gap and fit.alpha > alpha  # ignoring J* flattens the plain law
    # With 1% multiplicative noise on the gap.
    Jn = j_star + beta * F**alpha * np.exp(0.01 * rng.standard_normal(F.size))
    noisy = fit_scaling_law(F, Jn, j_star=j_star)
    assert noisy.alpha_gap == pytest.approx(alpha, abs=0.01) and noisy.r2_gap > 0.99
    # A plain power law, no J*.
    plain = fit_scaling_law(F, 2.0 * F**-0.1)
    assert plain.alpha == pytest.approx(-0.1) and plain.beta == pytest.approx(2.0) and plain.gap is None
    assert plain.plain(F[0]) == pytest.approx(2.0 * F[0] ** -0.1)
    with pytest.raises(ValueError, match="exceed j_star"):
        fit_scaling_law(F, J, j_star=1.0)
    with pytest.raises(ValueError, match="positive"):
        fit_scaling_law(F, -J)
    with pytest.raises(ValueError, match="same length"):
        fit_scaling_law(F[:3], J)


F_GRID = np.geomspace(1e15, 1e19, 12)


def _three_fits(J, j_star):
    fit = fit_scaling_law(F_GRID, J, j_star=j_star)
    return fit, {"plain": fit.r2, "gap": fit.r2_gap, "free": fit.free.r2}


def test_free_constant_fit_on_data_from_each_law():
    """Data from each law (1% multiplicative noise): the free-constant fit recovers beta, alpha, c, and
    the generating law has the best log-space R^2 (the free law contains the plain one, c = 0, so on
    plain data the two tie)."""
    rng = np.random.default_rng(1)
    noise = np.exp(0.01 * rng.standard_normal(F_GRID.size))
    beta, alpha, c = 3e4, -0.3, 0.7
    # free law, with a J* below its constant (the gap law then misses the floor)
    J = (beta * F_GRID**alpha + c) * noise
    fit, r2 = _three_fits(J, j_star=0.35)
    assert fit.free.c == pytest.approx(c, rel=0.05) and fit.free.alpha == pytest.approx(alpha, rel=0.1)
    assert max(r2, key=r2.get) == "free" and r2["free"] > 0.99 and r2["gap"] < r2["free"] - 0.01
    # noise-free: exact recovery of the three parameters
    exact = fit_offset_power_law(F_GRID, beta * F_GRID**alpha + c)
    assert exact.c == pytest.approx(c, rel=1e-6) and exact.alpha == pytest.approx(alpha, rel=1e-6)
    assert exact.beta == pytest.approx(beta, rel=1e-5) and exact.r2 == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(exact(F_GRID), beta * F_GRID**alpha + c, rtol=1e-7)
    # gap law with the true J*: the gap fit is best among the two-parameter laws; the free fit finds c = J*
    J = c + beta * F_GRID**alpha * noise
    fit, r2 = _three_fits(J, j_star=c)
    assert r2["gap"] > r2["plain"] + 0.01 and fit.free.c == pytest.approx(c, rel=0.05)
    # plain law: c ~ 0 (within what 1% noise lets a third parameter absorb) and the same R^2 as the
    # plain fit (nested), both above the gap law's
    J = 2.0 * F_GRID**-0.1 * noise
    fit, r2 = _three_fits(J, j_star=0.8 * J.min())
    assert fit.free.c < 0.1 * J.min() and r2["free"] == pytest.approx(r2["plain"], abs=1e-3)
    assert r2["plain"] > r2["gap"] + 0.01
    assert fit_scaling_law(F_GRID[:3], J[:3]).free is None  # 3 points: no 3-parameter fit
    with pytest.raises(ValueError, match=">= 4"):
        fit_offset_power_law(F_GRID[:3], J[:3])
