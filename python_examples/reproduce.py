#!/usr/bin/env python
"""Run the reproduction grids of the three papers over several seeds and write a RESULTS.md report.

    python python_examples/reproduce.py --budget small                # <= ~30 min on 2 CPU cores
    python python_examples/reproduce.py --budget full                 # longer runs, same grids
    python python_examples/reproduce.py --budget small --write-docs   # update the checkout's docs/RESULTS.md

Grids (each over ``--seeds``, default 0 1 2):

- Sparse supervision (train_image_diffusion.py, EDM on a small digits subset so that memorisation
  can appear within the budget): mask ratio eta in {0, 0.5, 0.95, 0.98}; memorised fraction, mean
  nearest-neighbour distance, quality score (digits-classifier Frechet distance), loss gap, curves.
- Masked diffusion LM (train_masked_diffusion_lm.py, 2-digit addition): standard vs P-POTS vs
  MIRROR vs both, from a shared standard-trained checkpoint per seed; A/B/C of the loss, the
  gradient variance (trace), exact-match accuracy, its run-to-run spread and worst/best runs.
- Optimal loss (optimal_loss_schedule.py): the digits J*(s) curve, and EDM's weighting against the
  J*-derived one (loss gap under both weightings, quality score, memorisation).

Writes ``RESULTS.md`` into ``--out`` (default ``out/reproduce``), the figures and a JSON of all numbers
into its ``results/`` folder, and the per-run outputs (sample grids, per-run plots, summaries) into its
``runs/`` folder. With ``--write-docs`` the report, figures and JSON replace the checkout's
``docs/RESULTS.md`` and ``docs/results/`` instead. Everything is seeded; rerunning gives the same
numbers on the same machine and library versions (timings differ).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from _common import default_device, jstar_table, load_images, set_threads
import stats
import optimal_loss_schedule as ols
import train_image_diffusion as tid
import train_masked_diffusion_lm as mdm
from diffkernels.plots import pyplot

REPO = Path(__file__).resolve().parent.parent
ETAS = (0.0, 0.5, 0.95, 0.98)
MDM_METHODS = {  # name -> (t sampler, mirror, batch-size factor)
    "standard": ("uniform", False, 1),
    "P-POTS": ("ppots", False, 1),
    "MIRROR": ("uniform", True, 1),
    "P-POTS+MIRROR": ("ppots", True, 1),
    # MIRROR runs two copies per sequence; with half the sequences it does the same work per step as standard
    "MIRROR, ½ batch": ("uniform", True, 2),
}

BUDGETS = {
    "small": {
        "seeds": [0, 1, 2],
        "mdm_seeds": [0, 1, 2, 3, 4],  # accuracy varies a lot between seeds (sudden learning of the carries)
        "image": ["--n-train", "64", "--steps", "800", "--batch-size", "64", "--n-samples", "256",
                  "--eval-queries", "256", "--levels", "12"],
        "mdm": ["--digits", "2", "--pretrain-steps", "500", "--steps", "400", "--batch-size", "128", "--lr", "5e-3",
                "--var-nx", "16", "--var-nt", "4", "--var-nm", "3", "--ppots-grid", "15", "--ppots-examples", "16",
                "--ppots-masks", "8", "--test-size", "1000"],
        "schedule": ["--steps", "600", "--batch-size", "64", "--n-samples", "256"],
        "jstar": {"levels": 30, "queries": 512},
    },
    "full": {
        "seeds": [0, 1, 2, 3, 4],
        "mdm_seeds": [0, 1, 2, 3, 4, 5, 6, 7, 8, 9],
        "image": ["--n-train", "64", "--steps", "3000", "--batch-size", "128", "--n-samples", "512",
                  "--eval-queries", "1024", "--levels", "16"],
        "mdm": ["--digits", "2", "--pretrain-steps", "1500", "--steps", "1500", "--batch-size", "128", "--lr", "5e-3",
                "--var-nx", "32", "--var-nt", "8", "--var-nm", "4", "--ppots-grid", "30", "--ppots-examples", "16",
                "--ppots-masks", "16", "--test-size", "1000"],
        "schedule": ["--steps", "3000", "--batch-size", "128", "--n-samples", "512"],
        "jstar": {"levels": 60, "queries": 2048},
    },
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", choices=tuple(BUDGETS), default="small")
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="seeds of every grid (default: the budget's; small: 0 1 2, and 0..4 for the MDM grid)")
    p.add_argument("--only", nargs="+", choices=("sparse", "mdm", "optimal"), default=["sparse", "mdm", "optimal"],
                   help="run only these grids (RESULTS.md then has only their sections)")
    p.add_argument("--out", default="out/reproduce",
                   help="RESULTS.md, results/ (figures and numbers) and runs/ (per-run outputs) go here")
    p.add_argument("--write-docs", action="store_true",
                   help=f"write RESULTS.md and results/ into the checkout's docs folder ({REPO / 'docs'}) instead")
    p.add_argument("--threads", type=int, default=1, help="CPU threads for torch (0: torch's default)")
    p.add_argument("--cache", default=None, help="cache directory for the quality classifier")
    p.add_argument("--device", default=None)
    p.add_argument("--progress", action="store_true", help="progress bars for every run")
    p.add_argument("--from-json", default=None,
                   help="rebuild the figures and RESULTS.md from a results_<budget>.json without training")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                   help="tiny-configuration overrides for tests: KEY=ARGS, e.g. image='--steps 5'")
    return p


def mean_std(values) -> tuple[float, float]:
    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    if len(v) == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def fmt(values, digits: int = 3) -> str:
    m, s = mean_std(values)
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def fmt_g(values) -> str:
    m, s = mean_std(values)
    return f"{m:.3g} ± {s:.2g}"


class Clock:
    """Wall and process CPU time of a section (the machine is shared: both are reported)."""

    def __init__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def read(self) -> dict:
        return {"wall_s": time.perf_counter() - self.wall, "cpu_s": time.process_time() - self.cpu}


# --- the grids --------------------------------------------------------------------------------


def common_args(args, extra: list, cache: bool = True) -> list:
    out = ["--threads", str(args.threads)] + ([] if args.progress else ["--no-progress"])
    if args.cache and cache:
        out += ["--cache", args.cache]
    if args.device:
        out += ["--device", args.device]
    return out + extra


def run_sparse(args, budget, extra, work: Path) -> dict:
    clock = Clock()
    runs = []
    for eta in ETAS:
        for seed in args.seeds:
            argv = budget["image"] + common_args(args, extra.get("image", [])) + [
                "--mask-ratio", str(eta), "--seed", str(seed), "--out", str(work / f"sparse/eta{eta}_seed{seed}")]
            r = tid.train(tid.build_parser().parse_args(argv), tag=f"sparse eta={eta} seed={seed}")
            runs.append({"eta": eta, "seed": seed, "memorized_fraction": r["memorized_fraction"],
                         "mean_d1": r["mean_d1"], "fd": r["quality"]["fd"], "fd_real_floor": r["quality"]["fd_real_floor"],
                         "fd_train_copies": r["quality"]["fd_train_copies"],
                         "edm_weighted_gap": r["gap"]["edm_weighted_gap"], "gap_curve": r["gap"]["gap"],
                         "gap_sigmas": r["gap"]["sigmas"], "final_loss": r["final_loss"],
                         "losses": r["losses"], "seconds": r["seconds"]["total"], "samples": r["files"]["samples"],
                         "n_train": r["n_train_images"], "steps": r["config"]["steps"]})
    return {"runs": runs, "time": clock.read(), "argv": budget["image"] + extra.get("image", [])}


def run_mdm(args, budget, extra, work: Path) -> dict:
    clock = Clock()
    runs = []
    base = budget["mdm"] + common_args(args, extra.get("mdm", []), cache=False)
    for seed in args.mdm_seeds:
        a0 = mdm.build_parser().parse_args(base + ["--seed", str(seed)])
        device = default_device(a0.device)
        t0 = time.perf_counter()
        shared = mdm.pretrain(a0, mdm.AdditionTask(a0.digits), device)  # one shared phase per seed
        shared_s = time.perf_counter() - t0
        for name, (sampler, mirror, shrink) in MDM_METHODS.items():
            argv = base + ["--seed", str(seed), "--t-sampler", sampler, "--batch-size", str(a0.batch_size // shrink),
                           "--out", str(work / "mdm" / f"{name.replace(',', '').replace(' ', '_')}_seed{seed}")]
            r = mdm.train(mdm.build_parser().parse_args(argv + (["--mirror"] if mirror else [])), shared=shared)
            runs.append({"method": name, "seed": seed, "accuracy": r["accuracy"],
                         "accuracy_shared": r["accuracy_shared_checkpoint"],
                         "var_shared": r["variance_shared_checkpoint"], "var_final": r["variance_final"],
                         "final_loss": r["final_loss"], "losses": r["losses"], "ppots": r["ppots"],
                         "seconds": r["seconds"]["total"], "shared_phase_seconds": shared_s,
                         "examples": r["examples"]})
    return {"runs": runs, "time": clock.read(), "argv": budget["mdm"] + extra.get("mdm", [])}


def run_optimal(args, budget, extra, work: Path) -> dict:
    clock = Clock()
    data = load_images("digits")
    jb = budget["jstar"]
    if "jstar" in extra:
        jb = {"levels": int(extra["jstar"][0]), "queries": int(extra["jstar"][1])}
    t0 = time.perf_counter()
    curve = jstar_table(data, np.geomspace(0.002, 80.0, jb["levels"]), jb["queries"], 0)
    jstar_s = time.perf_counter() - t0
    runs = []
    for seed in args.seeds:
        argv = budget["schedule"] + common_args(args, extra.get("schedule", [])) + [
            "--seed", str(seed), "--out", str(work / f"schedule/seed{seed}")]
        s = ols.run(ols.build_parser().parse_args(argv), curve=curve)
        for name, row in s["runs"].items():
            runs.append({"schedule": name, "seed": seed, **row, "gap_curve": s["gaps"][name]["gap"],
                         "gap_sigmas": s["gaps"][name]["sigmas"]})
        sched = s["schedule"]
        curve = {k: v for k, v in s["j_star"].items()}  # now also holds the Gaussian reference
    return {"curve": curve, "jstar_seconds": jstar_s, "schedule": sched, "runs": runs, "time": clock.read(),
            "argv": budget["schedule"] + extra.get("schedule", [])}


# --- figures ----------------------------------------------------------------------------------


def plot_sparse(res: dict, out: Path) -> list:
    plt = pyplot()
    runs = res["runs"]
    files = []
    fig, axes = plt.subplots(1, 4, figsize=(14, 3.2))
    metrics = [("memorized_fraction", "memorised fraction"), ("mean_d1", "mean NN distance d1 (0..255)"),
               ("fd", "quality: digits FD (lower better)"), ("edm_weighted_gap", "EDM-weighted loss gap")]
    for ax, (key, label) in zip(axes, metrics):
        m = [mean_std([r[key] for r in runs if r["eta"] == e]) for e in ETAS]
        ax.errorbar(range(len(ETAS)), [x[0] for x in m], yerr=[x[1] for x in m], fmt="o-", capsize=3)
        for e_i, e in enumerate(ETAS):
            ax.plot([e_i] * len(args_seeds(runs, e)), [r[key] for r in runs if r["eta"] == e], ".", color="0.6")
        if key == "fd":
            ax.axhline(mean_std([r["fd_real_floor"] for r in runs])[0], color="g", ls=":", lw=1, label="real-data floor")
            ax.axhline(mean_std([r["fd_train_copies"] for r in runs])[0], color="r", ls=":", lw=1,
                       label="copies of the training set")
            ax.legend(fontsize=7)
        ax.set_xticks(range(len(ETAS)), [str(e) for e in ETAS])
        ax.set(xlabel="mask ratio eta", title=label)
    fig.tight_layout()
    files.append(out / "sparse_metrics.png")
    fig.savefig(files[-1], dpi=100)
    plt.close(fig)

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 3.6))
    for e in ETAS:
        curves = np.array([r["losses"] for r in runs if r["eta"] == e])
        stride = runs[0].get("loss_stride", 1)  # > 1 when replotting thinned curves from the JSON
        k = max(1, curves.shape[1] // 25)
        mean = np.convolve(curves.mean(0), np.ones(k) / k, mode="valid")
        ax.plot(np.arange(k - 1, curves.shape[1]) * stride, mean, label=f"eta={e}")
        gaps = np.array([r["gap_curve"] for r in runs if r["eta"] == e])
        ax2.plot(runs[0]["gap_sigmas"], gaps.mean(0), "o-", ms=3, label=f"eta={e}")
    ax.set(yscale="log", xlabel="step", ylabel="training loss (EDM-weighted, sparse)",
           title="loss curves (mean over seeds, running mean)")
    ax2.set(xscale="log", yscale="log", xlabel="noise level s", ylabel="E||D_theta - D*||^2 / D",
            title="gap to the optimal denoiser (mean over seeds)")
    ax.legend(fontsize=7)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    files.append(out / "sparse_curves.png")
    fig.savefig(files[-1], dpi=100)
    plt.close(fig)

    # seed-0 sample grids side by side (only when the per-run outputs are still there)
    import matplotlib.image as mpimg

    if not all(Path(r.get("samples", "")).is_file() for r in runs):
        return files

    first = min(r["seed"] for r in runs)
    fig, axes = plt.subplots(1, len(ETAS), figsize=(4 * len(ETAS), 4.3))
    for ax, e in zip(axes, ETAS):
        r = next(r for r in runs if r["eta"] == e and r["seed"] == first)
        ax.imshow(mpimg.imread(r["samples"]))
        ax.axis("off")
        ax.set_title(f"eta={e}: memorised {r['memorized_fraction']:.2f}, FD {r['fd']:.1f}", fontsize=9)
    fig.tight_layout()
    fig.subplots_adjust(top=0.92)
    files.append(out / "sparse_samples.png")
    fig.savefig(files[-1], dpi=90)
    plt.close(fig)
    return files


def args_seeds(runs, eta):
    return [r["seed"] for r in runs if r["eta"] == eta]


def plot_mdm(res: dict, out: Path) -> list:
    plt = pyplot()
    runs = res["runs"]
    names = list(MDM_METHODS)
    seeds = sorted({r["seed"] for r in runs})
    get = {(r["method"], r["seed"]): r for r in runs}
    x = np.arange(len(names))
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    for ax, where, title in ((axes[0], "var_shared", "loss variance, shared checkpoint"),
                             (axes[3], "var_final", "loss variance, end of training")):
        bottom = np.zeros(len(names))
        for comp, color in (("A", "C0"), ("B", "C1"), ("C", "C2")):
            vals = np.array([mean_std([r[where]["loss"][comp] for r in runs if r["method"] == n])[0] for n in names])
            ax.bar(x, np.maximum(vals, 0), bottom=bottom, color=color, label=f"{comp} (mean over seeds)")
            bottom += np.maximum(vals, 0)
        ax.set_xticks(x, names, fontsize=7, rotation=25, ha="right")
        ax.set(title=title, ylabel="variance of the per-sequence loss")
        ax.legend(fontsize=7)
    # Paired view: each seed's variance relative to the standard estimator on the same checkpoint.
    ax = axes[1]
    for key, marker, color, label in (("loss", "o", "C0", "loss variance"), ("grad", "s", "C3", "gradient variance")):
        ratios = np.array([[get[(n, sd)]["var_shared"][key]["total"] / get[("standard", sd)]["var_shared"][key]["total"]
                            for sd in seeds] for n in names])
        off = -0.1 if key == "loss" else 0.1
        for i in range(len(names)):
            ax.plot([i + off] * len(seeds), ratios[i], marker, color=color, alpha=0.4, ms=4)
        with np.errstate(invalid="ignore", divide="ignore"):
            geo = np.exp(np.nanmean(np.log(np.where(ratios > 0, ratios, np.nan)), axis=1))
        ax.plot(x + off, geo, marker, color=color, ms=8, mfc="none", mew=2, label=f"{label} (geometric mean)")
    ax.axhline(1.0, color="0.6", ls=":")
    ax.set_xticks(x, names, fontsize=7, rotation=25, ha="right")
    ax.set(yscale="log", title="variance / standard's (per seed)")
    ax.legend(fontsize=7)
    ax = axes[2]
    for sd in seeds:
        ax.plot(x, [get[(n, sd)]["accuracy"] for n in names], "o-", ms=4, lw=0.8, alpha=0.7, label=f"seed {sd}")
        ax.plot([-0.35], [get[("standard", sd)]["accuracy_shared"]], "x", color="0.5")
    ax.set_xticks(x, names, fontsize=7, rotation=25, ha="right")
    ax.set(title="exact match (x: shared checkpoint)", ylim=(-0.02, 1.02))
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    files = [out / "mdm_variance_accuracy.png"]
    fig.savefig(files[0], dpi=100)
    plt.close(fig)

    pp = next((r["ppots"] for r in runs if r["ppots"]), None)
    if pp:
        fig, ax = plt.subplots(figsize=(5.5, 3.4))
        for r in runs:
            if r["ppots"] and r["seed"] == runs[0]["seed"]:
                t, w = np.array(r["ppots"]["t"]), np.array(r["ppots"]["w"])
                ax.plot(t, w / np.trapezoid(w, t), "o-", ms=3, label=f"{r['method']}: grid w(t), normalised")
        ax.axhline(1.0, color="0.6", ls=":", label="uniform")
        ax.set(xlabel="t", ylabel="density", title="P-POTS density estimated at the shared checkpoint")
        ax.legend(fontsize=7)
        fig.tight_layout()
        files.append(out / "mdm_ppots_density.png")
        fig.savefig(files[-1], dpi=100)
        plt.close(fig)
    return files


def plot_optimal(res: dict, out: Path) -> list:
    plt = pyplot()
    c = res["curve"]
    files = []
    fig, ax = plt.subplots(figsize=(6, 3.8))
    s, j, se = (np.array(c[k]) for k in ("sigmas", "j_star", "j_star_se"))
    ax.errorbar(s, np.maximum(j, 1e-30), yerr=se, fmt="o-", ms=3, label="digits (1797 images): J*(s)/D")
    ax.plot(s, c["gaussian_j_star"], "--", label="Gaussian with the data covariance")
    ax.axhline(c["total_variance_per_element"], color="0.6", lw=0.8, label="tr Cov / D")
    ax.axvline(res["schedule"]["s_star"], color="0.6", ls=":", lw=0.8, label="s* (J* leaves ~0)")
    ax.set(xscale="log", yscale="log", xlabel="noise level s (VE)", ylabel="optimal x0-loss per element",
           title="optimal loss of the digits")
    ax.set_ylim(1e-6, 1)
    ax.legend(fontsize=7)
    fig.tight_layout()
    files.append(out / "jstar_digits.png")
    fig.savefig(files[-1], dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.8))
    for name in dict.fromkeys(r["schedule"] for r in res["runs"]):
        gaps = np.array([r["gap_curve"] for r in res["runs"] if r["schedule"] == name])
        sig = res["runs"][0]["gap_sigmas"]
        ax.errorbar(sig, gaps.mean(0), yerr=gaps.std(0, ddof=1) if len(gaps) > 1 else None, fmt="o-", ms=3,
                    capsize=2, label=f"{name} weighting")
    ax.set(xscale="log", yscale="log", xlabel="noise level s", ylabel="E||D_theta - D*||^2 / D",
           title="gap to the optimal denoiser (mean ± std over seeds)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    files.append(out / "schedule_gap.png")
    fig.savefig(files[-1], dpi=100)
    plt.close(fig)
    return files


# --- the report -------------------------------------------------------------------------------


# Non-inferiority margin of "quality stays competitive": the masked run's quality score may be worse
# than the dense run's by at most this fraction of the dense run's mean score.
FD_MARGIN_REL = 0.10

CLAIMS: list = []  # (claim, test result, verdict, seeds for 80% power) of the report being written


def verdict(ok: bool) -> str:
    return "**reproduced at this scale**" if ok else "**not reproduced at this scale**"


def _record(label, result: stats.PairedResult, text: str, need) -> None:
    if label:
        CLAIMS.append({"claim": label, "mean": result.mean, "ci": (result.ci_low, result.ci_high), "p": result.p,
                       "margin": result.margin, "verdict": text, "seeds_80": need, "n": result.n})


def compare(better, worse, label: str = "") -> str:
    """Is ``better`` lower than ``worse``, beyond the noise? Both are lists in seed order; the test is a
    one-sided paired t-test (df = n - 1) on d = worse - better at the 5% level, reported with the 95%
    interval of mean d and, when not significant but in the claimed direction, the seeds a test would
    need for 80% power at the observed effect size. ``label`` records the claim for the summary table."""
    r = stats.paired_test(better, worse)
    dz = stats.effect_size(better, worse)
    need = stats.seeds_needed(dz) if dz == dz and dz > 0 else (r.n if r.significant else math.inf)
    if r.n < 2:
        text = "not testable with one seed"
    elif r.significant:
        text = "reproduced at this scale"
    elif r.mean > 0:
        text = "same direction, not significant: not reproduced at this scale"
    else:
        text = "not reproduced at this scale"
    _record(label, r, text, need)
    power = f"; {need:g} seeds would give 80% power at the observed effect" if (
        not r.significant and r.mean > 0 and r.n >= 2) else ""
    return f"**{text}** ({r.describe()}{power})"


def noninferior(candidate, reference, margin: float, label: str = "") -> str:
    """Is ``candidate`` (lower is better) not worse than ``reference`` by more than ``margin``? One-sided
    paired t-test of H0: mean(reference - candidate) <= -margin at the 5% level."""
    r = stats.noninferiority(candidate, reference, margin)
    text = ("not testable with one seed" if r.n < 2 else
            "reproduced at this scale (non-inferior)" if r.significant else "not shown non-inferior at this scale")
    _record(label, r, text, math.nan)
    return f"**{text}** ({r.describe()})"


def claims_table() -> list:
    """The claims of the report in one table: paired difference (positive = the claimed direction), its
    95% interval, the one-sided p-value, the verdict and the seeds needed for 80% power."""
    if not CLAIMS:
        return []
    L = ["| claim | paired difference | 95% CI | one-sided p | verdict | seeds for 80% power |", "|---|---|---|---|---|---|"]
    for c in CLAIMS:
        margin = f" (margin {c['margin']:.3g})" if c["margin"] else ""
        seeds = "—" if c["seeds_80"] != c["seeds_80"] else ("∞" if math.isinf(c["seeds_80"]) else f"{c['seeds_80']:g}")
        L.append(f"| {c['claim']} | {c['mean']:.3g}{margin} | [{c['ci'][0]:.3g}, {c['ci'][1]:.3g}] | {c['p']:.2g} | "
                 f"{c['verdict']} | {seeds} |")
    return L


def geo_ratio(values, reference) -> str:
    """Geometric mean over seeds of values / reference (paired by seed), with the per-seed range."""
    r = np.asarray(values, dtype=np.float64) / np.asarray(reference, dtype=np.float64)
    if (r <= 0).any():
        return "n/a"
    return f"{np.exp(np.log(r).mean()):.2f} ({r.min():.2f}–{r.max():.2f})"


def report_sparse(res: dict, rel) -> list:
    runs = res["runs"]
    n_train, steps = runs[0]["n_train"], runs[0]["steps"]
    by = {e: [r for r in runs if r["eta"] == e] for e in ETAS}
    L = ["## 1. Sparse supervision (Zhao et al. 2026)", "",
         f"EDM on a random subset of **{n_train} digits** (a small training set, so that memorisation can appear "
         f"within the budget), {steps} steps, `sparse_mse_loss` with `normalize='expected'`, element masks; "
         f"{len(runs[0]['gap_curve'])}-level loss-gap evaluation; memorisation and quality from "
         f"{res_samples(res)} Heun samples per run. Command-line arguments: `{' '.join(res['argv'])}`.", "",
         "| mask ratio η | memorised fraction | mean NN distance d1 | quality FD ↓ | EDM-weighted loss gap ↓ | final training loss |",
         "|---|---|---|---|---|---|"]
    for e in ETAS:
        rs = by[e]
        L.append(f"| {e} | {fmt([r['memorized_fraction'] for r in rs])} | {fmt([r['mean_d1'] for r in rs], 1)} | "
                 f"{fmt([r['fd'] for r in rs], 2)} | {fmt([r['edm_weighted_gap'] for r in rs])} | "
                 f"{fmt([r['final_loss'] for r in rs])} |")
    floor = mean_std([r["fd_real_floor"] for r in runs])[0]
    copies = mean_std([r["fd_train_copies"] for r in runs])
    L += ["", f"Quality-score references at this sample size: {floor:.2f} for random real digits (the floor), "
              f"{copies[0]:.2f} ± {copies[1]:.2f} for copies of the {n_train} training images (a pure memoriser).", ""]
    mem = {e: mean_std([r["memorized_fraction"] for r in by[e]])[0] for e in ETAS}
    fd = {e: mean_std([r["fd"] for r in by[e]]) for e in ETAS}
    memv = {e: [r["memorized_fraction"] for r in by[e]] for e in ETAS}
    fdv = {e: [r["fd"] for r in by[e]] for e in ETAS}
    margin = FD_MARGIN_REL * fd[0.0][0]
    L += ["Claims:", "",
          f"- *Masking reduces memorisation on small data*: memorised fraction {mem[0.0]:.3f} (η=0) → "
          f"{mem[0.5]:.3f} (0.5) → {mem[0.95]:.3f} (0.95) → {mem[0.98]:.3f} (0.98); η=0.95 vs dense: "
          f"{compare(memv[0.95], memv[0.0], 'sparse: memorisation, η=0.95 < dense')}; η=0.98 vs dense: "
          f"{compare(memv[0.98], memv[0.0], 'sparse: memorisation, η=0.98 < dense')}. Caveat: at "
          "equal steps a heavily masked loss has a much noisier gradient, so part of the effect can be plain "
          "under-fitting; the loss-gap column shows how far each model is from the optimal (memorising) denoiser.",
          f"- *Quality stays competitive up to η = 0.98*: FD {fd[0.0][0]:.2f} ± {fd[0.0][1]:.2f} (η=0) vs "
          f"{fd[0.98][0]:.2f} ± {fd[0.98][1]:.2f} (η=0.98): "
          f"{noninferior(fdv[0.98], fdv[0.0], margin, 'sparse: quality FD, η=0.98 non-inferior to dense')} "
          f"(criterion: a one-sided paired t-test that the FD is not worse by more than the margin "
          f"{FD_MARGIN_REL:.0%} of the dense FD). η=0.95: "
          f"{fd[0.95][0]:.2f} ± {fd[0.95][1]:.2f}.", "",
          f"![metrics]({rel('sparse_metrics.png')})", "", f"![curves]({rel('sparse_curves.png')})", "",
          f"![samples]({rel('sparse_samples.png')})", ""]
    return L


def res_samples(res):
    i = res["argv"].index("--n-samples") if "--n-samples" in res["argv"] else None
    return res["argv"][i + 1] if i is not None else "?"


def report_mdm(res: dict, rel) -> list:
    runs = res["runs"]
    names = list(MDM_METHODS)
    by = {n: [r for r in runs if r["method"] == n] for n in names}
    L = ["## 2. Masked diffusion LM variance reduction (Jia et al. 2025)", "",
         "A 2-layer transformer MDM on 2-digit addition (`12+34=46|..`; loss only on the answer), trained from a "
         "shared standard-training checkpoint per seed, then with each method for the same number of steps "
         "(MIRROR processes two copies per sequence: twice the work per step). Variance components of each "
         "method's own (weighted) loss estimator, by `variance_decomposition` with exact per-sample gradients; "
         "± is the standard deviation over seeds. Command-line arguments: "
         f"`{' '.join(res['argv'])}`.", "",
         "| method | exact match | per seed | worst / best run | A (mask) | B (rate) | C (data) | loss variance / standard's | gradient variance | gradient variance / standard's |",
         "|---|---|---|---|---|---|---|---|---|---|"]
    ref_tot = [r["var_shared"]["loss"]["total"] for r in by["standard"]]
    ref_g = [r["var_shared"]["grad"]["total"] for r in by["standard"]]
    for n in names:
        rs = by[n]
        acc = [r["accuracy"] for r in rs]
        L.append(f"| {n} | {fmt(acc)} | {' '.join(f'{a:.2f}' for a in acc)} | {min(acc):.3f} / {max(acc):.3f} | "
                 f"{fmt_g([r['var_shared']['loss']['A'] for r in rs])} | {fmt_g([r['var_shared']['loss']['B'] for r in rs])} | "
                 f"{fmt_g([r['var_shared']['loss']['C'] for r in rs])} | "
                 f"{geo_ratio([r['var_shared']['loss']['total'] for r in rs], ref_tot)} | "
                 f"{fmt_g([r['var_shared']['grad']['total'] for r in rs])} | "
                 f"{geo_ratio([r['var_shared']['grad']['total'] for r in rs], ref_g)} |")
    acc_shared = mean_std([r["accuracy_shared"] for r in by["standard"]])
    shared_seeds = " ".join(f"{r['accuracy_shared']:.2f}" for r in by["standard"])
    L += ["", f"A, B, C, the loss variance and the gradient variance (trace of the covariance of one sequence's "
              f"gradient) are measured at the shared checkpoint: the same model for every method of a seed, so only "
              f"the estimator differs; ratios to standard are geometric means over seeds (range in brackets). "
              f"Accuracy of the shared checkpoint: {acc_shared[0]:.3f} ± {acc_shared[1]:.3f} (per seed: "
              f"{shared_seeds}). The variance columns of \"MIRROR, ½ batch\" repeat MIRROR's (same estimator, same "
              f"checkpoint, same draws); it differs in training only.", ""]
    L += ["Variance components at the end of training (each method's own model):", "",
          "| method | A | B | C | total | gradient A | gradient B | gradient C | gradient total |",
          "|---|---|---|---|---|---|---|---|---|"]
    for n in names:
        rs = by[n]
        L.append(f"| {n} | " + " | ".join(fmt_g([r["var_final"]["loss"][c] for r in rs]) for c in ("A", "B", "C", "total"))
                 + " | " + " | ".join(fmt_g([r["var_final"]["grad"][c] for r in rs]) for c in ("A", "B", "C", "total"))
                 + " |")
    vals = lambda n, where, key, comp: [r[where][key][comp] for r in by[n]]
    tot = {n: vals(n, "var_shared", "loss", "total") for n in names}
    gv = {n: vals(n, "var_shared", "grad", "total") for n in names}
    A = {n: vals(n, "var_shared", "loss", "A") for n in names}
    m = lambda v: mean_std(v)[0]
    acc = {n: [r["accuracy"] for r in by[n]] for n in names}
    both, std = acc["P-POTS+MIRROR"], acc["standard"]
    L += ["", "Claims (variances at the shared checkpoint, where only the estimator differs):", "",
          f"- *MIRROR reduces the mask noise A*: A {m(A['standard']):.3g} (standard) → {m(A['MIRROR']):.3g} (MIRROR): "
          f"{compare(A['MIRROR'], A['standard'], 'MDM: mask noise A, MIRROR < standard')}; {m(A['P-POTS']):.3g} (P-POTS) → {m(A['P-POTS+MIRROR']):.3g} "
          f"(P-POTS+MIRROR): {compare(A['P-POTS+MIRROR'], A['P-POTS'], 'MDM: A, P-POTS+MIRROR < P-POTS')}.",
          f"- *P-POTS and MIRROR reduce the variance*: total loss variance {m(tot['standard']):.3g} (standard), "
          f"{m(tot['P-POTS']):.3g} (P-POTS), {m(tot['MIRROR']):.3g} (MIRROR), {m(tot['P-POTS+MIRROR']):.3g} (both); "
          f"gradient variance {m(gv['standard']):.3g}, {m(gv['P-POTS']):.3g}, {m(gv['MIRROR']):.3g}, "
          f"{m(gv['P-POTS+MIRROR']):.3g}. Loss variance, both vs standard: {compare(tot['P-POTS+MIRROR'], tot['standard'], 'MDM: loss variance, both < standard')}; "
          f"P-POTS vs standard: {compare(tot['P-POTS'], tot['standard'], 'MDM: loss variance, P-POTS < standard')}. Gradient variance, both vs standard: "
          f"{compare(gv['P-POTS+MIRROR'], gv['standard'], 'MDM: gradient variance, both < standard')}; P-POTS vs standard: {compare(gv['P-POTS'], gv['standard'], 'MDM: gradient variance, P-POTS < standard')}.",
          f"- *Accuracy rises*: {np.mean(std):.3f} (standard) vs {np.mean(both):.3f} (P-POTS+MIRROR): "
          f"{compare([-a for a in both], [-a for a in std], 'MDM: accuracy, both > standard')}. P-POTS alone ({np.mean(acc['P-POTS']):.3f}): "
          f"{compare([-a for a in acc['P-POTS']], [-a for a in std], 'MDM: accuracy, P-POTS > standard')}; MIRROR alone ({np.mean(acc['MIRROR']):.3f}): "
          f"{compare([-a for a in acc['MIRROR']], [-a for a in std], 'MDM: accuracy, MIRROR > standard')}.",
          f"- *The worst P-POTS+MIRROR run beats the best standard run*: worst {min(both):.3f} vs best "
          f"{max(std):.3f}: {verdict(min(both) > max(std))}.",
          f"- *Run-to-run spread shrinks*: std {np.std(std, ddof=1) if len(std) > 1 else 0:.3f} (standard) vs "
          f"{np.std(both, ddof=1) if len(both) > 1 else 0:.3f} (both)."]
    if "MIRROR, ½ batch" in acc:
        half = acc["MIRROR, ½ batch"]
        L += [f"- *Equal compute*: MIRROR doubles the sequences processed per step. With half the batch (the same "
              f"forward/backward work as standard) its accuracy is {np.mean(half):.3f} vs {np.mean(std):.3f}: "
              f"{compare([-a for a in half], [-a for a in std], 'MDM: accuracy, MIRROR ½ batch > standard')}. Its per-sequence variance is the MIRROR row's, but a "
              f"batch mean over half as many sequences has twice that variance: {2 * m(tot['MIRROR']):.3g} vs "
              f"{m(tot['standard']):.3g} (loss), {2 * m(gv['MIRROR']):.3g} vs {m(gv['standard']):.3g} (gradient) "
              f"per unit of compute."]
    L += ["",
          f"![mdm]({rel('mdm_variance_accuracy.png')})", ""]
    if (Path(rel.out) / "mdm_ppots_density.png").exists():
        L += [f"![ppots]({rel('mdm_ppots_density.png')})", ""]
    return L


def report_optimal(res: dict, rel) -> list:
    c, sch = res["curve"], res["schedule"]
    runs = res["runs"]
    by = {n: [r for r in runs if r["schedule"] == n] for n in dict.fromkeys(r["schedule"] for r in runs)}
    s, j = np.array(c["sigmas"]), np.array(c["j_star"])
    pick = [i for i in range(0, len(s), max(1, len(s) // 10))]
    L = ["## 3. The optimal loss (Xu et al. 2025)", "",
         f"J*(s)/D of the 1797 digits (scaled to [-1, 1]) with the full estimator (exact posterior over all images, "
         f"posterior-variance form, {c['n_queries']} queries per level, computed in {res['jstar_seconds']:.0f} s). "
         f"It reaches tr Cov/D = {c['total_variance_per_element']:.4f} at large s and falls to ~0 below s* = "
         f"{sch['s_star']:.3g}, where the optimal denoiser returns the nearest training image; a Gaussian with the "
         f"same covariance would still have J* ∝ s² there.", "",
         "| s | " + " | ".join(f"{s[i]:.3g}" for i in pick) + " |", "|---" * (len(pick) + 1) + "|",
         "| J*(s)/D | " + " | ".join(f"{j[i]:.3g}" for i in pick) + " |",
         "| Gaussian | " + " | ".join(f"{c['gaussian_j_star'][i]:.3g}" for i in pick) + " |", "",
         f"![jstar]({rel('jstar_digits.png')})", "",
         f"Schedule comparison on all digits, same network, steps and seeds: `edm` (EDM's λ(s), log-normal noise) "
         f"and `fm` (flow matching, unweighted velocity loss, logit-normal t) are the baselines; `jstar` replaces the "
         f"loss weight on the x0-loss by the J*-derived w(s) = a·min(1/J*(s), w_max) + bump (s* = "
         f"{sch['s_star']:.3g}, w_max = {sch['w_max']:.3g}, bump height {sch['bump']}·w_max, width "
         f"{sch['bump_width']} in ln s, a for the baseline's mean weight); `jstar+adaptive` is the paper's full "
         f"method, the same weight with noise levels drawn from p(s) ∝ w(s)(J_θ(s) − J*(s)), refreshed during "
         f"training from the running per-level loss and mixed with the baseline density. The gaps are the final EMA "
         f"model's E‖D_θ − D*‖²/D per level, integrated under each weighting. Command-line arguments: "
         f"`{' '.join(res['argv'])}`.", "",
         "| weighting | EDM-weighted gap ↓ | J*-weighted gap ↓ | quality FD ↓ | memorised fraction | mean d1 |",
         "|---|---|---|---|---|---|"]
    for n, rs in by.items():
        L.append(f"| {n} | {fmt([r['edm_weighted_gap'] for r in rs])} | {fmt([r['jstar_weighted_gap'] for r in rs])} | "
                 f"{fmt([r['fd'] for r in rs], 2)} | {fmt([r['memorized_fraction'] for r in rs])} | "
                 f"{fmt([r['mean_d1'] for r in rs], 1)} |")
    fd = {n: mean_std([r["fd"] for r in by[n]])[0] for n in by}
    L += ["", f"Quality-score floor (random real digits, same sample size): "
              f"{mean_std([r['fd_real_floor'] for r in runs])[0]:.2f}.", ""]
    for base, pre in (("edm", ""), ("fm", "fm ")):
        for kind, what in (("jstar", "J* weight"), ("jstar+adaptive", "J* weight + adaptive sampling")):
            name = pre + kind
            if base in by and name in by:
                L.append(f"- *The J*-derived schedule improves sample quality* ({base.upper()}, {what}; paper: FID "
                         f"3.06 → 2.29 on ImageNet-64 flow matching with the full method): FD {fd[base]:.2f} "
                         f"({base}) vs {fd[name]:.2f} ({name}): "
                         f"{compare([r['fd'] for r in by[name]], [r['fd'] for r in by[base]], f'optimal loss: FD, {name} < {base}')}.")
    L.append("")
    sig = np.array(runs[0]["gap_sigmas"])
    g = {n: np.mean([r["gap_curve"] for r in by[n]], axis=0) for n in by}
    if "edm" in g and "jstar" in g:
        ratio = g["jstar"] / g["edm"]
        parts = []
        for lo, hi, label in ((0, sch["s_star"], f"s < s* = {sch['s_star']:.2g}"), (sch["s_star"], 1.0, "s* ≤ s < 1"),
                              (1.0, np.inf, "s ≥ 1")):
            sel = (sig >= lo) & (sig < hi)
            if sel.any():
                parts.append(f"{np.exp(np.log(ratio[sel]).mean()):.2f}× for {label}")
        j10 = float(np.interp(np.log(10.0), np.log(c["sigmas"]), c["j_star"]))
        lam10 = (100.0 + 0.25) / (100.0 * 0.25)
        L += ["Gap of the J*-weighted EDM run relative to EDM's (geometric mean over the evaluation levels): "
              + ", ".join(parts) + f". For reference, at s = 10 the J*-derived weight is a/J* = {sch['a'] / j10:.3g} "
              f"against EDM's λ = {lam10:.3g}.", ""]
    L += [f"![gap]({rel('schedule_gap.png')})", "",
          "Not covered here: the estimator comparison (DOL / cDOL / SNIS against the full estimator, the paper's "
          "Fig. 1) lives in `python_examples/estimator_comparison.py`.", ""]
    return L


def write_report(args, results: dict, docs: Path, figs: Path, times: dict, load_end: float) -> Path:
    class Rel:
        out = figs

        def __call__(self, name):
            return os.path.relpath(figs / name, docs)

    rel = Rel()
    CLAIMS.clear()
    L = ["# Reproduction results", "",
         f"Generated by `python python_examples/reproduce.py --budget {args.budget}"
         f"{' --write-docs' if args.write_docs else ''}` (seeds "
         f"{', '.join(map(str, args.seeds))}; masked diffusion: seeds {', '.join(map(str, args.mdm_seeds))}). "
         "All numbers are mean ± standard deviation over the seeds. Claims are checked on paired differences "
         "(runs of one seed share the initialisation, the data subset or the shared checkpoint): "
         "*reproduced* means a one-sided paired t-test (df = seeds − 1) rejects \"no improvement\" at the 5% "
         "level; each verdict gives the paired difference (positive = the claimed direction), its 95% interval and "
         "the p-value, and \"quality stays competitive\" is a non-inferiority test with a stated margin. "
         + power_note(args), "",
         f"**Budget: `{args.budget}`.** " + (
             "These are short CPU runs on tiny models and a tiny dataset (scikit-learn's 8x8 digits): they check "
             "that the methods run end to end and show which of the papers' effects are visible at this scale. "
             "Where a claim is not reproduced here, the numbers say so; that is a statement about this scale, "
             "not about the papers." if args.budget == "small" else
             "Longer CPU runs on tiny models; still far below the papers' scale."), "",
         f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores (shared with other "
         f"jobs; load average at the end {'n/a' if load_end != load_end else f'{load_end:.1f}'}), torch {torch.__version__}, {args.threads} torch thread(s), "
         f"device {default_device(args.device)}. Wall time: "
         + ", ".join(f"{k} {v['wall_s'] / 60:.1f} min (CPU {v['cpu_s'] / 60:.1f} min)" for k, v in times.items())
         + ".", "",
         "The quality score is the Fréchet distance between generated and real digits in the 32-d feature space "
         "of a small digits classifier trained by the examples themselves (a stand-in for FID, which needs an "
         "ImageNet network and means nothing on 8x8 images). Compare it only within this file.", ""]
    if "sparse" in results:
        L += report_sparse(results["sparse"], rel)
    if "mdm" in results:
        L += report_mdm(results["mdm"], rel)
    if "optimal" in results:
        L += report_optimal(results["optimal"], rel)
    summary = claims_table()
    if summary:
        L += ["## Summary of the claims", "",
              "Paired differences are signed so that positive is the claimed direction; non-inferiority rows test "
              "against minus the margin. \"Seeds for 80% power\": how many seeds a one-sided paired t-test at 5% "
              "needs to detect the observed standardised effect (mean / sd of the differences) with 80% power.", ""]
        L += summary + [""]
        print("\n".join(summary))
    path = docs / "RESULTS.md"
    path.write_text("\n".join(L) + "\n")
    return path


def power_note(args) -> str:
    """What the seed counts can detect: the standardised effect a one-sided paired t-test at 5% finds with
    80% power."""
    parts = []
    for name, seeds in (("seeds", args.seeds), ("masked-diffusion seeds", args.mdm_seeds)):
        d = stats.detectable_effect(len(seeds))
        parts.append(f"{len(seeds)} {name}: d_z ≥ {d:.2f}" if math.isfinite(d) else f"{len(seeds)} {name}: none")
    return ("With 80% power these seed counts detect standardised paired effects (mean / sd of the per-seed "
            "differences) of " + "; ".join(parts) + ".")


def _compact(results: dict) -> dict:
    """The JSON next to the figures: every number, per-step losses thinned to 100 points."""
    out = json.loads(json.dumps(results))
    for grid in out.values():
        for r in grid.get("runs", []):
            if "losses" in r:
                stride = r.get("loss_stride", 1) * max(1, len(r["losses"]) // 100)
                r["losses"] = r["losses"][:: max(1, len(r["losses"]) // 100)]
                r["loss_stride"] = stride
    return out


def output_dirs(args) -> tuple[Path, Path]:
    """(where RESULTS.md and results/ go, where the per-run outputs go): --out, or the checkout's docs
    folder with --write-docs (the only way this script writes into the checkout)."""
    out = Path(args.out)
    return (REPO / "docs" if args.write_docs else out), out / "runs"


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    set_threads(args.threads)
    extra = {}
    for item in args.extra:
        key, _, value = item.partition("=")
        extra[key] = value.split()
    budget = BUDGETS[args.budget]
    args.mdm_seeds = args.seeds or budget["mdm_seeds"]
    args.seeds = args.seeds or budget["seeds"]
    docs, work = output_dirs(args)
    figs = docs / "results"
    figs.mkdir(parents=True, exist_ok=True)
    grids = (("sparse", run_sparse, plot_sparse), ("mdm", run_mdm, plot_mdm), ("optimal", run_optimal, plot_optimal))
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        args.budget, args.seeds, args.mdm_seeds = saved["budget"], saved["seeds"], saved["mdm_seeds"]
        results = {g: saved[g] for g, _, _ in grids if g in saved}
        for g, _, plot in grids:
            if g in results:
                plot(results[g], figs)
        path = write_report(args, results, docs, figs, saved["times"], saved.get("load_end", float("nan")))
        print(f"rebuilt {path} and the figures under {figs} from {args.from_json}")
        return {"results": results, "times": saved["times"], "report": str(path)}
    results, times = {}, {}
    total = Clock()
    for grid, fn, plot in grids:
        if grid in args.only:
            print(f"=== {grid} ({args.budget}) ===", flush=True)
            results[grid] = fn(args, budget, extra, work)
            times[grid] = results[grid]["time"]
            plot(results[grid], figs)
    times["total"] = total.read()
    load_end = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    with open(figs / f"results_{args.budget}.json", "w") as f:
        json.dump({"budget": args.budget, "seeds": args.seeds, "mdm_seeds": args.mdm_seeds, "times": times,
                   "load_end": load_end, **_compact(results)}, f, indent=1)
    path = write_report(args, results, docs, figs, times, load_end)
    print(f"wrote {path} and figures under {figs} in {times['total']['wall_s'] / 60:.1f} min")
    return {"results": results, "times": times, "report": str(path)}


if __name__ == "__main__":
    main()
