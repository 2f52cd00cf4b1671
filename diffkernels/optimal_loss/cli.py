"""``diffkernels optimal-loss DATA`` and ``diffkernels memorization SAMPLES TRAIN``.

Bad input (unreadable file, wrong rank, NaN/Inf rows, empty data, bad options, an output path that
cannot be written, an unavailable device) prints one line, ``diffkernels <command>: error: <what>``,
to stderr and exits with code 2 before any estimation starts or any output is created.

Under torchrun (``RANK`` and ``WORLD_SIZE`` in the environment) ``optimal-loss`` runs as one process
of a group: each process takes the rows ``shard_bounds(N, RANK, WORLD_SIZE)`` of the data (of a
``.npy`` file it reads only those), the process group is initialised from the environment, and
``estimate_curve(..., distributed=True)`` merges the shards exactly. Rank 0 alone prints, writes the
outputs and the checkpoint; the other processes print only errors. Checks that depend only on the
command line and the environment fail on every process before the group is created; checks that
read files (the data, the output folder) are shared in one collective right after it, so that every
process exits with code 2 and the same one-line error when any of them fails.
The torchrun side (launch environment, device, backend, data shard, shared errors) is in
``cli_distributed``.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path

from ..cli import (
    CliError,
    HelpFormatter,
    check_dependencies,
    check_writable_dir,
    device,
    fail,
    float_range,
    int_range,
    positive_float,
)
from .cli_distributed import Launch, _agree, _dist_backend, _load_rows, _process_device, launch_from_env

DEFAULT_OUT = "optimal_loss_out/optimal_loss"
MAX_SIGMAS = 10_000  # far more levels than a smooth curve needs; each one costs a pass over the data
SIGMA_LIMITS = (1e-100, 1e100)  # s^2 and distance^2 / s^2 stay far from float64 under- and overflow
MAX_QUERIES = 10**9  # per level; the per-level statistics keep a few numbers per 64 queries

_DATA_HELP = ".npy (memory-mapped), .npz, .pt, .safetensors, or 'digits' (scikit-learn's bundled set, in [-1, 1])"
_OL_DATA_HELP = (".npy (memory-mapped; under torchrun each process reads only its own rows), .npz, .pt, .safetensors "
                 "(under torchrun every process loads these whole, then keeps its rows), or 'digits' (scikit-learn's "
                 "bundled set, in [-1, 1])")
_RANGES = {"255": "0..255 (as is)", "unit": "0..1 (x 255)", "signed": "-1..1 ((x + 1) x 127.5)"}


def _out_prefix(out: str) -> Path:
    """--out as a file prefix: a folder (an existing one, or a path ending in a separator) gets the
    file name ``optimal_loss``; a .json/.csv/.png suffix is dropped."""
    p = Path(out)
    if out.endswith(("/", os.sep)) or p.is_dir():
        return p / "optimal_loss"
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


def _check_out(text: str) -> Path:
    """The output prefix, checked before any work: its folder can be created or written, and none
    of the files a run writes is a folder."""
    if not text.strip():
        raise CliError("--out is empty")
    prefix = _out_prefix(text)
    check_writable_dir(prefix.parent, f"--out {text}")
    for ext in (".csv", ".json", ".png", ".ckpt.json"):
        if Path(str(prefix) + ext).is_dir():
            raise CliError(f"--out {text}: {prefix}{ext} is a directory")
    return prefix


def cmd_optimal_loss(args) -> int:
    from .io import DIGITS

    name = "optimal-loss"
    try:  # the options and the environment: the same on every process, so every process stops here
        if args.sigma_min > args.sigma_max:
            raise CliError(f"need --sigma-min <= --sigma-max, got {args.sigma_min} and {args.sigma_max}")
        if args.estimator == "full" and args.subset is not None:
            raise CliError("--subset applies only to the subset estimators (--estimator snis, dol or cdol)")
        if args.estimator != "full" and args.subset is None:
            raise CliError(f"--estimator {args.estimator} needs --subset L (the subset size)")
        if args.C is not None and args.estimator != "cdol":
            raise CliError(f"--C applies only to --estimator cdol, not {args.estimator}")
        if args.key is not None and args.data == DIGITS:
            raise CliError("--key does not apply to 'digits'")
        if args.plot:
            check_dependencies("--plot", ("matplotlib",))
        launch = launch_from_env()
        if launch is None and args.dist_backend is not None:
            raise CliError("--dist-backend applies only under torchrun (RANK and WORLD_SIZE set)")
        dev, backend = args.device, None
        if launch is not None:
            dev = _process_device(args.device, launch)
            backend = _dist_backend(args.dist_backend, dev)
    except (ValueError, TypeError, OSError) as exc:
        return fail(name, str(exc))

    rank = 0 if launch is None else launch.rank
    error = None
    try:  # the output folder (rank 0 writes) and the data: files, which processes may see differently
        prefix = _check_out(args.out) if rank == 0 else _out_prefix(args.out)
        ckpt = Path(str(prefix) + ".ckpt.json")
        data, N = _load_rows(args, launch)
        if args.subset is not None and args.subset > N:
            raise CliError(f"--subset {args.subset} is larger than the number of data rows N = {N}")
    except (ValueError, TypeError, OSError) as exc:  # CliError and DataError are ValueErrors
        error = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if launch is None:
        return fail(name, error) if error is not None else _run(args, data, prefix, ckpt, dev, None)

    import torch
    import torch.distributed as dist

    try:
        if dev.startswith("cuda"):
            torch.cuda.set_device(torch.device(dev))
        dist.init_process_group(backend, init_method="env://", rank=launch.rank, world_size=launch.world_size)
    except (ValueError, RuntimeError) as exc:
        return fail(name, f"cannot initialise the {backend} process group: {exc}")
    try:
        try:
            error = _agree(error)
            if error is None:  # all inputs are valid: rank 0 prepares the outputs, and says if it cannot
                error = _agree(_prepare_out(prefix, ckpt, args.resume) if rank == 0 else None)
        except RuntimeError as exc:  # another process died
            error = f"the processes could not agree that the input is valid: {exc}"
        if error is not None:
            return fail(name, error)
        return _run(args, data, prefix, ckpt, dev, launch)
    finally:
        dist.destroy_process_group()


def _prepare_out(prefix: Path, ckpt: Path, resume: bool) -> str | None:
    """Create the output folder and, for a fresh run, delete an old checkpoint; the error, if any."""
    try:
        prefix.parent.mkdir(parents=True, exist_ok=True)
        if not resume and ckpt.exists():
            ckpt.unlink()  # a fresh run; --resume would continue from it
    except OSError as exc:
        return str(exc)
    return None


def _run(args, data, prefix: Path, ckpt: Path, device: str | None, launch: Launch | None) -> int:
    """Estimate the curve (on every process) and write the outputs (rank 0)."""
    import numpy as np

    from . import estimate_curve

    name = "optimal-loss"
    rank = 0 if launch is None else launch.rank
    sigmas = np.geomspace(args.sigma_min, args.sigma_max, args.num_sigmas)
    if launch is None:
        error = _prepare_out(prefix, ckpt, args.resume)
        if error is not None:
            return fail(name, error)
    try:
        # Every process passes the checkpoint path: rank 0 reads it and shares the finished levels,
        # and writes it after every level.
        result = estimate_curve(data, sigmas, estimator=args.estimator, num_queries=args.queries,
                                subset_size=args.subset, C=args.C, seed=args.seed, batch_size=args.batch_size,
                                progress=not args.quiet, checkpoint=ckpt, device=device,
                                precision=args.precision, distributed=launch is not None)
    except (ValueError, TypeError, OSError, RuntimeError) as exc:  # e.g. a checkpoint of other settings
        return fail(name, str(exc))
    except KeyboardInterrupt:
        if rank == 0:
            done = f"the finished noise levels are in {ckpt}; " if ckpt.exists() else ""
            print(f"diffkernels {name}: interrupted; {done}rerun the same command with --resume to continue",
                  file=sys.stderr)
        return 130
    if rank != 0:
        return 0

    result.extra = {"data": args.data, "command": "diffkernels " + shlex.join(args.argv)}
    if launch is not None:
        result.extra["processes"] = launch.world_size
    written = [str(prefix) + ".csv", str(prefix) + ".json"]
    try:
        result.to_csv(written[0])
        Path(written[1]).write_text(json.dumps(result.to_dict(), indent=1) + "\n")
        if args.plot:
            _plot(result, Path(str(prefix) + ".png"))
            written.append(str(prefix) + ".png")
    except OSError as exc:
        return fail(name, f"cannot write the results: {exc}")
    if not args.quiet:
        print(f"J*(s) of {args.data}: N = {result.num_data}, D = {result.dim}, estimator {result.estimator}, "
              f"{result.num_queries} queries per level")
        print(f"{'sigma':>12} {'J*/D':>12} {'stderr/D':>12}")
        for s, j, se in zip(result.sigmas, result.j_star_per_element, result.stderr_per_element):
            print(f"{s:12.4g} {j:12.5g} {se:12.3g}")
    print("wrote " + ", ".join(written + [f"{ckpt} (checkpoint)"]))
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
        if args.per_sample and not args.json:
            raise CliError("--per-sample needs --json")
        for which in ("samples", "train"):
            if getattr(args, f"{which}_key") is not None and getattr(args, which) == DIGITS:
                raise CliError(f"--{which}-key does not apply to 'digits'")
        samples = load_data(args.samples, key=args.samples_key)
        train = load_data(args.train, key=args.train_key)
        samples_range = args.samples_range or ("signed" if args.samples == DIGITS else "255")
        train_range = args.train_range or ("signed" if args.train == DIGITS else "255")
        train_px = train if train_range == "255" else _to_pixels(train, train_range)
        result = memorization(_to_pixels(samples, samples_range), train_px, args.threshold, device=args.device)
    except (ValueError, TypeError, OSError, RuntimeError) as exc:
        return fail(name, str(exc))
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
    p = sub.add_parser(
        "optimal-loss", help="estimate the optimal loss curve J*(s) of a dataset", formatter_class=HelpFormatter,
        description="Estimate the optimal x0-loss J*(s) of a dataset on a log grid of VE noise levels.\n"
                    "Writes OUT.csv and OUT.json (and OUT.png with --plot); the checkpoint OUT.ckpt.json is\n"
                    "updated after every noise level, and --resume continues from it.\n\n"
                    "Under torchrun (RANK and WORLD_SIZE set) the processes split the rows of DATA: each\n"
                    "takes a contiguous shard, the process group is created from the torchrun environment\n"
                    "(nccl with --device cuda, one GPU per process; gloo on the CPU), and the shards' sums\n"
                    "are merged exactly: the result equals one process's to float64 rounding. Rank 0 alone\n"
                    "prints and writes OUT.* and the checkpoint. Every node must see DATA at the same path.",
        epilog="examples:\n"
               "  diffkernels optimal-loss digits --num-sigmas 16 --plot\n"
               "  diffkernels optimal-loss train.npy --queries 4096 --out results/train\n"
               "  diffkernels optimal-loss train.npy --queries 4096 --out results/train --resume   # after a crash\n"
               "  diffkernels optimal-loss train.npz --key images --estimator cdol --subset 1000\n"
               "  torchrun --nproc-per-node 8 -m diffkernels optimal-loss train.npy --device cuda --out results/train")
    p.add_argument("data", metavar="DATA", help=_OL_DATA_HELP)
    p.add_argument("--key", default=None, help="array name inside .npz/.pt/.safetensors (default: the first)")
    sigma = float_range(*SIGMA_LIMITS, lo_open=False)
    p.add_argument("--sigma-min", type=sigma, default=0.002, help="smallest noise level s, in [1e-100, 1e100]")
    p.add_argument("--sigma-max", type=sigma, default=80.0, help="largest noise level s, in [1e-100, 1e100]")
    p.add_argument("--num-sigmas", type=int_range(1, MAX_SIGMAS), default=32, help="noise levels, log-spaced")
    p.add_argument("--estimator", choices=("full", "snis", "dol", "cdol"), default="full",
                   help="full: every data row per query; snis, dol, cdol: a random subset of --subset rows")
    p.add_argument("--queries", type=int_range(1, MAX_QUERIES), default=1024, help="queries per noise level")
    p.add_argument("--subset", type=int_range(1), default=None,
                   help="subset size L for snis/dol/cdol (default: none; those estimators need it)")
    p.add_argument("--C", type=positive_float, default=None, help="cDOL's constant (default: 4N/L)")
    p.add_argument("--seed", type=int_range(0, 2**64 - 1), default=0, help="seed of every random draw")
    p.add_argument("--batch-size", type=int_range(1), default=None,
                   help="queries per pass over the data (default: 4096 on CUDA, 1024 on CPU)")
    p.add_argument("--device", type=device, default=None,
                   help="cpu, cuda or cuda:N (default: cuda if available); under torchrun cuda means "
                        "cuda:LOCAL_RANK")
    p.add_argument("--dist-backend", choices=("nccl", "gloo"), default=None,
                   help="under torchrun: the process group's backend (default: nccl with CUDA, gloo on the CPU)")
    p.add_argument("--precision", choices=("auto", "float64"), default=None,
                   help="posterior engine: auto = screen with an fp32-accurate GEMM and recompute the top rows "
                        "exactly and prove the rest negligible, float64 = float64 GEMMs "
                        "(default: auto on the CPU, float64 on CUDA)")
    p.add_argument("--out", default=DEFAULT_OUT, help="output prefix: writes OUT.csv, OUT.json, OUT.ckpt.json; a folder (existing, or ending in /) "
                        "gets OUT/optimal_loss.*")
    p.add_argument("--plot", action="store_true", help="also write OUT.png: J*(s) per element, log axes")
    p.add_argument("--resume", action="store_true", help="continue from OUT.ckpt.json (same settings)")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no table")
    p.set_defaults(func=cmd_optimal_loss)

    p = sub.add_parser("memorization", help="fraction of generated samples that memorise the training set",
                       formatter_class=HelpFormatter,
                       description="Gu et al. (2023): a sample is memorised iff d1/d2 < threshold, d1 <= d2 the\n"
                                   "distances to its two nearest training images on the 0..255 scale divided by "
                                   "sqrt(D).",
                       epilog="example:\n  diffkernels memorization samples.npy train.npy --samples-range signed --json")
    p.add_argument("samples", metavar="SAMPLES", help=_DATA_HELP)
    p.add_argument("train", metavar="TRAIN", help=_DATA_HELP)
    p.add_argument("--threshold", type=float_range(0.0, 1.0), default=1.0 / 3.0,
                   help="memorised iff d1/d2 < threshold, in (0, 1] (default: 1/3)")
    for which in ("samples", "train"):
        p.add_argument(f"--{which}-range", choices=tuple(_RANGES), default=None,
                       help=f"value range of {which.upper()}: " + ", ".join(f"{k} = {v}" for k, v in _RANGES.items())
                       + " (default: signed for 'digits', else 255)")
        p.add_argument(f"--{which}-key", default=None,
                       help=f"array name inside {which.upper()}'s file (default: the first)")
    p.add_argument("--device", type=device, default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--per-sample", action="store_true", help="with --json: also d1, d2, ratio, nearest per sample")
    p.set_defaults(func=cmd_memorization)
