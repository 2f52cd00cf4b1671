"""Timing for the benchmark scripts: clocks, warm-up, interleaved rounds, summaries, and waiting for a quiet CPU.

CUDA events on a GPU, ``time.perf_counter`` on a CPU. ``measure`` warms every method up, then times
them round by round in rotating order, so that machine noise hits all of them alike; on a shared CPU
``measure_quietly`` repeats a measurement (after waiting for other processes to go idle) when they
interfered. ``Timer`` times eager calls and CUDA-graph replays (kernel time without host overhead).

Imports torch only (never diffkernels or triton: ``bench_cuda_vs_triton.py`` sets ``TRITON_INTERPRET``
before the kernels are defined).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import torch

LOAD_LIMIT = 0.25  # cores used by other processes above which a CPU measurement is repeated
WAIT_BUDGET = {"left_s": float("inf")}  # total waiting allowed in one run (--max-total-wait)


# --- clocks ---------------------------------------------------------------------------------------


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


def median_ms(fn, device, reps: int, warmup: int = 1) -> float:
    """Median milliseconds of ``reps`` calls fn() after ``warmup`` untimed ones."""
    return statistics.median(timeit(fn, device, reps, warmup)) * 1e3


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


# --- summaries ------------------------------------------------------------------------------------


def quartiles(xs):
    xs = sorted(xs)
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]
    q1, q2, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return q1, q2, q3


def summarize(samples_s) -> dict:
    """Median, quartiles, IQR and minimum of per-call times (seconds in, milliseconds out)."""
    q1, med, q3 = quartiles(samples_s)
    return {"median_ms": med * 1e3, "q1_ms": q1 * 1e3, "q3_ms": q3 * 1e3, "iqr_ms": (q3 - q1) * 1e3,
            "min_ms": min(samples_s) * 1e3, "n_samples": len(samples_s)}


def ratio_stats(num, den) -> dict:
    """Median and quartiles of the per-round ratios num[r] / den[r]."""
    rs = [a / b for a, b in zip(num, den)]
    q1, med, q3 = quartiles(rs)
    return {"median": med, "q1": q1, "q3": q3}


def record(row: dict, res: dict, ratios, keep_samples: bool = False) -> None:
    """Store a ``measure`` result in ``row``: "time" (``summarize`` per method), "ratio" (``ratio_stats``
    of each (numerator, denominator) pair, keyed "num/den"), the rounds and the load; with
    ``keep_samples`` every sample in ms."""
    s = res["samples"]
    row["time"] = {n: summarize(v) for n, v in s.items()}
    row["ratio"] = {f"{a}/{b}": ratio_stats(s[a], s[b]) for a, b in ratios if a in s and b in s}
    row.update({k: res.get(k) for k in ("rounds", "attempts", "calls_per_sample", "foreign_cores", "steal_cores")})
    if keep_samples:
        row["samples_ms"] = {n: [round(x * 1e3, 5) for x in v] for n, v in s.items()}


# --- a shared CPU -----------------------------------------------------------------------------------


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


def wait_if_busy(device, idle_wait: float) -> float:
    """On a CPU with ``idle_wait`` > 0: wait_for_idle, rounded seconds waited; else 0."""
    if device.type != "cpu" or idle_wait <= 0:
        return 0.0
    return round(wait_for_idle(idle_wait, LOAD_LIMIT), 1)


# --- interleaved measurement ------------------------------------------------------------------------


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


def measure_quietly(fns, device, args, budget_s: float, min_reps: int) -> dict:
    """measure(), repeated (after waiting for the machine to go idle) when other processes interfered;
    the attempt with the least foreign load is returned. ``args``: the options of add_timing_options."""
    best = None
    for attempt in range(1 + args.retries):
        res = measure(fns, device, budget_s=budget_s, min_reps=min_reps, max_reps=args.max_reps,
                      min_sample_s=args.min_sample, warmup_s=args.warmup)
        res["attempts"] = attempt + 1
        if best is None or (res["foreign_cores"] or 0) < (best["foreign_cores"] or 0):
            best = res
        if device.type != "cpu" or (res["foreign_cores"] or 0) <= LOAD_LIMIT or attempt == args.retries:
            break
        print(f"[bench]   other processes used {res['foreign_cores']:.2f} cores; measuring again", file=sys.stderr)
        wait_for_idle(args.idle_wait, LOAD_LIMIT)
    return best


def add_timing_options(ap: argparse.ArgumentParser, *, max_reps: int = 400) -> None:
    """The options of ``measure_quietly`` (defaults: ``timing_defaults``)."""
    ap.add_argument("--max-reps", type=int, default=max_reps)
    ap.add_argument("--min-sample", type=float, default=None, help="seconds per timed sample (calls are batched)")
    ap.add_argument("--warmup", type=float, default=None, help="seconds of warm-up per method")
    ap.add_argument("--idle-wait", type=float, default=None,
                    help="CPU only: wait up to this many seconds per row for other processes to go idle")
    ap.add_argument("--max-total-wait", type=float, default=None,
                    help="CPU only: total seconds the run may spend waiting for an idle machine")
    ap.add_argument("--retries", type=int, default=None,
                    help="CPU only: repeat a measurement up to this many times when other processes interfered")
    ap.add_argument("--keep-samples", action="store_true", help="store every timing sample in the JSON")


def benchmark_disabled(config) -> bool:
    """Whether pytest runs with ``--benchmark-disable`` (the pytest suites then run each case once, on small shapes)."""
    return bool(config.getoption("benchmark_disable", default=False))


def timing_defaults(quick: bool, cpu: bool) -> dict:
    """Defaults of add_timing_options' options: on a CPU wait for other processes to go idle and retry."""
    return dict(min_sample=2e-3 if cpu else 1e-3, warmup=0.1 if quick else 0.3,
                idle_wait=(15.0 if quick else 60.0) if cpu else 0.0,
                retries=(1 if quick else 2) if cpu else 0,
                max_total_wait=(120.0 if quick else 1200.0) if cpu else 0.0)


# --- eager calls and CUDA graphs --------------------------------------------------------------------


class Timer:
    """Median time of one call, eager (CUDA events around each call) or inside a CUDA graph."""

    def __init__(self, device: torch.device, runs: int, warmup: int):
        self.device, self.runs, self.warmup = device, runs, warmup
        self.cuda = device.type == "cuda"

    def sync(self):
        sync(self.device)

    def _median_events(self, fn) -> float:
        """Median seconds of fn() over self.runs runs, CUDA events around each."""
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(self.runs)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(self.runs)]
        for r in range(self.runs):
            starts[r].record()
            fn(r)
            ends[r].record()
        self.sync()
        return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)) / 1e3

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
        return self._median_events(lambda r: fn(r % k))

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
        t = self._median_events(lambda _r: graph.replay()) / k
        del graph
        return t
