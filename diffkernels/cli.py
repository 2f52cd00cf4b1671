"""Command line: ``diffkernels <command>`` or ``python -m diffkernels <command>``."""

from __future__ import annotations

import argparse
import json


def _cmd_backends(args) -> int:
    from . import backends

    print(json.dumps(backends(), indent=2))
    return 0


def _cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(steps=args.steps, mask_ratio=args.mask_ratio, seed=args.seed, out=args.out, device=args.device)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffkernels", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("backends", help="show which kernel backends are available")
    p.set_defaults(func=_cmd_backends)

    p = sub.add_parser("demo", help="train a tiny diffusion model on scikit-learn's digits with the sparse loss")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--mask-ratio", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--out", default="diffkernels_demo", help="directory for the outputs")
    p.set_defaults(func=_cmd_demo)

    from .optimal_loss.cli import add_subcommands  # optimal-loss, memorization

    add_subcommands(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)
