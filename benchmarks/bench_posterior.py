#!/usr/bin/env python
"""Benchmark of the optimal denoiser (posterior_mean) and knn against eager chunked baselines and other libraries.

    python benchmarks/bench_posterior.py [--quick] [--out DIR] [--device cuda|cpu]

posterior_mean. Baselines (the same chunked streaming, written the obvious way):
  eager_fp32  fp32 `mm` logits (TF32 off) + running logsumexp + `mm` for the weighted sum
  eager_tf32  the same with TF32 matmuls (fast, inaccurate at small sigma)
  eager_fp64  the same in float64: equal accuracy to ours
  keops_fp32, keops_fp64  KeOps (pykeops) LazyTensor sumsoftmaxweight over direct differences, when installed
Ours: diffkernels.posterior_mean(..., return_stats=True) (variance too) with each engine:
  auto        screen and refine: one fp32-accurate GEMM (3xTF32 on CUDA), top rows recomputed exactly
  float64     float64 GEMMs, the top rows by direct differences
Each row reports time (CUDA events or perf_counter, median of repeats after warm-up), achieved TFLOP/s
counting 4*M*N*D flops (two GEMMs; for "auto" an effective rate, it skips the second GEMM where the
screen proves the posterior sits on a few rows), and the error of each method against a float64 oracle
computed by direct differences on a few queries, at sigma = 1 and at sigma = 2e-3 times the data's RMS
scale. A sweep over sigma (2e-3 .. 5 x RMS) times both engines and eager fp64, since the screen's win
depends on how spread the posterior is.

knn (k = 2, the memorisation metric): ours (both engines), torch.cdist + topk in fp32 (chunked) and faiss
IndexFlatL2 (CPU; the index is built once, the search timed), each with the fraction of queries whose
neighbour set differs from the exact one (float64 direct differences), on two data sets with
near-duplicate triples and queries closer to their source row than the triples are wide: centred data,
and the same data at pixel scale ([0, 255], mean ~128: a large common offset, the hard case for the
expanded form |x|^2 - 2 x.y + |y|^2 in float32).

Device ceilings (copy bandwidth; fp64, fp32, tf32, bf16 GEMM rates) are measured first.
Results: a Markdown table on stdout and <out>/posterior_<device>[_quick].{md,json}.
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout: diffkernels, benchmarks
from benchmarks.cli import base_parser, result_stem  # noqa: E402
from benchmarks.environment import copy_gemm_ceilings, optional_peer, start  # noqa: E402
from benchmarks.memory import free  # noqa: E402
from benchmarks.reporting import err_s, header, log, log_start, md_table, write_results  # noqa: E402
from benchmarks.timing import median_ms  # noqa: E402

from diffkernels.optimal_loss import knn, posterior_mean  # noqa: E402

SHAPES_GPU = [(1024, 50000, 3072), (256, 100000, 4096), (1797, 1797, 64)]
SHAPES_CPU = [(256, 4096, 64), (1797, 1797, 64), (64, 4096, 3072)]
SWEEP = (2e-3, 2e-2, 0.2, 1.0, 5.0)  # sigma / RMS
K = 2  # neighbours (the memorisation metric's d1 / d2)
KNN_KINDS = ("centred", "pixel")
KNN_ORACLE_QUERIES = 256  # the exact neighbour sets are computed for this many queries
CHUNK = 8192


# --- posterior_mean: baselines and the oracle ------------------------------------------------------------


def eager_chunked(queries, data, sigma, dtype, tf32: bool, chunk: int = CHUNK):
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


def keops_mean(queries, data, sigma, dtype):
    """KeOps: softmax over j of -|x_i - y_j|^2 / (2 sigma^2), weighted sum of y_j; direct differences."""
    from pykeops.torch import LazyTensor

    x_i = LazyTensor(queries.to(dtype)[:, None, :].contiguous())
    y_j = LazyTensor(data.to(dtype)[None, :, :].contiguous())
    d = ((x_i - y_j) ** 2).sum(-1)
    return (-d / (2.0 * sigma * sigma)).sumsoftmaxweight(y_j, axis=1)


def keops_status(device) -> tuple[bool, str]:
    def probe():
        x = torch.randn(4, 3, device=device)
        keops_mean(x, x, 1.0, torch.float32)

    return optional_peer("pykeops", probe)


def oracle_mean(queries, data, sigma, chunk=2048):
    """float64 posterior mean by direct differences (no expanded form), for a few queries."""
    x = queries.double()
    logits = []
    for s in range(0, data.shape[0], chunk):
        y = data[s:s + chunk].double()
        logits.append(-(x[:, None, :] - y[None]).square().sum(2) / (2.0 * sigma * sigma))
    w = torch.softmax(torch.cat(logits, 1), 1)
    return sum(w[:, s:s + chunk] @ data[s:s + chunk].double() for s in range(0, data.shape[0], chunk))


def rel_err(mean, ref, data_norm):
    scale = torch.maximum(ref.norm(dim=1), torch.full_like(ref[:, 0], 0.1 * data_norm))
    return ((mean.double() - ref).norm(dim=1) / scale).max().item()


def make_data(N, D, device, gen, group: int = 2):
    """Clustered data (64 Gaussian clusters) with near-duplicate groups (the hard case at small sigma), fp32.

    In each group of ``group`` consecutive rows the others are the first moved by ~1e-3 x the RMS scale in
    norm: closer than sigma at sigma = 2e-3 x RMS, so they share the posterior there and small logit
    errors move the mean.
    """
    centers = torch.randn(64, D, device=device, generator=gen)
    data = centers[torch.randint(0, 64, (N,), device=device, generator=gen)]
    data += 0.5 * torch.randn(N, D, device=device, generator=gen)
    first = data[0::group]
    for j in range(1, group):
        n = data[j::group].shape[0]
        data[j::group] = first[:n] + (1.1e-3 / D**0.5) * torch.randn(n, D, device=device, generator=gen)
    return data


# --- posterior_mean rows -------------------------------------------------------------------------------


def posterior_methods(data, device, keops_ok):
    methods = {
        "ours": lambda q, s: posterior_mean(q, data, s, return_stats=True, precision="auto")[0],
        "ours_f64": lambda q, s: posterior_mean(q, data, s, return_stats=True, precision="float64")[0],
        "eager_fp32": lambda q, s: eager_chunked(q, data, s, torch.float32, False),
        "eager_tf32": lambda q, s: eager_chunked(q, data, s, torch.float32, True),
        "eager_fp64": lambda q, s: eager_chunked(q, data, s, torch.float64, False),
    }
    if device.type == "cpu":
        methods.pop("eager_tf32")
    if keops_ok:
        methods["keops_fp32"] = lambda q, s: keops_mean(q, data, s, torch.float32)
        methods["keops_fp64"] = lambda q, s: keops_mean(q, data, s, torch.float64)
    return methods


def bench_shape(M, N, D, device, reps, ceil, gen, keops_ok) -> dict:
    row = dict(M=M, N=N, D=D)
    data = make_data(N, D, device, gen)
    rms = data.square().mean().sqrt().item()
    data_norm = data.norm(dim=1).mean().item()
    flops = 4.0 * M * N * D
    src = torch.randint(0, N, (M,), device=device, generator=gen)
    noise = torch.randn(M, D, device=device, generator=gen)
    methods = posterior_methods(data, device, keops_ok)
    # Accuracy on 8 queries at two noise levels.
    for label, srel in (("s1", 1.0), ("s2e-3", 2e-3)):
        sigma = srel * rms
        q = data[src[:8]] + sigma * noise[:8]
        ref = oracle_mean(q, data, sigma)
        for name, fn in methods.items():
            try:
                row[f"err_{label}_{name}"] = rel_err(fn(q, sigma), ref, data_norm)
            except Exception as exc:  # noqa: BLE001 -- record, never abort the table
                row[f"err_{label}_{name}"] = f"error: {err_s(exc)}"
    sigma = rms
    q = data[src] + sigma * noise
    for name, fn in methods.items():
        try:
            row[f"ms_{name}"] = median_ms(lambda: fn(q, sigma), device, reps)
            row[f"tflops_{name}"] = flops / (row[f"ms_{name}"] / 1e3) / 1e12
        except Exception as exc:  # noqa: BLE001
            row[f"ms_{name}"] = f"error: {err_s(exc)}"
        free(device)
    # The sigma sweep: both engines and eager fp64 (equal accuracy), same queries' noise.
    row["sweep"] = {}
    for srel in SWEEP:
        qs = data[src] + srel * rms * noise
        for name in ("ours", "ours_f64", "eager_fp64"):
            try:
                row["sweep"][f"{srel:g}_{name}"] = median_ms(lambda: methods[name](qs, srel * rms), device,
                                                             max(2, reps // 2))
            except Exception as exc:  # noqa: BLE001
                row["sweep"][f"{srel:g}_{name}"] = f"error: {err_s(exc)}"
    if isinstance(row.get("ms_ours"), float):
        for key in ("fp64_TFLOPs", "fp32_TFLOPs", "tf32_TFLOPs"):
            if key in ceil:
                row[f"ours_frac_{key.split('_')[0]}"] = row["tflops_ours"] / ceil[key]
        if "tf32_TFLOPs" in ceil:  # the fp32-accurate tensor-core ceiling: three TF32 products per product
            row["ours_frac_3xtf32"] = row["tflops_ours"] / (ceil["tf32_TFLOPs"] / 3)
    return row


# --- knn rows ------------------------------------------------------------------------------------------------


def knn_data(kind: str, N: int, D: int, device, gen):
    """make_data with near-duplicate triples: centred (its mean removed), or at pixel scale in [0, 255]."""
    data = make_data(N, D, device, gen, group=3)
    data -= data.mean(0)
    if kind == "pixel":
        data = (128.0 + 40.0 * data).clamp_(0.0, 255.0)
    return data


def exact_distances(q, data, chunk: int = CHUNK):
    """(M, N) float64 distances by direct differences (cdist without the matrix-product form)."""
    x = q.double()
    return torch.cat([torch.cdist(x, data[s:s + chunk].double(), compute_mode="donot_use_mm_for_euclid_dist")
                      for s in range(0, data.shape[0], chunk)], 1)


def wrong_sets(exact, idx) -> float:
    """Fraction of queries whose k returned rows are not k nearest rows: their exact distances (sorted) must
    equal the k smallest (rows at equal distance are interchangeable)."""
    got = exact.gather(1, idx.to(exact.device, torch.int64)).sort(1).values
    best = exact.topk(idx.shape[1], 1, largest=False).values.sort(1).values
    return float((got != best).any(1).double().mean())


def cdist_topk(q, data, k: int, chunk: int = CHUNK):
    """torch.cdist + topk over data chunks, merged: the fp32 baseline."""
    best_d = best_i = None
    for s in range(0, data.shape[0], chunk):
        d = torch.cdist(q, data[s:s + chunk]).square()
        dd, ii = torch.topk(d, min(k, d.shape[1]), largest=False)
        if best_d is None:
            best_d, best_i = dd, ii + s
        else:
            best_d, pos = torch.topk(torch.cat([best_d, dd], 1), k, largest=False)
            best_i = torch.cat([best_i, ii + s], 1).gather(1, pos)
    return best_d, best_i


def faiss_status(device) -> tuple[bool, str]:
    if device.type != "cpu":
        return False, "faiss-cpu runs on the CPU: skipped on CUDA"

    def probe():
        import faiss

        faiss.IndexFlatL2(4).add(torch.randn(8, 4).numpy())

    return optional_peer("faiss-cpu", probe)


def faiss_search_fn(q, data, k: int):
    """IndexFlatL2 built once over data (the add is not timed); returns the search as a function."""
    import faiss

    faiss.omp_set_num_threads(torch.get_num_threads())
    index = faiss.IndexFlatL2(data.shape[1])
    index.add(data.contiguous().numpy())
    qn = q.contiguous().numpy()

    def search():
        d, i = index.search(qn, k)
        return torch.from_numpy(d), torch.from_numpy(i)
    return search


def bench_knn(kind, M, N, D, device, reps, gen, faiss_ok) -> dict:
    row = dict(kind=kind, M=M, N=N, D=D, k=K)
    data = knn_data(kind, N, D, device, gen)
    rms = (data - data.mean(0)).square().mean().sqrt().item()
    src = torch.randint(0, N, (M,), device=device, generator=gen)
    # Closer to its source row than the triples are wide (~1e-3 x RMS in norm): the k = 2 nearest are
    # two of a triple, and which two depends on distance differences far below fp32 rounding of |x|^2.
    q = data[src] + (3e-4 * rms / D**0.5) * torch.randn(M, D, device=device, generator=gen)
    fns = {"ours": lambda: knn(q, data, K, precision="auto"),
           "ours_f64": lambda: knn(q, data, K, precision="float64"),
           "cdist_fp32": lambda: cdist_topk(q, data, K)}
    if faiss_ok:
        fns["faiss"] = faiss_search_fn(q, data, K)
    n_check = min(M, KNN_ORACLE_QUERIES)
    exact = exact_distances(q[:n_check], data)
    for name, fn in fns.items():
        try:
            row[f"wrong_{name}"] = wrong_sets(exact, fn()[1][:n_check])
            row[f"ms_{name}"] = median_ms(fn, device, reps)
        except Exception as exc:  # noqa: BLE001 -- record, never abort the table
            row[f"ms_{name}"] = f"error: {err_s(exc)}"
        free(device)
    row["checked_queries"] = n_check
    if isinstance(row.get("ms_ours"), float):
        row["tflops_ours"] = 2.0 * M * N * D / (row["ms_ours"] / 1e3) / 1e12  # one GEMM's worth: the screen
    return row


# --- the CIFAR-10-sized curve, GPU only ------------------------------------------------------------------------


def curve_estimate(device, gen) -> dict:
    """One noise level of the CIFAR-10-sized curve (N = M = 50000, D = 3072), timed; x64 levels extrapolated."""
    N = M = 50000
    D = 3072
    data = make_data(N, D, device, gen)
    q = data + 0.5 * torch.randn(M, D, device=device, generator=gen)
    out = dict(levels=64)
    for precision in ("float64", "auto"):
        t = median_ms(lambda: posterior_mean(q, data, 0.5, return_stats=True, precision=precision), device, 1) / 1e3
        out[precision] = dict(one_level_s=t, curve_min=64 * t / 60.0, tflops=4.0 * M * N * D / t / 1e12)
    return out


# --- report ----------------------------------------------------------------------------------------------------


def fmt(v, spec=".3g"):
    return format(v, spec) if isinstance(v, float) else str(v)


def to_markdown(meta, ceil, rows, knn_rows, curve) -> str:
    L = header(meta, "posterior_mean / knn benchmark")
    rates = ", ".join(f"{k} {v:.3g}" for k, v in ceil.items() if k.endswith(("GBps", "TFLOPs")))
    L += ["", f"Ceilings measured first: {rates} (GEMM {ceil['gemm_size']}³)", "",
          "Time of one call at sigma = RMS (ms, median); TFLOP/s counts 4·M·N·D; `err` = max relative L2 error "
          "of the posterior mean against a float64 direct-difference oracle (8 queries), relative to "
          "max(‖D‖, 0.1·mean data norm), at sigma = 1 and 2e-3 × RMS. Data: 64 Gaussian clusters with "
          "near-duplicate pairs (distance ~1e-3 × RMS).", "",
          "`ours` is the screen-and-refine engine (precision=\"auto\"), `ours f64` the float64 engine.", "",
          "| M | N | D | ours ms | TFLOP/s | ours f64 ms | eager fp32 ms | eager tf32 ms | eager fp64 ms | "
          "ours/fp32 speed | ours/fp64 speed | err ours (s=1, 2e-3) | err ours f64 | err fp32 | err tf32 | err fp64 |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def speed(r, a):
        ok = isinstance(r.get(f"ms_{a}"), float) and isinstance(r.get("ms_ours"), float)
        return fmt(r[f"ms_{a}"] / r["ms_ours"], ".2f") + "×" if ok else "–"

    def err(r, name):
        return f"{fmt(r.get(f'err_s1_{name}', '–'), '.1e')}, {fmt(r.get(f'err_s2e-3_{name}', '–'), '.1e')}"

    for r in rows:
        if "error" in r:
            L.append(f"| {r['M']} | {r['N']} | {r['D']} | error: {r['error'].splitlines()[-1]} |")
            continue
        L.append(f"| {r['M']} | {r['N']} | {r['D']} | **{fmt(r.get('ms_ours'))}** | {fmt(r.get('tflops_ours'))} | "
                 f"{fmt(r.get('ms_ours_f64'))} | {fmt(r.get('ms_eager_fp32'))} | "
                 f"{fmt(r.get('ms_eager_tf32', '–'))} | {fmt(r.get('ms_eager_fp64'))} | {speed(r, 'eager_fp32')} | "
                 f"{speed(r, 'eager_fp64')} | {err(r, 'ours')} | {err(r, 'ours_f64')} | {err(r, 'eager_fp32')} | "
                 f"{err(r, 'eager_tf32')} | {err(r, 'eager_fp64')} |")
    L += ["", f"KeOps: {meta['keops']}."]
    if any("ms_keops_fp32" in r for r in rows):
        L += ["", "KeOps (pykeops LazyTensor, `sumsoftmaxweight` over direct differences) at the same shapes, sigma "
              "and queries (ms, median; err as above):", ""]
        L += md_table(["M", "N", "D", "ours ms", "keops fp32 ms", "keops fp64 ms", "err ours (s=1, 2e-3)",
                       "err keops fp32", "err keops fp64"],
                      [[r["M"], r["N"], r["D"], f"**{fmt(r.get('ms_ours'))}**", fmt(r.get("ms_keops_fp32", "–")),
                        fmt(r.get("ms_keops_fp64", "–")), err(r, "ours"), err(r, "keops_fp32"), err(r, "keops_fp64")]
                       for r in rows if "error" not in r])
    L += ["", "Sigma sweep (ms, median; sigma in units of the data's RMS; speed = eager fp64 / ours):", "",
          "| M | N | D | " + " | ".join(f"s={v:g}: ours / f64 / eager fp64 (speed)" for v in SWEEP) + " |",
          "|---|---|---|" + "---|" * len(SWEEP)]
    for r in rows:
        if "sweep" not in r:
            continue
        cells = []
        for v in SWEEP:
            a, b, c = (r["sweep"].get(f"{v:g}_{n}") for n in ("ours", "ours_f64", "eager_fp64"))
            sp = f" ({c / a:.2f}×)" if isinstance(a, float) and isinstance(c, float) else ""
            cells.append(f"{fmt(a)} / {fmt(b)} / {fmt(c)}{sp}")
        L.append(f"| {r['M']} | {r['N']} | {r['D']} | " + " | ".join(cells) + " |")
    L.append("")
    for r in rows:
        fr = {k: v for k, v in r.items() if k.startswith("ours_frac")}
        if fr:
            L.append(f"- ({r['M']}, {r['N']}, {r['D']}): ours reaches "
                     + ", ".join(f"{v:.0%} of the measured {k.split('_')[-1]} GEMM rate" for k, v in fr.items()))
    if knn_rows:
        names = [n for n in ("ours", "ours_f64", "cdist_fp32", "faiss") if any(f"ms_{n}" in r for r in knn_rows)]
        L += ["", f"## knn, k = {K}", "",
              "Time of one call (ms, median) and, in brackets, the fraction of queries whose neighbour set is wrong: "
              "the exact float64 distances (direct differences) of the returned rows differ from the k smallest "
              f"(checked on up to {KNN_ORACLE_QUERIES} queries; rows at equal distance count as correct). Data: "
              "the clusters above with near-duplicate triples (~1e-3 × RMS apart), `centred` (mean removed) or "
              "`pixel` (mapped to [0, 255], mean ~128); queries = a data row + noise of ~3e-4 × RMS in norm, so "
              "the two nearest are two of a triple. `cdist fp32` = torch.cdist + topk over chunks of "
              f"{CHUNK} rows; `faiss` = IndexFlatL2 search (index built once, not timed).", ""]
        L += md_table(["data", "M", "N", "D"] + [f"{n.replace('_', ' ')} ms (wrong)" for n in names]
                      + ["ours TFLOP/s (2·M·N·D)"],
                      [[r["kind"], r["M"], r["N"], r["D"]]
                       + [f"{fmt(r.get(f'ms_{n}', '–'))} ({fmt(r.get(f'wrong_{n}', '–'), '.1%')})" for n in names]
                       + [fmt(r.get("tflops_ours", "–"))] for r in knn_rows])
        L += ["", f"faiss: {meta['faiss']}."]
        L += [f"- knn {r['kind']} ({r['M']}, {r['N']}, {r['D']}): error: {r['error'].splitlines()[-1]}"
              for r in knn_rows if "error" in r]
    if curve:
        text = curve.get("error") or "; ".join(
            f"{p}: one noise level {c['one_level_s']:.2f} s ({c['tflops']:.1f} TFLOP/s), so 64 levels ≈ "
            f"{c['curve_min']:.1f} min (extrapolated from one measured level)"
            for p, c in curve.items() if isinstance(c, dict))
        L += ["", "CIFAR-10-sized curve (N = M = 50000, D = 3072, full estimator, posterior_mean with stats, "
              f"sigma = 0.5): {text}"]
    return "\n".join(L) + "\n"


# --- main ------------------------------------------------------------------------------------------------------


def main(argv=None) -> None:
    ap = base_parser(__doc__, quick_help="smaller shapes and fewer repeats")
    ap.add_argument("--skip-curve", action="store_true")
    args = ap.parse_args(argv)
    device, meta = start(args)
    gen = torch.Generator(device=device).manual_seed(0)
    keops_ok, meta["keops"] = keops_status(device)
    faiss_ok, meta["faiss"] = faiss_status(device)
    log_start(meta, f"KeOps: {meta['keops']}; faiss: {meta['faiss']}")
    ceil = copy_gemm_ceilings(device, args.quick)
    log(f"ceilings {ceil}")
    shapes = SHAPES_GPU if device.type == "cuda" else SHAPES_CPU
    if args.quick:
        shapes = [(min(M, 256), min(N, 4096), D) for M, N, D in shapes]
    reps = 3 if args.quick else 5
    rows, knn_rows = [], []
    for M, N, D in shapes:
        try:
            rows.append(bench_shape(M, N, D, device, reps, ceil, gen, keops_ok))
        except Exception:  # noqa: BLE001 -- record the failure in the table, never abort it
            rows.append(dict(M=M, N=N, D=D, error=traceback.format_exc(limit=3)))
        log(f"{rows[-1]}")
        for kind in KNN_KINDS:
            try:
                knn_rows.append(bench_knn(kind, M, N, D, device, reps, gen, faiss_ok))
            except Exception:  # noqa: BLE001
                knn_rows.append(dict(kind=kind, M=M, N=N, D=D, error=traceback.format_exc(limit=3)))
            log(f"knn {knn_rows[-1]}")
    curve = None
    if device.type == "cuda" and not args.skip_curve and not args.quick:
        try:
            curve = curve_estimate(device, gen)
        except Exception as exc:  # noqa: BLE001
            curve = dict(error=err_s(exc))
    md = to_markdown(meta, ceil, rows, knn_rows, curve)
    print(md)
    write_results(args.out, result_stem("posterior", meta["device_kind"], args), md,
                  dict(meta=meta, ceilings=ceil, rows=rows, knn_rows=knn_rows, curve=curve))


if __name__ == "__main__":
    main()
