"""EDM (Karras et al., 2022): noise levels, preconditioning, loss weight, Heun sampler, weight EMA.

The pieces of EDM training that do not depend on the network, as used by ``diffkernels demo`` and the
example scripts. Conventions are those of the paper (Table 1), VE form x = y + sigma * n:

- training noise levels: ln sigma ~ N(P_MEAN, P_STD^2) (:func:`sample_noise_levels`,
  :func:`log_sigma_pdf`);
- the denoiser D(x; sigma) = c_skip x + c_out F(c_in x, c_noise) with sigma_data = SIGMA_DATA
  (:class:`EDMPrecond`);
- the loss weight lambda(sigma) = 1 / c_out(sigma)^2 on ||D(x; sigma) - y||^2 (:func:`edm_loss_weight`);
- sampling: the deterministic 2nd-order Heun solver (Algorithm 1 with S_churn = 0) on the rho = 7
  grid of noise levels between SIGMA_MAX and SIGMA_MIN (:func:`karras_sigmas`, :func:`heun_solve`,
  :func:`edm_heun_sample`).

:func:`ema_update` keeps the EMA of the weights that samples are drawn from.
"""

from __future__ import annotations

import math
import numbers
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ._validate import check_finite, check_seed

__all__ = [
    "SIGMA_DATA",
    "P_MEAN",
    "P_STD",
    "SIGMA_MIN",
    "SIGMA_MAX",
    "RHO",
    "EDMPrecond",
    "edm_loss_weight",
    "sample_noise_levels",
    "log_sigma_pdf",
    "karras_sigmas",
    "heun_solve",
    "edm_heun_sample",
    "ema_update",
]

# Karras et al. (2022), Table 1.
SIGMA_DATA = 0.5
P_MEAN, P_STD = -1.2, 1.2
SIGMA_MIN, SIGMA_MAX, RHO = 0.002, 80.0, 7.0


def _check_int(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


class EDMPrecond(nn.Module):
    """D(x; sigma) = c_skip x + c_out F(c_in x, c_noise), EDM's preconditioning of a network F.

    c_skip = sd^2 / (sigma^2 + sd^2), c_out = sigma sd / sqrt(sigma^2 + sd^2),
    c_in = 1 / sqrt(sigma^2 + sd^2), c_noise = ln(sigma) / 4, with sd = ``sigma_data``.
    ``net(x, c_noise)`` takes the scaled input (B, ...) and c_noise of shape (B,); ``forward(x, sigma)``
    takes one noise level per sample, shape (B,).

    Examples:
        >>> import torch
        >>> from diffkernels.edm import EDMPrecond
        >>> class Zero(torch.nn.Module):  # a network that outputs 0: D(x; sigma) = c_skip x
        ...     def forward(self, x, c_noise):
        ...         return torch.zeros_like(x)
        >>> denoiser = EDMPrecond(Zero())
        >>> denoiser(torch.ones(2, 3), torch.tensor([0.5, 2.0]))  # c_skip = 0.25 / (sigma^2 + 0.25)
        tensor([[0.5000, 0.5000, 0.5000],
                [0.0588, 0.0588, 0.0588]])
    """

    def __init__(self, net: nn.Module, sigma_data: float = SIGMA_DATA):
        super().__init__()
        self.net = net
        self.sigma_data = check_finite(sigma_data, "sigma_data", minimum=0.0, strict=True)

    def forward(self, x: Tensor, sigma: Tensor) -> Tensor:
        sd = self.sigma_data
        s = sigma.reshape(-1, *([1] * (x.dim() - 1)))
        c_skip = sd**2 / (s**2 + sd**2)
        c_out = s * sd / (s**2 + sd**2).sqrt()
        c_in = 1.0 / (s**2 + sd**2).sqrt()
        c_noise = sigma.reshape(-1).log() / 4.0
        return c_skip * x + c_out * self.net(c_in * x, c_noise)


def edm_loss_weight(sigma: Tensor, sigma_data: float = SIGMA_DATA) -> Tensor:
    """lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2 = 1 / c_out(sigma)^2, the weight of ||D - y||^2.

    With it, lambda ||D - y||^2 equals the unweighted ||F - (y - c_skip x) / c_out||^2 on the raw
    network output F, in value and gradient.

    Examples:
        >>> import torch
        >>> from diffkernels.edm import edm_loss_weight
        >>> edm_loss_weight(torch.tensor([0.5, 1.0]))
        tensor([8., 5.])
    """
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def sample_noise_levels(n: int, *, generator: torch.Generator | None = None, p_mean: float = P_MEAN,
                        p_std: float = P_STD) -> Tensor:
    """n training noise levels sigma = exp(p_mean + p_std z), z ~ N(0, 1), float32 on the generator's device.

    Examples:
        >>> import torch
        >>> from diffkernels.edm import sample_noise_levels
        >>> sigma = sample_noise_levels(4, generator=torch.Generator().manual_seed(0))
        >>> sigma
        tensor([1.9140, 0.2118, 0.0220, 0.5958])
    """
    n = _check_int(n, "n", 0)
    return (torch.randn(n, generator=generator) * p_std + p_mean).exp()


def log_sigma_pdf(u, p_mean: float = P_MEAN, p_std: float = P_STD) -> np.ndarray:
    """The density of u = ln sigma under the training distribution, N(p_mean, p_std^2), at ``u``.

    Examples:
        >>> from diffkernels.edm import log_sigma_pdf
        >>> log_sigma_pdf([-1.2, 0.0]).round(4)  # the peak is at u = P_MEAN = -1.2
        array([0.3325, 0.2016])
    """
    u = np.asarray(u, dtype=np.float64)
    return np.exp(-((u - p_mean) ** 2) / (2 * p_std**2)) / (p_std * math.sqrt(2 * math.pi))


def karras_sigmas(steps: int, *, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX,
                  rho: float = RHO) -> Tensor:
    """The sampler's noise levels: ``steps`` levels from sigma_max down to sigma_min, evenly spaced in
    sigma^(1/rho), then 0; float64, shape (steps + 1,).

    Examples:
        >>> from diffkernels.edm import karras_sigmas
        >>> karras_sigmas(4)
        tensor([8.0000e+01, 9.7232e+00, 4.6998e-01, 2.0000e-03, 0.0000e+00],
               dtype=torch.float64)
    """
    steps = _check_int(steps, "steps", 2)  # the grid divides by steps - 1
    sigma_min = check_finite(sigma_min, "sigma_min", minimum=0.0, strict=True)
    sigma_max = check_finite(sigma_max, "sigma_max", minimum=sigma_min, strict=True)
    rho = check_finite(rho, "rho", minimum=0.0, strict=True)
    i = torch.arange(steps, dtype=torch.float64)
    t = (sigma_max ** (1 / rho) + i / (steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([t, torch.zeros(1, dtype=torch.float64)])


@torch.no_grad()
def heun_solve(derivative: Callable[[Tensor, float], Tensor], x: Tensor, times: Sequence[float]) -> Tensor:
    """Integrate dx/dt = derivative(x, t) from times[0] through ``times`` with Heun's 2nd-order method.

    Each step is an Euler step followed by the trapezoid correction, except a step to t = 0, which stays
    an Euler step (EDM's derivative (x - D) / sigma is undefined there): 2 len(times) - 3 evaluations
    when the last time is 0.

    Examples:
        >>> import torch
        >>> from diffkernels.edm import heun_solve
        >>> x1 = heun_solve(lambda x, t: -x, torch.ones(1), torch.linspace(0, 1, 11).tolist())
        >>> round(x1.item(), 4), round(torch.exp(torch.tensor(-1.0)).item(), 4)  # dx/dt = -x: x(1) = 1/e
        (0.3685, 0.3679)
    """
    times = [float(t) for t in times]
    for t_cur, t_next in zip(times[:-1], times[1:]):
        d_cur = derivative(x, t_cur)
        x_next = x + (t_next - t_cur) * d_cur
        if t_next != 0:
            d_next = derivative(x_next, t_next)
            x_next = x + (t_next - t_cur) * 0.5 * (d_cur + d_next)
        x = x_next
    return x


@torch.no_grad()
def edm_heun_sample(denoiser: nn.Module, shape: Sequence[int], *, steps: int = 18, seed: int = 0, device="cpu",
                    sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, rho: float = RHO) -> Tensor:
    """EDM's deterministic sampler (Algorithm 1, S_churn = 0): ``shape[0]`` samples of ``denoiser(x, sigma)``.

    The probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma solved by :func:`heun_solve` on
    :func:`karras_sigmas` (``steps`` levels plus a last Euler step to 0: 2 steps - 1 network evaluations),
    from x = sigma_max * n, where n comes from a CPU generator seeded with ``seed`` (the same samples
    on every device, up to rounding).

    Examples:
        >>> import torch
        >>> from diffkernels.edm import EDMPrecond, edm_heun_sample
        >>> class Tiny(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.layer = torch.nn.Linear(3, 3)
        ...     def forward(self, x, c_noise):
        ...         return self.layer(x)
        >>> denoiser = EDMPrecond(Tiny())
        >>> samples = edm_heun_sample(denoiser, (2, 3), steps=4, seed=0)
        >>> samples.shape, bool(samples.isfinite().all())
        (torch.Size([2, 3]), True)
        >>> bool((samples == edm_heun_sample(denoiser, (2, 3), steps=4, seed=0)).all())  # deterministic
        True
    """
    shape = tuple(_check_int(v, "shape", 1) for v in shape)
    t = karras_sigmas(steps, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho).tolist()
    gen = torch.Generator().manual_seed(check_seed(seed) % (1 << 64))
    n = shape[0]

    def derivative(x: Tensor, sigma: float) -> Tensor:
        return (x - denoiser(x, torch.full((n,), sigma, device=device))) / sigma

    return heun_solve(derivative, torch.randn(shape, generator=gen).to(device) * t[0], t)


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, step: int, *, decay: float = 0.999) -> None:
    """One update of an EMA copy of ``model``'s parameters after optimiser step ``step`` (0-based).

    p_ema <- beta p_ema + (1 - beta) p with beta = min(decay, (1 + step) / (10 + step)): the ramp-up
    lets early steps, far from the final weights, fade quickly. Buffers are not averaged.

    Examples:
        >>> import torch
        >>> from diffkernels.edm import ema_update
        >>> model, ema = torch.nn.Linear(1, 1, bias=False), torch.nn.Linear(1, 1, bias=False)
        >>> with torch.no_grad():
        ...     _ = model.weight.fill_(1.0), ema.weight.fill_(0.0)
        >>> ema_update(ema, model, step=0)  # beta = min(0.999, 1/10): mostly the new weights
        >>> round(ema.weight.item(), 4)
        0.9
        >>> ema_update(ema, model, step=10_000)  # later beta = decay = 0.999
        >>> round(ema.weight.item(), 4)
        0.9001
    """
    beta = min(decay, (1.0 + step) / (10.0 + step))
    for p_ema, p in zip(ema.parameters(), model.parameters()):
        p_ema.lerp_(p, 1.0 - beta)
