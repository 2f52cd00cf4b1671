"""``diffkernels optimal-loss DATA`` and ``diffkernels memorization SAMPLES TRAIN``.

Bad input (unreadable file, wrong rank, NaN/Inf rows, empty data, bad options) prints one line,
``diffkernels <command>: error: <what>``, to stderr and exits with code 2, like argparse's own errors.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

_DATA_HELP = ".npy (memory-mapped), .npz, .pt, .safetensors, or 'digits' (scikit-learn's bundled set, in [-1, 1])"
_RANGES = {"255": "0..255 (as is)", "unit": "0..1 (x 255)", "signed": "-1..1 ((x + 1) x 127.5)"}


def _fail(command: str, message: str) -> int:
    print(f"diffkernels {command}: error: {message}", file=sys.stderr)
    return 2


def _out_prefix(out: str) -> Path:
    p = Path(out)
    return p.with_suffix("") if p.suffix.lower() in (".json", ".csv", ".png") else p


def _plot(result, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    j, se = result.j_star_per_element, result.stderr_per_element
    fig, ax = plt.subplots(figsize=(6, 4.2))
    ok = j > 0  # a log axis cannot show J* <= 0 (rounding at tiny s)
    ax.errorbar(result.sigmas[ok], j[ok], yerr=np.minimum(se[ok], 0.999 * j[ok]), fmt="o-", ms=3, capsize=2,
                label=f"{result.estimator} (M = {result.num_queries})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    if ok.any():  # J* falls like e^(-d^2/2s^2) at small s: show 8 decades below the top, not 80
        ax.set_ylim(bottom=max(j[ok].min() * 0.5, 1e-8 * j[ok].max()), top=2 * j[ok].max())
    ax.set_xlabel("noise level s")
    ax.set_ylabel("optimal x0-loss J*(s) per element")
    ax.set_title(f"optimal loss, N = {result.num_data}, D = {result.dim}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def cmd_optimal_loss(args) -> int:
    import numpy as np

    from .estimators import estimate_curve
    from .io import DataError, load_data

    name = "optimal-loss"
    try:
        if not (0 < args.sigma_min <= args.sigma_max):
            raise DataError(f"need 0 < --sigma-min <= --sigma-max, got {args.sigma_min} and {args.sigma_max}")
        if args.num_sigmas < 1:
            raise DataError(f"--num-sigmas must be >= 1, got {args.num_sigmas}")
        data = load_data(args.data, key=args.key)
        sigmas = np.geomspace(args.sigma_min, args.sigma_max, args.num_sigmas)
        prefix = _out_prefix(args.out)
        prefix.parent.mkdir(parents=True, exist_ok=True)
        ckpt = Path(str(prefix) + ".ckpt.json")
        if not args.resume and ckpt.exists():
            ckpt.unlink()  # a fresh run; --resume would continue from it
        result = estimate_curve(data, sigmas, estimator=args.estimator, num_queries=args.queries,
                                subset_size=args.subset, C=args.C, seed=args.seed, batch_size=args.batch_size,
                                progress=not args.quiet, checkpoint=ckpt, device=args.device,
                                precision=args.precision)
    except (ValueError, TypeError, RuntimeError) as exc:  # DataError is a ValueError
        return _fail(name, str(exc).splitlines()[0])
    result.extra = {"data": args.data, "command": "diffkernels optimal-loss " + " ".join(sys.argv[2:])}
    result.to_csv(str(prefix) + ".csv")
    Path(str(prefix) + ".json").write_text(json.dumps(result.to_dict(), indent=1) + "\n")
    written = [str(prefix) + ".csv", str(prefix) + ".json"]
    if args.plot:
        _plot(result, Path(str(prefix) + ".png"))
        written.append(str(prefix) + ".png")
    if not args.quiet:
        print(f"J*(s) of {args.data}: N = {result.num_data}, D = {result.dim}, estimator {result.estimator}, "
              f"{result.num_queries} queries per level")
        print(f"{'sigma':>12} {'J*/D':>12} {'stderr/D':>12}")
        for s, j, se in zip(result.sigmas, result.j_star_per_element, result.stderr_per_element):
            print(f"{s:12.4g} {j:12.5g} {se:12.3g}")
    print("wrote " + ", ".join(written))
    return 0


def _to_pixels(x, value_range: str):
    import numpy as np
    import torch

    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.array(x, dtype=np.float64))
    x = x.double()
    if value_range == "unit":
        return x * 255.0
    if value_range == "signed":
        return (x + 1.0) * 127.5
    return x


def cmd_memorization(args) -> int:
    from .io import DIGITS, load_data
    from .memorization import memorization

    name = "memorization"
    try:
        samples = load_data(args.samples, key=args.samples_key)
        train = load_data(args.train, key=args.train_key)
        samples_range = args.samples_range or ("signed" if args.samples == DIGITS else "255")
        train_range = args.train_range or ("signed" if args.train == DIGITS else "255")
        train_px = train if train_range == "255" else _to_pixels(train, train_range)
        result = memorization(_to_pixels(samples, samples_range), train_px, args.threshold, device=args.device)
    except (ValueError, TypeError, RuntimeError) as exc:
        return _fail(name, str(exc).splitlines()[0])
    if args.json:
        print(json.dumps(result.to_dict(per_sample=args.per_sample), indent=1))
    else:
        n = result.d1.numel()
        print(f"memorised fraction: {result.fraction:.4f} ({int(result.memorized.sum())} of {n} samples with "
              f"d1/d2 < {result.threshold:.4g})")
        print(f"mean d1: {result.mean_d1:.4f} (0..255 pixel scale, divided by sqrt(D))")
    return 0


def add_subcommands(sub) -> None:
    """Register ``optimal-loss`` and ``memorization`` on the main parser's subparsers."""
    p = sub.add_parser("optimal-loss", help="estimate the optimal loss curve J*(s) of a dataset",
                       description="Estimate the optimal x0-loss J*(s) of a dataset on a log grid of VE noise "
                                   "levels (METHODS.md section 3). Writes OUT.csv and OUT.json (and OUT.png with "
                                   "--plot); a checkpoint OUT.ckpt.json is kept after every level for --resume.")
    p.add_argument("data", metavar="DATA", help=_DATA_HELP)
    p.add_argument("--key", default=None, help="array name inside .npz/.pt/.safetensors (default: the first)")
    p.add_argument("--sigma-min", type=float, default=0.002)
    p.add_argument("--sigma-max", type=float, default=80.0)
    p.add_argument("--num-sigmas", type=int, default=32, help="noise levels, log-spaced (default 32)")
    p.add_argument("--estimator", choices=("full", "snis", "dol", "cdol"), default="full")
    p.add_argument("--queries", type=int, default=1024, help="queries per noise level (default 1024)")
    p.add_argument("--subset", type=int, default=None, help="subset size L for snis/dol/cdol")
    p.add_argument("--C", type=float, default=None, help="cDOL's constant (default 4N/L)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=None,
                   help="queries per pass over the data (default: 4096 on CUDA, 1024 on CPU)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--precision", choices=("auto", "float64"), default=None,
                   help="posterior engine: auto = screen with an fp32-accurate GEMM and recompute the top rows "
                        "exactly, float64 = float64 GEMMs; both exact to float64 rounding "
                        "(default: auto on the CPU, float64 on CUDA)")
    p.add_argument("--out", default="optimal_loss", help="output prefix (default: optimal_loss)")
    p.add_argument("--plot", action="store_true", help="also write OUT.png: J*(s) per element, log axes")
    p.add_argument("--resume", action="store_true", help="continue from OUT.ckpt.json (same settings)")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no table")
    p.set_defaults(func=cmd_optimal_loss)

    p = sub.add_parser("memorization", help="fraction of generated samples that memorise the training set",
                       description="Gu et al. (2023): a sample is memorised iff d1/d2 < threshold, d1 <= d2 the "
                                   "distances to its two nearest training images on the 0..255 scale divided "
                                   "by sqrt(D).")
    p.add_argument("samples", metavar="SAMPLES", help=_DATA_HELP)
    p.add_argument("train", metavar="TRAIN", help=_DATA_HELP)
    p.add_argument("--threshold", type=float, default=1.0 / 3.0)
    for which in ("samples", "train"):
        p.add_argument(f"--{which}-range", choices=tuple(_RANGES), default=None,
                       help=f"value range of {which.upper()}: " + ", ".join(f"{k} = {v}" for k, v in _RANGES.items())
                       + " (default: signed for 'digits', else 255)")
        p.add_argument(f"--{which}-key", default=None, help=f"array name inside {which.upper()}'s file")
    p.add_argument("--device", default=None)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--per-sample", action="store_true", help="with --json: also d1, d2, ratio, nearest per sample")
    p.set_defaults(func=cmd_memorization)
