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

import argparse
import datetime
import gc
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

import diffkernels
from diffkernels import _backend
from diffkernels import reference as _reference
from diffkernels.ops import _kernels
from diffkernels.rng import seed_to_int64

REPO = Path(__file__).resolve().parent.parent
SHAPES = [(128, 3, 32, 32), (64, 4, 64, 64), (16, 3, 256, 256)]
ETAS = [0.0, 0.5, 0.98]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MiB = 2**20
BASE_SEED = 0x5EED_0000_1234


# --- the baseline: what a user writes with torch's own RNG --------------------------------------


def baseline_loss(pred: torch.Tensor, target: torch.Tensor, eta: float) -> torch.Tensor:
    """Masked MSE with the "expected" normalisation, as a user would write it without diffkernels."""
    keep = torch.rand(pred.shape, device=pred.device) >= eta
    d = pred.float() - target.float()
    n = pred[0].numel()
    per = torch.where(keep, d * d, 0).flatten(1).sum(1) / (n * (1 - eta))
    return per.mean()


def fused_backend(device: torch.device) -> str:
    """The backend the fused op runs on here by default; never the interpreter or the reference."""
    name = _backend.default(device)
    if device.type == "cpu" and name != "cpp":
        raise RuntimeError(f"the C++ kernels are not available ({diffkernels.backends()['cpp']}); "
                           "benchmarking the reference backend would be meaningless")
    if device.type == "cuda" and name not in ("cuda", "triton"):
        raise RuntimeError(f"no compiled CUDA backend (default is {name!r})")
    return name


# --- machine description ------------------------------------------------------------------------


def _cpuinfo() -> dict:
    info = {"model": platform.processor() or platform.machine(), "flags": []}
    try:
        text = Path("/proc/cpuinfo").read_text()
        for line in text.splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and info["model"] in ("", platform.machine(), platform.processor()):
                info["model"] = value.strip()
            elif key == "flags" and not info["flags"]:
                flags = set(value.split())
                info["flags"] = sorted(f for f in ("avx2", "fma", "avx512f", "avx512bw", "avx512_bf16") if f in flags)
    except OSError:
        pass
    return info


def _llc_bytes() -> int | None:
    best = None
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    for idx in sorted(base.glob("index*")) if base.exists() else []:
        try:
            if (idx / "type").read_text().strip() == "Instruction":
                continue
            size = (idx / "size").read_text().strip()
            mult = {"K": 2**10, "M": 2**20}.get(size[-1], 1)
            val = int(size.rstrip("KM")) * mult
            best = max(best or 0, val)
        except (OSError, ValueError):
            pass
    return best


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info(device: torch.device) -> dict:
    import triton  # noqa: F401  (version only)

    # A copy of the working tree (a lent GPU machine) may carry a stale .git: let the caller say.
    commit = os.environ.get("DIFFKERNELS_COMMIT") or _git("rev-parse", "HEAD")
    dirty = "" if os.environ.get("DIFFKERNELS_COMMIT") else _git("status", "--porcelain", "--untracked-files=no")
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python " + shlex.join([os.path.relpath(sys.argv[0], os.getcwd())] + sys.argv[1:]),
        "cwd": os.getcwd(),
        "git_commit": commit,
        "git_dirty": bool(dirty),
        "git_dirty_files": dirty.splitlines() if dirty else [],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": getattr(sys.modules.get("triton"), "__version__", None),
        "diffkernels": diffkernels.__version__,
        "platform": platform.platform(),
        "cpu": _cpuinfo(),
        "cpu_count": os.cpu_count(),
        "torch_num_threads": torch.get_num_threads(),
        "llc_bytes": _llc_bytes(),
        "fused_backend": fused_backend(device),
        "backends": diffkernels.backends(),
        "env": {k: os.environ[k] for k in ("TRITON_INTERPRET", "DIFFKERNELS_BACKEND", "OMP_NUM_THREADS") if k in os.environ},
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            device=torch.cuda.get_device_name(device),
            device_kind=_cuda_kind(torch.cuda.get_device_name(device)),
            cuda=torch.version.cuda,
            gpu_memory_bytes=props.total_memory,
            gpu_sm_count=props.multi_processor_count,
            gpu_l2_bytes=getattr(props, "L2_cache_size", None),
        )
    else:
        info.update(device=f"{info['cpu']['model']} ({info['cpu_count']} cores)", device_kind="cpu")
    return info


def _cuda_kind(name: str) -> str:
    for token in name.replace("-", " ").split():
        if len(token) >= 3 and token[0].isalpha() and token[1:].isdigit():
            return token.lower()
    return "cuda"


# --- load monitoring (a shared, noisy VM) -------------------------------------------------------


class LoadMonitor:
    """CPU time used by *other* processes while a measurement ran, in cores (Linux /proc only)."""

    HZ = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    @staticmethod
    def _read():
        try:
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:9]]
            with open("/proc/self/stat") as f:
                s = f.read()
            fields = s[s.rfind(")") + 2:].split()
            own = int(fields[11]) + int(fields[12])
            busy = v[0] + v[1] + v[2] + v[5] + v[6]  # user nice system irq softirq
            return time.perf_counter(), busy, v[7], own
        except (OSError, ValueError, IndexError):
            return None

    def __enter__(self):
        self.start = self._read()
        self.foreign_cores = self.steal_cores = None
        return self

    def __exit__(self, *exc):
        end = self._read()
        if self.start and end and end[0] > self.start[0]:
            dt = end[0] - self.start[0]
            self.foreign_cores = max(0.0, (end[1] - self.start[1]) - (end[3] - self.start[3])) / self.HZ / dt
            self.steal_cores = (end[2] - self.start[2]) / self.HZ / dt
        return False


_WAIT_BUDGET = {"left_s": float("inf")}  # total waiting allowed in one run (--max-total-wait)


def wait_for_idle(max_wait_s: float, threshold: float = 0.25) -> float:
    """Wait (up to max_wait_s) until other processes use less than `threshold` cores; returns the wait."""
    max_wait_s = min(max_wait_s, _WAIT_BUDGET["left_s"])
    t0 = time.perf_counter()
    try:
        return _wait_for_idle(t0, max_wait_s, threshold)
    finally:
        _WAIT_BUDGET["left_s"] -= time.perf_counter() - t0


def _wait_for_idle(t0: float, max_wait_s: float, threshold: float) -> float:
    while True:
        with LoadMonitor() as mon:
            time.sleep(0.5)
        if mon.foreign_cores is None or mon.foreign_cores < threshold:
            return time.perf_counter() - t0
        if time.perf_counter() - t0 > max_wait_s:
            return time.perf_counter() - t0
        time.sleep(1.5)


# --- timing -------------------------------------------------------------------------------------


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn, i0: int, k: int, device) -> float:
    """Seconds per call of fn(i) over k consecutive calls (CUDA events on GPU, perf_counter on CPU)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for j in range(k):
            fn(i0 + j)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / k
    t0 = time.perf_counter()
    for j in range(k):
        fn(i0 + j)
    return (time.perf_counter() - t0) / k


def quartiles(xs):
    xs = sorted(xs)
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]
    q1, q2, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return q1, q2, q3


def summarize(samples_s):
    q1, med, q3 = quartiles(samples_s)
    return {"median_ms": med * 1e3, "q1_ms": q1 * 1e3, "q3_ms": q3 * 1e3, "iqr_ms": (q3 - q1) * 1e3,
            "min_ms": min(samples_s) * 1e3, "n_samples": len(samples_s)}


def measure(fns: dict, device, *, budget_s: float, min_reps: int, max_reps: int, min_sample_s: float,
            warmup_s: float, min_warmup_calls: int = 3) -> dict:
    """Interleaved timing: each round times every method once (k calls each), rotating the order."""
    names = list(fns)
    est, k = {}, {}
    counter = 0
    for name in names:  # warm-up: at least min_warmup_calls calls and warmup_s seconds
        fn = fns[name]
        times = []
        t_end = time.perf_counter() + warmup_s
        while len(times) < min_warmup_calls or (time.perf_counter() < t_end and len(times) < 200):
            times.append(time_calls(fn, counter, 1, device))
            counter += 1
        est[name] = statistics.median(times[-max(min_warmup_calls, len(times) // 2):])
        k[name] = max(1, math.ceil(min_sample_s / max(est[name], 1e-9)))
    per_round = sum(est[n] * k[n] for n in names)
    reps = int(min(max_reps, max(min_reps, budget_s / max(per_round, 1e-9))))
    samples = {n: [] for n in names}
    with LoadMonitor() as mon:
        for r in range(reps):
            order = names[r % len(names):] + names[: r % len(names)]
            for name in order:
                samples[name].append(time_calls(fns[name], counter, k[name], device))
                counter += k[name]
    return {"samples": samples, "calls_per_sample": k, "rounds": reps,
            "foreign_cores": mon.foreign_cores, "steal_cores": mon.steal_cores}


def ratio_stats(num, den):
    rs = [a / b for a, b in zip(num, den)]
    q1, med, q3 = quartiles(rs)
    return {"median": med, "q1": q1, "q3": q3}


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


class _quiet_stderr:
    """Silence file descriptor 2 (the profiler's C++ start/stop lines) for the duration."""

    def __enter__(self):
        try:
            sys.stderr.flush()
            self.saved = os.dup(2)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 2)
            os.close(devnull)
        except OSError:
            self.saved = None
        return self

    def __exit__(self, *exc):
        if self.saved is not None:
            os.dup2(self.saved, 2)
            os.close(self.saved)
        return False


def peak_extra_bytes(fn, i: int, device) -> int:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn(i)
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile

    with warnings.catch_warnings(), _quiet_stderr():
        warnings.simplefilter("ignore")
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn(i)
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    cur = peak = 0
    for e in events:
        cur += e.nbytes()
        peak = max(peak, cur)
    return peak


# --- ceilings -----------------------------------------------------------------------------------


def ceilings(device, quick: bool) -> dict:
    """Copy bandwidth, mask-generation throughput (our Philox) and torch.rand throughput."""
    out = {}
    # GPU: median of many runs. CPU (a shared VM whose noise only ever adds time): the best run.
    stat = "median" if device.type == "cuda" else "best"
    pick = statistics.median if device.type == "cuda" else min
    if device.type == "cuda":
        nbytes, reps = 2**30, (10 if quick else 30)
    else:
        nbytes, reps = (2**27 if quick else 2**29), (5 if quick else 15)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    _sync(device)
    ts = [time_calls(lambda i: dst.copy_(src), 0, 1, device) for _ in range(reps)]
    t = pick(ts)
    out["copy"] = {"bytes": nbytes, "median_ms": statistics.median(ts) * 1e3, "min_ms": min(ts) * 1e3,
                   "GBps": 2 * nbytes / t / 1e9, "note": f"dst.copy_(src), bytes read + written / {stat} time"}
    del src, dst

    n = 2**26 if device.type == "cuda" else (2**22 if quick else 2**24)
    shape = (64, n // 64)
    for name, fn in (
        ("philox_mask", lambda i: diffkernels.sparse_mask(shape, 0.5, BASE_SEED + i, device=device)),
        ("torch_rand", lambda i: torch.rand(shape, device=device)),
    ):
        for i in range(3):
            fn(i)
        _sync(device)
        ts = [time_calls(fn, i, 1, device) for i in range(reps)]
        t = pick(ts)
        out[name] = {"elements": n, "median_ms": statistics.median(ts) * 1e3, "min_ms": min(ts) * 1e3,
                     "ns_per_element": t / n * 1e9, "stat": stat}
    out["philox_mask"]["note"] = "diffkernels.sparse_mask: Philox uniforms + compare + 1 B/element bool write"
    if device.type == "cpu":
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
    out["torch_rand"]["note"] = "torch.rand (float32, 4 B/element write)"
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


# --- one row ------------------------------------------------------------------------------------


LOAD_LIMIT = 0.25  # cores used by other processes above which a CPU measurement is repeated


def measure_quietly(fns, device, args, budget_s):
    """measure(), repeated (after waiting for the machine to go idle) when other processes interfered."""
    best = None
    for attempt in range(1 + args.retries):
        res = measure(fns, device, budget_s=budget_s, min_reps=args.min_reps, max_reps=args.max_reps,
                      min_sample_s=args.min_sample, warmup_s=args.warmup)
        res["attempts"] = attempt + 1
        if best is None or (res["foreign_cores"] or 0) < (best["foreign_cores"] or 0):
            best = res
        if device.type != "cpu" or (res["foreign_cores"] or 0) <= LOAD_LIMIT or attempt == args.retries:
            break
        print(f"[bench]   other processes used {res['foreign_cores']:.2f} cores; measuring again", file=sys.stderr)
        wait_for_idle(args.idle_wait, LOAD_LIMIT)
    return best


def make_inputs(shape, dtype, device, n_sets: int, gen: torch.Generator):
    sets = []
    for _ in range(n_sets):
        p = torch.randn(shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)
        t = torch.randn(shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)
        sets.append((p.requires_grad_(True), t))
    return sets


def bench_row(shape, eta, dtype_name, device, args, ceil, backend) -> dict:
    dtype = DTYPES[dtype_name]
    numel = math.prod(shape)
    B = shape[0]
    n = numel // B
    item = torch.empty((), dtype=dtype).element_size()
    set_bytes = 3 * numel * item
    cache = (ceil.get("_cache_bytes") or 0)
    n_sets = 1 if args.no_rotate else max(1, min(64, math.ceil(2 * cache / set_bytes)))
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
    waited = wait_for_idle(args.idle_wait, LOAD_LIMIT) if (device.type == "cpu" and args.idle_wait > 0) else 0.0
    row["waited_for_idle_s"] = round(waited, 1)

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
        _sync(device)
        row["compile_s"] = time.perf_counter() - t0
    except Exception as exc:  # noqa: BLE001 -- report, do not abort the whole run
        errors["compile"] = f"{type(exc).__name__}: {exc}"[:500]
        del fns["compile"]
    res = measure_quietly(fns, device, args, args.budget)
    row["foreign_cores"] = res["foreign_cores"]
    row["steal_cores"] = res["steal_cores"]
    row["rounds"] = res["rounds"]
    row["attempts"] = res["attempts"]
    row["calls_per_sample"] = res["calls_per_sample"]
    row["time"] = {name: summarize(s) for name, s in res["samples"].items()}
    row["ratio"] = {f"{name}/fused": ratio_stats(res["samples"][name], res["samples"]["fused"])
                    for name in res["samples"] if name != "fused"}
    # Ratios of the fastest samples: noise on a shared machine only ever adds time, so the minimum
    # is a robust estimate of the uncontended time when other processes interfered.
    for name in list(row["ratio"]):
        num = name.split("/")[0]
        row["ratio"][name]["of_min"] = min(res["samples"][num]) / min(res["samples"]["fused"])
    if args.keep_samples:
        row["samples_ms"] = {name: [round(x * 1e3, 5) for x in s] for name, s in res["samples"].items()}
    row["errors"] = errors

    # Peak extra memory of one step (inputs already allocated, grads cleared).
    row["peak_extra_MiB"] = {}
    for name, fn in fns.items():
        for p, _ in sets:
            p.grad = None
        fn(0)
        for p, _ in sets:
            p.grad = None
        row["peak_extra_MiB"][name] = peak_extra_bytes(fn, 0, device) / MiB
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
    kernels = None
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
                          args.budget_strategy)
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
            errors["reference"] = f"{type(exc).__name__}: {exc}"[:500]

    del sets, compiled_fn
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


# --- output -------------------------------------------------------------------------------------


def _fmt_t(s):
    if s is None:
        return "n/a"
    med = s["median_ms"]
    digits = 3 if med < 1 else (2 if med < 10 else 1)
    return f"{med:.{digits}f} ± {s['iqr_ms'] / 2:.{digits}f}"


def _fmt_r(r):
    return "n/a" if r is None else f"{r['median']:.2f}× ({r['q1']:.2f}–{r['q3']:.2f})"


def _fmt_min(ratios):
    parts = [ratios[k]["of_min"] for k in ("eager/fused", "compile/fused") if k in ratios]
    return ", ".join(f"{x:.2f}×" for x in parts) or "n/a"


def _shape_s(shape):
    return "×".join(str(s) for s in shape)


def to_markdown(meta, ceil, rows) -> str:
    dev = meta["device"]
    L = []
    L.append(f"# sparse_mse benchmark — {dev}")
    L.append("")
    L.append(f"- date: {meta['date']}; commit `{meta['git_commit']}`" + (" (+ uncommitted changes)" if meta["git_dirty"] else ""))
    L.append(f"- command: `{meta['command']}`")
    L.append(f"- python {meta['python']}, torch {meta['torch']}, triton {meta['triton']}, diffkernels {meta['diffkernels']}; "
             f"fused backend: `{meta['fused_backend']}`")
    cpu = meta["cpu"]
    L.append(f"- CPU: {cpu['model']}, {meta['cpu_count']} logical cores, torch threads {meta['torch_num_threads']}, "
             f"flags {' '.join(cpu['flags']) or '-'}, last-level cache {(meta['llc_bytes'] or 0) // MiB} MiB")
    if meta.get("cuda") is not None:
        L.append(f"- GPU: {meta['device']}, CUDA {meta['cuda']}, {meta['gpu_sm_count']} SMs, "
                 f"L2 {(meta.get('gpu_l2_bytes') or 0) // MiB} MiB")
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
    L.append(f"- our Philox mask generation: **{m['ns_per_element']:.3f} ns/element** ({m['note']}, {m['elements']} elements)")
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
        load = row.get("foreign_cores")
        steal = row.get("steal_cores")
        mark = " †" if (load or 0) > LOAD_LIMIT else ""
        L.append(
            f"| {_shape_s(row['shape'])} | {row['eta']} | {row['dtype']} | **{_fmt_t(t.get('fused'))}** | "
            f"{_fmt_t(t.get('eager'))} | {_fmt_t(t.get('compile'))} | {_fmt_r(row['ratio'].get('eager/fused'))} | "
            f"{_fmt_r(row['ratio'].get('compile/fused'))} | {_fmt_min(row['ratio'])} | {row['byte_floor_ms']:.3f} | "
            f"{100 * row['fused_frac_of_byte_floor']:.0f}% | "
            f"{row.get('compile_s', float('nan')):.1f} | {'' if load is None else f'{load:.2f} / {steal:.2f}'}{mark} |"
        )
    errs = [(r, k, v) for r in rows for k, v in r["errors"].items()]
    if errs:
        L.append("")
        for r, k, v in errs:
            L.append(f"- error in {k} at {_shape_s(r['shape'])} η={r['eta']} {r['dtype']}: `{v}`")
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
        L.append(f"| {_shape_s(row['shape'])} | {row['eta']} | {row['dtype']} | {row['grad_MiB']:.2f} | "
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
        L.append(f"| {_shape_s(row['shape'])} | {row['eta']} | {row['dtype']} | **{_fmt_t(s['A_one_pass'])}** | "
                 f"{_fmt_t(s['B_two_pass'])} | {_fmt_r(s['B/A'])} | {_fmt_t(s['fwd_no_grad'])} | "
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
            L.append(f"| {_shape_s(row['shape'])} | {row['eta']} | {row['dtype']} | {_fmt_t(t['reference'])} | "
                     f"{t['reference']['median_ms'] / t['fused']['median_ms']:.0f}× |")
    L.append("")
    return "\n".join(L)


# --- main ---------------------------------------------------------------------------------------


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fp32 only, eta in {0, 0.98}, short timing budgets")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"), help="directory for .md and .json results")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--shapes", default=None, help="e.g. '128x3x32x32,16x3x256x256'")
    ap.add_argument("--etas", default=None, help="e.g. '0,0.5,0.98'")
    ap.add_argument("--dtypes", default=None, help="e.g. 'fp32,bf16'")
    ap.add_argument("--budget", type=float, default=None, help="seconds of timing per row (fused+eager+compile)")
    ap.add_argument("--budget-strategy", type=float, default=None, help="seconds of timing per row (A/B strategy)")
    ap.add_argument("--budget-reference", type=float, default=None, help="seconds of timing for the reference")
    ap.add_argument("--min-reps", type=int, default=None)
    ap.add_argument("--max-reps", type=int, default=400)
    ap.add_argument("--min-sample", type=float, default=None, help="seconds per timed sample (calls are batched)")
    ap.add_argument("--warmup", type=float, default=None, help="seconds of warm-up per method")
    ap.add_argument("--idle-wait", type=float, default=None,
                    help="CPU only: wait up to this many seconds per row for other processes to go idle")
    ap.add_argument("--max-total-wait", type=float, default=None,
                    help="CPU only: total seconds the run may spend waiting for an idle machine")
    ap.add_argument("--retries", type=int, default=None,
                    help="CPU only: repeat a measurement up to this many times when other processes interfered")
    ap.add_argument("--no-rotate", action="store_true", help="do not rotate input copies to defeat caches")
    ap.add_argument("--no-reference", action="store_true", help="skip the float64 reference")
    ap.add_argument("--keep-samples", action="store_true", help="store every timing sample in the JSON")
    ap.add_argument("--suffix", default="", help="appended to the output file names")
    args = ap.parse_args(argv)

    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.shapes:
        args.shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    else:
        args.shapes = list(SHAPES)
    args.etas = [float(x) for x in args.etas.split(",")] if args.etas else ([0.0, 0.98] if args.quick else list(ETAS))
    args.dtypes = args.dtypes.split(",") if args.dtypes else (["fp32"] if args.quick else list(DTYPES))
    cpu = args.device.type == "cpu"
    defaults = dict(
        budget=(0.8 if args.quick else 4.0) * (1 if cpu else 0.5),
        budget_strategy=(0.4 if args.quick else 1.5) * (1 if cpu else 0.5),
        budget_reference=(1.0 if args.quick else 3.0),
        min_reps=5 if args.quick else 15,
        min_sample=2e-3 if cpu else 1e-3,
        warmup=0.1 if args.quick else 0.3,
        idle_wait=(15.0 if args.quick else 60.0) if cpu else 0.0,
        retries=(1 if args.quick else 2) if cpu else 0,
        max_total_wait=(120.0 if args.quick else 1200.0) if cpu else 0.0,
    )
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def main(argv=None):
    args = parse_args(argv)
    device = args.device
    if device.type == "cuda":
        if device.index is None:  # "cuda" means the current device; pin it so every call agrees
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = False
    _WAIT_BUDGET["left_s"] = args.max_total_wait
    meta = machine_info(device)
    backend = meta["fused_backend"]
    meta["memory_method"] = CUDA_MEMORY_METHOD if device.type == "cuda" else CPU_MEMORY_METHOD
    meta["settings"] = {k: (str(v) if isinstance(v, torch.device) else v) for k, v in vars(args).items()}
    print(f"[bench] {meta['device']}; torch {meta['torch']}; fused backend {backend}; commit {meta['git_commit']}",
          file=sys.stderr)

    if device.type == "cpu" and args.idle_wait > 0:
        wait_for_idle(args.idle_wait, LOAD_LIMIT)
    with LoadMonitor() as mon:
        ceil = ceilings(device, args.quick)
    ceil["foreign_cores"], ceil["steal_cores"] = mon.foreign_cores, mon.steal_cores
    ceil["_cache_bytes"] = (meta.get("gpu_l2_bytes") or 50 * MiB) if device.type == "cuda" else (meta["llc_bytes"] or 32 * MiB)
    print(f"[bench] copy {ceil['copy']['GBps']:.1f} GB/s; Philox mask {ceil['philox_mask']['ns_per_element']:.3f} ns/el; "
          f"torch.rand {ceil['torch_rand']['ns_per_element']:.3f} ns/el", file=sys.stderr)

    rows = []
    t_start = time.perf_counter()
    for shape in args.shapes:
        for dtype_name in args.dtypes:
            for eta in args.etas:
                t0 = time.perf_counter()
                row = bench_row(shape, eta, dtype_name, device, args, ceil, backend)
                rows.append(row)
                t = row["time"]
                msg = " ".join(f"{k}={v['median_ms']:.3f}ms" for k, v in t.items())
                rr = " ".join(f"{k}={v['median']:.2f}" for k, v in row["ratio"].items())
                print(f"[bench] {_shape_s(shape)} eta={eta} {dtype_name}: {msg} | {rr} | "
                      f"B/A={row['strategy']['B/A']['median']:.2f} | load={row['foreign_cores']} | "
                      f"{time.perf_counter() - t0:.1f}s", file=sys.stderr)
    meta["total_s"] = time.perf_counter() - t_start
    meta["waited_for_idle_total_s"] = sum(r.get("waited_for_idle_s", 0) for r in rows)

    md = to_markdown(meta, ceil, rows)
    print(md)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"sparse_mse_{meta['device_kind']}" + ("_quick" if args.quick else "") + args.suffix
    (out / f"{stem}.md").write_text(md)
    ceil.pop("_cache_bytes", None)
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "ceilings": ceil, "rows": rows}, indent=1, default=str))
    print(f"[bench] wrote {out / stem}.md and .json in {meta['total_s']:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
