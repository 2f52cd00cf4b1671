"""Backend selection, forced backends, and running without the native extension."""

import json
import os
import subprocess
import sys

import pytest
import torch

import diffkernels as dk
from diffkernels import _backend, reference

# Every test here may start a fresh interpreter that loads (or, on a fresh cache, builds) the native
# library: a hang in that path must fail the test, not stall CI.
pytestmark = pytest.mark.timeout(600)


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=300)


def test_backends_report_lists_every_backend():
    report = dk.backends()
    for name in ("triton", "cuda", "cpp", "torch"):
        assert isinstance(report[name], str) and report[name]
    assert report["default"]["cpu"] in ("cpp", "torch")


def test_use_backend_forces_and_restores():
    before = _backend.select(torch.device("cpu"))
    with dk.use_backend("torch"):
        assert _backend.select(torch.device("cpu")) == "torch"
    assert _backend.select(torch.device("cpu")) == before
    with pytest.raises(ValueError, match="unknown backend"):
        with dk.use_backend("fortran"):
            pass


def test_impossible_forced_backend_is_an_error():
    with dk.use_backend("cuda"):
        with pytest.raises(RuntimeError, match="backend 'cuda' was requested"):
            dk.sparse_mse_loss(torch.randn(2, 3), torch.randn(2, 3), 0.5, 1)


def test_env_variable_forces_backend_and_rejects_unknown_names():
    code = "import torch, diffkernels as dk; print(dk.sparse_mse_loss(torch.ones(2, 3), torch.zeros(2, 3), 0.0, 1).item())"
    ok = run_python(code, DIFFKERNELS_BACKEND="torch")
    assert ok.returncode == 0 and float(ok.stdout.strip()) == 1.0
    bad = run_python(code, DIFFKERNELS_BACKEND="fortran")
    assert bad.returncode != 0 and "DIFFKERNELS_BACKEND='fortran'" in bad.stderr
    no_interp = run_python(code, DIFFKERNELS_BACKEND="triton", TRITON_INTERPRET="0", CUDA_VISIBLE_DEVICES="")
    assert no_interp.returncode != 0 and "backend 'triton' was requested" in no_interp.stderr


def test_without_native_code_the_reference_backend_runs():
    code = (
        "import json, torch, diffkernels as dk\n"
        "p = torch.linspace(-1, 1, 300).reshape(4, 3, 5, 5).requires_grad_()\n"
        "loss = dk.sparse_mse_loss(p, torch.zeros_like(p), 0.5, 3)\n"
        "loss.backward()\n"
        "print(json.dumps({'backends': dk.backends(), 'loss': loss.item()}))\n"
    )
    out = run_python(code, DIFFKERNELS_NO_NATIVE="1", DIFFKERNELS_BACKEND="")
    assert out.returncode == 0, out.stderr
    assert "diffkernels:" not in out.stderr  # asked for: no fallback message
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert "DIFFKERNELS_NO_NATIVE" in result["backends"]["cpp"]
    assert result["backends"]["default"]["cpu"] == "torch"
    p = torch.linspace(-1, 1, 300).reshape(4, 3, 5, 5)
    expected = reference.sparse_mse_loss(p, torch.zeros_like(p), 0.5, 3)
    assert abs(result["loss"] - expected.item()) <= 1e-6 * expected.item()


def test_cli_backends_command():
    out = subprocess.run([sys.executable, "-m", "diffkernels", "backends"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "default" in json.loads(out.stdout)


def test_backends_report_says_why_the_cpp_kernels_are_missing(tmp_path):
    """No compiler and an empty cache: `diffkernels backends` still answers, with the reason."""
    (tmp_path / "bin").mkdir()
    code = ("from diffkernels import _native\n"
            "_native._load_prebuilt = lambda: False  # as on an installation without a setup.py build\n"
            "from diffkernels.cli import main\n"
            "main(['backends'])\n")
    env = {k: v for k, v in os.environ.items() if k not in ("CXX", "DIFFKERNELS_BACKEND", "DIFFKERNELS_NO_NATIVE")}
    env.update(PATH=str(tmp_path / "bin"), DIFFKERNELS_CACHE=str(tmp_path / "cache"), DIFFKERNELS_NO_CUDA="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["cpp"].startswith("unavailable: no C++ compiler") and "install g++" in report["cpp"]
    assert report["default"]["cpu"] == "torch"
    lines = [line for line in out.stderr.splitlines() if line.startswith("diffkernels:")]
    assert len(lines) == 1 and report["cpp"].removeprefix("unavailable: ") in lines[0]


def test_backend_table_covers_every_primitive():
    """Each primitive of the Kernels protocol has an implementation on every backend, and each one
    available here resolves; masked_ce_rows has no C++ kernel: cpp runs the reference."""
    from diffkernels.ops import _kernels
    from diffkernels.reference import masked_ce

    primitives = {name for name in vars(_kernels.Kernels) if not name.startswith("_")}
    assert primitives == set(_kernels.TABLE)
    for primitive, where in _kernels.TABLE.items():
        assert set(where) == set(_backend.BACKENDS), primitive
    for name in _backend.BACKENDS:
        if _backend.unavailable(name, torch.device("cuda" if name == "cuda" else "cpu")) is None:
            for primitive in primitives:
                assert callable(getattr(_kernels.kernels_for(name), primitive)), (name, primitive)
    assert _kernels.kernels_for("torch").masked_ce_rows is masked_ce.masked_ce_rows
    assert _kernels.kernels_for("cpp").masked_ce_rows is masked_ce.masked_ce_rows
    with pytest.raises(ValueError, match="unknown backend"):
        _kernels.kernels_for("fortran")


def test_masked_ce_follows_the_forced_backend():
    """A forced backend that cannot run on the tensors is an error for the masked cross-entropy too
    (it used to fall back to plain PyTorch silently)."""
    targets, coef = torch.tensor([1, 2]), torch.ones(2)
    with dk.use_backend("cuda"), pytest.raises(RuntimeError, match="backend 'cuda' was requested"):
        dk.mdm.masked_cross_entropy(targets, coef, logits=torch.randn(2, 5))
    with dk.use_backend("torch"):
        assert torch.isfinite(dk.mdm.masked_cross_entropy(targets, coef, logits=torch.randn(2, 5)))
