"""Helpers shared by the benchmark scripts (``benchmarks/bench_*.py``, ``host_overhead.py``).

One copy of each: the command-line basics (``--quick``, ``--out``, ``--device``), the description
of the machine (device, versions, commit, date), timing (CUDA events on a GPU, ``perf_counter`` on a
CPU; warm-up, medians, quartiles, interleaved rounds, load monitoring on a shared VM, CUDA graphs),
peak memory, the device ceilings (copy bandwidth, GEMM rates, RNG throughput) and writing results
(Markdown + JSON). Not a benchmark itself: ``gpu_pass.sh`` runs ``bench_*.py`` only.

Import it as ``benchmarks._common`` with the checkout on ``sys.path`` (every script puts it there),
not as a top-level ``_common``: ``python_examples/_common.py`` owns that name, and the two must be
importable in one process (``pytest tests benchmarks``).

Importing this module imports torch but never diffkernels or triton (``bench_cuda_vs_triton.py``
sets ``TRITON_INTERPRET`` before the kernels are defined); those are imported inside functions.
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

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "benchmarks" / "results"
MiB = 2**20
CEILING_SEED = 0x5EED_0000_1234  # the seed of the Philox mask-throughput ceiling

if str(REPO) not in sys.path:  # run from a checkout too
    sys.path.insert(0, str(REPO))


# --- command line ---------------------------------------------------------------------------------


def base_parser(doc: str | None, *, quick_help: str, out_default=str(RESULTS_DIR),
                device_help: str = "cpu or cuda (default: cuda when available)", device_default=None,
                first_paragraph: bool = True, **kwargs) -> argparse.ArgumentParser:
    """An ArgumentParser with the options every benchmark has: --quick, --out DIR, --device.

    ``doc``: the script's docstring; its first paragraph (or first line) is the description.
    ``out_default=None``: results are only written when --out is given.
    """
    description = None
    if doc:
        description = doc.split("\n\n")[0] if first_paragraph else doc.strip().splitlines()[0]
    kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
    ap = argparse.ArgumentParser(description=description, **kwargs)
    ap.add_argument("--quick", action="store_true", help=quick_help)
    ap.add_argument("--out", default=out_default, help="directory for .md and .json results")
    ap.add_argument("--device", default=device_default, help=device_help)
    return ap


def add_timing_options(ap: argparse.ArgumentParser) -> None:
    """The timing-loop options shared by the adaptive-timing benchmarks (bench_sparse_mse, bench_mdm)."""
    ap.add_argument("--max-reps", type=int, default=400)
    ap.add_argument("--min-sample", type=float, default=None, help="seconds per timed sample (calls are batched)")
    ap.add_argument("--warmup", type=float, default=None, help="seconds of warm-up per method")
    ap.add_argument("--idle-wait", type=float, default=None,
                    help="CPU only: wait up to this many seconds per row for other processes to go idle")
    ap.add_argument("--max-total-wait", type=float, default=None,
                    help="CPU only: total seconds the run may spend waiting for an idle machine")
    ap.add_argument("--retries", type=int, default=None,
                    help="CPU only: repeat a measurement up to this many times when other processes interfered")
    ap.add_argument("--keep-samples", action="store_true", help="store every timing sample in the JSON")
    ap.add_argument("--suffix", default="", help="appended to the output file names")


def default_device(name: str | None = None) -> torch.device:
    """``name``, or cuda when available, else cpu."""
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def pin_device(device: torch.device) -> torch.device:
    """For CUDA: "cuda" means the current device; pin its index (so every call agrees) and make it current."""
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    return device


# --- the machine ----------------------------------------------------------------------------------


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def command_line() -> str:
    """The command that ran this script, relative to the working directory."""
    return "python " + shlex.join([os.path.relpath(sys.argv[0], os.getcwd())] + sys.argv[1:])


def git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def git_commit() -> str | None:
    """DIFFKERNELS_COMMIT when set (a copy of the working tree may carry a stale .git), else HEAD."""
    return os.environ.get("DIFFKERNELS_COMMIT") or git("rev-parse", "HEAD")


def git_dirty_files() -> list:
    """Modified tracked files ([] when DIFFKERNELS_COMMIT says which commit this is)."""
    if os.environ.get("DIFFKERNELS_COMMIT"):
        return []
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return dirty.splitlines() if dirty else []


def triton_version(on_error: str | None = None) -> str | None:
    """triton.__version__; on failure None, or ``on_error`` with the error appended when given."""
    try:
        import triton

        return triton.__version__
    except Exception as exc:  # noqa: BLE001
        return None if on_error is None else f"{on_error} ({err_s(exc, 300, first_line=True)})"


def cpuinfo() -> dict:
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


def llc_bytes() -> int | None:
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


def device_kind(device) -> str:
    """Short name for result files: "h100", "h200", "a100", ... from the GPU's name; "cuda" when the
    name has no such token; "cpu" for a CPU. ``device``: a torch.device or a GPU name."""
    if isinstance(device, torch.device):
        if device.type != "cuda":
            return device.type
        device = torch.cuda.get_device_name(device)
    for token in device.replace("-", " ").split():
        if len(token) >= 3 and token[0].isalpha() and token[1:].isdigit():
            return token.lower()
    return "cuda"


def gpu_info(device: torch.device) -> dict:
    """name, CUDA version, SM count, L2 and memory bytes of a CUDA device."""
    props = torch.cuda.get_device_properties(device)
    return {"name": torch.cuda.get_device_name(device), "cuda": torch.version.cuda,
            "sm_count": props.multi_processor_count, "l2_bytes": getattr(props, "L2_cache_size", None),
            "memory_bytes": props.total_memory}


def environment(device: torch.device, env_keys=("TRITON_INTERPRET", "DIFFKERNELS_BACKEND", "OMP_NUM_THREADS")) -> dict:
    """The machine and software a measurement ran on: date, command, commit, versions, CPU, GPU."""
    import diffkernels

    dirty = git_dirty_files()
    cpu = cpuinfo()
    info = {
        "date": now_iso(),
        "command": command_line(),
        "cwd": os.getcwd(),
        "git_commit": git_commit(),
        "git_dirty": bool(dirty),
        "git_dirty_files": dirty,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version(),
        "diffkernels": diffkernels.__version__,
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_num_threads": torch.get_num_threads(),
        "llc_bytes": llc_bytes(),
        "backends": diffkernels.backends(),
        "env": {k: os.environ[k] for k in env_keys if k in os.environ},
    }
    if device.type == "cuda":
        g = gpu_info(device)
        info.update(device=g["name"], device_kind=device_kind(g["name"]), cuda=g["cuda"],
                    gpu_memory_bytes=g["memory_bytes"], gpu_sm_count=g["sm_count"], gpu_l2_bytes=g["l2_bytes"])
    else:
        info.update(device=f"{cpu['model']} ({info['cpu_count']} cores)", device_kind="cpu")
    return info


def fused_backend(device: torch.device) -> str:
    """The backend the fused ops run on here by default; never the interpreter or the reference."""
    import diffkernels
    from diffkernels import _backend

    name = _backend.default(device)
    if device.type == "cpu" and name != "cpp":
        raise RuntimeError(f"the C++ kernels are not available ({diffkernels.backends()['cpp']}); "
                           "benchmarking the reference backend would be meaningless")
    if device.type == "cuda" and name not in ("cuda", "triton"):
        raise RuntimeError(f"no compiled CUDA backend (default is {name!r})")
    return name


def cache_bytes(meta: dict, device: torch.device) -> int:
    """The cache that rotating inputs must defeat: the GPU's L2, or the CPU's last-level cache."""
    if device.type == "cuda":
        return meta.get("gpu_l2_bytes") or 50 * MiB
    return meta.get("llc_bytes") or 32 * MiB


def err_s(exc: BaseException, limit: int = 400, first_line: bool = False) -> str:
    """An exception as one short line."""
    if first_line:
        msg = str(exc).strip()
        return f"{type(exc).__name__}: {msg.splitlines()[0] if msg else ''}"[:limit]
    return " ".join(f"{type(exc).__name__}: {exc}".split())[:limit]


def rel_diff(a: float, b: float) -> float:
    """|a - b| / |b| (b = 0 counts as 1e-30)."""
    return abs(a - b) / max(abs(b), 1e-30)


def grad_rel_diff(g, ref) -> float:
    """max |g - ref| / max |ref|, in float32."""
    return float((g.float() - ref.float()).abs().max() / ref.float().abs().max().clamp(min=1e-30))


# --- timing -----------------------------------------------------------------------------------------


def sync(device) -> None:
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


def time_once(fn, device) -> float:
    """Seconds of one call fn() (CUDA events around it on GPU)."""
    return time_calls(lambda _i: fn(), 0, 1, device)


def timeit(fn, device, reps: int, warmup: int = 1) -> list[float]:
    """Seconds of each of ``reps`` calls fn(), after ``warmup`` untimed calls and a sync."""
    for _ in range(warmup):
        fn()
    sync(device)
    return [time_once(fn, device) for _ in range(reps)]


def best_round_us(fn, device, calls: int, repeats: int, clock=time.perf_counter) -> float:
    """Microseconds per call, device synchronised around each round of ``calls`` calls: the best
    round, as timeit reports (the other rounds only add noise from other processes)."""
    for _ in range(max(10, calls // 10)):
        fn()
    rounds = []
    for _ in range(repeats):
        sync(device)
        start = clock()
        for _ in range(calls):
            fn()
        sync(device)
        rounds.append((clock() - start) / calls * 1e6)
    return min(rounds)


def quartiles(xs, method: str = "inclusive"):
    xs = sorted(xs)
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]
    q1, q2, q3 = statistics.quantiles(xs, n=4, method=method)
    return q1, q2, q3


def summarize(samples_s) -> dict:
    """Median, quartiles, IQR and minimum of per-call times (seconds in, milliseconds out)."""
    q1, med, q3 = quartiles(samples_s)
    return {"median_ms": med * 1e3, "q1_ms": q1 * 1e3, "q3_ms": q3 * 1e3, "iqr_ms": (q3 - q1) * 1e3,
            "min_ms": min(samples_s) * 1e3, "n_samples": len(samples_s)}


def stats(samples_s) -> dict:
    """Median, quartiles (statistics.quantiles' default "exclusive" method), minimum, count; ms."""
    s = sorted(samples_s)
    q = quartiles(s, method="exclusive") if len(s) >= 2 else [s[0]] * 3
    return {"median_ms": statistics.median(s) * 1e3, "q1_ms": q[0] * 1e3, "q3_ms": q[2] * 1e3,
            "min_ms": s[0] * 1e3, "n": len(s)}


def time_fn(fn, device, reps: int, warmup: int = 3) -> dict:
    """``stats`` of ``reps`` single calls fn() after ``warmup`` untimed ones."""
    return stats(timeit(fn, device, reps, warmup))


def ratio_stats(num, den) -> dict:
    """Median and quartiles of the per-round ratios num[r] / den[r]."""
    rs = [a / b for a, b in zip(num, den)]
    q1, med, q3 = quartiles(rs)
    return {"median": med, "q1": q1, "q3": q3}


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


LOAD_LIMIT = 0.25  # cores used by other processes above which a CPU measurement is repeated
WAIT_BUDGET = {"left_s": float("inf")}  # total waiting allowed in one run (--max-total-wait)


def wait_for_idle(max_wait_s: float, threshold: float = LOAD_LIMIT) -> float:
    """Wait (up to max_wait_s) until other processes use less than `threshold` cores; returns the wait."""
    max_wait_s = min(max_wait_s, WAIT_BUDGET["left_s"])
    t0 = time.perf_counter()
    try:
        while True:
            with LoadMonitor() as mon:
                time.sleep(0.5)
            if mon.foreign_cores is None or mon.foreign_cores < threshold:
                return time.perf_counter() - t0
            if time.perf_counter() - t0 > max_wait_s:
                return time.perf_counter() - t0
            time.sleep(1.5)
    finally:
        WAIT_BUDGET["left_s"] -= time.perf_counter() - t0


def measure(fns: dict, device, *, budget_s: float, min_reps: int, max_reps: int, min_sample_s: float,
            warmup_s: float, min_warmup_calls: int = 3) -> dict:
    """Interleaved timing: each round times every method once (k calls each), rotating the order.

    fns: name -> fn(i), i a running call counter (to rotate inputs and seeds). Returns per-call
    seconds per sample and method, the calls per sample, the rounds and the foreign CPU load.
    """
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


def measure_quietly(fns, device, args, budget_s, *, log_prefix: str = "[bench]"):
    """measure(), repeated (after waiting for the machine to go idle) when other processes interfered.

    ``args`` supplies retries, min_reps, max_reps, min_sample, warmup and idle_wait.
    """
    best = None
    for attempt in range(1 + args.retries):
        res = measure(fns, device, budget_s=budget_s, min_reps=args.min_reps, max_reps=args.max_reps,
                      min_sample_s=args.min_sample, warmup_s=args.warmup)
        res["attempts"] = attempt + 1
        if best is None or (res["foreign_cores"] or 0) < (best["foreign_cores"] or 0):
            best = res
        if device.type != "cpu" or (res["foreign_cores"] or 0) <= LOAD_LIMIT or attempt == args.retries:
            break
        print(f"{log_prefix}   other processes used {res['foreign_cores']:.2f} cores; measuring again", file=sys.stderr)
        wait_for_idle(args.idle_wait, LOAD_LIMIT)
    return best


class Timer:
    """Median time of one call, eager (CUDA events around each call) or inside a CUDA graph."""

    def __init__(self, device: torch.device, runs: int, warmup: int):
        self.device, self.runs, self.warmup = device, runs, warmup
        self.cuda = device.type == "cuda"

    def sync(self):
        sync(self.device)

    def per_call(self, fn, k: int) -> float:
        """Median seconds of one eager call fn(i), i cycling over the k input copies."""
        for r in range(self.warmup):
            fn(r % k)
        self.sync()
        if not self.cuda:
            times = []
            for r in range(self.runs):
                t0 = time.perf_counter()
                fn(r % k)
                times.append(time.perf_counter() - t0)
            return statistics.median(times)
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(self.runs)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(self.runs)]
        for r in range(self.runs):
            starts[r].record()
            fn(r % k)
            ends[r].record()
        self.sync()
        return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)) / 1e3

    def per_call_graph(self, fn, k: int) -> float:
        """Median seconds per call of a CUDA graph that calls fn(0), ..., fn(k - 1), replayed."""
        if not self.cuda:
            raise RuntimeError("CUDA graphs need a CUDA device")
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # warm-up outside the capture (compiles, caches, allocator)
            for i in range(k):
                fn(i)
        torch.cuda.current_stream(self.device).wait_stream(side)
        self.sync()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for i in range(k):
                fn(i)
        for _ in range(max(1, self.warmup // 2)):
            graph.replay()
        self.sync()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(self.runs)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(self.runs)]
        for r in range(self.runs):
            starts[r].record()
            graph.replay()
            ends[r].record()
        self.sync()
        t = statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)) / 1e3 / k
        del graph
        return t


# --- memory -----------------------------------------------------------------------------------------


def free(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class quiet_stderr:
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


def cuda_peak_bytes(fn, i: int, device) -> tuple[int, int]:
    """(allocated before, peak allocated during) the call fn(i) on a CUDA device, in bytes."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn(i)
    torch.cuda.synchronize(device)
    return before, torch.cuda.max_memory_allocated(device)


def peak_extra_bytes(fn, i: int, device) -> int:
    """Peak memory fn(i) allocates above what was allocated before it.

    CUDA: torch.cuda.max_memory_allocated() during the call minus memory_allocated() before it.
    CPU: torch.profiler(profile_memory=True) records every allocation and free through PyTorch's CPU
    allocator; the peak of their running sum (in time order) is returned.
    """
    gc.collect()
    if device.type == "cuda":
        before, peak = cuda_peak_bytes(fn, i, device)
        return peak - before
    from torch.profiler import ProfilerActivity, profile

    with warnings.catch_warnings(), quiet_stderr():
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


def peak_extra_mib(fn, device):
    """CUDA only (None on a CPU): peak extra MiB of one call fn(), after freeing cached memory."""
    if device.type != "cuda":
        return None
    free(device)
    return peak_extra_bytes(lambda _i: fn(), 0, device) / MiB


# --- device ceilings ----------------------------------------------------------------------------------


def copy_times(device, nbytes: int, reps: int, warmup: int = 3) -> list[float]:
    """Seconds of each of ``reps`` device-to-device (host: memcpy) copies of ``nbytes`` bytes."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    return timeit(lambda: dst.copy_(src), device, reps, warmup)


def gemm_times(device, m: int, k: int, n: int, dtype, reps: int, *, warmup: int = 1, tf32: bool = False,
               b_transposed: bool = False, seed: int | None = None) -> list[float]:
    """Seconds of each of ``reps`` (m, k) @ (k, n) products in ``dtype`` (b stored (n, k) and
    transposed when ``b_transposed``); TF32 on or off for float32 on CUDA (restored after)."""
    gen = None if seed is None else torch.Generator(device=device).manual_seed(seed)
    a = torch.randn(m, k, generator=gen, device=device).to(dtype)
    b = torch.randn(*((n, k) if b_transposed else (k, n)), generator=gen, device=device).to(dtype)
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        fn = (lambda: a @ b.t()) if b_transposed else (lambda: a @ b)
        return timeit(fn, device, reps, warmup)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


GEMM_CEILING_DTYPES = (("fp64", torch.float64, False), ("fp32", torch.float32, False),
                       ("tf32", torch.float32, True), ("bf16", torch.bfloat16, False))


def gemm_ceilings(device, size: int, reps: int, names=("fp64", "fp32", "tf32", "bf16")) -> dict:
    """{"<name>_TFLOPs": ...}: median rate of size^3 GEMMs per dtype (tf32 and bf16 skipped on a CPU)."""
    res = {}
    for name, dtype, tf32 in GEMM_CEILING_DTYPES:
        if name not in names or (device.type == "cpu" and name in ("tf32", "bf16")):
            continue
        t = statistics.median(gemm_times(device, size, size, size, dtype, reps, tf32=tf32))
        res[f"{name}_TFLOPs"] = 2 * size**3 / t / 1e12
    return res


def bandwidth_ceilings(device, quick: bool, seed: int = CEILING_SEED) -> dict:
    """Copy bandwidth, our Philox mask-generation throughput and torch.rand's.

    GPU: median of many runs. CPU (a shared VM whose noise only ever adds time): the best run.
    """
    import diffkernels

    out = {}
    stat = "median" if device.type == "cuda" else "best"
    pick = statistics.median if device.type == "cuda" else min
    if device.type == "cuda":
        nbytes, reps = 2**30, (10 if quick else 30)
    else:
        nbytes, reps = (2**27 if quick else 2**29), (5 if quick else 15)
    ts = copy_times(device, nbytes, reps, warmup=3)
    t = pick(ts)
    out["copy"] = {"bytes": nbytes, "median_ms": statistics.median(ts) * 1e3, "min_ms": min(ts) * 1e3,
                   "GBps": 2 * nbytes / t / 1e9, "note": f"dst.copy_(src), bytes read + written / {stat} time"}

    n = 2**26 if device.type == "cuda" else (2**22 if quick else 2**24)
    shape = (64, n // 64)
    for name, fn in (
        ("philox_mask", lambda i: diffkernels.sparse_mask(shape, 0.5, seed + i, device=device)),
        ("torch_rand", lambda i: torch.rand(shape, device=device)),
    ):
        for i in range(3):
            fn(i)
        sync(device)
        ts = [time_calls(fn, i, 1, device) for i in range(reps)]
        t = pick(ts)
        out[name] = {"elements": n, "median_ms": statistics.median(ts) * 1e3, "min_ms": min(ts) * 1e3,
                     "ns_per_element": t / n * 1e9, "stat": stat}
    out["philox_mask"]["note"] = "diffkernels.sparse_mask: Philox uniforms + compare + 1 B/element bool write"
    out["torch_rand"]["note"] = "torch.rand (float32, 4 B/element write)"
    free(device)
    return out


# --- output -------------------------------------------------------------------------------------------


def fmt_t(s) -> str:
    """A summarize() dict as "median ± IQR/2" in ms, with 1-3 decimals."""
    if s is None:
        return "n/a"
    med = s["median_ms"]
    digits = 3 if med < 1 else (2 if med < 10 else 1)
    return f"{med:.{digits}f} ± {s['iqr_ms'] / 2:.{digits}f}"


def fmt_r(r) -> str:
    """A ratio_stats() dict as "median× (q1–q3)"."""
    return "n/a" if r is None else f"{r['median']:.2f}× ({r['q1']:.2f}–{r['q3']:.2f})"


def shape_s(shape) -> str:
    return "×".join(str(s) for s in shape)


def md_table(header, rows) -> list[str]:
    """Markdown table lines: a header row, the separator, one line per row (cells str()-ed)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def write_json(path, payload) -> None:
    Path(path).write_text(json.dumps(payload, indent=1, default=str))


def write_results(out, stem: str, md: str, payload: dict, *, log_prefix: str = "[bench]", suffix_msg: str = "") -> Path:
    """Write ``<out>/<stem>.md`` and ``<out>/<stem>.json`` (creating ``out``); returns out / stem."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.md").write_text(md)
    write_json(out / f"{stem}.json", payload)
    msg = f"wrote {out / stem}.md and .json{suffix_msg}"
    print(f"{log_prefix} {msg}" if log_prefix else msg, file=sys.stderr)
    return out / stem
