"""The JIT build cache of the native library: never hang, never crash, always say why it falls back.

Every scenario runs in a fresh subprocess on a temporary ``DIFFKERNELS_CACHE``. Only one test runs the
real compiler (on sources broken on purpose, so it fails within a second); elsewhere ``_compile`` is
replaced, in the subprocess, by a copy of the library this test session already built or loaded, so
the locking, checksum and publishing logic runs for real without a minute of compiling per test.
"""

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from diffkernels import _native, _native_cache, reference

PRELUDE = '''
import json, os, shutil, sys
from pathlib import Path
import torch
from diffkernels import _native, _native_cache
_native._load_prebuilt = lambda: False  # the cache is under test, not an ahead-of-time build
GOOD = {good!r}
if {fake!r}:
    def _fake_compile(name, src, build, with_cuda):
        """Stands in for the compiler: the library the test session built, under the new name."""
        if GOOD is None:
            raise AssertionError("no build should run here")
        lib = Path(build) / (name + ".so")
        shutil.copyfile(GOOD, lib)
        torch.ops.load_library(str(lib))
    _native_cache._compile = _fake_compile
if {csrc!r}:
    _native._CSRC = Path({csrc!r})
if {read_only!r}:  # a read-only file system, emulated: chmod does not stop root
    _cache = os.path.realpath(os.environ["DIFFKERNELS_CACHE"])
    _write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    def _deny_writes(event, args):
        if event in ("open", "os.mkdir", "os.rename", "os.remove", "os.rmdir", "os.chmod", "shutil.rmtree"):
            path, write = args[0], event != "open"
            if event == "open":
                mode, flags = args[1], args[2]
                write = (mode is not None and any(c in mode for c in "wax+")) or bool((flags or 0) & _write_flags)
            if write and isinstance(path, (str, bytes, os.PathLike)) and \\
                    os.path.realpath(os.fsdecode(path)).startswith(_cache):
                raise PermissionError(30, "Read-only file system", os.fsdecode(path))
    sys.addaudithook(_deny_writes)
'''

REPORT = '''
loaded = _native.load()
print(json.dumps({"loaded": loaded, "status": _native.status(), "path": _native._state["path"]}))
'''

HOLD_LOCK = '''
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(600)
'''


def lib_name() -> str:
    return _native._lib_name(_native._csrc_dir(), with_cuda=False)


def run(cache, body=REPORT, *, good=None, fake=True, csrc=None, read_only=False, timeout=90, **env):
    """Run PRELUDE + body in a fresh interpreter on the cache ``cache``; returns (result, stderr)."""
    full = {k: v for k, v in os.environ.items()
            if k not in ("DIFFKERNELS_BACKEND", "DIFFKERNELS_NO_NATIVE", "DIFFKERNELS_LOCK_TIMEOUT", "CXX")}
    full.update(DIFFKERNELS_CACHE=str(cache), DIFFKERNELS_NO_CUDA="1", OMP_NUM_THREADS="1")
    full.update(env)
    code = PRELUDE.format(good=None if good is None else str(good), fake=fake,
                          csrc=None if csrc is None else str(csrc), read_only=read_only) + body
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, timeout=timeout)
    assert out.returncode == 0, f"rc={out.returncode}\n{out.stderr}"
    return json.loads(out.stdout.strip().splitlines()[-1]), out.stderr


def our_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("diffkernels:")]


def fallback_line(stderr: str) -> str:
    """The single line that announces the fallback to the reference backend."""
    lines = [line for line in our_lines(stderr) if "the C++ kernels are unavailable" in line]
    assert len(lines) == 1, stderr
    return lines[0]


def publish(cache: Path, good: Path) -> Path:
    """Put ``good`` in ``cache`` as a finished build would leave it (library + checksum)."""
    name = lib_name()
    (cache / name).mkdir(parents=True)
    lib = cache / name / f"{name}.so"
    shutil.copyfile(good, lib)
    _native._write_checksum(lib)
    return lib


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


@pytest.fixture(scope="module")
def good():
    """A working copy of the native library: the one this test session loaded (built at most once)."""
    if not _native.load() or not _native._state["path"]:
        pytest.skip(f"the native library is unavailable here: {_native.status()}")
    return Path(_native._state["path"])


@pytest.fixture
def no_compiler_path(tmp_path):
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    return str(empty)


@pytest.fixture
def lock_holder():
    """Start processes that hold a build lock (flock); all are killed at the end."""
    procs = []

    def start(lock_path: Path) -> subprocess.Popen:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        proc = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(lock_path)], stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        assert proc.stdout.readline().strip() == "locked"
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)


@pytest.mark.timeout(180)
def test_stale_locks_of_killed_builds_do_not_block(tmp_path, good, lock_holder):
    cache = tmp_path / "cache"
    name = lib_name()
    # What torch's FileBaton leaves when its process dies mid-build (the old layout built in place) ...
    (cache / name).mkdir(parents=True)
    (cache / name / "lock").touch()
    stale = cache / f".build-{name}-killed"
    stale.mkdir()
    (stale / "lock").touch()
    # ... and our own flock, taken by a process that is then killed.
    holder = lock_holder(cache / f"{name}.lock")
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)

    body = "from diffkernels.cli import main\nmain(['backends'])\n"  # `diffkernels backends`
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-c", PRELUDE.format(good=str(good), fake=True, csrc=None, read_only=False)
                          + body], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "DIFFKERNELS_CACHE": str(cache), "DIFFKERNELS_NO_CUDA": "1",
                              "DIFFKERNELS_BACKEND": "", "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    assert time.monotonic() - start < 60
    report = json.loads(out.stdout)
    assert report["cpp"].startswith("available (JIT-compiled"), report
    assert any("compiling the C++ CPU kernels" in line for line in our_lines(out.stderr)), out.stderr
    assert not stale.exists()  # a killed build's directory is cleaned up by the next build
    assert _native._check_cached(cache / name / f"{name}.so") is None


@pytest.mark.timeout(120)
def test_a_build_lock_held_too_long_falls_back_to_the_reference(tmp_path, lock_holder):
    cache = tmp_path / "cache"
    lock_holder(cache / f"{lib_name()}.lock")  # a live process "compiling" forever
    start = time.monotonic()
    result, stderr = run(cache, good=None, DIFFKERNELS_LOCK_TIMEOUT="1")
    assert time.monotonic() - start < 30
    assert not result["loaded"]
    line = fallback_line(stderr)
    assert "build lock" in line and "DIFFKERNELS_LOCK_TIMEOUT" in line
    assert "DIFFKERNELS_LOCK_TIMEOUT" in result["status"] and result["status"].startswith("unavailable")


def test_lock_timeout_setting_is_validated(monkeypatch):
    monkeypatch.delenv("DIFFKERNELS_LOCK_TIMEOUT", raising=False)
    assert _native._lock_timeout() == _native.LOCK_TIMEOUT_S
    monkeypatch.setenv("DIFFKERNELS_LOCK_TIMEOUT", "2.5")
    assert _native._lock_timeout() == 2.5
    for bad in ("soon", "-1", "nan"):
        monkeypatch.setenv("DIFFKERNELS_LOCK_TIMEOUT", bad)
        with pytest.raises(_native.NativeUnavailable, match="DIFFKERNELS_LOCK_TIMEOUT"):
            _native._lock_timeout()


def damage(lib: Path, how: str) -> None:
    data = lib.read_bytes()
    if how == "truncated":
        lib.write_bytes(data[: len(data) // 2])
    elif how == "flipped byte":
        i = len(data) // 3
        lib.write_bytes(data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:])
    else:
        _native._checksum_path(lib).unlink()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", ["truncated", "flipped byte", "no checksum"])
def test_a_damaged_cached_library_is_rebuilt_never_loaded(tmp_path, good, how):
    cache = tmp_path / "cache"
    lib = publish(cache, good)
    damage(lib, how)
    result, stderr = run(cache, good=good)
    assert result["loaded"], stderr
    assert result["path"] == str(lib)
    line = next(line for line in our_lines(stderr) if "damaged" in line)
    assert str(lib) in line and "recompiling" in line
    assert _native._check_cached(lib) is None


@pytest.mark.timeout(120)
def test_a_damaged_library_that_cannot_be_rebuilt_falls_back(tmp_path, good, no_compiler_path):
    cache = tmp_path / "cache"
    lib = publish(cache, good)
    damage(lib, "truncated")
    result, stderr = run(cache, fake=False, PATH=no_compiler_path)
    assert not result["loaded"]
    line = fallback_line(stderr)
    assert "damaged" in line and str(lib) in line and "no C++ compiler" in line


@pytest.mark.timeout(120)
def test_a_read_only_cache_with_a_finished_build_is_loaded_without_writes(tmp_path, good):
    cache = tmp_path / "cache"
    lib = publish(cache, good)
    before = snapshot(cache)
    modes = {p: p.stat().st_mode for p in [cache, *cache.rglob("*")]}
    for p in modes:
        p.chmod(stat.S_IMODE(modes[p]) & ~0o222)
    try:
        result, stderr = run(cache, good=None, read_only=True)
    finally:
        for p, mode in modes.items():
            p.chmod(stat.S_IMODE(mode))
    assert result["loaded"], stderr
    assert result["path"] == str(lib)
    assert our_lines(stderr) == []
    assert snapshot(cache) == before


@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", ["under a file", "read-only"])
def test_an_unwritable_cache_without_a_build_falls_back(tmp_path, how):
    if how == "under a file":
        (tmp_path / "file").write_text("")
        cache = tmp_path / "file" / "cache"  # mkdir fails even for root
    else:
        cache = tmp_path / "cache"
        cache.mkdir()
    body = "from diffkernels import backends\nprint(json.dumps(backends()))\n"
    report, stderr = run(cache, body, good=None, read_only=how == "read-only")
    line = fallback_line(stderr)
    assert "not writable" in line and "DIFFKERNELS_CACHE" in line and str(cache) in line
    assert report["cpp"].startswith("unavailable") and "DIFFKERNELS_CACHE" in report["cpp"]
    assert report["default"]["cpu"] == "torch"


FALLBACK_OPS = '''
from diffkernels import backends, sparse_mse_loss
p = torch.linspace(-1, 1, 300).reshape(4, 3, 5, 5).requires_grad_()
t = torch.linspace(1, -2, 300).reshape(4, 3, 5, 5)
loss = sparse_mse_loss(p, t, 0.5, 7)
loss.backward()
print(json.dumps({"backends": backends(), "loss": loss.item(), "grad": p.grad.flatten().tolist()}))
'''


@pytest.mark.timeout(120)
@pytest.mark.parametrize("compiler", ["none on PATH", "CXX missing"])
def test_without_a_compiler_ops_fall_back_and_match_the_reference(tmp_path, no_compiler_path, compiler):
    env = {"PATH": no_compiler_path} if compiler == "none on PATH" else {"CXX": "no-such-compiler++ -O2"}
    result, stderr = run(tmp_path / "cache", FALLBACK_OPS, fake=False, **env)
    line = fallback_line(stderr)
    assert len(our_lines(stderr)) == 1, stderr
    want = ("no C++ compiler (c++) on PATH" if compiler == "none on PATH" else
            "CXX='no-such-compiler++ -O2' is not found")
    assert want in line and "install g++" in line
    assert want in result["backends"]["cpp"] and result["backends"]["default"]["cpu"] == "torch"
    p = torch.linspace(-1, 1, 300).reshape(4, 3, 5, 5).requires_grad_()
    t = torch.linspace(1, -2, 300).reshape(4, 3, 5, 5)
    expected = reference.sparse_mse_loss(p, t, 0.5, 7)  # float64 oracle
    expected.backward()
    # float32 results of float64 sums: a few ulps of float32
    torch.testing.assert_close(torch.tensor(result["loss"]), expected.detach(), rtol=1e-6, atol=0)
    torch.testing.assert_close(torch.tensor(result["grad"]).reshape(p.shape), p.grad, rtol=1e-6, atol=1e-9)


@pytest.mark.timeout(180)
def test_a_failed_build_falls_back_with_the_compiler_error(tmp_path):
    from torch.utils import cpp_extension

    if shutil.which(os.environ.get("CXX") or "c++") is None or not cpp_extension.is_ninja_available():
        pytest.skip("needs a C++ compiler and ninja")
    broken = tmp_path / "csrc"
    shutil.copytree(_native._csrc_dir(), broken)
    for f in _native.SOURCES:  # a fatal preprocessor error: the compiler stops at once
        (broken / f).write_text('#include "no_such_header_anywhere.h"\n' + (broken / f).read_text())
    cache = tmp_path / "cache"
    result, stderr = run(cache, fake=False, csrc=broken, timeout=150)
    assert not result["loaded"]
    line = fallback_line(stderr)
    assert "compiling the C++ kernels failed" in line and "no_such_header_anywhere.h" in line
    log = cache / "build_error.log"
    assert f"full output in {log}" in line and "no_such_header_anywhere.h" in log.read_text()
    assert [p.name for p in cache.iterdir() if p.is_dir()] == []  # no half-built directory left behind


@pytest.mark.timeout(120)
def test_identical_sources_anywhere_share_one_build(tmp_path, good, monkeypatch):
    here = _native._csrc_dir()
    other = tmp_path / "other-checkout" / "csrc"
    shutil.copytree(here, other)
    for f in other.iterdir():  # a fresh clone: new paths, new mtimes
        os.utime(f, (time.time() + 3600, time.time() + 3600))
    assert _native._build_key(other, False) == _native._build_key(here, False)
    cache = tmp_path / "cache"
    lib = publish(cache, good)
    result, stderr = run(cache, good=None, csrc=other)  # would raise if it compiled
    assert result["loaded"] and result["path"] == str(lib)
    assert our_lines(stderr) == []
    # ... while any change to what is compiled makes a new key.
    changed = tmp_path / "changed"
    shutil.copytree(here, changed)
    (changed / _native.HEADERS[0]).write_text((changed / _native.HEADERS[0]).read_text() + "\n// changed\n")
    assert _native._build_key(changed, False) != _native._build_key(here, False)
    key = _native._build_key(here, False)
    monkeypatch.setattr(_native_cache, "_cflags", lambda: ["-O2"])
    assert _native._build_key(here, False) != key


def test_this_sessions_build_is_published_with_its_checksum():
    if not _native.load() or not str(_native._state["how"]).startswith("JIT"):
        pytest.skip(f"not JIT-built here: {_native.status()}")
    lib = Path(_native._state["path"])
    assert lib.parent.name == lib.stem == lib_name() and lib.parent.parent == _native.cache_dir()
    assert _native._check_cached(lib) is None
