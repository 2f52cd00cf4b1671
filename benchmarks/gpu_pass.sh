#!/usr/bin/env bash
# The GPU verification pass, in one command:
#     bash benchmarks/gpu_pass.sh OUTDIR
# 1. installs the package in place against this machine's torch (no deps, no build isolation);
# 2. runs the whole test suite on CUDA tensors, then compute-sanitizer over the kernels;
# 3. measures the device's ceilings and benchmarks every op (bench_*.py; bench_end_to_end.py times whole
#    training steps of a diffusers UNet and a transformers Llama and the CIFAR-10-sized optimal-loss curve;
#    the other modules of benchmarks/ are the scripts' shared helpers, not benchmarks);
# 4. writes everything (logs, JSON + Markdown tables, versions, commit, date) to OUTDIR.
# Every step runs even if an earlier one fails; the exit code says whether all passed.
# GPU_PASS_SKIP="tests sanitizer" skips steps by name (to spend a short lease on what changed);
# GPU_PASS_BENCH_ARGS passes extra arguments to every bench_*.py; GPU_PASS_TESTS replaces the test
# selection (default: the whole suite); GPU_PASS_STEP_TIMEOUT caps each step (seconds, 0 = none);
# GPU_PASS_BENCHES="bench_end_to_end bench_mdm" runs only those benchmarks (default: every bench_*.py).
set -uo pipefail
OUT=${1:?usage: bash benchmarks/gpu_pass.sh OUTDIR}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
status=0
step() {  # step NAME COMMAND...: run, log to OUTDIR/NAME.log, remember failures
  local name=$1; shift
  case " ${GPU_PASS_SKIP:-} " in *" $name "*) echo "== $name: skipped (GPU_PASS_SKIP)"; return;; esac
  echo "== $name: $*"
  local t0=$SECONDS
  if timeout "${GPU_PASS_STEP_TIMEOUT:-0}" "$@" >"$OUT/$name.log" 2>&1; then echo "   ok ($((SECONDS - t0)) s)"; else echo "   FAILED ($((SECONDS - t0)) s), see $OUT/$name.log"; tail -n 30 "$OUT/$name.log"; status=1; fi
}

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "commit: ${DIFFKERNELS_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null
  python -c "import sys, torch; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  python -c "import triton; print('triton', triton.__version__)" 2>/dev/null || echo "triton: not installed"
  nvcc --version 2>/dev/null | tail -n 1
} | tee "$OUT/environment.txt"

# `python -m pip`: a bare `pip` may belong to another interpreter than the one that has torch.
step install python -m pip install --no-deps --no-build-isolation -e .
# The scripts below run from other directories too: make the checkout importable whatever pip did.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
step backends python -m diffkernels backends
# shellcheck disable=SC2086  # GPU_PASS_TESTS is a list of paths / pytest options
step tests python -m pytest ${GPU_PASS_TESTS:-tests} -q -rs --durations=15 --junitxml="$OUT/tests.xml"
if command -v compute-sanitizer >/dev/null; then
  step sanitizer compute-sanitizer --tool memcheck --error-exitcode 1 python benchmarks/sanitize_kernels.py
else
  echo "compute-sanitizer not found: skipped" | tee "$OUT/sanitizer.log"
fi
for bench in benchmarks/bench_*.py; do
  if [ -n "${GPU_PASS_BENCHES:-}" ]; then
    case " $GPU_PASS_BENCHES " in *" $(basename "$bench" .py) "*) ;; *) continue;; esac
  fi
  step "$(basename "$bench" .py)" python "$bench" --out "$OUT" ${GPU_PASS_BENCH_ARGS:-}
done
cat "$OUT"/*.md 2>/dev/null | tail -n 80
exit $status
