"""Benchmark of the optimal denoiser (posterior_mean) and knn against eager chunked baselines.

    python benchmarks/bench_posterior.py [--quick] [--out DIR] [--device cuda|cpu]

Baselines (the same chunked streaming, written the obvious way):
  eager_fp32  fp32 `mm` logits (TF32 off) + running logsumexp + `mm` for the weighted sum
  eager_tf32  the same with TF32 matmuls (fast, inaccurate at small sigma)
  eager_fp64  the same in float64: equal accuracy to ours
Ours: diffkernels.posterior_mean(..., return_stats=True) (variance too) with each engine:
  auto        screen and refine: one fp32-accurate GEMM (3xTF32 on CUDA), top rows recomputed exactly
  float64     float64 GEMMs, the top rows by direct differences

Each row reports time (CUDA events or perf_counter, median of repeats after warm-up), achieved TFLOP/s
counting 4*M*N*D flops (two GEMMs; for "auto" an effective rate, it skips the second GEMM where the
screen proves the posterior sits on a few rows), and the error of each method against a float64 oracle
computed by direct differences on a few queries, at sigma = 1 and at sigma = 2e-3 times the data's RMS
scale. A sweep over sigma (2e-3 .. 5 x RMS) times both engines and eager fp64, since the screen's win
depends on how spread the posterior is. knn (k = 2) is timed with both engines against cdist + topk.
Device ceilings (copy bandwidth; fp64, fp32, tf32, bf16 GEMM rates) are measured first.
Results: a Markdown table on stdout and <out>/posterior_<device>.{md,json}.
"""

from __future__ import annotations

import platform
import statistics
import sys
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout: diffkernels, benchmarks._common
from benchmarks._common import (  # noqa: E402  -- shared machine / timing / ceiling / output helpers
    base_parser,
    command_line,
    copy_times,
    default_device,
    device_kind,
    gemm_ceilings,
    git_commit,
    now_iso,
    timeit,
    write_results,
)

import diffkernels  # noqa: E402
from diffkernels.optimal_loss import knn, posterior_mean  # noqa: E402

SHAPES_GPU = [(1024, 50000, 3072), (256, 100000, 4096), (1797, 1797, 64)]
SHAPES_CPU = [(256, 4096, 64), (1797, 1797, 64), (64, 4096, 3072)]
SWEEP = (2e-3, 2e-2, 0.2, 1.0, 5.0)  # sigma / RMS


def ceilings(device, quick: bool) -> dict:
    """Copy bandwidth (GB/s, median of 10 copies of 256 MiB on GPU, 16 MiB on CPU) and the
    fp64 / fp32 / tf32 / bf16 GEMM rates (TFLOP/s; 8192^3 on GPU, 1024^3 on CPU fp64 / fp32 only)."""
    res = {}
    n = (1 << 28) if device.type == "cuda" else (1 << 24)
    t = statistics.median(copy_times(device, n, 10, warmup=1))
    res["copy_GBps"] = 2 * n / t / 1e9
    size = 8192 if device.type == "cuda" else 1024
    res.update(gemm_ceilings(device, size, 3 if quick else 10))
    return res


def eager_chunked(queries, data, sigma, dtype, tf32: bool, chunk: int = 8192):
    """The obvious streaming baseline: expanded-form logits by mm, running logsumexp, mm for the sum."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        x = queries.to(dtype)
        inv = 1.0 / (2.0 * sigma * sigma)
        m = torch.full((x.shape[0],), float("-inf"), device=x.device, dtype=dtype)
        l = torch.zeros(x.shape[0], device=x.device, dtype=dtype)
        acc = torch.zeros_like(x)
        for s in range(0, data.shape[0], chunk):
            y = data[s:s + chunk].to(dtype)
            logits = (2.0 * (x @ y.T) - y.square().sum(1)[None, :]) * inv  # ||x||^2 cancels in the softmax
            m_new = torch.maximum(m, logits.max(1).values)
            scale = (m - m_new).exp()
            p = (logits - m_new[:, None]).exp()
            l = l * scale + p.sum(1)
            acc = acc * scale[:, None] + p @ y
            m = m_new
        return acc / l[:, None]
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def oracle_mean(queries, data, sigma, chunk=2048):
    """float64 posterior mean by direct differences (no expanded form), for a few queries."""
    x = queries.double()
    logits = []
    for s in range(0, data.shape[0], chunk):
        y = data[s:s + chunk].double()
        logits.append(-(x[:, None, :] - y[None]).square().sum(2) / (2.0 * sigma * sigma))
    logits = torch.cat(logits, 1)
    w = torch.softmax(logits, 1)
    return sum(w[:, s:s + chunk] @ data[s:s + chunk].double() for s in range(0, data.shape[0], chunk))


def rel_err(mean, ref, data_norm):
    scale = torch.maximum(ref.norm(dim=1), torch.full_like(ref[:, 0], 0.1 * data_norm))
    return ((mean.double() - ref).norm(dim=1) / scale).max().item()


def make_data(N, D, device, gen):
    """Clustered data with near-duplicate pairs (the hard case at small sigma), fp32.

    Each odd row is its even neighbour moved by ~1e-3 x the RMS scale in norm: closer than sigma at
    sigma = 2e-3 x RMS, so both share the posterior there and small logit errors move the mean.
    """
    centers = torch.randn(64, D, device=device, generator=gen)
    data = centers[torch.randint(0, 64, (N,), device=device, generator=gen)] + 0.5 * torch.randn(N, D, device=device, generator=gen)
    data[1::2] = data[0::2][: N // 2] + (1.1e-3 / D**0.5) * torch.randn(N // 2, D, device=device, generator=gen)
    return data


def bench_shape(M, N, D, device, reps, ceil, gen) -> dict:
    row = dict(M=M, N=N, D=D)
    data = make_data(N, D, device, gen)
    rms = data.square().mean().sqrt().item()
    data_norm = data.norm(dim=1).mean().item()
    flops = 4.0 * M * N * D
    src = torch.randint(0, N, (M,), device=device, generator=gen)
    noise = torch.randn(M, D, device=device, generator=gen)
    methods = {
        "ours": lambda q, s: posterior_mean(q, data, s, return_stats=True, precision="auto")[0],
        "ours_f64": lambda q, s: posterior_mean(q, data, s, return_stats=True, precision="float64")[0],
        "eager_fp32": lambda q, s: eager_chunked(q, data, s, torch.float32, False),
        "eager_tf32": lambda q, s: eager_chunked(q, data, s, torch.float32, True),
        "eager_fp64": lambda q, s: eager_chunked(q, data, s, torch.float64, False),
    }
    if device.type == "cpu":
        methods.pop("eager_tf32")
    # Accuracy on 8 queries at two noise levels.
    for label, srel in (("s1", 1.0), ("s2e-3", 2e-3)):
        sigma = srel * rms
        q = data[src[:8]] + sigma * noise[:8]
        ref = oracle_mean(q, data, sigma)
        for name, fn in methods.items():
            try:
                row[f"err_{label}_{name}"] = rel_err(fn(q, sigma), ref, data_norm)
            except Exception as exc:  # record, never abort the table
                row[f"err_{label}_{name}"] = f"error: {type(exc).__name__}: {exc}"
    sigma = rms
    q = data[src] + sigma * noise
    for name, fn in methods.items():
        try:
            ts = timeit(lambda: fn(q, sigma), device, reps)
            t = statistics.median(ts)
            row[f"ms_{name}"] = t * 1e3
            row[f"tflops_{name}"] = flops / t / 1e12
        except Exception as exc:
            row[f"ms_{name}"] = f"error: {type(exc).__name__}: {exc}"
        if device.type == "cuda":
            torch.cuda.empty_cache()
    # The sigma sweep: both engines and eager fp64 (equal accuracy), same queries' noise.
    row["sweep"] = {}
    for srel in SWEEP:
        qs = data[src] + srel * rms * noise
        for name in ("ours", "ours_f64", "eager_fp64"):
            try:
                t = statistics.median(timeit(lambda: methods[name](qs, srel * rms), device, max(2, reps // 2)))
                row["sweep"][f"{srel:g}_{name}"] = t * 1e3
            except Exception as exc:
                row["sweep"][f"{srel:g}_{name}"] = f"error: {type(exc).__name__}: {exc}"
    # knn (k = 2, the memorisation metric) against torch.cdist + topk, chunked, fp32.
    try:
        def eager_knn():
            out = []
            for s in range(0, N, 8192):
                d = torch.cdist(q, data[s:s + 8192]).square()
                out.append(torch.topk(d, min(2, d.shape[1]), largest=False))
            return out
        row["ms_knn_ours"] = statistics.median(timeit(lambda: knn(q, data, 2, precision="auto"), device, reps)) * 1e3
        row["ms_knn_ours_f64"] = statistics.median(timeit(lambda: knn(q, data, 2, precision="float64"), device, reps)) * 1e3
        row["ms_knn_eager_fp32"] = statistics.median(timeit(eager_knn, device, reps)) * 1e3
        row["knn_tflops_ours"] = 2.0 * M * N * D / (row["ms_knn_ours"] / 1e3) / 1e12
    except Exception as exc:
        row["ms_knn_ours"] = f"error: {type(exc).__name__}: {exc}"
    if isinstance(row.get("ms_ours"), float):
        for key in ("fp64_TFLOPs", "fp32_TFLOPs", "tf32_TFLOPs"):
            if key in ceil:
                row[f"ours_frac_{key.split('_')[0]}"] = row["tflops_ours"] / ceil[key]
        if "tf32_TFLOPs" in ceil:  # the fp32-accurate tensor-core ceiling: three TF32 products per product
            row["ours_frac_3xtf32"] = row["tflops_ours"] / (ceil["tf32_TFLOPs"] / 3)
            if isinstance(row.get("knn_tflops_ours"), float):
                row["knn_frac_3xtf32"] = row["knn_tflops_ours"] / (ceil["tf32_TFLOPs"] / 3)
    return row


def curve_estimate(device, ceil, gen) -> dict:
    """One noise level of the CIFAR-10-sized curve (N = M = 50000, D = 3072), timed; x64 levels extrapolated."""
    N = M = 50000
    D = 3072
    data = make_data(N, D, device, gen)
    q = data + 0.5 * torch.randn(M, D, device=device, generator=gen)
    out = dict(levels=64)
    for precision in ("float64", "auto"):
        t = statistics.median(timeit(lambda: posterior_mean(q, data, 0.5, return_stats=True, precision=precision),
                                     device, 1, warmup=1))
        out[precision] = dict(one_level_s=t, curve_min=64 * t / 60.0, tflops=4.0 * M * N * D / t / 1e12)
    return out


def fmt(v, spec=".3g"):
    return format(v, spec) if isinstance(v, float) else str(v)


def main() -> None:
    ap = base_parser(__doc__, quick_help="smaller shapes and fewer repeats", device_help="cuda or cpu (default: cuda when available)",
                     first_paragraph=False)
    ap.add_argument("--skip-curve", action="store_true")
    args = ap.parse_args()
    device = default_device(args.device)
    gen = torch.Generator(device=device).manual_seed(0)
    kind = device_kind(device)
    meta = dict(date=now_iso(), commit=git_commit(), command=command_line(),
                torch=torch.__version__, python=platform.python_version(), diffkernels=diffkernels.__version__,
                device=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
                threads=torch.get_num_threads())
    print(f"[bench_posterior] {meta['device']}, torch {meta['torch']}", file=sys.stderr)
    ceil = ceilings(device, args.quick)
    print(f"[bench_posterior] ceilings {ceil}", file=sys.stderr)
    shapes = SHAPES_GPU if device.type == "cuda" else SHAPES_CPU
    if args.quick:
        shapes = [(min(M, 256), min(N, 4096), D) for M, N, D in shapes]
    rows = []
    for M, N, D in shapes:
        try:
            rows.append(bench_shape(M, N, D, device, 3 if args.quick else 5, ceil, gen))
        except Exception:  # record the failure in the table, never abort it
            rows.append(dict(M=M, N=N, D=D, error=traceback.format_exc(limit=3)))
        print(f"[bench_posterior] {rows[-1]}", file=sys.stderr)
    curve = None
    if device.type == "cuda" and not args.skip_curve and not args.quick:
        try:
            curve = curve_estimate(device, ceil, gen)
        except Exception as exc:
            curve = dict(error=f"{type(exc).__name__}: {exc}")
    L = [f"# posterior_mean / knn benchmark — {meta['device']}", "",
         f"- date {meta['date']}; commit `{meta['commit']}`; command `{meta['command']}`",
         f"- torch {meta['torch']}, python {meta['python']}, diffkernels {meta['diffkernels']}", "",
         "Ceilings measured first: " + ", ".join(f"{k} {v:.1f}" for k, v in ceil.items()), "",
         "Time of one call at sigma = RMS (ms, median); TFLOP/s counts 4·M·N·D; `err` = max relative L2 error "
         "of the posterior mean against a float64 direct-difference oracle (8 queries), relative to "
         "max(‖D‖, 0.1·mean data norm), at sigma = 1 and 2e-3 × RMS. Data: 64 Gaussian clusters with "
         "near-duplicate pairs (distance ~1e-3 × RMS).", "",
         "`ours` is the screen-and-refine engine (precision=\"auto\"), `ours f64` the float64 engine.", "",
         "| M | N | D | ours ms | TFLOP/s | ours f64 ms | eager fp32 ms | eager tf32 ms | eager fp64 ms | ours/fp32 speed | ours/fp64 speed | "
         "err ours (s=1, 2e-3) | err ours f64 | err fp32 | err tf32 | err fp64 | knn ours ms | knn ours f64 ms | knn cdist fp32 ms |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            L.append(f"| {r['M']} | {r['N']} | {r['D']} | error: {r['error'].splitlines()[-1]} |")
            continue
        sp = lambda a: fmt(r[f"ms_{a}"] / r["ms_ours"], ".2f") + "×" if isinstance(r.get(f"ms_{a}"), float) and isinstance(r.get("ms_ours"), float) else "–"
        e = lambda name: f"{fmt(r.get(f'err_s1_{name}', '–'), '.1e')}, {fmt(r.get(f'err_s2e-3_{name}', '–'), '.1e')}"
        L.append(f"| {r['M']} | {r['N']} | {r['D']} | **{fmt(r.get('ms_ours'))}** | {fmt(r.get('tflops_ours'))} | "
                 f"{fmt(r.get('ms_ours_f64'))} | {fmt(r.get('ms_eager_fp32'))} | {fmt(r.get('ms_eager_tf32', '–'))} | "
                 f"{fmt(r.get('ms_eager_fp64'))} | {sp('eager_fp32')} | {sp('eager_fp64')} | {e('ours')} | {e('ours_f64')} | "
                 f"{e('eager_fp32')} | {e('eager_tf32')} | {e('eager_fp64')} | {fmt(r.get('ms_knn_ours'))} | "
                 f"{fmt(r.get('ms_knn_ours_f64'))} | {fmt(r.get('ms_knn_eager_fp32'))} |")
    L += ["", "Sigma sweep (ms, median; sigma in units of the data's RMS; speed = eager fp64 / ours):", "",
          "| M | N | D | " + " | ".join(f"s={v:g}: ours / f64 / eager fp64 (speed)" for v in SWEEP) + " |",
          "|---|---|---|" + "---|" * len(SWEEP)]
    for r in rows:
        if "sweep" not in r:
            continue
        cells = []
        for v in SWEEP:
            a, b, c = (r["sweep"].get(f"{v:g}_{n}") for n in ("ours", "ours_f64", "eager_fp64"))
            speed = f" ({c / a:.2f}×)" if isinstance(a, float) and isinstance(c, float) else ""
            cells.append(f"{fmt(a)} / {fmt(b)} / {fmt(c)}{speed}")
        L.append(f"| {r['M']} | {r['N']} | {r['D']} | " + " | ".join(cells) + " |")
    L.append("")
    for r in rows:
        fr = {k: v for k, v in r.items() if k.startswith("ours_frac")}
        if fr:
            L.append(f"- ({r['M']}, {r['N']}, {r['D']}): ours reaches " + ", ".join(f"{v:.0%} of the measured {k.split('_')[-1]} GEMM rate" for k, v in fr.items())
                     + (f"; knn {r['knn_frac_3xtf32']:.0%} of the 3xTF32 rate (2·M·N·D flops)" if "knn_frac_3xtf32" in r else ""))
    if curve:
        L += ["", "CIFAR-10-sized curve (N = M = 50000, D = 3072, full estimator, posterior_mean with stats, sigma = 0.5): "
              + ("; ".join(f"{p}: one noise level {c['one_level_s']:.2f} s ({c['tflops']:.1f} TFLOP/s), so 64 levels ≈ "
                           f"{c['curve_min']:.1f} min (extrapolated from one measured level)"
                           for p, c in curve.items() if isinstance(c, dict)) if "error" not in curve else curve["error"])]
    md = "\n".join(L) + "\n"
    print(md)
    stem = f"posterior_{kind}" + ("_quick" if args.quick else "")
    write_results(args.out, stem, md, dict(meta=meta, ceilings=ceil, rows=rows, curve=curve), log_prefix="[bench_posterior]")

if __name__ == "__main__":
    main()
