"""What a measurement ran on, and the device's ceilings, for the benchmark scripts.

``environment(device)``: date, command, commit, versions, CPU, GPU, backends. The ceilings are measured
before any op so that every table can say how far an op is from them: copy bandwidth (bytes read +
written by a large device-to-device copy), GEMM rates per dtype, and the throughput of our Philox mask
generation and of ``torch.rand``.

Imports torch only; diffkernels and triton are imported inside the functions (``bench_cuda_vs_triton.py``
sets ``TRITON_INTERPRET`` before the kernels are defined).
"""

from __future__ import annotations

import datetime
import importlib.metadata
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from benchmarks.cli import settings
from benchmarks.memory import MiB, free
from benchmarks.reporting import err_s
from benchmarks.timing import WAIT_BUDGET, sync, time_calls, timeit

REPO = Path(__file__).resolve().parent.parent
CEILING_SEED = 0x5EED_0000_1234  # the seed of the Philox mask-throughput ceiling


# --- devices ----------------------------------------------------------------------------------------


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


def optional_peer(package: str, probe, install: str | None = None) -> tuple[bool, str]:
    """(usable, note) of an optional baseline from another library: is the distribution ``package``
    installed, and does ``probe()`` (a tiny call on the device) run? The note says which, with the
    ``pip install`` command (``install``, default the package name) when it is missing."""
    try:
        version = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return False, f"{package} is not installed: skipped (pip install {install or package})"
    try:
        probe()
    except Exception as exc:  # noqa: BLE001 -- e.g. kernels that need a GPU or a compiler
        return False, f"{package} {version} is installed but cannot run here: skipped ({err_s(exc, 300)})"
    return True, f"{package} {version}"


# --- the machine and the software -------------------------------------------------------------------


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


def triton_version() -> str:
    """triton.__version__, or "unavailable (<error>)"."""
    try:
        import triton

        return triton.__version__
    except Exception as exc:  # noqa: BLE001
        return f"unavailable ({err_s(exc, 300, first_line=True)})"


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


def gpu_info(device: torch.device) -> dict:
    """name, CUDA version, SM count, L2 and memory bytes of a CUDA device."""
    props = torch.cuda.get_device_properties(device)
    return {"name": torch.cuda.get_device_name(device), "cuda": torch.version.cuda,
            "sm_count": props.multi_processor_count, "l2_bytes": getattr(props, "L2_cache_size", None),
            "memory_bytes": props.total_memory}


ENV_KEYS = ("TRITON_INTERPRET", "DIFFKERNELS_BACKEND", "OMP_NUM_THREADS", "TORCH_CUDA_ARCH_LIST")


def environment(device: torch.device, args=None) -> dict:
    """The machine and software a measurement ran on: date, command, commit, versions, CPU, GPU, backends;
    and the parsed options ``args`` (as "settings")."""
    import diffkernels

    try:
        backends = diffkernels.backends()
    except Exception as exc:  # noqa: BLE001 -- a broken build is worth a table too
        backends = {"error": err_s(exc, 300, first_line=True)}
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
        "backends": backends,
        "env": {k: os.environ[k] for k in ENV_KEYS if k in os.environ},
    }
    if device.type == "cuda":
        g = gpu_info(device)
        info.update(device=g["name"], device_kind=device_kind(g["name"]), cuda=g["cuda"],
                    gpu_memory_bytes=g["memory_bytes"], gpu_sm_count=g["sm_count"], gpu_l2_bytes=g["l2_bytes"])
    else:
        info.update(device=f"{cpu['model']} ({info['cpu_count']} cores)", device_kind="cpu")
    if args is not None:
        info["settings"] = settings(args)
    return info


def start(args) -> tuple[torch.device, dict]:
    """The start of every benchmark run: the device (``args.device``, pinned), TF32 off on CUDA (fp32 rows
    measure fp32; rows that want TF32 turn it on themselves), the run's budget for waiting for an idle
    CPU (``--max-total-wait`` where the script has it), and the environment with the settings."""
    device = pin_device(default_device(args.device))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
    WAIT_BUDGET["left_s"] = getattr(args, "max_total_wait", float("inf"))
    return device, environment(device, args)


def cache_bytes(meta: dict, device: torch.device) -> int:
    """The cache that rotating inputs must defeat: the GPU's L2, or the CPU's last-level cache."""
    if device.type == "cuda":
        return meta.get("gpu_l2_bytes") or 50 * MiB
    return meta.get("llc_bytes") or 32 * MiB


def input_copies(set_bytes: int, cache: int, rotate: bool = True) -> int:
    """How many copies of a row's inputs to rotate over so that together they exceed twice ``cache``
    (every call then reads from memory, not from a cache warmed by the previous call); at most 64."""
    return max(1, min(64, math.ceil(2 * cache / max(1, set_bytes)))) if rotate else 1


# --- ceilings -----------------------------------------------------------------------------------------


def copy_times(device, nbytes: int, reps: int, warmup: int = 3) -> list[float]:
    """Seconds of each of ``reps`` device-to-device (host: memcpy) copies of ``nbytes`` bytes."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    return timeit(lambda: dst.copy_(src), device, reps, warmup)


def copy_ceiling(device, nbytes: int, reps: int, pick=statistics.median) -> dict:
    """Copy bandwidth: bytes read + written per second at ``pick`` (median, or min on a noisy CPU) of
    ``reps`` copies of ``nbytes`` bytes."""
    ts = copy_times(device, nbytes, reps)
    return {"bytes": nbytes, "median_ms": statistics.median(ts) * 1e3, "min_ms": min(ts) * 1e3,
            "GBps": 2 * nbytes / pick(ts) / 1e9}


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


def gemm_ceilings(device, size: int, reps: int) -> dict:
    """{"<name>_TFLOPs": ...}: median rate of size^3 GEMMs per dtype (tf32 and bf16 skipped on a CPU)."""
    res = {}
    for name, dtype, tf32 in GEMM_CEILING_DTYPES:
        if device.type == "cpu" and name in ("tf32", "bf16"):
            continue
        t = statistics.median(gemm_times(device, size, size, size, dtype, reps, tf32=tf32))
        res[f"{name}_TFLOPs"] = 2 * size**3 / t / 1e12
    return res


def copy_gemm_ceilings(device, quick: bool) -> dict:
    """Copy bandwidth (GB/s, median) and GEMM rates (TFLOP/s, median; 8192³ on a GPU, 1024³ on a CPU;
    smaller with ``quick``): {"copy_GBps", "copy_bytes", "gemm_size", "<dtype>_TFLOPs"...}."""
    cuda = device.type == "cuda"
    nbytes = (2**28 if quick else 2**30) if cuda else (2**24 if quick else 2**26)
    size = (4096 if quick else 8192) if cuda else (256 if quick else 1024)
    res = {"copy_GBps": copy_ceiling(device, nbytes, 10 if cuda else 3)["GBps"], "copy_bytes": nbytes,
           "gemm_size": size}
    res.update(gemm_ceilings(device, size, 5 if cuda else 3))
    free(device)
    return res


def bandwidth_ceilings(device, quick: bool, seed: int = CEILING_SEED) -> dict:
    """Copy bandwidth, our Philox mask-generation throughput and torch.rand's.

    GPU: median of many runs. CPU (a shared VM whose noise only ever adds time): the best run.
    """
    import diffkernels

    stat = "median" if device.type == "cuda" else "best"
    pick = statistics.median if device.type == "cuda" else min
    if device.type == "cuda":
        nbytes, reps = 2**30, (10 if quick else 30)
    else:
        nbytes, reps = (2**27 if quick else 2**29), (5 if quick else 15)
    out = {"copy": {**copy_ceiling(device, nbytes, reps, pick),
                    "note": f"dst.copy_(src), bytes read + written / {stat} time"}}

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
        out[name] = {"elements": n, "median_ms": statistics.median(ts) * 1e3, "min_ms": min(ts) * 1e3,
                     "ns_per_element": pick(ts) / n * 1e9, "stat": stat}
    out["philox_mask"]["note"] = "diffkernels.sparse_mask: Philox uniforms + compare + 1 B/element bool write"
    out["torch_rand"]["note"] = "torch.rand (float32, 4 B/element write)"
    free(device)
    return out
