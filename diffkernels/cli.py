"""Command line: ``diffkernels <command>`` or ``python -m diffkernels <command>``.

Bad input (an option out of range, an unavailable device, an output path that cannot be written, an
unreadable data file) prints one line, ``diffkernels <command>: error: <what>``, to stderr and exits
with code 2 before any work is done.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Optional

_DESCRIPTION = "diffkernels: fused kernels for training and diagnosing diffusion models."

_EPILOG = """\
examples:
  diffkernels demo --out diffkernels_demo
  diffkernels optimal-loss digits --num-sigmas 16 --plot
  diffkernels optimal-loss train.npy --queries 4096 --out results/train --resume
  diffkernels memorization samples.npy train.npy --json
  diffkernels <command> --help     the options of one command
"""

_DEPENDENCIES = {"sklearn": "scikit-learn", "matplotlib": "matplotlib", "tqdm": "tqdm"}


class CliError(ValueError):
    """A bad command line: the message is printed as ``diffkernels <command>: error: <message>``."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Descriptions and epilogs as written; every option's help ends with its default unless it
    already says what the default is."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default is argparse.SUPPRESS or not action.option_strings:
            return text
        if action.nargs == 0 and action.default is False:  # a flag such as --plot
            return f"{text} (default: off)".strip()
        return f"{text} (default: %(default)s)".strip()


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``prog: error: message`` and exit code 2, no usage block."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def fail(command: str, message: str) -> int:
    """Print the one-line error of ``command`` to stderr and return exit code 2."""
    lines = str(message).strip().splitlines() or ["failed"]
    print(f"diffkernels {command}: error: {lines[0]}", file=sys.stderr)
    return 2


# --- option types: each checks its value when the command line is parsed -------------------------


def int_range(lo: int, hi: Optional[int] = None):
    """argparse type: an int in [lo, hi]."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"need an integer, got {text!r}") from None
        if value < lo or (hi is not None and value > hi):
            bound = f">= {lo}" if hi is None else f"between {lo} and {hi}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {value}")
        return value

    return parse


def float_range(lo: float, hi: float, *, lo_open: bool = True, hi_open: bool = False):
    """argparse type: a finite float in the interval from lo to hi (open or closed at each end)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"need a number, got {text!r}") from None
        ok = math.isfinite(value) and (value > lo if lo_open else value >= lo) and (
            value < hi if hi_open else value <= hi)
        if not ok:
            left, right = "(" if lo_open else "[", ")" if hi_open else "]"
            hi_text = "inf" if math.isinf(hi) else f"{hi:g}"
            raise argparse.ArgumentTypeError(f"must be finite and in {left}{lo:g}, {hi_text}{right}, got {text}")
        return value

    return parse


def positive_float(text: str) -> float:
    return float_range(0.0, math.inf, hi_open=True)(text)


def device(text: str) -> str:
    """argparse type: ``cpu``, ``cuda`` or ``cuda:N``, and CUDA only where a CUDA device is present."""
    import torch

    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        raise argparse.ArgumentTypeError(f"unknown device {text!r}; use cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"device {text!r} is not supported; use cpu, cuda or cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA device is visible"
            raise argparse.ArgumentTypeError(f"{text!r}: CUDA is not available ({why}); use --device cpu")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise argparse.ArgumentTypeError(f"{text!r}: there {'is' if count == 1 else 'are'} only {count} "
                                             f"CUDA device{'' if count == 1 else 's'} (cuda:0 to cuda:{count - 1})")
    return text


def _nearest_existing(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_writable_dir(path: Path, label: str) -> None:
    """CliError starting with ``label`` unless ``path`` is, or can be created as, a writable directory
    (nothing is created)."""
    base = _nearest_existing(path)
    if not base.is_dir():
        raise CliError(f"{label}: {base} exists and is not a directory")
    if not os.access(base, os.W_OK | os.X_OK):
        raise CliError(f"{label}: {base} is not writable")


def check_dependencies(command: str, modules: tuple) -> None:
    """CliError naming the missing packages of ``command`` (checked without importing them)."""
    import importlib.util

    missing = [_DEPENDENCIES.get(m, m) for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise CliError(f"{command} needs {' and '.join(missing)}: pip install {' '.join(missing)} "
                       "(or pip install 'diffkernels[examples]')")


# --- commands ------------------------------------------------------------------------------------


def _cmd_backends(args) -> int:
    from . import backends

    print(json.dumps(backends(), indent=2))
    return 0


def _cmd_demo(args) -> int:
    from .demo import backend_label, check_demo_args, demo_device, run_demo

    try:  # everything is checked before the demo builds a model or creates a folder
        check_dependencies("the demo", ("sklearn", "matplotlib", "tqdm"))
        if not args.out.strip():
            raise CliError("--out is empty")
        out = Path(args.out)
        check_writable_dir(out, f"--out {args.out}")
        check_demo_args(steps=args.steps, mask_ratio=args.mask_ratio, seed=args.seed, threads=args.threads)
        backend_label(demo_device(args.device))  # a DIFFKERNELS_BACKEND that cannot run there
    except (ValueError, TypeError, RuntimeError) as exc:
        return fail("demo", str(exc))
    try:
        run_demo(steps=args.steps, mask_ratio=args.mask_ratio, seed=args.seed, out=out, device=args.device,
                 threads=args.threads)
    except OSError as exc:  # e.g. the disk filled up while writing the figures
        return fail("demo", f"cannot write the outputs: {exc}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = Parser(prog="diffkernels", description=_DESCRIPTION, epilog=_EPILOG, formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"diffkernels {__version__}")
    sub = parser.add_subparsers(dest="command", title="commands", metavar="<command>")

    p = sub.add_parser(
        "demo", help="train a tiny diffusion model on scikit-learn's digits with the sparse loss",
        formatter_class=HelpFormatter,
        description="Train a tiny EDM diffusion model on scikit-learn's 8x8 digits with sparse_mse_loss,\n"
                    "sample it, and compare its loss with the digits' optimal loss J*. Writes samples.png,\n"
                    "loss.png, gap.png and summary.json into OUT. Needs scikit-learn and matplotlib.",
        epilog="example:\n  diffkernels demo --steps 400 --mask-ratio 0.9 --out diffkernels_demo")
    p.add_argument("--steps", type=int_range(1, 10**6), default=400, help="training steps")
    p.add_argument("--mask-ratio", type=float_range(0.0, 1.0, lo_open=False, hi_open=True), default=0.9,
                   help="fraction of the pixels left out of each step's loss, in [0, 1)")
    p.add_argument("--seed", type=int_range(0, 2**64 - 1), default=0, help="seed of the weights, data and masks")
    p.add_argument("--device", type=device, default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--threads", type=int_range(1, 1024), default=1,
                   help="torch CPU threads for the demo; its tensors are tiny, and more threads than idle cores "
                        "slow it down several times")
    p.add_argument("--out", default="diffkernels_demo", help="folder for the outputs (created if needed)")
    p.set_defaults(func=_cmd_demo)

    from .optimal_loss.cli import add_subcommands  # optimal-loss, memorization

    add_subcommands(sub)

    p = sub.add_parser("backends", help="show which kernel backends are available", formatter_class=HelpFormatter,
                       description="Print, as JSON, which kernel backends this installation can run on each device.")
    p.set_defaults(func=_cmd_backends)
    return parser


def _subparsers(parser: argparse.ArgumentParser) -> dict:
    """{command name: its parser}."""
    return next(a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction))


def main(argv=None) -> int:
    """Run the command line and return its exit code (0 success, 2 bad input, 130 interrupted)."""
    parser = build_parser()
    try:
        args, unknown = parser.parse_known_args(argv)
        if unknown:  # reported by the command's own parser, so that the error names the command
            owner = parser if args.command is None else _subparsers(parser)[args.command]
            owner.error(f"unrecognized arguments: {' '.join(unknown)}")
    except SystemExit as exc:  # --help (0) or a bad option (2), already printed
        return exc.code if isinstance(exc.code, int) else 2
    if args.command is None:  # a bare `diffkernels`: the help, like git
        parser.print_help()
        return 0
    args.argv = list(sys.argv[1:] if argv is None else argv)  # recorded in the optimal-loss results
    try:
        code = args.func(args)
        sys.stdout.flush()  # a closed pipe shows up here, not at interpreter exit
        return code
    except KeyboardInterrupt:
        print(f"diffkernels {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the output was piped into e.g. `head`, which has exited
        # Point stdout at /dev/null so that the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
