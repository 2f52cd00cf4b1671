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

2. For each objective of ``--objectives`` (``edm``: EDM, ``fm``: flow matching), trainings with the
   same network, steps and seed, differing in the schedule (``--schedules``):
   - ``baseline``: the objective's own: EDM's lambda(s) = (s^2 + sigma_d^2) / (s sigma_d)^2 on the
     x0-loss with ln s ~ N(-1.2, 1.2^2) (Karras et al. 2022); flow matching's unweighted velocity loss
     (x0 weight (1 + s)^2 / s^2) with logit-normal t, ln s ~ N(0, 1). Runs ``edm`` and ``fm``.
   - ``jstar``: the same noise sampling, the loss weight replaced by the paper's form
     (``diffkernels.optimal_loss.loss_weight``) w(s) = a * min(1 / J*(s), w_max) + f(s) 1[s < s*]
     with s* the smallest grid level where J* >= 1e-3 max J*, w_max = 1 / J*(s*), and f a Gaussian
     bump in ln s centred at s* (width 0.5, height ``--bump`` * w_max). 1/J* makes every level's
     *optimal* loss count equally; the cap and the bump decide how much the levels below s* (where
     J* ~ 0) count. a is set so that w has the baseline weight's mean under the baseline's noise
     distribution (Adam is nearly invariant to a constant loss scale anyway). Runs ``jstar`` and ``fm jstar``.
   - ``adaptive``: the paper's full method: the weight w(s) and adaptive noise sampling
     p(s) ~ w(s) (J_theta(s) - J*(s)) (``diffkernels.optimal_loss.adaptive_density``) on the J* grid,
     J_theta(s) the running per-level training x0-loss (levels binned to the nearest grid point in ln s,
     refreshed every ``--adaptive-refresh`` steps, an exponential average of 0.5 across refreshes,
     unobserved levels interpolated in ln s), mixed with the baseline density
     (p <- (1 - m) p + m p_base, m = ``--adaptive-mix``, so every level stays reachable) and
     drawn with ``sample_sigmas``; the baseline density for the first ``--adaptive-warmup`` of the
     steps. The sampled loss is w(s) times the x0-loss, without a 1/p(s) correction: the sampling
     is part of the schedule, as in the paper. Runs ``jstar+adaptive`` and ``fm jstar+adaptive``.
   For each: the loss gap to J* per level (the final EMA model vs the optimal denoiser), the gap
   summed under EDM's and the J*-derived weighting (both under EDM's log-normal, one yardstick for
   every run), the quality score (digits-classifier Frechet distance, see train_image_diffusion.py)
   and the memorised fraction. Writes jstar.png, schedule.png, schedule_summary.json and each run's
   own outputs under ``--out``. ``--quick`` runs a tiny configuration of everything (seconds).
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
from diffkernels.edm import P_MEAN, P_STD, edm_loss_weight, log_sigma_pdf, sample_noise_levels
from diffkernels.optimal_loss import adaptive_density, find_s_star, interpolate_log, loss_weight, sample_sigmas

OBJECTIVES = ("edm", "fm")
SCHEDULES = ("baseline", "jstar", "adaptive")
RUN_NAMES = {("edm", "baseline"): "edm", ("edm", "jstar"): "jstar", ("edm", "adaptive"): "jstar+adaptive",
             ("fm", "baseline"): "fm", ("fm", "jstar"): "fm jstar", ("fm", "adaptive"): "fm jstar+adaptive"}
QUICK = {"steps": 4, "batch_size": 8, "n_samples": 8, "jstar_levels": 8, "jstar_queries": 16,
         "adaptive_refresh": 1}
QUICK_NET = {"channels": 8, "blocks": 1, "sample_steps": 3, "eval_queries": 8, "levels": 3}
from diffkernels.plots import pyplot


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-train", type=int, default=None, help="train on a random subset of the digits (default: all 1797)")
    p.add_argument("--jstar-levels", type=int, default=40, help="levels of the J* table, log-spaced over 0.002 .. 80")
    p.add_argument("--jstar-queries", type=int, default=1024, help="queries per level")
    p.add_argument("--bump", type=float, default=0.5, help="bump height as a multiple of w_max (0: no bump)")
    p.add_argument("--bump-width", type=float, default=0.5, help="bump width in ln s")
    p.add_argument("--objectives", nargs="+", choices=OBJECTIVES, default=list(OBJECTIVES),
                   help="edm: EDM; fm: flow matching")
    p.add_argument("--schedules", nargs="+", choices=SCHEDULES, default=list(SCHEDULES),
                   help="baseline: the objective's own; jstar: the J*-derived weight; adaptive: the weight and "
                        "adaptive noise sampling p(s) ~ w(s)(J_theta(s) - J*(s))")
    p.add_argument("--adaptive-warmup", type=float, default=0.1,
                   help="fraction of the steps sampled from the baseline density before adapting")
    p.add_argument("--adaptive-refresh", type=int, default=50, help="steps between refreshes of p(s)")
    p.add_argument("--adaptive-mix", type=float, default=0.2, help="share of the baseline density in p(s)")
    p.add_argument("--quick", action="store_true", help="a tiny configuration of everything (seconds; for tests)")
    p.add_argument("--steps", type=int, default=2000, help="training steps of each run")
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


# The baselines' noise distributions, as ln s ~ N(mean, std^2), and their loss weights on the x0-loss.
BASE_LOG_NORMAL = {"edm": (P_MEAN, P_STD), "fm": (tid.FM_P_MEAN, tid.FM_P_STD)}


def baseline_weight(objective: str, s) -> np.ndarray:
    """EDM's lambda(s), or flow matching's unweighted velocity loss as a weight on the x0-loss: (1 + s)^2 / s^2."""
    s = np.asarray(s, dtype=np.float64)
    if objective == "edm":
        return edm_loss_weight(torch.tensor(s)).numpy()
    return (1.0 + s) ** 2 / s**2


class JStarWeight:
    """w(s) = a min(1/J*(s), w_max) + bump(s) 1[s < s*] from a J* table (per element), by
    ``diffkernels.optimal_loss.loss_weight``: s* and w_max = 1/J*(s*) its defaults, the bump height
    ``bump`` * a * w_max, and a set for the same mean weight as the ``objective``'s baseline weight
    under its baseline noise distribution."""

    def __init__(self, sigmas, j_star, *, bump: float, bump_width: float, objective: str = "edm"):
        self.sigmas, self.j = np.asarray(sigmas, dtype=np.float64), np.asarray(j_star, dtype=np.float64)
        self.s_star = find_s_star(self.sigmas, self.j)
        self.w_max = 1.0 / float(interpolate_log(self.s_star, self.sigmas, self.j))
        self.bump, self.bump_width = bump, bump_width
        mean, std = BASE_LOG_NORMAL[objective]
        ls = np.linspace(mean - 5 * std, mean + 5 * std, 2001)
        dens = log_sigma_pdf(ls, mean, std)
        self.a = 1.0
        self.a = float(np.sum(dens * baseline_weight(objective, np.exp(ls))) / np.sum(dens * self.numpy(np.exp(ls))))

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


class NoiseSchedule:
    """The noise levels and loss weight of one run (the ``schedule`` hook of train_image_diffusion.train).

    ``weight``: None for the objective's baseline weight, else a :class:`JStarWeight`. ``adaptive``:
    sample p(s) ~ w(s)(J_theta(s) - J*(s)) mixed with the baseline density (module docstring) after
    ``warmup`` steps, refreshed every ``refresh`` steps; else the baseline density throughout (drawn
    exactly as the baseline run draws it, so runs that differ only in the weight share their noise).
    """

    def __init__(self, objective: str, sigmas, j_star, *, weight: Optional[JStarWeight] = None,
                 adaptive: bool = False, warmup: int = 0, refresh: int = 50, mix: float = 0.2):
        if adaptive and weight is None:
            raise ValueError("adaptive sampling needs the J*-derived weight")
        if not 0 < mix <= 1:
            raise ValueError(f"mix must lie in (0, 1] (every level must stay reachable), got {mix}")
        self.objective, self.weight_fn, self.adaptive = objective, weight, adaptive
        self.grid = np.asarray(sigmas, dtype=np.float64)
        self.j = np.asarray(j_star, dtype=np.float64)
        self.warmup, self.refresh, self.mix = warmup, max(1, refresh), mix
        self.mean, self.std = BASE_LOG_NORMAL[objective]
        self.base = log_sigma_pdf(np.log(self.grid), self.mean, self.std)  # density in ln s on the grid
        self.w_grid = None if weight is None else weight.numpy(self.grid)
        self.j_theta = np.full(self.grid.size, np.nan)
        self._sum = np.zeros(self.grid.size)
        self._count = np.zeros(self.grid.size)
        self.density = None  # the adaptive p(s) on the grid once active
        self.refreshes = 0

    def sample(self, n: int, gen: torch.Generator) -> torch.Tensor:
        if self.density is None:
            if self.objective == "edm":
                return sample_noise_levels(n, generator=gen)
            return torch.exp(torch.randn(n, generator=gen) * self.std + self.mean)
        return sample_sigmas(n, self.grid, self.density, generator=gen)

    def weight(self, s: torch.Tensor) -> torch.Tensor:
        values = s.detach().double().cpu().numpy()
        w = baseline_weight(self.objective, values) if self.weight_fn is None else self.weight_fn.numpy(values)
        return torch.as_tensor(w, dtype=s.dtype).to(s.device)

    def observe(self, step: int, s: torch.Tensor, x0_loss: torch.Tensor) -> None:
        if not self.adaptive:
            return
        u = np.log(s.double().cpu().numpy())
        edges = 0.5 * (np.log(self.grid[1:]) + np.log(self.grid[:-1]))  # nearest grid level in ln s
        idx = np.searchsorted(edges, u)
        np.add.at(self._sum, idx, x0_loss.double().cpu().numpy())
        np.add.at(self._count, idx, 1.0)
        if step + 1 >= self.warmup and (step + 1 - self.warmup) % self.refresh == 0:
            self.update()

    def update(self) -> None:
        """Fold the losses seen since the last refresh into J_theta and recompute p(s)."""
        seen = self._count > 0
        if not seen.any():
            return
        mean = np.where(seen, self._sum / np.maximum(self._count, 1), np.nan)
        fresh = seen & np.isnan(self.j_theta)
        self.j_theta = np.where(fresh, mean, self.j_theta)
        both = seen & ~fresh
        self.j_theta[both] = 0.5 * self.j_theta[both] + 0.5 * mean[both]
        self._sum[:], self._count[:] = 0.0, 0.0
        known = ~np.isnan(self.j_theta)
        u = np.log(self.grid)
        j_theta = np.interp(u, u[known], self.j_theta[known])  # unobserved levels: interpolated in ln s
        base = self.base / np.trapezoid(self.base, u)
        try:
            p = adaptive_density(self.grid, self.w_grid, j_theta, self.j)
        except ValueError:  # J_theta <= J* everywhere (noise): nothing to adapt to, use the baseline
            p = base
        self.density = (1.0 - self.mix) * p + self.mix * base
        self.refreshes += 1

    def describe(self) -> dict:
        return {"objective": self.objective, "weight": "baseline" if self.weight_fn is None else "jstar",
                "adaptive": self.adaptive, "refreshes": self.refreshes,
                "density": None if self.density is None else self.density.tolist(),
                "j_theta": [None if v != v else float(v) for v in self.j_theta]}


def apply_quick(args: argparse.Namespace) -> argparse.Namespace:
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    return args


def run(args: argparse.Namespace, *, curve: Optional[dict] = None, verbose: bool = True) -> dict:
    """J* table (or the given ``curve``), then the trainings; returns the summary dict."""
    apply_quick(args)
    set_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = load_images("digits", args.n_train, args.seed)
    t0 = time.perf_counter()
    if curve is None:
        curve = jstar_table(data, np.geomspace(0.002, 80.0, args.jstar_levels), args.jstar_queries, args.seed)
    jstar_seconds = time.perf_counter() - t0
    curve = {**curve, "gaussian_j_star": gaussian_jstar(data, curve["sigmas"]).tolist()}
    weights = {obj: JStarWeight(curve["sigmas"], curve["j_star"], bump=args.bump, bump_width=args.bump_width,
                                objective=obj) for obj in args.objectives}
    weight = weights.get("edm") or JStarWeight(curve["sigmas"], curve["j_star"], bump=args.bump,
                                               bump_width=args.bump_width)
    plot_jstar(curve, out / "jstar.png", len(data))

    runs, schedules = {}, {}
    for objective in args.objectives:
        for kind in args.schedules:
            name = RUN_NAMES[(objective, kind)]
            targs = tid.build_parser().parse_args([])
            for key in ("steps", "batch_size", "n_samples", "mask_ratio", "seed", "device", "threads", "cache",
                        "no_progress", "n_train"):
                setattr(targs, key, getattr(args, key))
            if args.quick:
                for key, value in QUICK_NET.items():
                    setattr(targs, key, value)
            targs.objective = objective
            targs.out = str(out / name.replace(" ", "_"))
            sched = NoiseSchedule(objective, curve["sigmas"], curve["j_star"],
                                  weight=None if kind == "baseline" else weights[objective],
                                  adaptive=kind == "adaptive", warmup=int(args.adaptive_warmup * args.steps),
                                  refresh=args.adaptive_refresh, mix=args.adaptive_mix)
            runs[name] = tid.train(targs, schedule=sched, data=data, tag=f"{name}:", verbose=verbose)
            schedules[name] = sched.describe()

    # The same gap under both weightings (per-level gaps on the shared evaluation grid), as integrals
    # over EDM's log-normal noise density in ln s: one yardstick for every run.
    first = next(iter(runs.values()))
    s = np.array(first["gap"]["sigmas"])
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
                            "bump_width": args.bump_width,
                            "a_by_objective": {k: w.a for k, w in weights.items()},
                            "adaptive": {"warmup": args.adaptive_warmup, "refresh": args.adaptive_refresh,
                                         "mix": args.adaptive_mix}},
               "noise_schedules": schedules,
               "runs": table, "gaps": {k: r["gap"] for k, r in runs.items()}}
    with open(out / "schedule_summary.json", "w") as f:
        json.dump(summary, f, indent=1)
    plot_schedule(summary, weight, out / "schedule.png")
    if verbose:
        print(f"s* = {weight.s_star:.3g}, w_max = {weight.w_max:.3g}, a = {weight.a:.3g}")
        for name, row in table.items():
            print(f"  {name:18s}: EDM-weighted gap {row['edm_weighted_gap']:.4f}, J*-weighted gap "
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
           title="loss weights (shaded: EDM's noise density)")
    axd = ax.twinx()
    axd.fill_between(s, dens, color="0.9", zorder=0)
    for name, sched in summary.get("noise_schedules", {}).items():
        if sched["density"] is not None:  # the final adaptive p(s), a density in ln s like the shading
            axd.plot(summary["j_star"]["sigmas"], sched["density"], ":", lw=1, label=f"p(s) of {name}")
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
