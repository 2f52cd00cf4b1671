"""Compare the optimal-loss estimators (full, SNIS, DOL, cDOL) on a synthetic Gaussian mixture.

Reproduces the comparison of Xu et al. (2025) at a small scale (docs/METHODS.md section 3): at equal subset
size L, how far do SNIS, DOL and cDOL land from the full estimator? The reference is the full
estimator's posterior-variance form with many queries; every subset estimator is run ``--repeats``
times with different seeds (``--queries`` queries per level each), and the full estimator's A - B
form with the same queries is included as the floor set by the query noise alone.

Printed (and with ``--out PREFIX`` written to PREFIX.md / PREFIX.json): per noise level the
relative bias and RMSE of each estimator against the reference, and a summary over the levels
where J* is not ~0. Runs on CPU in a few minutes with the defaults:

    python python_examples/estimator_comparison.py
    python python_examples/estimator_comparison.py --subset 400 --out results/estimators_L400
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from diffkernels.optimal_loss import estimate_curve


def gaussian_mixture(n: int, dim: int, components: int, seed: int) -> torch.Tensor:
    """n points from `components` Gaussian clusters in `dim` dimensions, float64.

    Centers ~ N(0, I); each cluster has its own random scale (0.1 to 0.5) and random per-axis
    anisotropy, so J*(s) bends at several noise levels.
    """
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(components, dim, generator=g, dtype=torch.float64)
    scales = 0.1 + 0.4 * torch.rand(components, 1, generator=g, dtype=torch.float64)
    axes = 0.5 + torch.rand(components, dim, generator=g, dtype=torch.float64)
    which = torch.randint(components, (n,), generator=g)
    return centers[which] + scales[which] * axes[which] * torch.randn(n, dim, generator=g, dtype=torch.float64)


def _no_nan(obj):
    """JSON has no NaN: write null."""
    if isinstance(obj, dict):
        return {k: _no_nan(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_no_nan(v) for v in obj]
    return None if isinstance(obj, float) and math.isnan(obj) else obj


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--num-points", type=int, default=4000, help="N, points in the dataset")
    p.add_argument("--dim", type=int, default=32, help="D, dimensions")
    p.add_argument("--components", type=int, default=10, help="mixture components")
    p.add_argument("--subset", type=int, default=100, help="L, the subset size of SNIS/DOL/cDOL")
    p.add_argument("--queries", type=int, default=512, help="queries per level of each repeated run")
    p.add_argument("--reference-queries", type=int, default=4096, help="queries per level of the reference")
    p.add_argument("--repeats", type=int, default=10, help="runs per estimator (different seeds)")
    p.add_argument("--num-sigmas", type=int, default=12)
    p.add_argument("--sigma-min", type=float, default=0.05)
    p.add_argument("--sigma-max", type=float, default=20.0)
    p.add_argument("--c-factors", type=float, nargs="*", default=[0.25, 1.0, 4.0, 16.0, 64.0],
                   help="cDOL runs with C = factor * N / L (the paper's choice is 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads; the per-block tensors are small, and on a busy machine more threads "
                        "cost more in synchronisation than they give")
    p.add_argument("--out", default=None, help="write PREFIX.md and PREFIX.json")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    t0 = time.time()
    N, L = args.num_points, args.subset
    data = gaussian_mixture(N, args.dim, args.components, args.seed).to(args.device)
    sigmas = np.geomspace(args.sigma_min, args.sigma_max, args.num_sigmas)
    runs = {"full (A-B, same queries)": dict(estimator="full"),
            "SNIS": dict(estimator="snis", subset_size=L),
            "DOL (C = 1)": dict(estimator="dol", subset_size=L)}
    for f in args.c_factors:
        runs[f"cDOL (C = {f:g} N/L)"] = dict(estimator="cdol", subset_size=L, C=f * N / L)

    bar = tqdm(total=1 + len(runs) * args.repeats, desc="estimator runs")
    ref = estimate_curve(data, sigmas, estimator="full", num_queries=args.reference_queries,
                         seed=10_000 + args.seed, progress=False, device=args.device)
    bar.update(1)
    estimates = {}
    for name, kw in runs.items():
        rows = []
        for r in range(args.repeats):
            res = estimate_curve(data, sigmas, num_queries=args.queries, seed=args.seed + r, progress=False,
                                 device=args.device, **kw)
            rows.append(res.j_star_ab)  # the A - B form for every estimator (the paper's comparison)
            bar.update(1)
        estimates[name] = np.array(rows)
    bar.close()

    j_ref = ref.j_star
    # Relative errors are meaningful where J* is not ~0 (at tiny s every estimator gives ~0).
    valid = j_ref > 1e-3 * j_ref.max()
    table = {}
    for name, est in estimates.items():
        rel = (est[:, valid] - j_ref[valid]) / j_ref[valid]
        bias, rmse = np.full(len(sigmas), np.nan), np.full(len(sigmas), np.nan)
        bias[valid], rmse[valid] = rel.mean(axis=0), np.sqrt((rel**2).mean(axis=0))
        table[name] = {"bias": bias, "rmse": rmse, "rmse_all": float(np.sqrt((rel**2).mean())),
                       "mean_bias": float(rel.mean())}

    lines = [
        f"Gaussian mixture: N = {N}, D = {args.dim}, {args.components} components; subset L = {L} "
        f"(N/L = {N / L:g}); {args.queries} queries per level, {args.repeats} seeds per estimator; reference: "
        f"full estimator, posterior-variance form, {args.reference_queries} queries. Errors relative to the "
        f"reference J*(s); levels with J* < 1e-3 max J* left out of the summary.",
        "",
        "Summary over levels (relative error of J*):",
        "",
        "| estimator | mean bias | RMSE |",
        "|---|---:|---:|",
    ]
    for name, t in table.items():
        lines.append(f"| {name} | {t['mean_bias']:+.3f} | {t['rmse_all']:.3f} |")
    lines += ["", "Per noise level: relative bias / RMSE", ""]
    names = list(table)
    lines.append("| s | J*/D (ref) | " + " | ".join(names) + " |")
    lines.append("|---:|---:|" + "---:|" * len(names))
    for k, s in enumerate(sigmas):
        cells = []
        for name in names:
            b, e = table[name]["bias"][k], table[name]["rmse"][k]
            cells.append("—" if not valid[k] else f"{b:+.3f} / {e:.3f}")
        lines.append(f"| {s:.3g} | {j_ref[k] / args.dim:.4g} | " + " | ".join(cells) + " |")
    lines += ["", f"({time.time() - t0:.0f} s on {args.device}; command: python python_examples/estimator_comparison.py "
              + " ".join(argv if argv is not None else __import__("sys").argv[1:]) + ")"]
    text = "\n".join(lines)
    print(text)

    result = {
        "settings": vars(args), "sigmas": sigmas.tolist(), "reference_j_star": j_ref.tolist(),
        "reference_stderr": ref.stderr.tolist(), "valid": valid.tolist(),
        "estimators": {n: {"estimates": estimates[n].tolist(), "bias": table[n]["bias"].tolist(),
                           "rmse": table[n]["rmse"].tolist(), "rmse_all": table[n]["rmse_all"],
                           "mean_bias": table[n]["mean_bias"]} for n in names},
        "seconds": time.time() - t0,
    }
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".md").write_text(text + "\n")
        out.with_suffix(".json").write_text(json.dumps(_no_nan(result), indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
