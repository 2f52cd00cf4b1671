#!/usr/bin/env bash
# The wheel on a machine without a compiler: build it against the installed torch
# (`python -m build --wheel --no-isolation`), install it in a fresh virtual environment that sees
# neither this checkout nor its editable install, and run its prebuilt C++ kernels there with no
# compiler on PATH and an empty kernel cache: the prebuilt library must load and agree with the
# plain-PyTorch reference. Exits non-zero on any failure. About a minute on 2 cores.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
start=$SECONDS
say() { echo "wheel_smoke: $* ($((SECONDS - start)) s)"; }
fail() { echo "wheel_smoke: FAILED: $1" >&2; [ -f "${2:-}" ] && tail -n 40 "$2" >&2; exit 1; }

python -m pip install --quiet build wheel >"$work/pip.log" 2>&1 || fail "pip install build wheel" "$work/pip.log"
torch_version="$(python -c 'import torch; print(torch.__version__.split("+")[0])')"

# 1. The wheel, built from a copy of the checkout's files (a stale build/ must not leak into it),
#    in the background while the environment is made.
mkdir "$work/src"
(cd "$repo" && git ls-files -z --cached --others --exclude-standard |
    tar --null --ignore-failed-read -T - -cf - 2>/dev/null) | tar -xf - -C "$work/src"
(cd "$work/src" && python -m build --wheel --no-isolation -o "$work/dist") >"$work/build.log" 2>&1 &
build_pid=$!

# 2. A plain virtual environment (not --system-site-packages: it would see the editable install)
#    with the same torch release.
python -m venv "$work/venv"
venv_python="$work/venv/bin/python"
"$venv_python" -m pip install --quiet --no-compile "torch==$torch_version" >"$work/venv.log" 2>&1 ||
    fail "pip install torch==$torch_version in the venv" "$work/venv.log"
wait "$build_pid" || fail "python -m build --wheel --no-isolation" "$work/build.log"
wheels=("$work"/dist/*.whl)
[ "${#wheels[@]}" -eq 1 ] || fail "expected one wheel, found: ${wheels[*]}"
say "built $(basename "${wheels[0]}")"
"$venv_python" -m pip install --quiet --no-compile "${wheels[0]}" >>"$work/venv.log" 2>&1 ||
    fail "pip install the wheel" "$work/venv.log"

# 3. Run it from outside the checkout, in a clean environment: no compiler (PATH is the venv's bin
#    only, no CXX), no DIFFKERNELS_* settings, an empty kernel cache.
mkdir "$work/run" "$work/cache"
cat >"$work/run/smoke.py" <<'EOF'
import os
import shutil
import sys

import torch

compilers = [c for c in ("c++", "g++", "gcc", "cc", "clang++") if shutil.which(c)]
assert not compilers and "CXX" not in os.environ, f"a compiler is visible: {compilers}"
import diffkernels
from diffkernels.mdm import mask_tokens
from diffkernels.reference import sparse_mse_loss as ref_sparse_mse_loss
from diffkernels.reference.mask_tokens import mask_tokens as ref_mask_tokens

assert diffkernels.__file__.startswith(sys.prefix), f"diffkernels imported from {diffkernels.__file__}"
cpp = diffkernels.backends()["cpp"]
print(f"wheel_smoke: torch {torch.__version__}; cpp: {cpp}")
assert cpp.startswith("available (prebuilt by setup.py"), cpp
assert not os.listdir(os.environ["DIFFKERNELS_CACHE"]), "something was compiled into the cache"

g = torch.Generator().manual_seed(0)
pred = torch.randn(4, 3, 16, 16, generator=g, requires_grad=True)
target = torch.randn(4, 3, 16, 16, generator=g)
with diffkernels.use_backend("cpp"):
    loss = diffkernels.sparse_mse_loss(pred, target, 0.75, 1234)
    loss.backward()
pred64 = pred.detach().double().requires_grad_()
want = ref_sparse_mse_loss(pred64, target.double(), 0.75, 1234)
want.backward()
# float32 sums of ~800 terms against float64: a few ulps of float32, relatively.
torch.testing.assert_close(loss.double(), want.detach(), rtol=1e-5, atol=0)
torch.testing.assert_close(pred.grad.double(), pred64.grad, rtol=1e-5, atol=1e-9)

ids = torch.randint(0, 1000, (8, 64), generator=g)
p = torch.rand(8, generator=g)
with diffkernels.use_backend("cpp"):
    got = mask_tokens(ids, p, 99, mask_id=1000)
noisy, masked, weight = ref_mask_tokens(ids, p, 99, mask_id=1000)
assert torch.equal(got.noisy_ids, noisy[0]) and torch.equal(got.masked, masked[0]), "mask_tokens differs"
assert torch.equal(got.weights, weight[0]), "mask_tokens' weights differ"
print("wheel_smoke: sparse_mse_loss and mask_tokens on the prebuilt C++ kernels agree with the reference")
EOF
(cd "$work/run" && env -i HOME="$HOME" LANG=C.UTF-8 PATH="$work/venv/bin" DIFFKERNELS_CACHE="$work/cache" \
    OMP_NUM_THREADS=1 "$venv_python" smoke.py) || fail "the smoke test in the fresh environment"
say "passed; the wheel carries: $(python -c 'import sys, zipfile; print(" ".join(n for n in zipfile.ZipFile(sys.argv[1]).namelist() if "/_C." in n or "_build_info" in n or "/csrc/" in n))' "${wheels[0]}")"
