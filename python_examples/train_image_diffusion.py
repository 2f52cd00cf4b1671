#!/usr/bin/env python
"""Train a small image diffusion model (EDM or flow matching) with sparse supervision, and diagnose it.

The loss is ``diffkernels.sparse_mse_loss`` (docs/METHODS.md section 1): each step supervises a random
``1 - mask_ratio`` of the elements (fresh counter-RNG mask per step); the network sees the whole
noisy image. ``--mask-ratio 0`` is ordinary dense training.

What it reports (all written to ``--out``):

- ``loss_gap.png``: the per-element x0-loss per noise level against J*(s), the optimal loss of the
  training set (docs/METHODS.md section 3; computed here with ``diffkernels.posterior_mean``). Left: the
  training loss per noise-level bin (early and late in training) and the final EMA model's dense
  loss on fixed evaluation queries; right: the gap E||D_theta(x) - D*(x)||^2 / D of that model,
  which is exactly its loss minus J* (in expectation) and has far less noise than the difference.
- ``samples.png``: a grid of samples (EDM's Heun sampler; a Heun ODE solver for flow matching).
- ``loss.png``: the training loss per step.
- ``summary.json``: everything, including the memorised fraction of the samples (Gu et al. 2023:
  nearest / second-nearest training image distance ratio < 1/3) and the quality score.

Quality score: the Frechet distance between generated and real digits in the 32-d feature space of
a small digits classifier that this example trains once (a few seconds) and caches under
``~/.cache/diffkernels`` (or ``--cache``). It is our stand-in for FID, which needs an ImageNet
network and means nothing on 8x8 images; compare it only across runs of these examples, together
with ``fd_real_floor`` (the score of as many *real* digits; FD is biased upward at small sample
sizes). Only computed for 1x8x8 data.

Objectives. ``edm``: Karras et al. (2022) preconditioning, log-normal noise levels, loss weight
lambda(sigma) on the denoiser's x0 error (``diffkernels.edm``). ``fm``: flow matching (rectified
flow), x_t = (1 - t) x0 + t eps, the network predicts the velocity eps - x0, t ~ logit-normal(0, 1).
Both use the demo's tiny conv + token-mixing network (:class:`diffkernels.demo.model.TinyDenoiser`); flow matching maps to
the VE level s = t / (1 - t), and its velocity loss is (1 + s)^2 / s^2 times the x0-loss, which is
how its curves are put on J*'s scale.

The sparse loss runs on the device's default backend (``diffkernels.backends()``): on a GPU the CUDA
kernels where they are built, else the Triton kernels; on the CPU the C++ kernels.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch import Tensor

from torch import nn

from _common import BinnedLoss, default_device, is_digits_shaped, load_images, quality_score, set_threads
from diffkernels import fold_seed, posterior_mean, sparse_mse_loss
from diffkernels.datasets import to_pixels
from diffkernels.demo.model import TinyDenoiser
from diffkernels.edm import (EDMPrecond, edm_heun_sample, edm_loss_weight, ema_update, heun_solve, karras_sigmas,
                             log_sigma_pdf, sample_noise_levels)
from diffkernels.optimal_loss import memorization
from diffkernels.plots import pyplot, save_image_grid

FM_P_MEAN, FM_P_STD = 0.0, 1.0  # logit-normal t for flow matching (Esser et al. 2024): ln s ~ N(0, 1)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="digits", help="'digits' (scikit-learn's bundled 8x8 digits) or a .npy array of "
                   "square images: (N, H, H), (N, H, H, C) or (N, C, H, H)")
    p.add_argument("--n-train", type=int, default=None,
                   help="train on a random subset of this many images (small data shows memorisation sooner)")
    p.add_argument("--objective", choices=("edm", "fm"), default="edm", help="EDM or flow matching")
    p.add_argument("--steps", type=int, default=3000, help="optimizer steps (default: about 3-5 min on 2 CPU cores)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--mask-ratio", type=float, default=0.0, help="fraction eta of loss elements masked out (0 = dense)")
    p.add_argument("--granularity", choices=("element", "pixel"), default="element",
                   help="mask single elements, or whole pixels (all channels together)")
    p.add_argument("--normalize", choices=("expected", "all", "kept"), default="expected",
                   help="normaliser of the masked loss (docs/METHODS.md section 1)")
    p.add_argument("--channels", type=int, default=32)
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--n-samples", type=int, default=256, help="samples for memorisation and the quality score")
    p.add_argument("--sample-steps", type=int, default=18, help="Heun steps (2 * steps - 1 network evaluations)")
    p.add_argument("--eval-queries", type=int, default=512, help="queries per noise level for the loss gap")
    p.add_argument("--levels", type=int, default=16, help="noise levels of the loss-gap evaluation (0.01 .. 50)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads for torch (0: torch's default)")
    p.add_argument("--cache", default=None,
                   help="cache directory for the quality classifier (default ~/.cache/diffkernels)")
    p.add_argument("--out", default="out/image_diffusion", help="output directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


# --- flow matching ----------------------------------------------------------------------------


class FlowNet(nn.Module):
    """v_theta(x_t, t) for flow matching: the network conditioned on c_noise = ln(s) / 4 with
    s = t / (1 - t) (the same embedding scale as EDM's c_noise = ln(sigma) / 4)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x_t: Tensor, t: Tensor) -> Tensor:
        s = t / (1 - t)
        return self.net(x_t, s.log() / 4.0)

    def denoise(self, x: Tensor, sigma: Tensor) -> Tensor:
        """x0 estimate from a VE query x = x0 + sigma eps: x_t = x / (1 + sigma), x0 = x_t - t v."""
        s = sigma.reshape(-1, *([1] * (x.dim() - 1)))
        t = s / (1 + s)
        x_t = x / (1 + s)
        return x_t - t * self(x_t, t.reshape(-1))


@torch.no_grad()
def fm_heun_sample(model: FlowNet, n: int, *, steps: int, seed: int, device, shape) -> Tensor:
    """Heun ODE solver for dx/dt = v(x, t) from t_max down to 0 on EDM's rho = 7 grid mapped to t = s / (1 + s)."""
    gen = torch.Generator().manual_seed(seed)
    s = karras_sigmas(steps)
    t = (s / (1 + s)).tolist()  # the final level s = 0 is t = 0
    x = torch.randn((n, *shape), generator=gen).to(device) * t[0]  # (1 - t) x0 is negligible at t_max
    return heun_solve(lambda x, t: model(x, torch.full((n,), t, device=device)), x, t)


# --- training ---------------------------------------------------------------------------------


def train(args: argparse.Namespace, *, weight_fn: Optional[Callable[[Tensor], Tensor]] = None,
          data: Optional[Tensor] = None, tag: str = "", verbose: bool = True, schedule=None) -> dict:
    """Train, sample and evaluate as described in the module docstring; returns the summary dict.

    ``weight_fn(sigma) -> (B,) weights`` replaces EDM's lambda(sigma) on the per-element x0-loss
    (used by optimal_loss_schedule.py); EDM objective only. ``data`` overrides ``args.data``.

    ``schedule`` (either objective; excludes ``weight_fn``): an object with ``sample(n, gen) -> (n,)``
    VE noise levels s (CPU float32), ``weight(s) -> (n,)`` weights on the per-element x0-loss, and
    ``observe(step, s, x0_loss)`` receiving each step's levels and unweighted per-sample x0-losses
    (used by optimal_loss_schedule.py for the adaptive noise sampling). For flow matching t = s / (1 + s)
    and the velocity loss is weighted by weight(s) t^2 (the x0-loss is t^2 times the velocity loss).
    """
    t_start = time.perf_counter()
    set_threads(args.threads)
    device = default_device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if data is None:
        data = load_images(args.data, args.n_train, args.seed)
    if weight_fn is not None and args.objective != "edm":
        raise ValueError("weight_fn applies to the EDM objective only")
    if weight_fn is not None and schedule is not None:
        raise ValueError("give weight_fn or schedule, not both")
    shape = tuple(data.shape[1:])
    C, H, W = shape
    if H != W:
        raise ValueError(f"the network needs square images, got {H}x{W}")

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    net = TinyDenoiser(C, channels=args.channels, blocks=args.blocks, size=H)
    model = (EDMPrecond(net) if args.objective == "edm" else FlowNet(net)).to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    warmup = max(1, min(100, args.steps // 10))
    data_dev = data.to(device)
    binned = BinnedLoss(0.002, 100.0, 20, windows=4, steps=args.steps)
    losses = []

    from tqdm.auto import tqdm

    label = f"{tag} " if tag else ""
    bar = tqdm(range(args.steps), desc=f"{label}{args.objective} eta={args.mask_ratio}", disable=args.no_progress,
               dynamic_ncols=True, leave=False)
    for step in bar:
        idx = torch.randint(0, data.shape[0], (args.batch_size,), generator=gen)
        y = data_dev[idx.to(device)]
        noise = torch.randn((args.batch_size, *shape), generator=gen).to(device)
        if args.objective == "edm":
            if schedule is None:
                sigma = sample_noise_levels(args.batch_size, generator=gen).to(device)
            else:
                sigma = schedule.sample(args.batch_size, gen).to(device)
            x = y + sigma.view(-1, 1, 1, 1) * noise
            pred, target = model(x, sigma), y
            weight = edm_loss_weight(sigma) if weight_fn is None else weight_fn(sigma)
            weight = weight if schedule is None else schedule.weight(sigma)
            to_x0 = torch.ones_like(sigma)
        else:
            if schedule is None:
                t = torch.sigmoid(torch.randn(args.batch_size, generator=gen) * FM_P_STD + FM_P_MEAN).to(device)
            else:
                s_draw = schedule.sample(args.batch_size, gen).to(device)
                t = s_draw / (1 + s_draw)
            sigma = t / (1 - t)
            x_t = (1 - t.view(-1, 1, 1, 1)) * y + t.view(-1, 1, 1, 1) * noise
            pred, target = model(x_t, t), noise - y
            weight = torch.ones_like(t) if schedule is None else schedule.weight(sigma) * t * t
            to_x0 = t * t  # x0 error = -t * velocity error
        for group in opt.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / warmup)
        # Per-sample masked MSE (an unbiased estimate of the dense per-element MSE with
        # normalize="expected"); weighting outside the op keeps the unweighted values for the bins.
        per_sample = sparse_mse_loss(pred, target, args.mask_ratio, fold_seed(args.seed, step),
                                     granularity=args.granularity, normalize=args.normalize, reduction="none")
        loss = (weight * per_sample).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema_update(ema, model, step, decay=args.ema_decay)
        binned.add(step, sigma, per_sample * to_x0)
        if schedule is not None:
            schedule.observe(step, sigma.detach(), (per_sample * to_x0).detach())
        losses.append(loss.detach())
        if (step + 1) % 50 == 0:
            bar.set_postfix(loss=f"{float(torch.stack(losses[-50:]).mean()):.4f}", refresh=False)
    bar.close()
    losses = torch.stack(losses).cpu().tolist() if losses else []
    train_seconds = time.perf_counter() - t_start

    # Loss gap on fixed queries: the EMA model against the optimal denoiser of the training set.
    t_eval = time.perf_counter()
    sigmas = np.geomspace(0.01, 50.0, args.levels).tolist()
    # Fixed (clean image, unit noise) pairs, reused at every level (common random numbers).
    gen = torch.Generator().manual_seed(fold_seed(args.seed, 1))
    y = data[torch.randint(0, data.shape[0], (args.eval_queries,), generator=gen)].to(device)
    noise = torch.randn((args.eval_queries, *shape), generator=gen).to(device)
    gap = {"sigmas": sigmas, "model_loss": [], "j_star": [], "gap": [], "gap_se": []}
    D = y[0].numel()
    with torch.no_grad():
        for s in sigmas:
            x = y + s * noise
            sig = torch.full((len(x),), s, device=device)
            d_theta = ema(x, sig) if args.objective == "edm" else ema.denoise(x, sig)
            # the optimal denoiser E[x0 | x] over the training set and tr Cov[x0 | x] (J* per query)
            d_star, _, var = posterior_mean(x.flatten(1), data_dev.flatten(1), s, return_stats=True)
            g = ((d_theta - d_star.reshape(x.shape)) ** 2).flatten(1).mean(1).double()
            gap["model_loss"].append(float(((d_theta - y) ** 2).flatten(1).mean(1).mean()))
            gap["j_star"].append(float(var.mean() / D))
            gap["gap"].append(float(g.mean()))
            gap["gap_se"].append(float(g.std() / math.sqrt(len(g))))
    # One scalar for tables: EDM's own training loss minus its optimum -- the same yardstick for every run.
    gap["edm_weighted_gap"] = edm_weighted(sigmas, gap["gap"])
    gap["edm_weighted_j_star"] = edm_weighted(sigmas, gap["j_star"])
    eval_seconds = time.perf_counter() - t_eval

    t_sample = time.perf_counter()
    if args.objective == "edm":
        samples = edm_heun_sample(ema, (args.n_samples, *shape), steps=args.sample_steps, seed=args.seed,
                                  device=device)
    else:
        samples = fm_heun_sample(ema, args.n_samples, steps=args.sample_steps, seed=args.seed, device=device,
                                 shape=shape)
    samples = samples.cpu()
    sample_seconds = time.perf_counter() - t_sample
    mem = memorization(to_pixels(samples.flatten(1).double()), to_pixels(data.flatten(1).double()))
    quality = quality_score(samples, args.cache, train=data) if is_digits_shaped(data) else None

    files = {"samples": out / "samples.png", "loss_gap": out / "loss_gap.png", "loss": out / "loss.png",
             "summary": out / "summary.json"}
    title = f"{args.objective}, eta={args.mask_ratio}, {args.steps} steps, seed {args.seed}"
    save_image_grid(samples[:100], files["samples"], f"samples ({title})")
    plot_gap(binned, gap, files["loss_gap"], title)
    plot_losses(losses, files["loss"], title)

    summary = {
        "config": {k: v for k, v in vars(args).items()},
        "n_train_images": int(data.shape[0]),
        "parameters": sum(p.numel() for p in model.parameters()),
        "weighting": "custom schedule" if schedule is not None else (
            "edm lambda(sigma)" if weight_fn is None and args.objective == "edm" else
            ("custom weight_fn" if weight_fn is not None else "flow matching (unweighted velocity)")),
        "losses": losses,
        "final_loss": float(np.mean(losses[-max(1, len(losses) // 10):])) if losses else float("nan"),
        "binned_train_loss": binned.to_dict(),
        "gap": gap,
        "memorized_fraction": mem.fraction,
        "mean_d1": mem.mean_d1,
        "quality": quality,
        "device": str(device),
        "seconds": {"train": train_seconds, "eval": eval_seconds, "sample": sample_seconds,
                    "total": time.perf_counter() - t_start},
        "files": {k: str(v) for k, v in files.items()},
    }
    summary["config"]["out"] = str(out)
    with open(files["summary"], "w") as f:
        json.dump(summary, f, indent=1)
    if verbose and not tag:  # standalone runs print the per-level table; grids (tagged) keep one line per run
        late = interp_bins(binned, sigmas)
        print(f"{'s':>8} {'train loss (last quarter)':>26} {'EMA model loss':>15} {'J*(s)/D':>10} {'gap':>10}")
        for s, tl, ml, j, g in zip(sigmas, late, gap["model_loss"], gap["j_star"], gap["gap"]):
            print(f"{s:8.3g} {tl:26.4g} {ml:15.4g} {j:10.4g} {g:10.4g}")
    if verbose:
        q = f", quality FD {quality['fd']:.2f} (real-data floor {quality['fd_real_floor']:.2f})" if quality else ""
        print(f"{label}{title}: final loss {summary['final_loss']:.4f}, EDM-weighted gap {gap['edm_weighted_gap']:.4f} "
              f"(optimum {gap['edm_weighted_j_star']:.4f}), memorised {mem.fraction:.3f}, "
              f"mean d1 {mem.mean_d1:.1f}{q}; {summary['seconds']['total']:.0f} s -> {out}")
    return summary


def edm_weighted(sigmas, values, weight: Optional[np.ndarray] = None) -> float:
    """E_s[w(s) v(s)] under EDM's training distribution of s (log-normal), by the trapezoid rule in ln s
    over the grid ``sigmas``; w = EDM's lambda(s) unless ``weight`` (its values on the grid) is given.
    With v = the per-level gap: that loss's reducible part."""
    s = np.asarray(sigmas, dtype=np.float64)
    ls = np.log(s)
    w = edm_loss_weight(torch.tensor(s)).numpy() if weight is None else np.asarray(weight, dtype=np.float64)
    return float(np.trapezoid(log_sigma_pdf(ls) * w * np.asarray(values, dtype=np.float64), ls))


def interp_bins(binned: BinnedLoss, sigmas) -> list:
    """The last window's binned training loss at the given levels (nearest bin in ln s; NaN if empty)."""
    means = binned.means()[-1]
    idx = np.clip(np.searchsorted(binned.edges, sigmas) - 1, 0, len(means) - 1)
    return [float(means[i]) for i in idx]


def plot_gap(binned: BinnedLoss, gap: dict, path: Path, title: str) -> None:
    plt = pyplot()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    s, j = np.array(gap["sigmas"]), np.array(gap["j_star"])
    means = binned.means()
    c = binned.centers()
    for w, label in ((0, "training loss, first quarter"), (binned.windows - 1, "training loss, last quarter")):
        ok = ~np.isnan(means[w])
        ax.plot(c[ok], means[w][ok], "o-", ms=3, lw=1, label=label, alpha=0.8)
    ax.plot(s, gap["model_loss"], "s-", ms=3, lw=1.2, label="EMA model, eval queries")
    ax.plot(s, np.maximum(j, 1e-30), "k--", lw=1.5, label="J*(s)/D (optimal)")
    ax.set(xscale="log", yscale="log", xlabel="noise level s (VE)", ylabel="x0-loss per element", title=title)
    # J* of a finite training set falls to ~0 below the nearest-neighbour spacing; keep the models in view
    ax.set_ylim(bottom=0.1 * min(v for v in gap["model_loss"] if v > 0))
    ax.legend(fontsize=7)
    ax2.errorbar(s, gap["gap"], yerr=gap["gap_se"], fmt="o-", ms=3, lw=1)
    ax2.set(xscale="log", yscale="log", xlabel="noise level s (VE)", ylabel="E||D_theta - D*||^2 / D",
            title="gap to the optimal denoiser")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_losses(losses: list, path: Path, title: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    if losses:
        v = np.array(losses)
        k = max(1, len(v) // 50)
        ax.plot(v, color="0.75", lw=0.6, label="per step")
        ax.plot(np.arange(k - 1, len(v)), np.convolve(v, np.ones(k) / k, mode="valid"), lw=1.4, label=f"mean of {k}")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    ax.set(xlabel="step", ylabel="weighted training loss", title=title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    return train(args)


if __name__ == "__main__":
    main()
