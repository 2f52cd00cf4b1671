"""Tables and result files of the benchmark scripts: formatting, Markdown, JSON, and comparisons.

Every script prints a Markdown report and writes ``<out>/<stem>.md`` and ``<out>/<stem>.json`` (the
JSON holds everything the tables show, and more). The report starts with ``header``: device, date,
commit, command and versions.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from benchmarks.memory import MiB


# --- comparisons ----------------------------------------------------------------------------------


def rel_diff(a: float, b: float) -> float:
    """|a - b| / |b| (b = 0 counts as 1e-30)."""
    return abs(a - b) / max(abs(b), 1e-30)


def grad_rel_diff(g, ref) -> float:
    """max |g - ref| / max |ref|, in float32."""
    return float((g.float() - ref.float()).abs().max() / ref.float().abs().max().clamp(min=1e-30))


def err_s(exc: BaseException, limit: int = 400, first_line: bool = False) -> str:
    """An exception as one short line."""
    if first_line:
        msg = str(exc).strip()
        return f"{type(exc).__name__}: {msg.splitlines()[0] if msg else ''}"[:limit]
    return " ".join(f"{type(exc).__name__}: {exc}".split())[:limit]


# --- cells ------------------------------------------------------------------------------------------


def fmt_t(s) -> str:
    """A timing.summarize() dict as "median ± IQR/2" in ms, with 1-3 decimals."""
    if s is None:
        return "n/a"
    med = s["median_ms"]
    digits = 3 if med < 1 else (2 if med < 10 else 1)
    return f"{med:.{digits}f} ± {s['iqr_ms'] / 2:.{digits}f}"


def fmt_r(r) -> str:
    """A timing.ratio_stats() dict as "median× (q1–q3)"."""
    return "n/a" if r is None else f"{r['median']:.2f}× ({r['q1']:.2f}–{r['q3']:.2f})"


def shape_s(shape) -> str:
    return "×".join(str(s) for s in shape)


def load_cell(row: dict, limit: float | None = None) -> str:
    """"foreign / stolen" CPU cores while the row was timed, marked † above ``limit``."""
    ld, st = row.get("foreign_cores"), row.get("steal_cores")
    if ld is None:
        return ""
    return f"{ld:.2f} / {st:.2f}" + (" †" if limit is not None and ld > limit else "")


def md_table(header, rows) -> list[str]:
    """Markdown table lines: a header row, the separator, one line per row (cells str()-ed)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def header(meta: dict, title: str, software_note: str = "") -> list[str]:
    """The report's first lines: title and device, date and commit, command, versions, CPU, GPU.
    ``meta``: environment.environment(); ``software_note`` ends the versions line (e.g. the backend)."""
    L = [f"# {title} — {meta['device']}", ""]
    L.append(f"- date: {meta['date']}; commit `{meta['git_commit']}`"
             + (" (+ uncommitted changes)" if meta.get("git_dirty") else ""))
    L.append(f"- command: `{meta['command']}`")
    L.append(f"- python {meta['python']}, torch {meta['torch']}, triton {meta['triton']}, diffkernels "
             f"{meta['diffkernels']}" + (f"; {software_note}" if software_note else ""))
    cpu = meta["cpu"]
    L.append(f"- CPU: {cpu['model']}, {meta['cpu_count']} logical cores, torch threads {meta['torch_num_threads']}, "
             f"flags {' '.join(cpu['flags']) or '-'}, last-level cache {(meta['llc_bytes'] or 0) // MiB} MiB")
    if meta.get("cuda") is not None:
        L.append(f"- GPU: {meta['device']}, CUDA {meta['cuda']}, {meta['gpu_sm_count']} SMs, L2 "
                 f"{(meta.get('gpu_l2_bytes') or 0) // MiB} MiB, {(meta.get('gpu_memory_bytes') or 0) / 2**30:.0f} GiB")
    return L


# --- progress and files ----------------------------------------------------------------------------


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def log_start(meta: dict, note: str = "") -> None:
    log(f"{meta['device']}; torch {meta['torch']}; commit {meta['git_commit']}" + (f"; {note}" if note else ""))


def log_row(label: str, row: dict, t0: float, *extra: str) -> None:
    """One line per timed row: the medians, the ratios, ``extra``, the foreign load and the wall time since t0."""
    times = " ".join(f"{k}={v['median_ms']:.3f}ms" for k, v in row.get("time", {}).items())
    ratios = " ".join(f"{k}={v['median']:.2f}" for k, v in row.get("ratio", {}).items())
    parts = [times, ratios, *extra, f"load={row.get('foreign_cores')}", f"{time.perf_counter() - t0:.1f}s"]
    log(f"{label}: " + " | ".join(p for p in parts if p))


# --- files ------------------------------------------------------------------------------------------


def write_results(out, stem: str, md: str, payload: dict, *, note: str = "") -> Path:
    """Write ``<out>/<stem>.json`` then ``<out>/<stem>.md`` (creating ``out``); returns out / stem."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(payload, indent=1, default=str))
    (out / f"{stem}.md").write_text(md)
    log(f"wrote {out / stem}.md and .json{note}")
    return out / stem
