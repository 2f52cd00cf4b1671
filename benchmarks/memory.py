"""Peak memory of one call, for the benchmark scripts.

CUDA: ``torch.cuda.max_memory_allocated()`` during the call minus ``memory_allocated()`` before it.
CPU: ``torch.profiler(profile_memory=True)`` records every allocation and free made through PyTorch's
CPU allocator; the peak of their running sum (in time order) is the call's peak extra memory.
"""

from __future__ import annotations

import gc
import os
import sys
import warnings

import torch

MiB = 2**20


def free(device) -> None:
    """Collect garbage and, on a GPU, return cached blocks (between rows)."""
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
    """Peak memory fn(i) allocates above what was allocated before it (see the module docstring)."""
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


def peak_extra_mib(fns: dict, device, reset, i: int = 0) -> dict:
    """{name: peak extra MiB of one call fn(i)} for each of ``fns``, ``reset()`` (dropping the gradients
    the previous call left) before and after each."""
    out = {}
    for name, fn in fns.items():
        reset()
        out[name] = peak_extra_bytes(fn, i, device) / MiB
        reset()
    return out
