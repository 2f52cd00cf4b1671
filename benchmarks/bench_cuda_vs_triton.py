#!/usr/bin/env python
"""The CUDA kernels of csrc/ against the Triton kernels, primitive by primitive.

    python benchmarks/bench_cuda_vs_triton.py [--out DIR] [--quick] [--runs N] [--device cuda|cpu]

Times the backend primitives (``diffkernels.ops._kernels``), not the public API, so that only the
kernels differ: ``sparse_mse_fwd`` with the gradient (mask ratio 0 and 0.98), ``scale_rows_``
(factor != 1) and ``mask_tokens`` (standard and mirror, int64 ids), fp32 and bf16, at training-sized
shapes plus (256, 3, 256, 256). Before timing a row it checks that the two backends agree: masks,
kept counts, gradients and token outputs bit for bit, per-row sums to 1e-6.

Two times per backend, both the median of --runs runs after warm-up, timed with CUDA events, the
inputs rotating over enough copies to exceed twice the L2 cache (so every run reads from DRAM):
* ``graph``: one CUDA graph holding one call per input copy, replayed; time per call. This is the
  GPU time of the kernels alone (no Python, no launch overhead): compare it with the floor.
* ``call``: events around each eager call. At small shapes this is host overhead (Python,
  dispatcher, launches), which is what a training step pays.
``floor`` = bytes that must move / the measured device-to-device copy bandwidth. For
sparse_mse_fwd the dense floor reads pred and target and writes the gradient (3 x numel x itemsize
bytes); the ``sectors`` floor only reads the 32-byte sectors that hold a kept element
(1 - eta^(32/itemsize) of them), which a kernel that skips masked elements can reach at eta = 0.98.

Every section and row is guarded: an error is recorded in the table and the run goes on.
With ``--device cpu`` (for CI / a machine without a GPU) it compares the C++ kernels with the
Triton interpreter on tiny shapes, timed with perf_counter (no graphs).

Results: a Markdown table on stdout and ``<out>/cuda_vs_triton_<device>[_quick].{md,json}``.
"""

from __future__ import annotations

import math
import os
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout: diffkernels, benchmarks
# The benchmarks modules import torch, never diffkernels or triton: TRITON_INTERPRET can still be set below.
from benchmarks.cli import base_parser, parse_tolerantly, result_stem  # noqa: E402
from benchmarks.environment import copy_ceiling, default_device, start  # noqa: E402
from benchmarks.reporting import err_s, header, log, write_results  # noqa: E402
from benchmarks.timing import Timer  # noqa: E402

MB = 1e6


def parse_args(argv=None):
    p = base_parser(__doc__, quick_help="fewer shapes and runs (a smoke test)", out_default=None,
                    device_help="cuda (default when available) or cpu")
    p.add_argument("--runs", type=int, default=None, help="timed runs per measurement (default 100; quick: 20, cpu: 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs first (default 10; cpu: 1)")
    p.add_argument("--l2-mb", type=float, default=50.0, help="L2 size used when the device does not report it")
    return parse_tolerantly(p, argv, "bench_cuda_vs_triton")


import torch  # noqa: E402

ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None and default_device(ARGS.device).type == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any Triton kernel is defined

from diffkernels import _backend  # noqa: E402
from diffkernels.ops import _kernels  # noqa: E402
from diffkernels.ops.mask_tokens import row_table  # noqa: E402

SHAPES = [(128, 3, 32, 32), (64, 4, 64, 64), (16, 3, 256, 256), (256, 3, 256, 256)]
TOKEN_SHAPES = [(32, 4096), (256, 1024), (1024, 4096), (4096, 4096)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
ETAS = [0.0, 0.98]
SEED = 0x5EED_0000_C0DA


def _err(exc: BaseException) -> str:
    return err_s(exc, 300, first_line=True)


def copy_bandwidth(device: torch.device, quick: bool, timer: Timer) -> dict:
    """Bytes read + written per second by a large device-to-device (or host) copy, median."""
    nbytes = (256 if quick else 1024) * 2**20 if device.type == "cuda" else 64 * 2**20
    return copy_ceiling(device, nbytes, max(5, min(timer.runs, 20)))


def n_copies(set_bytes: int, l2_bytes: int, device: torch.device) -> int:
    """Input copies to rotate over: their total exceeds twice the L2, within a memory budget."""
    if device.type != "cuda":
        return 2
    k = max(2, math.ceil(2 * l2_bytes / max(1, set_bytes)))
    free = torch.cuda.mem_get_info(device)[0]
    k = min(k, 64, max(1, int(0.3 * free // max(1, set_bytes))))
    return max(1, k)


# --- the measured rows --------------------------------------------------------------------------


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fmt_us(t):
    return "—" if t is None else (f"{t * 1e6:.1f}" if t < 1e-3 else f"{t * 1e6:.0f}")


def _pct(floor, t):
    return "—" if (t is None or floor is None) else f"{100 * floor / t:.0f}%"


def time_pair(timer: Timer, fns: dict, k: int, row: dict) -> None:
    """row[name] = {graph, call} seconds for each backend; errors recorded per measurement."""
    for name, fn in fns.items():
        res = row.setdefault("times", {}).setdefault(name, {})
        for kind, method in (("graph", timer.per_call_graph), ("call", timer.per_call)):
            if kind == "graph" and not timer.cuda:
                continue
            try:
                res[kind] = method(fn, k)
            except Exception as exc:  # noqa: BLE001 -- record and go on
                res[kind + "_error"] = _err(exc)
                try:
                    timer.sync()
                except Exception:  # noqa: BLE001 -- a sticky CUDA error: the row's caller reports it
                    pass


def bench_sparse_mse(ctx, shape, dtype_name, eta) -> dict:
    device, timer, (a, b) = ctx["device"], ctx["timer"], ctx["backends"]
    dtype = DTYPES[dtype_name]
    item = torch.empty((), dtype=dtype).element_size()
    numel = math.prod(shape)
    row = {"op": "sparse_mse_fwd", "shape": list(shape), "dtype": dtype_name, "eta": eta}
    row["bytes_dense"] = 3 * numel * item
    row["bytes_sectors"] = numel * item * (1 + 2 * (1 - eta ** (32 // item)))
    k = n_copies(3 * numel * item, ctx["l2_bytes"], device)
    row["copies"] = k
    g = torch.Generator(device="cpu").manual_seed(1)
    preds = [torch.randn(shape, generator=g).to(dtype).to(device) for _ in range(k)]
    targets = [torch.randn(shape, generator=g).to(dtype).to(device) for _ in range(k)]
    B = shape[0]
    scale = torch.full((B,), 2.0 / numel, dtype=_acc(dtype), device=device)
    kern = {name: _kernels.kernels_for(name) for name in (a, b)}
    # Bit-equality of the two backends on the first copy, before timing.
    outs = {name: kern[name].sparse_mse_fwd(preds[0], targets[0], eta, SEED, 1, scale) for name in (a, b)}
    sa, ka, ga = outs[a]
    sb, kb, gb = outs[b]
    rel = float(((sa - sb).abs() / sb.abs().clamp(min=1e-30)).max()) if B else 0.0
    same_grad = torch.equal(ga, gb)
    ok = torch.equal(ka, kb) and same_grad and rel <= 1e-6
    row["check"] = "✓" if ok else (f"✗ kept {'=' if torch.equal(ka, kb) else '≠'}, grad "
                                  f"{'=' if same_grad else '≠'}, sum rel diff {rel:.1e}")
    if not same_grad and device.type == "cpu" and dtype == torch.bfloat16 and torch.equal(ka, kb) and rel <= 1e-6:
        # The Triton *interpreter* converts float32 to bfloat16 by truncation (compiled Triton and
        # the C++/CUDA kernels round to nearest even): allow 1 ulp here, and say so.
        ulp = (ga.float() - gb.float()).abs() / ga.float().abs().clamp(min=1e-30) * 2**7
        if float(ulp.max()) <= 1.0 + 1e-6:
            row["check"] = "✓ (bf16 grad within 1 ulp: the Triton interpreter truncates)"
    row["sum_rel_diff"] = rel
    del outs, sa, sb, ga, gb
    fns = {name: (lambda i, kk=kern[name]: kk.sparse_mse_fwd(preds[i], targets[i], eta, SEED, 1, scale))
           for name in (a, b)}
    time_pair(timer, fns, k, row)
    return row


def bench_scale_rows(ctx, shape, dtype_name) -> dict:
    device, timer, (a, b) = ctx["device"], ctx["timer"], ctx["backends"]
    dtype = DTYPES[dtype_name]
    item = torch.empty((), dtype=dtype).element_size()
    numel = math.prod(shape)
    row = {"op": "scale_rows_", "shape": list(shape), "dtype": dtype_name, "eta": None}
    row["bytes_dense"] = row["bytes_sectors"] = 2 * numel * item
    k = n_copies(numel * item, ctx["l2_bytes"], device)
    row["copies"] = k
    g = torch.Generator(device="cpu").manual_seed(2)
    grads = [torch.randn(shape, generator=g).to(dtype).to(device) for _ in range(k)]
    B = shape[0]
    factor = (1.0 + torch.rand(B, generator=g) * 2.0**-10).to(_acc(dtype)).to(device)  # != 1: every row scaled
    kern = {name: _kernels.kernels_for(name) for name in (a, b)}
    x, y = grads[0].clone(), grads[0].clone()
    kern[a].scale_rows_(x, factor)
    kern[b].scale_rows_(y, factor)
    row["check"] = "✓" if torch.equal(x, y) else "✗ results differ"
    del x, y
    fns = {name: (lambda i, kk=kern[name]: kk.scale_rows_(grads[i], factor)) for name in (a, b)}
    time_pair(timer, fns, k, row)
    return row


def bench_mask_tokens(ctx, shape, mode) -> dict:
    device, timer, (a, b) = ctx["device"], ctx["timer"], ctx["backends"]
    B, L = shape
    mirror = mode == "mirror"
    copies = 2 if mirror else 1
    row = {"op": "mask_tokens", "shape": list(shape), "dtype": "int64", "mode": mode, "eta": None}
    row["bytes_dense"] = row["bytes_sectors"] = B * L * (8 + copies * (8 + 1 + 4))
    k = n_copies(B * L * 8, ctx["l2_bytes"], device)
    row["copies"] = k
    g = torch.Generator(device="cpu").manual_seed(3)
    ids = [torch.randint(0, 32000, shape, generator=g).to(device) for _ in range(k)]
    p = ((torch.arange(B, dtype=torch.float32) + 0.5) / B).to(device)  # stratified, mean 0.5
    table = row_table(p, 0.0, torch.ones(B, dtype=torch.bool, device=device) if mirror else None, False)
    kern = {name: _kernels.kernels_for(name) for name in (a, b)}
    outs = {name: kern[name].mask_tokens(ids[0], table, SEED, 32000, None, None, mirror) for name in (a, b)}
    same = all(torch.equal(x, y) for x, y in zip(outs[a], outs[b]))
    row["check"] = "✓" if same else "✗ outputs differ"
    row["masked_fraction"] = float(outs[a][1].float().mean())
    del outs
    fns = {name: (lambda i, kk=kern[name]: kk.mask_tokens(ids[i], table, SEED, 32000, None, None, mirror))
           for name in (a, b)}
    time_pair(timer, fns, k, row)
    return row


# --- report -------------------------------------------------------------------------------------


def _ratio(ta, tb):
    return None if (ta is None or tb is None) else ta / tb


def to_markdown(meta, ceil, rows, backends, errors) -> str:
    a, b = backends
    bw = ceil["GBps"] * 1e9 if "GBps" in ceil else None
    bk = meta.get("backends", {})
    lines = header(meta, "CUDA kernels vs Triton kernels (backend primitives)",
                   f"backends: `{a}`: {bk.get(a)}; `{b}`: {bk.get(b)}")
    if bw:
        lines.append(f"- copy bandwidth: **{bw / 1e9:.1f} GB/s** (read + write, {ceil['bytes'] // 2**20} MiB "
                     "buffers, median)")
    elif ceil.get("error"):
        lines.append(f"- copy bandwidth: error: {ceil['error']}")
    lines += ["", "`graph` = GPU time per call inside a CUDA graph (kernels only), `call` = CUDA events around "
              "one eager call (includes host overhead); medians over the runs, µs. `floor` = bytes / copy "
              f"bandwidth (dense; sectors: only the 32-byte sectors holding kept elements are read). "
              f"`{a}/{b}` < 1: {a} faster. `check`: outputs compared before timing (bit-exact; sums 1e-6).", ""]
    head = ("| op | shape | dtype | η / mode | MB | floor µs (dense / sectors) | "
            f"{a} graph | {b} graph | {a}/{b} graph | {a} % floor | {b} % floor | "
            f"{a} call | {b} call | {a}/{b} call | check |")
    lines += [head, "|" + "---|" * 15]
    for r in rows:
        shape = "×".join(map(str, r.get("shape", [])))
        if "error" in r and "times" not in r:
            lines.append(f"| {r.get('op')} | {shape} | {r.get('dtype')} | {r.get('mode', r.get('eta'))} | | | "
                         f"error: {r['error']} | | | | | | | | |")
            continue
        t = r.get("times", {})
        ga, gb = t.get(a, {}).get("graph"), t.get(b, {}).get("graph")
        ca, cb = t.get(a, {}).get("call"), t.get(b, {}).get("call")
        fd = r["bytes_dense"] / bw if bw else None
        fs = r["bytes_sectors"] / bw if bw else None
        floor = f"{_fmt_us(fd)} / {_fmt_us(fs)}" if fd is not None and abs(fd - fs) > 1e-12 else _fmt_us(fd)

        def cell(x, key):
            err = t.get(x, {}).get(key + "_error")
            return f"error: {err}" if err else _fmt_us(t.get(x, {}).get(key))

        def pct(tt):
            if tt is None or fd is None:
                return "—"
            return _pct(fd, tt) + (f" / {_pct(fs, tt)}" if abs(fd - fs) > 1e-12 else "")

        rg, rc = _ratio(ga, gb), _ratio(ca, cb)
        mode = r.get("mode", r.get("eta"))
        lines.append(
            f"| {r['op']} | {shape} | {r['dtype']} | {'' if mode is None else mode} | {r['bytes_dense'] / MB:.1f} | "
            f"{floor} | {cell(a, 'graph')} | {cell(b, 'graph')} | {'—' if rg is None else f'{rg:.2f}'} | "
            f"{pct(ga)} | {pct(gb)} | {cell(a, 'call')} | {cell(b, 'call')} | "
            f"{'—' if rc is None else f'{rc:.2f}'} | {r.get('check', '—')}"
            f"{' ' + r['error'] if 'error' in r else ''} |")
    # Per-op geometric means of the ratios: the summary the backend default is decided on.
    lines += ["", f"### Geometric mean of {a}/{b} per op (< 1: {a} faster)", "",
              "| op | rows | graph (kernels) | call (eager) |", "|---|---|---|---|"]
    for op in dict.fromkeys(r["op"] for r in rows):
        rs = [r for r in rows if r["op"] == op]
        gm = {}
        for kind in ("graph", "call"):
            vals = [_ratio(r.get("times", {}).get(a, {}).get(kind), r.get("times", {}).get(b, {}).get(kind))
                    for r in rs]
            vals = [v for v in vals if v]
            gm[kind] = f"{math.exp(sum(map(math.log, vals)) / len(vals)):.2f} ({len(vals)})" if vals else "—"
        lines.append(f"| {op} | {len(rs)} | {gm['graph']} | {gm['call']} |")
    if errors:
        lines += ["", "### Errors", ""] + [f"- {e}" for e in errors]
    return "\n".join(lines) + "\n"


# --- main ---------------------------------------------------------------------------------------


def main(args) -> int:
    device, meta = start(args)
    cpu = device.type == "cpu"
    runs = args.runs or (3 if cpu else (20 if args.quick else 100))
    warmup = args.warmup if args.warmup is not None else (1 if cpu else 10)
    backends = ("cpp", "triton") if cpu else ("cuda", "triton")
    timer = Timer(device, runs, warmup)
    errors: list[str] = []
    meta.update(runs=runs, warmup=warmup, backends_compared=list(backends))
    for name in backends:
        why = _backend.unavailable(name, device)
        if why:
            errors.append(f"backend {name!r} is unavailable here: {why}")
    l2 = meta.get("gpu_l2_bytes") or int(args.l2_mb * 2**20)
    ctx = {"device": device, "timer": timer, "backends": backends, "l2_bytes": l2}
    log(f"{meta['device']}: {backends[0]} vs {backends[1]}, {runs} runs, warm-up {warmup}")

    try:
        ceil = copy_bandwidth(device, args.quick, timer)
    except Exception as exc:  # noqa: BLE001
        ceil = {"error": _err(exc)}
        errors.append(f"copy bandwidth: {_err(exc)}")

    if cpu:
        shapes, token_shapes = [(2, 3, 8, 8), (3, 5, 7)], [(4, 64), (3, 37)]
    elif args.quick:
        shapes, token_shapes = SHAPES[:2], TOKEN_SHAPES[:2]
    else:
        shapes, token_shapes = SHAPES, TOKEN_SHAPES
    jobs = []
    for shape in shapes:
        for dtype_name in DTYPES:
            for eta in ETAS:
                jobs.append(("sparse_mse_fwd", bench_sparse_mse, (shape, dtype_name, eta)))
    for shape in shapes:
        for dtype_name in DTYPES:
            jobs.append(("scale_rows_", bench_scale_rows, (shape, dtype_name)))
    for shape in token_shapes:
        for mode in ("standard", "mirror"):
            jobs.append(("mask_tokens", bench_mask_tokens, (shape, mode)))

    rows = []
    for op, fn, fargs in jobs:
        t0 = time.perf_counter()
        try:
            row = fn(ctx, *fargs)
        except Exception as exc:  # noqa: BLE001 -- one bad row must not cost the others
            row = {"op": op, "shape": list(fargs[0]), "dtype": fargs[1] if op != "mask_tokens" else "int64",
                   "error": _err(exc), "traceback": traceback.format_exc(limit=4)}
            if op == "sparse_mse_fwd":
                row["eta"] = fargs[2]
            if op == "mask_tokens":
                row["mode"] = fargs[1]
            errors.append(f"{op} {fargs}: {_err(exc)}")
        finally:
            if device.type == "cuda":
                try:
                    torch.cuda.synchronize()
                    torch.cuda.empty_cache()
                except Exception as exc:  # noqa: BLE001 -- a sticky CUDA error: report, go on
                    errors.append(f"after {op} {fargs}: {_err(exc)}")
        row["wall_s"] = time.perf_counter() - t0
        rows.append(row)
        log(f"{op} {fargs}: {row.get('check', row.get('error'))} ({row['wall_s']:.1f} s)")

    md = to_markdown(meta, ceil, rows, backends, errors)
    print(md)
    if args.out:
        try:
            write_results(args.out, result_stem("cuda_vs_triton", meta["device_kind"], args), md,
                          {"meta": meta, "copy_bandwidth": ceil, "rows": rows, "errors": errors})
        except Exception as exc:  # noqa: BLE001
            print(f"could not write results: {_err(exc)}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(ARGS))
