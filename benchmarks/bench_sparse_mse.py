#!/usr/bin/env python
"""Benchmark the fused sparse-supervision loss against what a user would write without it.

    python benchmarks/bench_sparse_mse.py [--quick] [--out benchmarks/results]

For every (shape, mask ratio eta, dtype) it times one training-style step, forward + backward
(``loss.backward()`` with ``pred.grad`` reset to None, as an optimizer's ``zero_grad`` does), of

* fused    -- ``diffkernels.sparse_mse_loss`` on the device's default compiled backend
              (C++ on CPU, Triton on CUDA; never the Triton interpreter or the reference);
* eager    -- the same math written with torch's own RNG (``baseline_loss`` below; not bit-exact
              with our Philox stream, same distribution and normalisation);
* compile  -- ``torch.compile(baseline_loss)``, compiled once per row (compile time reported apart);

interleaved round by round so that machine noise hits all three alike, and reports the median
and inter-quartile range of each, the ratios eager/fused and compile/fused (median and IQR of
the per-round ratios), and the peak extra memory of one step. A second table compares two ways to
get the gradient, with the backend primitive ``sparse_mse_fwd``: (A) the shipped one, one pass
computing loss and gradient in forward; (B) a forward pass without gradient, then a second pass
in backward that regenerates the mask and writes the gradient. The bit-exact float64 reference
(``diffkernels.reference.sparse_mse_loss``) is timed at the smallest shape for information.

Before the op it measures the device's ceilings: copy bandwidth (a large device-to-device copy,
bytes read + written / time), mask-generation throughput of our Philox stream, and torch.rand's.
The fused op must read pred and target once and write the gradient once: 3 * numel * itemsize
bytes, whatever eta is (the dense-count floor; at high eta a GPU kernel could skip sectors with
no kept element, which only matters when almost every 32-byte sector is fully masked).

Results: a Markdown table on stdout, and ``<out>/sparse_mse_<kind>[_quick].{md,json}``.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout: diffkernels, benchmarks
from benchmarks.cli import base_parser, fill_defaults, parse_floats, parse_shapes, result_stem  # noqa: E402
from benchmarks.environment import (  # noqa: E402
    bandwidth_ceilings,
    cache_bytes,
    default_device,
    fused_backend,
    input_copies,
    start,
)
from benchmarks.memory import MiB, free, peak_extra_mib  # noqa: E402
from benchmarks.reporting import (  # noqa: E402
    err_s,
    fmt_r,
    fmt_t,
    header,
    load_cell,
    log,
    log_row,
    log_start,
    shape_s,
    write_results,
)
from benchmarks.timing import (  # noqa: E402
    LOAD_LIMIT,
    LoadMonitor,
    add_timing_options,
    measure,
    measure_quietly,
    ratio_stats,
    record,
    summarize,
    sync,
    time_calls,
    timing_defaults,
    wait_if_busy,
)

import diffkernels  # noqa: E402
from diffkernels import reference as _reference  # noqa: E402
from diffkernels.ops import _kernels  # noqa: E402
from diffkernels.rng import seed_to_int64  # noqa: E402

SHAPES = [(128, 3, 32, 32), (64, 4, 64, 64), (16, 3, 256, 256)]
ETAS = [0.0, 0.5, 0.98]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
BASE_SEED = 0x5EED_0000_1234


# --- the baseline: what a user writes with torch's own RNG --------------------------------------


def baseline_loss(pred: torch.Tensor, target: torch.Tensor, eta: float) -> torch.Tensor:
    """Masked MSE with the "expected" normalisation, as a user would write it without diffkernels."""
    keep = torch.rand(pred.shape, device=pred.device) >= eta
    d = pred.float() - target.float()
    n = pred[0].numel()
    per = torch.where(keep, d * d, 0).flatten(1).sum(1) / (n * (1 - eta))
    return per.mean()


# --- memory -------------------------------------------------------------------------------------

CPU_MEMORY_METHOD = (
    "CPU peak extra memory: torch.profiler(profile_memory=True) records every allocation and free "
    "made through PyTorch's CPU allocator during one step; the peak of their running sum (in time "
    "order), relative to the start of the step, is reported. It includes the pred-sized gradient the "
    "step leaves in pred.grad; scratch memory a kernel takes from malloc directly (the C++ kernel's "
    "per-task partial sums, 16 B per 1024 elements) is not seen."
)
CUDA_MEMORY_METHOD = (
    "CUDA peak extra memory: torch.cuda.max_memory_allocated() during one step minus "
    "torch.cuda.memory_allocated() before it (inputs already allocated, pred.grad = None); it "
    "includes the pred-sized gradient the step leaves in pred.grad."
)


# --- ceilings -----------------------------------------------------------------------------------


def ceilings(device, quick: bool) -> dict:
    """Copy bandwidth, mask-generation throughput (our Philox) and torch.rand throughput (shared with
    bench_mdm.py); on a CPU also the fused kernel's cache-resident compute rate."""
    out = bandwidth_ceilings(device, quick, BASE_SEED)
    if device.type == "cpu":
        stat, pick, reps = "best", min, (5 if quick else 15)  # as bandwidth_ceilings on a CPU
        # The fused kernel's own compute rate: loss + gradient on inputs small enough to stay in
        # the cores' L2 (64 x 2048 fp32, 0.5 MiB each), so memory bandwidth is not what limits it.
        # Measured on one thread (a parallel region is at the mercy of the scheduler on a shared VM)
        # and divided by the thread count: the kernel splits into independent row tiles.
        with diffkernels.use_backend("cpp"):
            kernels = _kernels.for_device(device)
        p = torch.randn(64, 2048, device=device)
        q = torch.randn(64, 2048, device=device)
        gs = torch.full((64,), 1e-4, device=device)
        threads = torch.get_num_threads()
        out["fused_kernel_cached"] = {"elements": p.numel(), "threads": threads, "stat": stat, "by_eta": {}}
        torch.set_num_threads(1)
        try:
            for eta in (0.0, 0.5, 0.98):
                fn = lambda i, eta=eta: kernels.sparse_mse_fwd(p, q, eta, i, 1, gs)  # noqa: E731
                for i in range(20):
                    fn(i)
                ts = [time_calls(fn, i, 10, device) for i in range(reps * 2)]
                t1 = pick(ts) / p.numel() * 1e9
                out["fused_kernel_cached"]["by_eta"][str(eta)] = {
                    "ns_per_element_1thread": t1, "ns_per_element": t1 / threads}
        finally:
            torch.set_num_threads(threads)
        out["fused_kernel_cached"]["note"] = (
            "sparse_mse_fwd with gradient, 64x2048 fp32 inputs resident in L2, one thread, divided by the "
            f"{threads} threads (compute rate)")
    return out


# --- one row ------------------------------------------------------------------------------------


def make_inputs(shape, dtype, device, n_sets: int, gen: torch.Generator):
    sets = []
    for _ in range(n_sets):
        p = torch.randn(shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)
        t = torch.randn(shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)
        sets.append((p.requires_grad_(True), t))
    return sets


def bench_row(shape, eta, dtype_name, device, args, ceil, backend, cache: int) -> dict:
    dtype = DTYPES[dtype_name]
    numel = math.prod(shape)
    B = shape[0]
    n = numel // B
    item = torch.empty((), dtype=dtype).element_size()
    n_sets = input_copies(3 * numel * item, cache, not args.no_rotate)
    gen = torch.Generator().manual_seed(hash((shape, eta, dtype_name)) & 0xFFFFFFFF)
    sets = make_inputs(shape, dtype, device, n_sets, gen)

    def pick(i):
        # One gradient alive at a time, as in training: the previous step's (another input set when
        # rotating) is dropped too, so rotation does not keep n_sets gradients alive.
        sets[(i - 1) % n_sets][0].grad = None
        p, t = sets[i % n_sets]
        p.grad = None
        return p, t

    def fused(i):
        p, t = pick(i)
        with diffkernels.use_backend(backend):
            diffkernels.sparse_mse_loss(p, t, eta, BASE_SEED + i).backward()

    def eager(i):
        p, t = pick(i)
        baseline_loss(p, t, eta).backward()

    row = {"shape": list(shape), "eta": eta, "dtype": dtype_name, "numel": numel, "input_sets": n_sets}
    row["waited_for_idle_s"] = wait_if_busy(device, args.idle_wait)

    # Sanity: at eta = 0 every element is kept by both, so fused and eager must agree.
    if eta == 0.0:
        p, t = sets[0]
        with torch.no_grad(), diffkernels.use_backend(backend):
            a = float(diffkernels.sparse_mse_loss(p, t, 0.0, 1))
            b = float(baseline_loss(p, t, 0.0))
        row["eta0_rel_diff_fused_vs_eager"] = abs(a - b) / abs(b)

    torch._dynamo.reset()
    compiled_fn = torch.compile(baseline_loss, dynamic=False)

    def compiled(i):
        p, t = pick(i)
        compiled_fn(p, t, eta).backward()

    fns = {"fused": fused, "eager": eager, "compile": compiled}
    errors = {}
    t0 = time.perf_counter()
    try:
        compiled(0)
        sync(device)
        row["compile_s"] = time.perf_counter() - t0
    except Exception as exc:  # noqa: BLE001 -- report, do not abort the whole run
        errors["compile"] = err_s(exc, 500)
        del fns["compile"]
    res = measure_quietly(fns, device, args, args.budget, args.min_reps)
    record(row, res, [(name, "fused") for name in fns if name != "fused"], args.keep_samples)
    # Ratios of the fastest samples: noise on a shared machine only ever adds time, so the minimum
    # is a robust estimate of the uncontended time when other processes interfered.
    for name in list(row["ratio"]):
        num = name.split("/")[0]
        row["ratio"][name]["of_min"] = min(res["samples"][num]) / min(res["samples"]["fused"])
    row["errors"] = errors

    # Peak extra memory of one step (inputs already allocated, grads cleared).
    def drop_grads():
        for p, _ in sets:
            p.grad = None

    row["peak_extra_MiB"] = peak_extra_mib(fns, device, drop_grads)
    row["grad_MiB"] = numel * item / MiB

    # Floors for the fused op: dense-count bytes (read pred, target; write grad) at copy bandwidth;
    # and the time our Philox mask generation alone takes for this many elements.
    floor_bytes = 3 * numel * item
    row["floor_bytes"] = floor_bytes
    row["byte_floor_ms"] = floor_bytes / (ceil["copy"]["GBps"] * 1e9) * 1e3
    if "fused_kernel_cached" in ceil:  # CPU: the kernel's compute rate, measured on cache-resident data
        by_eta = ceil["fused_kernel_cached"]["by_eta"]
        rate = by_eta.get(str(eta)) or by_eta[min(by_eta, key=lambda e: abs(float(e) - eta))]
        row["compute_floor_ms"] = numel * rate["ns_per_element"] * 1e-6
        row["predicted_kernel_ms"] = max(row["byte_floor_ms"], row["compute_floor_ms"])
    med = row["time"]["fused"]["median_ms"]
    row["fused_frac_of_byte_floor"] = row["byte_floor_ms"] / med

    # Gradient strategy, with the backend primitive (no autograd around it).
    with diffkernels.use_backend(backend):
        kernels = _kernels.for_device(device)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    gscale = torch.full((B,), 2.0 / (B * n * (1.0 - eta)), dtype=acc, device=device)
    seed64 = seed_to_int64

    def strat_a(i):
        p, t = sets[i % n_sets]
        kernels.sparse_mse_fwd(p.detach(), t, eta, seed64(BASE_SEED + i), 1, gscale)

    def strat_b(i):
        p, t = sets[i % n_sets]
        s = seed64(BASE_SEED + i)
        kernels.sparse_mse_fwd(p.detach(), t, eta, s, 1, None)
        kernels.sparse_mse_fwd(p.detach(), t, eta, s, 1, gscale)

    def fwd_only(i):
        p, t = sets[i % n_sets]
        kernels.sparse_mse_fwd(p.detach(), t, eta, seed64(BASE_SEED + i), 1, None)

    res = measure_quietly({"A_one_pass": strat_a, "B_two_pass": strat_b, "fwd_no_grad": fwd_only}, device, args,
                          args.budget_strategy, args.min_reps)
    row["strategy"] = {name: summarize(s) for name, s in res["samples"].items()}
    row["strategy"]["B/A"] = ratio_stats(res["samples"]["B_two_pass"], res["samples"]["A_one_pass"])
    row["strategy"]["foreign_cores"] = res["foreign_cores"]
    row["kernel_A_frac_of_byte_floor"] = row["byte_floor_ms"] / row["strategy"]["A_one_pass"]["median_ms"]

    # The bit-exact float64 reference, for information, at the smallest shape only.
    if shape == tuple(min(args.shapes, key=math.prod)) and not args.no_reference:
        def ref(i):
            p, t = pick(i)
            _reference.sparse_mse_loss(p, t, eta, BASE_SEED + i).backward()

        try:
            res = measure({"reference": ref}, device, budget_s=args.budget_reference, min_reps=3, max_reps=20,
                          min_sample_s=0.0, warmup_s=0.0, min_warmup_calls=1)
            row["time"]["reference"] = summarize(res["samples"]["reference"])
        except Exception as exc:  # noqa: BLE001
            errors["reference"] = err_s(exc, 500)

    del sets, compiled_fn
    torch._dynamo.reset()
    free(device)
    return row


# --- output -------------------------------------------------------------------------------------


def _fmt_min(ratios):
    parts = [ratios[k]["of_min"] for k in ("eager/fused", "compile/fused") if k in ratios]
    return ", ".join(f"{x:.2f}×" for x in parts) or "n/a"


def to_markdown(meta, ceil, rows) -> str:
    L = header(meta, "sparse_mse benchmark", f"fused backend: `{meta['fused_backend']}`")
    L.append("")
    L.append("## Ceilings measured first")
    L.append("")
    if ceil.get("foreign_cores") is not None:
        L.append(f"(other processes used {ceil['foreign_cores']:.2f} cores while these were measured; on CPU each "
                 "ceiling is the best of its runs, on GPU the median)")
        L.append("")
    c = ceil["copy"]
    L.append(f"- copy bandwidth: **{c['GBps']:.1f} GB/s** ({c['note']}, {c['bytes'] // MiB} MiB buffers, "
             f"median {c['median_ms']:.2f} ms, best {c['min_ms']:.2f} ms)")
    m = ceil["philox_mask"]
    L.append(f"- our Philox mask generation: **{m['ns_per_element']:.3f} ns/element** ({m['note']}, "
             f"{m['elements']} elements)")
    r = ceil["torch_rand"]
    L.append(f"- torch.rand: **{r['ns_per_element']:.3f} ns/element** ({r['note']})")
    if "fused_kernel_cached" in ceil:
        k = ceil["fused_kernel_cached"]
        rates = ", ".join(f"η={e}: **{v['ns_per_element']:.3f}**" for e, v in k["by_eta"].items())
        L.append(f"- fused kernel compute rate, ns/element: {rates} ({k['note']})")
    L.append("")
    L.append("## Forward + backward, ms (median ± IQR/2)")
    L.append("")
    L.append("One step = `loss = f(pred, target); loss.backward()` with `pred.grad = None` before it; "
             "target needs no gradient. Methods are interleaved round by round; ratios are the median "
             "(and quartiles) of the per-round ratios; `ratios of minima` divide the fastest samples (noise "
             "on a shared machine only adds time, so minima estimate the uncontended times). " + (
                 "Timing: CUDA events after warm-up. " if meta.get("cuda") else
                 "Timing: time.perf_counter after warm-up, default torch threads. ")
             + "Inputs are rotated over enough copies to exceed twice the last-level cache "
             "(L2 on GPU). `floor` = 3·numel·itemsize bytes (read pred and target, write grad; the "
             "dense count, whatever η) at the measured copy bandwidth; `% floor` = floor / fused time. "
             "`load` = CPU cores used by other processes / stolen by the hypervisor during the timing (a shared VM); "
             f"† marks rows where other processes used more than {LOAD_LIMIT} cores even after retries. "
             "`compile s`: the first compiled step, compiling forward and backward (short when Inductor's "
             "on-disk cache already holds the graphs).")
    L.append("")
    L.append("| shape | η | dtype | fused | eager | compile | eager/fused | compile/fused | ratios of minima e/f, c/f "
             "| floor ms | % floor | compile s | load |")
    L.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        t = row["time"]
        L.append(
            f"| {shape_s(row['shape'])} | {row['eta']} | {row['dtype']} | **{fmt_t(t.get('fused'))}** | "
            f"{fmt_t(t.get('eager'))} | {fmt_t(t.get('compile'))} | {fmt_r(row['ratio'].get('eager/fused'))} | "
            f"{fmt_r(row['ratio'].get('compile/fused'))} | {_fmt_min(row['ratio'])} | {row['byte_floor_ms']:.3f} | "
            f"{100 * row['fused_frac_of_byte_floor']:.0f}% | "
            f"{row.get('compile_s', float('nan')):.1f} | {load_cell(row, LOAD_LIMIT)} |"
        )
    errs = [(r, k, v) for r in rows for k, v in r["errors"].items()]
    if errs:
        L.append("")
        for r, k, v in errs:
            L.append(f"- error in {k} at {shape_s(r['shape'])} η={r['eta']} {r['dtype']}: `{v}`")
    L.append("")
    L.append("## Peak extra memory of one step, MiB")
    L.append("")
    L.append(meta["memory_method"])
    L.append("")
    L.append("| shape | η | dtype | grad (floor) | fused | eager | compile |")
    L.append("|---|---|---|---|---|---|---|")
    for row in rows:
        pm = row["peak_extra_MiB"]
        f = lambda k: "n/a" if k not in pm else f"{pm[k]:.2f}"  # noqa: E731
        L.append(f"| {shape_s(row['shape'])} | {row['eta']} | {row['dtype']} | {row['grad_MiB']:.2f} | "
                 f"{f('fused')} | {f('eager')} | {f('compile')} |")
    L.append("")
    L.append("## Gradient strategy, backend primitive only, ms (median ± IQR/2)")
    L.append("")
    L.append("(A) shipped: one pass computes the loss and writes the gradient in forward "
             "(`sparse_mse_fwd(..., grad_scale)`); (B) a forward pass without gradient, then a second "
             "pass in backward regenerating the mask and writing the gradient (simulated as "
             "`sparse_mse_fwd(..., None)` + `sparse_mse_fwd(..., grad_scale)`; the second call also "
             "re-sums the loss, which a dedicated backward kernel would skip — a few flops per element). "
             "`fwd, no grad` is the first pass of B alone. `A % floor` = byte floor / A.")
    L.append("")
    has_pred = all("predicted_kernel_ms" in r for r in rows)
    L.append("| shape | η | dtype | A: one pass | B: two passes | B/A | fwd, no grad | A % floor |"
             + (" predicted A |" if has_pred else ""))
    L.append("|---|---|---|---|---|---|---|---|" + ("---|" if has_pred else ""))
    for row in rows:
        s = row["strategy"]
        L.append(f"| {shape_s(row['shape'])} | {row['eta']} | {row['dtype']} | **{fmt_t(s['A_one_pass'])}** | "
                 f"{fmt_t(s['B_two_pass'])} | {fmt_r(s['B/A'])} | {fmt_t(s['fwd_no_grad'])} | "
                 f"{100 * row['kernel_A_frac_of_byte_floor']:.0f}% |"
                 + (f" {row['predicted_kernel_ms']:.3f} |" if has_pred else ""))
    if has_pred:
        L.append("")
        L.append("`predicted A` = max(byte floor, numel × the kernel's cache-resident compute rate at the "
                 "nearest measured η) — the roofline prediction for the one-pass kernel on this CPU (fp32 rate; "
                 "bf16 rows use it too).")
    ref_rows = [r for r in rows if "reference" in r["time"]]
    if ref_rows:
        L.append("")
        L.append("## Bit-exact float64 reference (`diffkernels.reference.sparse_mse_loss`), for information")
        L.append("")
        L.append("| shape | η | dtype | reference fwd+bwd ms | reference/fused |")
        L.append("|---|---|---|---|---|")
        for row in ref_rows:
            t = row["time"]
            L.append(f"| {shape_s(row['shape'])} | {row['eta']} | {row['dtype']} | {fmt_t(t['reference'])} | "
                     f"{t['reference']['median_ms'] / t['fused']['median_ms']:.0f}× |")
    L.append("")
    return "\n".join(L)


# --- main ---------------------------------------------------------------------------------------


def parse_args(argv=None):
    ap = base_parser(__doc__, quick_help="fp32 only, eta in {0, 0.98}, short timing budgets")
    ap.add_argument("--shapes", default=None, help="e.g. '128x3x32x32,16x3x256x256'")
    ap.add_argument("--etas", default=None, help="e.g. '0,0.5,0.98'")
    ap.add_argument("--dtypes", default=None, help="e.g. 'fp32,bf16'")
    ap.add_argument("--budget", type=float, default=None, help="seconds of timing per row (fused+eager+compile)")
    ap.add_argument("--budget-strategy", type=float, default=None, help="seconds of timing per row (A/B strategy)")
    ap.add_argument("--budget-reference", type=float, default=None, help="seconds of timing for the reference")
    ap.add_argument("--min-reps", type=int, default=None)
    add_timing_options(ap)
    ap.add_argument("--no-rotate", action="store_true", help="do not rotate input copies to defeat caches")
    ap.add_argument("--no-reference", action="store_true", help="skip the float64 reference")
    args = ap.parse_args(argv)

    args.device = default_device(args.device)
    args.shapes = parse_shapes(args.shapes, SHAPES)
    args.etas = parse_floats(args.etas, [0.0, 0.98] if args.quick else ETAS)
    args.dtypes = args.dtypes.split(",") if args.dtypes else (["fp32"] if args.quick else list(DTYPES))
    cpu = args.device.type == "cpu"
    fill_defaults(args, **timing_defaults(args.quick, cpu),
                  budget=(0.8 if args.quick else 4.0) * (1 if cpu else 0.5),
                  budget_strategy=(0.4 if args.quick else 1.5) * (1 if cpu else 0.5),
                  budget_reference=(1.0 if args.quick else 3.0),
                  min_reps=5 if args.quick else 15)
    return args


def main(argv=None):
    args = parse_args(argv)
    device, meta = start(args)
    meta["fused_backend"] = backend = fused_backend(device)
    meta["memory_method"] = CUDA_MEMORY_METHOD if device.type == "cuda" else CPU_MEMORY_METHOD
    log_start(meta, f"fused backend {backend}")

    wait_if_busy(device, args.idle_wait)
    with LoadMonitor() as mon:
        ceil = ceilings(device, args.quick)
    ceil["foreign_cores"], ceil["steal_cores"] = mon.foreign_cores, mon.steal_cores
    log(f"copy {ceil['copy']['GBps']:.1f} GB/s; Philox mask {ceil['philox_mask']['ns_per_element']:.3f} ns/el; "
        f"torch.rand {ceil['torch_rand']['ns_per_element']:.3f} ns/el")

    rows = []
    t_start = time.perf_counter()
    for shape in args.shapes:
        for dtype_name in args.dtypes:
            for eta in args.etas:
                t0 = time.perf_counter()
                row = bench_row(shape, eta, dtype_name, device, args, ceil, backend, cache_bytes(meta, device))
                rows.append(row)
                log_row(f"{shape_s(shape)} eta={eta} {dtype_name}", row, t0,
                        f"B/A={row['strategy']['B/A']['median']:.2f}")
    meta["total_s"] = time.perf_counter() - t_start
    meta["waited_for_idle_total_s"] = sum(r.get("waited_for_idle_s", 0) for r in rows)

    md = to_markdown(meta, ceil, rows)
    print(md)
    write_results(args.out, result_stem("sparse_mse", meta["device_kind"], args), md,
                  {"meta": meta, "ceilings": ceil, "rows": rows}, note=f" in {meta['total_s']:.0f} s")


if __name__ == "__main__":
    main()
