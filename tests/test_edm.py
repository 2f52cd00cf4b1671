"""diffkernels.edm against the formulas of Karras et al. (2022), written out independently in float64."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from diffkernels import edm


class _Affine(nn.Module):
    """F(u, c) = 2 u + c: simple enough to write D by hand."""

    def forward(self, u, c_noise):
        return 2.0 * u + c_noise.reshape(-1, *([1] * (u.dim() - 1)))


def test_preconditioning_matches_the_formulas():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 1, 3, 3, generator=gen, dtype=torch.float64)
    sigma = torch.tensor([0.002, 0.1, 0.5, 3.0, 80.0], dtype=torch.float64)
    got = edm.EDMPrecond(_Affine(), sigma_data=0.5)(x, sigma)
    for b, s in enumerate(sigma.tolist()):
        c_skip = 0.25 / (s * s + 0.25)
        c_out = s * 0.5 / math.sqrt(s * s + 0.25)
        c_in = 1.0 / math.sqrt(s * s + 0.25)
        expected = c_skip * x[b] + c_out * (2.0 * c_in * x[b] + math.log(s) / 4.0)
        torch.testing.assert_close(got[b], expected, rtol=1e-14, atol=1e-14)


def test_preconditioning_any_rank_and_bad_sigma_data():
    x = torch.randn(4, 7, dtype=torch.float64)  # (B, D) data: sigma broadcasts over the trailing dims
    sigma = torch.tensor([0.1, 1.0, 2.0, 5.0], dtype=torch.float64)
    got = edm.EDMPrecond(_Affine())(x, sigma)
    assert got.shape == x.shape
    with pytest.raises(ValueError, match="sigma_data"):
        edm.EDMPrecond(_Affine(), sigma_data=0.0)


def test_loss_weight_is_one_over_c_out_squared_and_the_f_target_identity():
    sigma = torch.tensor([0.002, 0.3, 1.0, 80.0], dtype=torch.float64)
    sd = edm.SIGMA_DATA
    c_out = sigma * sd / (sigma**2 + sd**2).sqrt()
    torch.testing.assert_close(edm.edm_loss_weight(sigma) * c_out**2, torch.ones_like(sigma), rtol=1e-14, atol=0)
    # lambda ||D - y||^2 = ||F - (y - c_skip x) / c_out||^2 for D = c_skip x + c_out F
    gen = torch.Generator().manual_seed(1)
    x, y, f = (torch.randn(4, 6, generator=gen, dtype=torch.float64) for _ in range(3))
    s = sigma[:, None]
    c_skip = sd**2 / (s**2 + sd**2)
    d = c_skip * x + c_out[:, None] * f
    lhs = edm.edm_loss_weight(sigma) * ((d - y) ** 2).sum(1)
    rhs = ((f - (y - c_skip * x) / c_out[:, None]) ** 2).sum(1)
    torch.testing.assert_close(lhs, rhs, rtol=1e-10, atol=0)


def test_noise_levels_and_their_density():
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(1000, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(edm.sample_noise_levels(1000, generator=gen), (z * edm.P_STD + edm.P_MEAN).exp())
    assert edm.sample_noise_levels(0).shape == (0,)
    with pytest.raises(ValueError, match="n must be >= 0"):
        edm.sample_noise_levels(-1)
    with pytest.raises(TypeError, match="n must be an int"):
        edm.sample_noise_levels(2.0)
    u = np.linspace(edm.P_MEAN - 10 * edm.P_STD, edm.P_MEAN + 10 * edm.P_STD, 20001)
    p = edm.log_sigma_pdf(u)
    assert np.trapezoid(p, u) == pytest.approx(1.0, abs=1e-9)
    assert u[np.argmax(p)] == pytest.approx(edm.P_MEAN, abs=1e-3)


def test_karras_sigmas():
    t = edm.karras_sigmas(18)
    assert t.dtype == torch.float64 and t.shape == (19,)
    assert t[0].item() == pytest.approx(edm.SIGMA_MAX, rel=1e-14)
    assert t[17].item() == pytest.approx(edm.SIGMA_MIN, rel=1e-12)
    assert t[18].item() == 0.0 and bool((t[:-1] > t[1:]).all())
    # evenly spaced in sigma^(1/rho)
    r = t[:-1] ** (1 / edm.RHO)
    torch.testing.assert_close(r[1:] - r[:-1], (r[1] - r[0]).expand(17), rtol=1e-10, atol=0)
    with pytest.raises(ValueError, match="steps"):
        edm.karras_sigmas(1)
    with pytest.raises(ValueError, match="sigma_max"):
        edm.karras_sigmas(5, sigma_min=1.0, sigma_max=0.5)


def test_heun_is_second_order_and_ends_with_an_euler_step():
    # dx/dt = x from t = 1 to 0.5: x(0.5) = x(1) exp(-0.5); Heun's error falls like h^2
    errors = []
    for n in (10, 20, 40):
        times = np.linspace(1.0, 0.5, n + 1)
        x = edm.heun_solve(lambda x, t: x, torch.ones(1, dtype=torch.float64), times)
        errors.append(abs(x.item() - math.exp(-0.5)))
    assert 3.5 < errors[0] / errors[1] < 4.5 and 3.5 < errors[1] / errors[2] < 4.5
    calls = []
    edm.heun_solve(lambda x, t: calls.append(t) or x, torch.ones(1), [3.0, 2.0, 1.0, 0.0])
    assert calls == [3.0, 2.0, 2.0, 1.0, 1.0]  # 2 * 4 - 3 evaluations, none at t = 0


def test_sampler_with_the_exact_denoiser_of_gaussian_data():
    """Data N(0, sd^2 I): D(x; s) = x sd^2 / (sd^2 + s^2), and the ODE maps x_T to x_T sd / sqrt(sd^2 + s_max^2)."""
    sd = 0.7

    def denoiser(x, sigma):
        s = sigma.reshape(-1, 1, 1, 1).to(x.dtype)
        return x * sd**2 / (sd**2 + s**2)

    seed = 5
    x_t = torch.randn((6, 2, 3, 3), generator=torch.Generator().manual_seed(seed)) * edm.SIGMA_MAX
    expected = x_t * sd / math.sqrt(sd**2 + edm.SIGMA_MAX**2)
    errors = []
    for steps in (40, 80, 160):
        got = edm.edm_heun_sample(denoiser, (6, 2, 3, 3), steps=steps, seed=seed)
        errors.append(((got - expected).abs() / expected.abs()).max().item())
    # the discretisation error (measured: 0.9%, 0.2%, 0.05%) falls like 1 / steps^2
    assert errors[2] < 1e-3 and 3.5 < errors[0] / errors[1] < 4.8 and 3.5 < errors[1] / errors[2] < 4.8
    assert torch.equal(got, edm.edm_heun_sample(denoiser, (6, 2, 3, 3), steps=160, seed=seed))


def test_sampler_with_a_single_training_point_returns_it():
    """D = y0 for every sigma: x - y0 shrinks linearly in sigma, which every step follows exactly."""
    y0 = torch.tensor([0.25, -0.5, 0.75])
    got = edm.edm_heun_sample(lambda x, sigma: y0.expand_as(x), (4, 3), steps=5, seed=0)
    torch.testing.assert_close(got, y0.expand(4, 3), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="shape"):
        edm.edm_heun_sample(lambda x, sigma: x, (0, 3))
    with pytest.raises(ValueError, match="steps"):
        edm.edm_heun_sample(lambda x, sigma: x, (2, 3), steps=1)


def test_ema_update_ramp_up():
    model, ema = nn.Linear(2, 1, bias=False), nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
        ema.weight.fill_(0.0)
    edm.ema_update(ema, model, 0, decay=0.999)  # beta = min(0.999, 1 / 10) = 0.1
    torch.testing.assert_close(ema.weight, torch.full((1, 2), 0.9))
    edm.ema_update(ema, model, 10**6, decay=0.5)  # beta = decay
    torch.testing.assert_close(ema.weight, torch.full((1, 2), 0.95))
