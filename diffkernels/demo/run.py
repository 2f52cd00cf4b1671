"""``diffkernels demo``: train a tiny EDM diffusion model on scikit-learn's digits with the sparse loss.

The loss is :func:`diffkernels.sparse_mse_loss`: each step supervises only a
random ``1 - mask_ratio`` of the pixels, with a fresh counter-RNG mask per step
(``fold_seed(seed, step)``); the network still sees the whole noisy image. Everything else is plain
EDM (Karras et al., 2022): log-normal noise levels, preconditioning with sigma_data = 0.5, the
lambda(sigma) loss weight and the deterministic Heun sampler.

Needs the optional ``examples`` extras (scikit-learn for the bundled digits, matplotlib for the
figures); nothing is downloaded. Runs on CUDA when available (Triton kernels), else on CPU (C++
kernels); on the CPU the whole default run takes about 20 s with one thread on an idle machine.
"""

from __future__ import annotations

import copy
import json
import math
import numbers
import os
import time
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor, nn

from . import _backend, backends, fold_seed, posterior_mean, sparse_mse_loss
from ._validate import check_mask_ratio

# EDM constants (Karras et al. 2022, Table 1).
SIGMA_DATA = 0.5
P_MEAN, P_STD = -1.2, 1.2
SIGMA_MIN, SIGMA_MAX, RHO = 0.002, 80.0, 7.0


# --- data -------------------------------------------------------------------------------------


def load_digits_tensor() -> Tensor:
    """scikit-learn's bundled 8x8 digits (1797 images, 0..16) as a (1797, 1, 8, 8) float tensor in [-1, 1]."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("the demo needs scikit-learn: pip install scikit-learn (or diffkernels[examples])") from exc
    data = torch.tensor(load_digits().data, dtype=torch.float32)
    return (data / 8.0 - 1.0).reshape(-1, 1, 8, 8)


def to_pixels(x: Tensor) -> Tensor:
    """[-1, 1] images -> the 0..255 pixel scale of the memorisation metric (0..16, then x 255/16)."""
    return (x.clamp(-1, 1) + 1.0) * 8.0 * (255.0 / 16.0)


# --- network ----------------------------------------------------------------------------------


class _Block(nn.Module):
    """Residual block: GroupNorm -> SiLU -> 3x3 conv, a per-channel scale/shift from the noise
    embedding, SiLU -> 3x3 conv; then a global token-mixing MLP over the H*W positions.

    The token mixing gives every block a whole-image receptive field and absolute position (digits
    are centred, so position matters); with convolutions alone the samples had plausible strokes but
    less digit-like global shapes after 400 steps.
    """

    def __init__(self, ch: int, emb: int, positions: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(8, ch)
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.film = nn.Linear(emb, 2 * ch)
        self.norm2 = nn.GroupNorm(8, ch)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1)
        self.norm3 = nn.GroupNorm(8, ch)
        self.mix1 = nn.Linear(positions, positions)
        self.mix2 = nn.Linear(positions, positions)
        for layer in (self.conv2, self.mix2):  # each block starts as the identity
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        y = self.conv1(nn.functional.silu(self.norm1(h)))
        scale, shift = self.film(emb)[:, :, None, None].chunk(2, dim=1)
        y = self.norm2(y) * (1 + scale) + shift
        h = h + self.conv2(nn.functional.silu(y))
        t = self.norm3(h).flatten(2)  # (B, C, H*W): mix across positions, shared over channels
        return h + self.mix2(nn.functional.silu(self.mix1(t))).reshape(h.shape)


class TinyDenoiser(nn.Module):
    """F_theta(c_in x, c_noise) for 1 x size x size images: a small conv net at full resolution.

    A 3x3 conv stem, ``blocks`` residual blocks (convolutions plus global token mixing, see
    :class:`_Block`) and a 3x3 conv head, all at 8x8 with ``channels`` channels; the noise level
    enters through random Fourier features of c_noise -> MLP -> a scale/shift in every block. The
    head is zero-initialised, so the untrained model outputs D = c_skip x. About 71k parameters.
    """

    def __init__(self, channels: int = 32, blocks: int = 2, emb: int = 64, size: int = 8):
        super().__init__()
        self.register_buffer("freqs", torch.randn(emb // 2) * 4.0)
        self.emb = nn.Sequential(nn.Linear(emb, emb), nn.SiLU(), nn.Linear(emb, emb), nn.SiLU())
        self.inp = nn.Conv2d(1, channels, 3, padding=1)
        self.blocks = nn.ModuleList(_Block(channels, emb, size * size) for _ in range(blocks))
        self.out_norm = nn.GroupNorm(8, channels)
        self.out = nn.Conv2d(channels, 1, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor, c_noise: Tensor) -> Tensor:
        f = c_noise[:, None] * self.freqs[None, :] * (2 * math.pi)
        emb = self.emb(torch.cat([f.cos(), f.sin()], dim=1))
        h = self.inp(x)
        for block in self.blocks:
            h = block(h, emb)
        return self.out(nn.functional.silu(self.out_norm(h)))


class EDMPrecond(nn.Module):
    """D(x; sigma) = c_skip x + c_out F(c_in x, c_noise) with EDM's preconditioning."""

    def __init__(self, net: nn.Module, sigma_data: float = SIGMA_DATA):
        super().__init__()
        self.net = net
        self.sigma_data = sigma_data

    def forward(self, x: Tensor, sigma: Tensor) -> Tensor:
        sd = self.sigma_data
        s = sigma.reshape(-1, 1, 1, 1)
        c_skip = sd**2 / (s**2 + sd**2)
        c_out = s * sd / (s**2 + sd**2).sqrt()
        c_in = 1.0 / (s**2 + sd**2).sqrt()
        c_noise = sigma.reshape(-1).log() / 4.0
        return c_skip * x + c_out * self.net(c_in * x, c_noise)


def edm_loss_weight(sigma: Tensor, sigma_data: float = SIGMA_DATA) -> Tensor:
    """lambda(sigma) = (sigma^2 + sigma_d^2) / (sigma sigma_d)^2 = 1 / c_out(sigma)^2."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


# --- sampling ---------------------------------------------------------------------------------


@torch.no_grad()
def edm_heun_sample(model: nn.Module, n: int, *, steps: int = 18, seed: int = 0, device="cpu",
                    shape=(1, 8, 8)) -> Tensor:
    """EDM's deterministic 2nd-order Heun sampler (Karras et al. 2022, Algorithm 1, S_churn = 0).

    ``steps`` noise levels from SIGMA_MAX to SIGMA_MIN (rho = 7) plus a final step to 0; 2*steps - 1
    network evaluations. The initial noise comes from a CPU generator seeded with ``seed``.
    """
    gen = torch.Generator().manual_seed(seed)
    i = torch.arange(steps, dtype=torch.float64)
    t = (SIGMA_MAX ** (1 / RHO) + i / (steps - 1) * (SIGMA_MIN ** (1 / RHO) - SIGMA_MAX ** (1 / RHO))) ** RHO
    t = torch.cat([t, torch.zeros(1, dtype=torch.float64)]).tolist()
    x = torch.randn((n, *shape), generator=gen).to(device) * t[0]
    for k in range(steps):
        t_cur, t_next = t[k], t[k + 1]
        d_cur = (x - model(x, torch.full((n,), t_cur, device=device))) / t_cur
        x_next = x + (t_next - t_cur) * d_cur
        if t_next > 0:
            d_next = (x_next - model(x_next, torch.full((n,), t_next, device=device))) / t_next
            x_next = x + (t_next - t_cur) * 0.5 * (d_cur + d_next)
        x = x_next
    return x


# --- memorisation -----------------------------------------------------------------------------


def memorization(samples: Tensor, train: Tensor, threshold: float = 1.0 / 3.0) -> dict:
    """Gu et al. (2023) on [-1, 1] digits: :func:`diffkernels.optimal_loss.memorization` on the 0..255
    scale, as the dict the demo's summary stores (fraction, mean d1, per-sample d1 and d1/d2)."""
    from .optimal_loss import memorization as gu_memorization

    result = gu_memorization(to_pixels(samples.reshape(samples.shape[0], -1).double().cpu()),
                             to_pixels(train.reshape(train.shape[0], -1).double().cpu()), threshold)
    return {
        "memorized_fraction": result.fraction,
        "mean_d1": result.mean_d1,
        "d1": result.d1.tolist(),
        "ratio": result.ratio.tolist(),
    }


# --- the optimal loss J*(sigma) -------------------------------------------------------------

OPTIMAL_LEVELS = 24  # Gauss-Hermite nodes in log sigma: J* is computed exactly where the quadrature needs it


def optimal_x0_loss(data: Tensor, sigmas: Tensor, queries: int, seed: int, device) -> Tensor:
    """J*(sigma) / D per element for each sigma: the full estimator in its posterior-variance form.

    Queries x = y_n + sigma * eps with n uniform; J* = mean over queries of tr Cov[x0 | x]
    (diffkernels.posterior_mean, float64-accurate at every sigma).
    """
    flat = data.reshape(data.shape[0], -1).to(device)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for sigma in sigmas.tolist():
        src = torch.randint(0, flat.shape[0], (queries,), generator=gen)
        x = flat[src.to(device)].double() + sigma * torch.randn(queries, flat.shape[1], generator=gen,
                                                                dtype=torch.float64).to(device)
        _, _, variance = posterior_mean(x, flat, sigma, return_stats=True)
        out.append(variance.mean().item() / flat.shape[1])
    return torch.tensor(out, dtype=torch.float64)


def edm_optimal_loss(data: Tensor, queries: int, seed: int, device) -> dict:
    """The smallest possible value of the demo's training loss, E_sigma[lambda(sigma) J*(sigma) / D].

    sigma = exp(P_mean + P_std z), z ~ N(0, 1): Gauss-Hermite quadrature in z, with J* evaluated
    exactly at the quadrature nodes (which also serve as the J*(sigma) curve for the plot).
    """
    import numpy as np

    z, w = np.polynomial.hermite_e.hermegauss(OPTIMAL_LEVELS)
    sigmas = torch.tensor(np.exp(P_MEAN + P_STD * z), dtype=torch.float64)
    j_star = optimal_x0_loss(data, sigmas, queries, seed, device)
    weights = torch.tensor(w / w.sum(), dtype=torch.float64)
    total = float((weights * edm_loss_weight(sigmas) * j_star).sum())
    return {"sigmas": sigmas.tolist(), "j_star_per_element": j_star.tolist(), "optimal_loss": total}


def loss_by_noise_level(sigmas: list, x0_mse: list, edges: Tensor) -> tuple[list, list]:
    """Mean per-element x0 error of the training samples in each log-sigma bin (empty bins skipped)."""
    s = torch.tensor(sigmas, dtype=torch.float64)
    e = torch.tensor(x0_mse, dtype=torch.float64)
    centers, means = [], []
    bins = torch.bucketize(s.log(), edges.log())
    for k in range(1, len(edges)):
        hit = bins == k
        if int(hit.sum()) >= 5:
            centers.append(float((edges[k - 1] * edges[k]).sqrt()))
            means.append(float(e[hit].mean()))
    return centers, means


# --- figures ----------------------------------------------------------------------------------


def _pyplot():
    try:
        import matplotlib
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("the demo needs matplotlib: pip install matplotlib (or diffkernels[examples])") from exc
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save_grid(images: Tensor, path: Path, title: str) -> None:
    plt = _pyplot()
    n = images.shape[0]
    cols = int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 0.8, rows * 0.8 + 0.5))
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k < n:
            ax.imshow(images[k].reshape(8, 8).clamp(-1, 1).cpu().numpy(), cmap="gray_r", vmin=-1, vmax=1)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_loss_curve(losses: list, smoothed: list, path: Path, title: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(losses, color="0.75", lw=0.8, label="loss per step")
    ax.plot(smoothed, color="C0", lw=1.5, label="EMA")
    ax.set_xlabel("step")
    ax.set_ylabel("sparse EDM loss")
    ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_gap_plot(optimal: dict, bin_sigma: list, bin_mse: list, path: Path, title: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.8))
    ax.plot(optimal["sigmas"], optimal["j_star_per_element"], "k-", lw=1.5, label="optimal J*(σ)/D (the data's floor)")
    ax.plot(bin_sigma, bin_mse, "o-", color="C1", ms=4, label="model: x0 error per element (2nd half of training)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    # Below the data's nearest-neighbour spacing J* falls off like exp(-d^2 / 8 sigma^2): clip the axis there.
    ax.set_xlim(SIGMA_MIN, SIGMA_MAX)
    if bin_mse:
        shown = [j for sig, j in zip(optimal["sigmas"], optimal["j_star_per_element"]) if sig <= SIGMA_MAX]
        ax.set_ylim(min(bin_mse) / 100, 3 * max(bin_mse + shown))
    ax.set_xlabel("noise level σ")
    ax.set_ylabel("per-element x0 loss")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --- training ---------------------------------------------------------------------------------


def _check_int(value, name: str, lo: int, hi: Optional[int] = None) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < lo or (hi is not None and value > hi):
        raise ValueError(f"{name} must be >= {lo}, got {value}" if hi is None
                         else f"{name} must be between {lo} and {hi}, got {value}")


def demo_device(device: Optional[str] = None) -> torch.device:
    """The device the demo runs on: ``device``, or CUDA when available, else the CPU."""
    return torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))


def backend_label(device: torch.device) -> str:
    """The kernel backend the demo's loss uses on ``device``, as reported in its summary.

    Raises ValueError / RuntimeError when DIFFKERNELS_BACKEND (or ``use_backend``) names an unknown
    backend or one that cannot run on ``device``.
    """
    default = backends()["default"].get(device.type, "torch")
    used = _backend.select(device)  # differs from the default only if DIFFKERNELS_BACKEND / use_backend forces one
    return default if used == default else f"{used} (forced; default {default})"


def check_demo_args(*, steps: int, mask_ratio: float, seed: int, threads: Optional[int] = None,
                    batch_size: int = 128, n_samples: int = 64, sample_steps: int = 18,
                    optimal_queries: int = 512, log_every: int = 50) -> None:
    """Raise ValueError / TypeError naming the argument unless :func:`run_demo` accepts these settings."""
    _check_int(steps, "steps", 1)
    check_mask_ratio(mask_ratio)
    _check_int(seed, "seed", 0, 2**64 - 1)  # torch's generators take seeds below 2**64
    if threads is not None:
        _check_int(threads, "threads", 1)
    _check_int(batch_size, "batch_size", 1)
    _check_int(n_samples, "n_samples", 1)
    _check_int(sample_steps, "sample_steps", 2)  # the Heun schedule divides by sample_steps - 1
    _check_int(optimal_queries, "optimal_queries", 1)
    _check_int(log_every, "log_every", 1)


def run_demo(steps: int = 400, mask_ratio: float = 0.9, seed: int = 0, out="diffkernels_demo",
             device: Optional[str] = None, *, batch_size: int = 128, lr: float = 5e-3, channels: int = 32,
             blocks: int = 2, ema_decay: float = 0.999, n_samples: int = 64, sample_steps: int = 18,
             log_every: int = 50, progress: bool = True, optimal_queries: int = 512,
             threads: Optional[int] = None) -> dict:
    """Train a tiny EDM denoiser on the digits with ``sparse_mse_loss``, sample, and write figures.

    Loss (sparse supervision with EDM). For clean images y, sigma ~ exp(N(P_mean, P_std^2)) and
    x = y + sigma * n, the *denoiser output* D(x; sigma) is compared with the *clean image* y and
    each sample is weighted by lambda(sigma) = (sigma^2 + sigma_d^2) / (sigma sigma_d)^2::

        loss = sparse_mse_loss(D(x; sigma), y, mask_ratio, fold_seed(seed, step), weight=lambda(sigma))

    This is EDM's lambda ||D - y||^2. Since D = c_skip x + c_out F and lambda c_out^2 = 1, it
    equals, in value and gradient, the *unweighted* loss ||F - (y - c_skip x) / c_out||^2 on the raw
    network output F (so lambda must not be applied a second time when using the F-target form).
    The keep-mask is the same element-wise mask either way. With normalize="expected" (the
    default) the masked loss is an unbiased estimate of the dense per-pixel EDM loss. The network
    always sees the whole noisy image; only the loss is masked.

    Optimiser: Adam (lr ``lr``, 20-step linear warm-up); samples use an EMA of the weights with
    EDM-style ramp-up, beta_t = min(ema_decay, (1 + t) / (10 + t)), so in a 400-step run the
    EMA averages roughly the last 10% of the steps.

    Deterministic given ``seed``: ``torch.manual_seed(seed)`` for the weights, a CPU generator
    seeded with ``seed`` for batches, noise levels and noise (the same data on CPU and CUDA), and
    ``fold_seed(seed, step)`` for the mask of each step.

    The optimal loss: J*(sigma) of the digits themselves, from
    ``posterior_mean`` with ``optimal_queries`` queries per noise level, gives the smallest value the
    training loss can reach, E_sigma[lambda(sigma) J*(sigma) / D]; the summary reports the final loss's
    gap to it, and ``gap.png`` plots the model's per-element x0 error per noise level (second half of
    training, per-sample losses divided by lambda) against J*(sigma) / D.

    Writes ``samples.png`` (``n_samples`` deterministic Heun samples, 2 * sample_steps - 1
    network evaluations), ``loss.png``, ``gap.png`` and ``summary.json`` into ``out``. Returns a dict with
    ``initial_loss`` / ``final_loss`` (mean training loss over the first / last ``loss_window``
    steps, ``loss_window = clamp(steps // 8, 1, 50)``), ``losses`` (per step), ``out_dir``,
    ``optimal_loss`` and ``loss_gap``, ``memorized_fraction`` and ``mean_d1`` (Gu et al. 2023, generated samples vs the 1797 training
    images on the 0..255 scale), ``backend``, timings and the config.

    ``threads``: torch's CPU threads during the run (restored afterwards); None keeps the current
    setting. The demo's tensors are tiny: a second thread saves about a fifth of the time on an idle
    CPU but costs several times as much when other processes keep the cores busy.
    Every argument is checked (:func:`check_demo_args`) before anything is built or written.
    """
    check_demo_args(steps=steps, mask_ratio=mask_ratio, seed=seed, threads=threads, batch_size=batch_size,
                    n_samples=n_samples, sample_steps=sample_steps, optimal_queries=optimal_queries,
                    log_every=log_every)
    device = demo_device(device)
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run(steps, mask_ratio, seed, Path(out), device, batch_size=batch_size, lr=lr, channels=channels,
                    blocks=blocks, ema_decay=ema_decay, n_samples=n_samples, sample_steps=sample_steps,
                    log_every=log_every, progress=progress, optimal_queries=optimal_queries)
    finally:
        torch.set_num_threads(previous_threads)


def _run(steps: int, mask_ratio: float, seed: int, out_dir: Path, device: torch.device, *, batch_size: int,
         lr: float, channels: int, blocks: int, ema_decay: float, n_samples: int, sample_steps: int,
         log_every: int, progress: bool, optimal_queries: int) -> dict:
    """The body of :func:`run_demo`, with checked arguments."""
    t_start = time.perf_counter()
    backend = backend_label(device)
    out_dir.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    data = load_digits_tensor()
    data_dev = data.to(device)
    model = EDMPrecond(TinyDenoiser(channels=channels, blocks=blocks)).to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    warmup = max(1, min(20, steps // 10))
    n_params = sum(p.numel() for p in model.parameters())

    print(f"diffkernels demo: EDM on scikit-learn digits ({data.shape[0]} images, 8x8), {n_params} parameters, "
          f"{steps} steps x batch {batch_size}, mask_ratio={mask_ratio}, device={device}, backend={backend}, "
          f"{torch.get_num_threads()} CPU thread(s)")

    from tqdm.auto import tqdm

    losses: list[float] = []
    smoothed: list[float] = []
    pending: list[Tensor] = []  # losses not yet copied to the host (one sync every few steps on CUDA)
    per_sample_log: list[Tensor] = []  # (sigma, x0 error per element) of the second half, for gap.png
    ema_loss = None

    def flush() -> None:
        nonlocal ema_loss
        if not pending:
            return
        for value in torch.stack(pending).tolist():
            losses.append(value)
            ema_loss = value if ema_loss is None else 0.95 * ema_loss + 0.05 * value
            smoothed.append(ema_loss)
        pending.clear()

    bar = tqdm(range(steps), desc="training", disable=not progress, dynamic_ncols=True)
    t_train = time.perf_counter()
    for step in bar:
        idx = torch.randint(0, data.shape[0], (batch_size,), generator=gen)
        sigma = (torch.randn(batch_size, generator=gen) * P_STD + P_MEAN).exp()
        noise = torch.randn((batch_size, *data.shape[1:]), generator=gen)
        y = data_dev[idx.to(device)]
        sigma, noise = sigma.to(device), noise.to(device)
        x = y + sigma.reshape(-1, 1, 1, 1) * noise

        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / warmup)
        lam = edm_loss_weight(sigma)
        per_sample = sparse_mse_loss(model(x, sigma), y, mask_ratio, fold_seed(seed, step), weight=lam,
                                     reduction="none")
        loss = per_sample.mean()
        if step >= steps // 2:
            per_sample_log.append(torch.stack([sigma, per_sample.detach() / lam]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            beta = min(ema_decay, (1.0 + step) / (10.0 + step))
            for p_ema, p in zip(ema.parameters(), model.parameters()):
                p_ema.lerp_(p, 1.0 - beta)

        pending.append(loss.detach())
        if (step + 1) % 10 == 0 or (step + 1) % log_every == 0 or step + 1 == steps:
            flush()
            bar.set_postfix(loss=f"{ema_loss:.4f}", refresh=False)
        if (step + 1) % log_every == 0 or step + 1 == steps:
            msg = f"step {step + 1:5d}/{steps}  loss {losses[-1]:.4f}  EMA loss {ema_loss:.4f}"
            if progress:
                tqdm.write(msg)
            else:
                print(msg)
    bar.close()
    train_seconds = time.perf_counter() - t_train

    window = max(1, min(50, steps // 8))
    initial_loss = sum(losses[:window]) / window
    final_loss = sum(losses[-window:]) / window

    t_sample = time.perf_counter()
    samples = edm_heun_sample(ema, n_samples, steps=sample_steps, seed=seed, device=device).cpu()
    sample_seconds = time.perf_counter() - t_sample
    mem = memorization(samples, data)
    optimal = edm_optimal_loss(data, optimal_queries, seed, device)
    logged = torch.cat(per_sample_log, dim=1).cpu().double()
    edges = torch.logspace(math.log10(SIGMA_MIN), math.log10(SIGMA_MAX), 17, dtype=torch.float64)
    bin_sigma, bin_mse = loss_by_noise_level(logged[0].tolist(), logged[1].tolist(), edges)

    samples_png = out_dir / "samples.png"
    loss_png = out_dir / "loss.png"
    gap_png = out_dir / "gap.png"
    summary_json = out_dir / "summary.json"
    save_grid(samples, samples_png, f"{n_samples} EDM Heun samples ({2 * sample_steps - 1} NFE) after {steps} steps, "
                                    f"mask_ratio={mask_ratio}")
    save_loss_curve(losses, smoothed, loss_png, f"sparse EDM loss, mask_ratio={mask_ratio}, backend={backend}")
    save_gap_plot(optimal, bin_sigma, bin_mse, gap_png,
                  f"loss gap after {steps} steps: final {final_loss:.4f} vs optimal {optimal['optimal_loss']:.4f}")
    total_seconds = time.perf_counter() - t_start

    config = {
        "steps": steps, "mask_ratio": mask_ratio, "seed": seed, "device": str(device), "backend": backend,
        "batch_size": batch_size, "lr": lr, "warmup_steps": warmup, "ema_decay": ema_decay,
        "channels": channels, "blocks": blocks, "parameters": n_params, "sigma_data": SIGMA_DATA,
        "P_mean": P_MEAN, "P_std": P_STD, "sample_steps": sample_steps, "n_samples": n_samples,
        "sigma_min": SIGMA_MIN, "sigma_max": SIGMA_MAX, "rho": RHO,
        "loss": "sparse_mse_loss(D(x; sigma), y, mask_ratio, fold_seed(seed, step), weight=lambda(sigma)), "
                "normalize='expected', granularity='element'",
        "loss_window": window, "threads": torch.get_num_threads(),
    }
    result = {
        "initial_loss": initial_loss,
        "final_loss": final_loss,
        "losses": losses,
        "smoothed_losses": smoothed,
        "out_dir": str(out_dir),
        "optimal_loss": optimal["optimal_loss"],
        "loss_gap": final_loss - optimal["optimal_loss"],
        "optimal_curve": {"sigmas": optimal["sigmas"], "j_star_per_element": optimal["j_star_per_element"]},
        "loss_by_sigma": {"sigmas": bin_sigma, "x0_error_per_element": bin_mse},
        "memorized_fraction": mem["memorized_fraction"],
        "mean_d1": mem["mean_d1"],
        "backend": backend,
        "device": str(device),
        "train_seconds": train_seconds,
        "sample_seconds": sample_seconds,
        "total_seconds": total_seconds,
        "files": {"samples": str(samples_png), "loss": str(loss_png), "gap": str(gap_png), "summary": str(summary_json)},
        "config": config,
    }
    with open(summary_json, "w") as f:
        json.dump({**result, "d1": mem["d1"], "d1_over_d2": mem["ratio"]}, f, indent=1)

    print(f"\nsummary: loss {initial_loss:.4f} -> {final_loss:.4f} (mean over the first / last {window} steps)")
    print(f"  optimal loss of the digits under this schedule {optimal['optimal_loss']:.4f} "
          f"(E_sigma[lambda J*(sigma)/D]): gap {final_loss - optimal['optimal_loss']:.4f}")
    print(f"  mask ratio {mask_ratio}: each step supervised ~{100 * (1 - mask_ratio):.0f}% of the pixels")
    print(f"  backend {backend} on {device}; {steps} steps in {train_seconds:.1f} s, "
          f"{n_samples} samples in {sample_seconds:.1f} s, {total_seconds:.1f} s in all")
    print(f"  memorised fraction {mem['memorized_fraction']:.3f} (Gu et al.: d1/d2 < 1/3), "
          f"mean d1 {mem['mean_d1']:.1f} (distance to the nearest training image, 0..255 scale)")
    print("wrote:")
    for path in (samples_png, loss_png, gap_png, summary_json):
        print(f"  {os.fspath(path)}")
    return result
