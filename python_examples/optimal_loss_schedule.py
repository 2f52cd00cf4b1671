#!/usr/bin/env python
"""The optimal loss J*(s) of the digits, and a training schedule derived from it (docs/METHODS.md section 3).

1. J*(s): the smallest per-element x0-loss any denoiser can reach on the training set at VE noise
   level s, E_x[tr Cov(x0 | x)] / D with the exact posterior over the training images
   (``diffkernels.optimal_loss.estimate_curve``: the full estimator in its low-variance
   posterior-variance form, with common random numbers across levels; standard errors over the
   queries). Plotted with the J* of a Gaussian with the data's covariance,
   sum_j lambda_j s^2 / (lambda_j + s^2) / D: the two agree at large s and part where the finite
   training set's nearest-neighbour spacing takes over (there J* of the data drops to ~0: the
   optimal denoiser returns the nearest training image -- it memorises).

2. Two EDM trainings with the same noise sampling (log-normal), network, steps and seed, differing
   only in the loss weight on the per-element x0-loss:
   - ``edm``: lambda(s) = (s^2 + sigma_d^2) / (s sigma_d)^2 (Karras et al. 2022);
   - ``jstar``: the paper's form (``diffkernels.optimal_loss.loss_weight``)
     w(s) = a * min(1 / J*(s), w_max) + f(s) 1[s < s*] with s* the
     smallest grid level where J* >= 1e-3 max J*, w_max = 1 / J*(s*), and f a Gaussian bump in ln s
     centred at s* (width 0.5, height ``--bump`` * w_max). 1/J* makes every level's *optimal* loss
     count equally; the cap and the bump decide how much the levels below s* (where J* ~ 0) count.
     a is set so that both weights have the same mean under the noise distribution (Adam is nearly
     invariant to a constant loss scale anyway).
   For each: the loss gap to J* per level (the final EMA model vs the optimal denoiser), the gap
   summed under both weightings, the quality score (digits-classifier Frechet distance, see
   train_image_diffusion.py) and the memorised fraction. Writes jstar.png, schedule.png,
   schedule_summary.json and each run's own outputs under ``--out``.

Not done here: the paper's adaptive noise sampling p(s) ~ w(s) (J_theta(s) - J*(s)); both runs sample
s from EDM's log-normal.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from _common import jstar_table, load_images, set_threads
import train_image_diffusion as tid
from diffkernels.edm import P_MEAN, P_STD, edm_loss_weight, log_sigma_pdf
from diffkernels.optimal_loss import find_s_star, interpolate_log, loss_weight
from diffkernels.plots import pyplot


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-train", type=int, default=None, help="train on a random subset of the digits (default: all 1797)")
    p.add_argument("--jstar-levels", type=int, default=40, help="levels of the J* table, log-spaced over 0.002 .. 80")
    p.add_argument("--jstar-queries", type=int, default=1024, help="queries per level")
    p.add_argument("--bump", type=float, default=0.5, help="bump height as a multiple of w_max (0: no bump)")
    p.add_argument("--bump-width", type=float, default=0.5, help="bump width in ln s")
    p.add_argument("--steps", type=int, default=2000, help="training steps of each of the two runs")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--n-samples", type=int, default=256)
    p.add_argument("--mask-ratio", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=1, help="CPU threads for torch (0: torch's default)")
    p.add_argument("--cache", default=None, help="cache directory for the quality classifier")
    p.add_argument("--out", default="out/optimal_loss_schedule")
    p.add_argument("--no-progress", action="store_true")
    return p


class JStarWeight:
    """w(s) = a min(1/J*(s), w_max) + bump(s) 1[s < s*] from a J* table (per element), by
    ``diffkernels.optimal_loss.loss_weight``: s* and w_max = 1/J*(s*) its defaults, the bump height
    ``bump`` * a * w_max, and a set for the same mean weight as EDM's lambda under the log-normal."""

    def __init__(self, sigmas, j_star, *, bump: float, bump_width: float):
        self.sigmas, self.j = np.asarray(sigmas, dtype=np.float64), np.asarray(j_star, dtype=np.float64)
        self.s_star = find_s_star(self.sigmas, self.j)
        self.w_max = 1.0 / float(interpolate_log(self.s_star, self.sigmas, self.j))
        self.bump, self.bump_width = bump, bump_width
        ls = np.linspace(P_MEAN - 5 * P_STD, P_MEAN + 5 * P_STD, 2001)
        dens = log_sigma_pdf(ls)
        lam = edm_loss_weight(torch.tensor(np.exp(ls))).numpy()
        self.a = 1.0
        self.a = float(np.sum(dens * lam) / np.sum(dens * self.numpy(np.exp(ls))))

    def numpy(self, s) -> np.ndarray:
        return loss_weight(s, self.sigmas, self.j, a=self.a, w_max=self.w_max, s_star=self.s_star,
                           bump_height=self.bump * self.a * self.w_max, bump_width=self.bump_width)

    def __call__(self, sigma: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(self.numpy(sigma.detach().double().cpu().numpy()), dtype=sigma.dtype).to(sigma.device)


def gaussian_jstar(data: torch.Tensor, sigmas) -> np.ndarray:
    """J*/D of a Gaussian with the data's covariance: sum_j lambda_j s^2 / (lambda_j + s^2) / D."""
    x = data.reshape(len(data), -1).double()
    lam = torch.linalg.eigvalsh(torch.cov(x.T)).clamp(min=0).numpy()
    s2 = np.asarray(sigmas)[:, None] ** 2
    return (lam * s2 / (lam + s2)).sum(1) / x.shape[1]


def run(args: argparse.Namespace, *, curve: Optional[dict] = None, verbose: bool = True) -> dict:
    """J* table (or the given ``curve``), then the two trainings; returns the summary dict."""
    set_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = load_images("digits", args.n_train, args.seed)
    t0 = time.perf_counter()
    if curve is None:
        curve = jstar_table(data, np.geomspace(0.002, 80.0, args.jstar_levels), args.jstar_queries, args.seed)
    jstar_seconds = time.perf_counter() - t0
    curve = {**curve, "gaussian_j_star": gaussian_jstar(data, curve["sigmas"]).tolist()}
    weight = JStarWeight(curve["sigmas"], curve["j_star"], bump=args.bump, bump_width=args.bump_width)
    plot_jstar(curve, out / "jstar.png", len(data))

    runs = {}
    for name in ("edm", "jstar"):
        targs = tid.build_parser().parse_args([])
        for key in ("steps", "batch_size", "n_samples", "mask_ratio", "seed", "device", "threads", "cache",
                    "no_progress", "n_train"):
            setattr(targs, key, getattr(args, key))
        targs.out = str(out / name)
        runs[name] = tid.train(targs, weight_fn=None if name == "edm" else weight, data=data,
                               tag=f"{name} weighting:",
                               verbose=verbose)

    # The same gap under both weightings (per-level gaps on the shared evaluation grid), as integrals
    # over the log-normal noise density in ln s.
    s = np.array(runs["edm"]["gap"]["sigmas"])
    w_j = weight.numpy(s)
    table = {}
    for name, r in runs.items():
        g = r["gap"]["gap"]
        table[name] = {
            "edm_weighted_gap": r["gap"]["edm_weighted_gap"],
            "jstar_weighted_gap": tid.edm_weighted(s, g, weight=w_j),
            "fd": r["quality"]["fd"], "fd_real_floor": r["quality"]["fd_real_floor"],
            "memorized_fraction": r["memorized_fraction"], "mean_d1": r["mean_d1"],
            "seconds": r["seconds"]["total"],
        }
    summary = {"config": {**vars(args), "out": str(out)}, "j_star": curve, "jstar_seconds": jstar_seconds,
               "schedule": {"s_star": weight.s_star, "w_max": weight.w_max, "a": weight.a, "bump": args.bump,
                            "bump_width": args.bump_width},
               "runs": table, "gaps": {k: r["gap"] for k, r in runs.items()}}
    with open(out / "schedule_summary.json", "w") as f:
        json.dump(summary, f, indent=1)
    plot_schedule(summary, weight, out / "schedule.png")
    if verbose:
        print(f"s* = {weight.s_star:.3g}, w_max = {weight.w_max:.3g}, a = {weight.a:.3g}")
        for name, row in table.items():
            print(f"  {name:5s}: EDM-weighted gap {row['edm_weighted_gap']:.4f}, J*-weighted gap "
                  f"{row['jstar_weighted_gap']:.4f}, FD {row['fd']:.2f} (floor {row['fd_real_floor']:.2f}), "
                  f"memorised {row['memorized_fraction']:.3f}")
        print(f"wrote {out / 'jstar.png'}, {out / 'schedule.png'}, {out / 'schedule_summary.json'}")
    return summary


def plot_jstar(curve: dict, path: Path, n: int) -> None:
    plt = pyplot()
    s, j, se = (np.array(curve[k]) for k in ("sigmas", "j_star", "j_star_se"))
    fig, ax = plt.subplots(figsize=(6, 3.8))
    ax.errorbar(s, np.maximum(j, 1e-30), yerr=se, fmt="o-", ms=3, lw=1.2, label=f"digits ({n} images), J*(s)/D")
    ax.plot(s, curve["gaussian_j_star"], "--", label="Gaussian with the data covariance")
    ax.axhline(curve["total_variance_per_element"], color="0.6", lw=0.8, label="tr Cov / D (s -> inf)")
    ax.set(xscale="log", yscale="log", xlabel="noise level s (VE)", ylabel="optimal x0-loss per element",
           title="optimal loss of the digits training set")
    ax.set_ylim(1e-6, 1.0)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_schedule(summary: dict, weight: JStarWeight, path: Path) -> None:
    plt = pyplot()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    s = np.geomspace(0.002, 80, 300)
    ax.plot(s, edm_loss_weight(torch.tensor(s)).numpy(), label="EDM lambda(s)")
    ax.plot(s, weight.numpy(s), label="J*-derived w(s)")
    dens = log_sigma_pdf(np.log(s))
    ax.axvline(weight.s_star, color="0.6", lw=0.8, ls=":", label="s*")
    ax.set(xscale="log", yscale="log", xlabel="noise level s", ylabel="loss weight on the x0-loss",
           title="loss weights (noise sampled log-normal for both)")
    axd = ax.twinx()
    axd.fill_between(s, dens, color="0.9", zorder=0)
    axd.set_yticks([])
    ax.set_zorder(axd.get_zorder() + 1)
    ax.patch.set_visible(False)
    ax.legend(fontsize=7)
    for name, g in summary["gaps"].items():
        ax2.errorbar(g["sigmas"], g["gap"], yerr=g["gap_se"], fmt="o-", ms=3, lw=1, label=name)
    ax2.set(xscale="log", yscale="log", xlabel="noise level s", ylabel="E||D_theta - D*||^2 / D",
            title="gap to the optimal denoiser after training")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> dict:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
