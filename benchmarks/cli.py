"""The command line of the benchmark scripts: the options every script has, and small parsers."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def base_parser(doc: str | None, *, quick_help: str, out_default: str | None = str(RESULTS_DIR),
                device_help: str = "cpu or cuda (default: cuda when available)") -> argparse.ArgumentParser:
    """An ArgumentParser with the options every benchmark has: --quick, --out DIR, --device, --suffix.

    ``doc``: the script's docstring; its first paragraph is the description.
    ``out_default=None``: results are only written when --out is given.
    """
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0] if doc else None,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help=quick_help)
    ap.add_argument("--out", default=out_default, help="directory for .md and .json results")
    ap.add_argument("--device", default=None, help=device_help)
    ap.add_argument("--suffix", default="", help="appended to the output file names")
    return ap


def result_stem(name: str, device_kind: str, args: argparse.Namespace) -> str:
    """The results' file name: ``<name>_<device kind>[_quick]<suffix>``."""
    return f"{name}_{device_kind}" + ("_quick" if args.quick else "") + args.suffix


def parse_tolerantly(ap: argparse.ArgumentParser, argv, script: str) -> argparse.Namespace:
    """ap.parse_known_args, saying which arguments were ignored (``gpu_pass.sh`` passes the same extra
    arguments to every script)."""
    args, unknown = ap.parse_known_args(argv)
    if unknown:
        print(f"{script}: ignoring arguments {unknown}", file=sys.stderr)
    return args


def fill_defaults(args: argparse.Namespace, **defaults) -> None:
    """Set each option that was not given (None) to its default (defaults that depend on --quick or the device)."""
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)


def parse_shapes(text: str | None, default) -> list[tuple[int, ...]]:
    """"128x3x32x32,16x3x256x256" -> [(128, 3, 32, 32), (16, 3, 256, 256)]; ``default`` when not given."""
    if not text:
        return list(default)
    return [tuple(int(x) for x in s.split("x")) for s in text.split(",") if s]


def shape_arg(shape) -> str:
    """(128, 3, 32, 32) -> "128x3x32x32": a shape as ``parse_shapes`` reads it (also the pytest case ids)."""
    return "x".join(map(str, shape))


def parse_floats(text: str | None, default) -> list[float]:
    """"0,0.5,0.98" -> [0.0, 0.5, 0.98]; ``default`` when not given."""
    return [float(x) for x in text.split(",") if x] if text else list(default)


def settings(args: argparse.Namespace) -> dict:
    """The parsed options as JSON-friendly values (for the results' metadata)."""
    return {k: v if v is None or isinstance(v, (bool, int, float, str, list, tuple, dict)) else str(v)
            for k, v in vars(args).items()}
