#!/usr/bin/env python
"""Host overhead of the fused ops at small shapes, where Python and dispatch, not the kernel, dominate.

    python benchmarks/host_overhead.py [--device cuda] [--mse-shape 128,3,32,32] [--ids-shape 32,4096]

For each case it prints the time per call (best of --repeats rounds of --calls calls, with the
device synchronised around each round; the cases of a group are interleaved round by round, so
that noise from other processes hits all of them alike), the load average before and after, and
the aten ops one call issues, counted with the profiler: the aten ops not nested in another aten
op, split into "launch" ops (the ones that do work: on a GPU, each is a kernel launch) and
allocations / views / metadata (no launch). The counts include what the backend primitive itself
issues; the "primitive" rows show that part.

Cases: the sparse_mse training step (``loss = sparse_mse_loss(pred, target, 0.98, seed);
loss.backward()``, with and without a per-sample weight), the dense steps it replaces (eager
``((p - t)**2).mean()`` and ``F.mse_loss``), the eager masked loss a user would write
(``torch.rand`` mask, benchmarks/bench_sparse_mse.py's baseline) and the primitive ``sparse_mse_fwd``
alone; ``mdm.mask_tokens`` (standard and mirror), an eager
``torch.rand`` + ``where`` mask, and the ``mask_tokens`` primitive alone.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout too
from benchmarks.bench_sparse_mse import baseline_loss  # noqa: E402
from benchmarks.environment import pin_device  # noqa: E402
from benchmarks.memory import quiet_stderr  # noqa: E402
from benchmarks.timing import sync  # noqa: E402

import diffkernels as dk  # noqa: E402
from diffkernels import _backend  # noqa: E402
from diffkernels.mdm import mask_tokens  # noqa: E402
from diffkernels.ops import _kernels  # noqa: E402
from diffkernels.ops.mask_tokens import row_table  # noqa: E402

# Ops that allocate or only change metadata: no kernel launch on a GPU.
NO_LAUNCH = {
    "aten::empty", "aten::empty_like", "aten::empty_strided", "aten::new_empty", "aten::new_empty_strided",
    "aten::view", "aten::_reshape_alias", "aten::as_strided", "aten::expand", "aten::detach",
    "aten::alias", "aten::unsqueeze", "aten::squeeze", "aten::select", "aten::slice", "aten::t",
    "aten::lift_fresh", "aten::resolve_conj", "aten::resolve_neg", "aten::_unsafe_view",
    "aten::result_type", "aten::promote_types", "aten::split", "aten::unbind", "aten::set_", "aten::detach_",
}
# Ops that copy only when they must: a launch only if something below them launches.
MAYBE_NO_LAUNCH = {"aten::to", "aten::contiguous", "aten::reshape", "aten::type_as", "aten::flatten"}
# Ops that make the host wait for the device.
SYNCS = {"aten::_local_scalar_dense", "aten::nonzero"}
PROFILED_CALLS = 5


def _launches(event) -> bool:
    if event.name in NO_LAUNCH:
        return False
    if event.name in MAYBE_NO_LAUNCH:
        return any(_launches(child) for child in event.cpu_children)
    return True


def count_ops(fn, calls: int = PROFILED_CALLS) -> tuple[float, float, float, Counter]:
    """Per call: launch ops, no-launch ops, host syncs; and the launch-op names, from the profiler."""
    fn()
    with quiet_stderr(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            fn()
    launch, other, syncs = Counter(), 0, 0
    for event in prof.events():
        if not event.name.startswith("aten::"):
            continue
        syncs += event.name in SYNCS
        parent = event.cpu_parent
        while parent is not None and not parent.name.startswith("aten::"):
            parent = parent.cpu_parent
        if parent is not None:  # nested in another aten op: part of that op
            continue
        if _launches(event):
            launch[event.name] += 1
        else:
            other += 1
    return sum(launch.values()) / calls, other / calls, syncs / calls, launch


def cases(device: torch.device, mse_shape, ids_shape):
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(mse_shape, generator=g).to(device).requires_grad_()
    target = torch.randn(mse_shape, generator=g).to(device)
    weight = (torch.rand(mse_shape[0], generator=g) + 0.5).to(device)
    seed = iter(range(10**12))
    kernels = _kernels.for_device(device)
    scale = torch.full((mse_shape[0],), 0.1, device=device)

    def fused(w=None):
        def step():
            pred.grad = None
            dk.sparse_mse_loss(pred, target, 0.98, next(seed), weight=w).backward()
        return step

    def eager_mse():
        pred.grad = None
        ((pred - target) ** 2).mean().backward()

    def dense_mse_loss():
        pred.grad = None
        torch.nn.functional.mse_loss(pred, target).backward()

    def eager_masked():
        pred.grad = None
        baseline_loss(pred, target, 0.98).backward()

    def mse_primitive():
        kernels.sparse_mse_fwd(pred.detach(), target, 0.98, next(seed), 1, scale)

    B, L = ids_shape
    ids = torch.randint(0, 1000, ids_shape, generator=g).to(device)
    p = (torch.rand(B, generator=g) * 0.9 + 0.05).to(device)
    table = row_table(p, 0.0, None, False)

    def masked(mode):
        return lambda: mask_tokens(ids, p, next(seed), mask_id=1000, mode=mode)

    def eager_mask():
        m = torch.rand(ids_shape, device=device) < p[:, None]
        torch.where(m, 1000, ids)

    def mask_primitive():
        kernels.mask_tokens(ids, table, next(seed), 1000, None, None, False)

    yield f"sparse_mse step {tuple(mse_shape)}", [
        ("fused", fused()), ("fused, weight", fused(weight)), ("eager", eager_mse), ("F.mse_loss", dense_mse_loss),
        ("eager masked", eager_masked), ("primitive", mse_primitive)]
    yield f"mask_tokens {tuple(ids_shape)}", [
        ("fused", masked("standard")), ("fused, mirror", masked("mirror")), ("eager", eager_mask),
        ("primitive", mask_primitive)]


def interleaved_best_us(fns, device, calls: int, repeats: int, clock) -> list[float]:
    """Microseconds per call of each of ``fns``: the best of ``repeats`` rounds of ``calls`` calls,
    the functions timed in rotating order round by round."""
    for fn in fns:
        for _ in range(max(10, calls // 10)):
            fn()
    best = [float("inf")] * len(fns)
    for r in range(repeats):
        for k in range(len(fns)):
            i = (r + k) % len(fns)
            sync(device)
            start = clock()
            for _ in range(calls):
                fns[i]()
            sync(device)
            best[i] = min(best[i], (clock() - start) / calls * 1e6)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--calls", type=int, default=500, help="calls per timed round")
    parser.add_argument("--repeats", type=int, default=10, help="timed rounds; the best is reported")
    parser.add_argument("--mse-shape", default="4,8", help="pred shape, e.g. 128,3,32,32")
    parser.add_argument("--ids-shape", default="32,64", help="token ids shape (B, L), e.g. 32,4096")
    parser.add_argument("--show-ops", action="store_true", help="list the launch ops of each case")
    parser.add_argument("--cpu-time", action="store_true",
                        help="time with the process's CPU time instead of the wall clock (CPU only: steadier on "
                             "a machine shared with other jobs)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.cpu_time and device.type != "cpu":
        parser.error("--cpu-time measures host work only; on a GPU time with the wall clock")
    clock = time.process_time if args.cpu_time else time.perf_counter
    device = pin_device(device)
    shape = lambda s: tuple(int(x) for x in s.split(","))  # noqa: E731
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), "
          f"backend {_backend.select(device)}, torch {torch.__version__}, best of {args.repeats} rounds of "
          f"{args.calls} calls, {'CPU' if args.cpu_time else 'wall'} time")
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    for title, rows in cases(device, shape(args.mse_shape), shape(args.ids_shape)):
        print(f"\n{title}\n  {'case':<16}{'us/call':>10}{'launch ops':>12}{'other ops':>11}{'syncs':>7}")
        times = interleaved_best_us([fn for _, fn in rows], device, args.calls, args.repeats, clock)
        for (name, fn), us in zip(rows, times):
            launch, other, syncs, names = count_ops(fn)
            print(f"  {name:<16}{us:>10.1f}{launch:>12.1f}{other:>11.1f}{syncs:>7.1f}")
            if args.show_ops:
                listed = (f"{k.removeprefix('aten::')} x{v / PROFILED_CALLS:g}" for k, v in sorted(names.items()))
                print("      " + ", ".join(listed))
    print(f"\nload average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
