"""``diffkernels demo``: train, sample and diagnose the tiny EDM model (:func:`run_demo`)."""

from __future__ import annotations

import copy
import json
import math
import numbers
import os
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from .. import _backend, backends, fold_seed, sparse_mse_loss
from .._validate import check_mask_ratio
from ..datasets import load_digits, to_pixels
from ..edm import (P_MEAN, P_STD, RHO, SIGMA_DATA, SIGMA_MAX, SIGMA_MIN, EDMPrecond, edm_heun_sample, edm_loss_weight,
                   ema_update, sample_noise_levels)
from ..optimal_loss import edm_schedule_loss, estimate_curve, memorization
from ..plots import save_image_grid
from .model import TinyDenoiser
from .plots import save_gap_plot, save_loss_curve

# Noise levels of the J* curve, log-spaced over SIGMA_MIN .. SIGMA_MAX. The total interpolates J* in ln sigma,
# which underestimates it where J* drops steeply (sigma ~ 0.1): by ~3% with 24 levels, ~0.7% with 48 (measured).
OPTIMAL_LEVELS = 48


def digits_optimal_loss(data: Tensor, queries: int, seed: int, device) -> dict:
    """The smallest possible value of the demo's training loss, E_sigma[lambda(sigma) J*(sigma) / D].

    J*(sigma) of the digits from :func:`~diffkernels.optimal_loss.estimate_curve` (full estimator,
    common random numbers: a smooth curve for the plot), integrated against EDM's noise distribution
    and weight by :func:`~diffkernels.optimal_loss.edm_schedule_loss`.
    """
    sigmas = np.geomspace(SIGMA_MIN, SIGMA_MAX, OPTIMAL_LEVELS)
    curve = estimate_curve(data, sigmas, num_queries=queries, seed=seed, progress=False, device=device,
                           common_random_numbers=True)
    j_star = curve.j_star_per_element
    total = edm_schedule_loss(sigmas, j_star, p_mean=P_MEAN, p_std=P_STD, sigma_data=SIGMA_DATA)
    return {"sigmas": sigmas.tolist(), "j_star_per_element": j_star.tolist(), "optimal_loss": total}


def loss_by_noise_level(sigmas: list, x0_mse: list, edges: Tensor) -> tuple[list, list]:
    """Mean per-element x0 error of the training samples in each log-sigma bin (bins with < 5 skipped)."""
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


# --- arguments ---------------------------------------------------------------------------------


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

    Optimiser: Adam (lr ``lr``, 20-step linear warm-up); samples use an EMA of the weights with a
    ramp-up (:func:`diffkernels.edm.ema_update`), beta_t = min(ema_decay, (1 + t) / (10 + t)), so in a
    400-step run the EMA averages roughly the last 10% of the steps.

    Deterministic given ``seed``: ``torch.manual_seed(seed)`` for the weights, a CPU generator
    seeded with ``seed`` for batches, noise levels and noise (the same data on CPU and CUDA), and
    ``fold_seed(seed, step)`` for the mask of each step.

    The optimal loss: J*(sigma) of the digits themselves (:func:`digits_optimal_loss`, ``optimal_queries``
    queries per noise level) gives the smallest value the
    training loss can reach, E_sigma[lambda(sigma) J*(sigma) / D]; the summary reports the final loss's
    gap to it, and ``gap.png`` plots the model's per-element x0 error per noise level (second half of
    training, per-sample losses divided by lambda) against J*(sigma) / D.

    Writes ``samples.png`` (``n_samples`` deterministic Heun samples, 2 * sample_steps - 1
    network evaluations), ``loss.png``, ``gap.png`` and ``summary.json`` into ``out``. Returns a dict with
    ``initial_loss`` / ``final_loss`` (mean training loss over the first / last ``loss_window``
    steps, ``loss_window = clamp(steps // 8, 1, 50)``), ``losses`` (per step), ``out_dir``,
    ``optimal_loss`` and ``loss_gap``, ``memorized_fraction`` and ``mean_d1`` (Gu et al. 2023, generated
    samples vs the 1797 training images on the 0..255 scale), ``backend``, timings and the config.

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
    data = load_digits()
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
        sigma = sample_noise_levels(batch_size, generator=gen)
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
        ema_update(ema, model, step, decay=ema_decay)

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
    samples = edm_heun_sample(ema, (n_samples, *data.shape[1:]), steps=sample_steps, seed=seed, device=device).cpu()
    sample_seconds = time.perf_counter() - t_sample
    # Gu et al. (2023) on the 0..255 scale: generated samples vs the training images.
    mem = memorization(to_pixels(samples.flatten(1).double()), to_pixels(data.flatten(1).double()))
    optimal = digits_optimal_loss(data, optimal_queries, seed, device)
    logged = torch.cat(per_sample_log, dim=1).cpu().double()
    edges = torch.logspace(math.log10(SIGMA_MIN), math.log10(SIGMA_MAX), 17, dtype=torch.float64)
    bin_sigma, bin_mse = loss_by_noise_level(logged[0].tolist(), logged[1].tolist(), edges)

    samples_png = out_dir / "samples.png"
    loss_png = out_dir / "loss.png"
    gap_png = out_dir / "gap.png"
    summary_json = out_dir / "summary.json"
    save_image_grid(samples, samples_png, f"{n_samples} EDM Heun samples ({2 * sample_steps - 1} NFE) after "
                                          f"{steps} steps, mask_ratio={mask_ratio}", cell=0.8)
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
        "memorized_fraction": mem.fraction,
        "mean_d1": mem.mean_d1,
        "backend": backend,
        "device": str(device),
        "train_seconds": train_seconds,
        "sample_seconds": sample_seconds,
        "total_seconds": total_seconds,
        "files": {"samples": str(samples_png), "loss": str(loss_png), "gap": str(gap_png),
                  "summary": str(summary_json)},
        "config": config,
    }
    with open(summary_json, "w") as f:
        json.dump({**result, "d1": mem.d1.tolist(), "d1_over_d2": mem.ratio.tolist()}, f, indent=1)

    print(f"\nsummary: loss {initial_loss:.4f} -> {final_loss:.4f} (mean over the first / last {window} steps)")
    print(f"  optimal loss of the digits under this schedule {optimal['optimal_loss']:.4f} "
          f"(E_sigma[lambda J*(sigma)/D]): gap {final_loss - optimal['optimal_loss']:.4f}")
    print(f"  mask ratio {mask_ratio}: each step supervised ~{100 * (1 - mask_ratio):.0f}% of the pixels")
    print(f"  backend {backend} on {device}; {steps} steps in {train_seconds:.1f} s, "
          f"{n_samples} samples in {sample_seconds:.1f} s, {total_seconds:.1f} s in all")
    print(f"  memorised fraction {mem.fraction:.3f} (Gu et al.: d1/d2 < 1/3), "
          f"mean d1 {mem.mean_d1:.1f} (distance to the nearest training image, 0..255 scale)")
    print("wrote:")
    for path in (samples_png, loss_png, gap_png, summary_json):
        print(f"  {os.fspath(path)}")
    return result
