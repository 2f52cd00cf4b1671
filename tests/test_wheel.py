"""Which prebuilt library (setup.py's ``_C*.so``, as a wheel carries it) is loaded, and which is refused.

Each test lays out a package directory as an installed wheel has it (the library, its build record
``_build_info.json``, the sources in ``csrc/``) and calls ``_native._load_prebuilt`` on it, with
``torch.ops.load_library`` replaced by a recorder: the decision is under test, not ``dlopen`` (a
real wheel is built, installed and run without a compiler by .ci/wheel_smoke.sh).
"""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from diffkernels import _build_record, _native

REPO_CSRC = Path(__file__).resolve().parent.parent / "csrc"
LIB = "_C.cpython-311-x86_64-linux-gnu.so"


@pytest.fixture
def wheel(tmp_path, monkeypatch):
    """A fake installed package: (its directory, the list of libraries torch was asked to load)."""
    pkg = tmp_path / "site-packages" / "diffkernels"
    (pkg / "csrc").mkdir(parents=True)
    (pkg / LIB).write_bytes(b"not a real library")
    # pip writes the files in the wheel's order: the sources land after the library, so they are newer.
    for f in REPO_CSRC.iterdir():
        if f.suffix in _build_record.SOURCE_SUFFIXES:
            shutil.copyfile(f, pkg / "csrc" / f.name)
    lib_time = os.stat(pkg / LIB).st_mtime
    for f in (pkg / "csrc").iterdir():
        os.utime(f, (lib_time + 1, lib_time + 1))
    write_record(pkg)
    loaded = []
    monkeypatch.setattr(torch.ops, "load_library", lambda path: loaded.append(path))
    monkeypatch.setattr(_native, "_PREBUILT_DIR", pkg)
    monkeypatch.setattr(_native, "_CSRC", tmp_path / "no-checkout" / "csrc")
    monkeypatch.setattr(_native, "_PACKAGED_CSRC", pkg / "csrc")
    monkeypatch.setattr(_native, "_state", dict(_native._state, path=None, how=None, prebuilt_refused=None))
    monkeypatch.setenv("DIFFKERNELS_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("DIFFKERNELS_NO_CUDA", raising=False)
    return pkg, loaded


def write_record(pkg: Path, **changes) -> None:
    """The record setup.py writes for a build against the running torch, with ``changes`` applied."""
    record = {**_build_record.identity(), "torch_git": torch.version.git_version, "library": LIB,
              "cuda_kernels": False, "sources_sha256": _build_record.sources_digest(REPO_CSRC)}
    record.update(changes)
    (pkg / _build_record.RECORD).write_text(json.dumps(record))


def test_a_wheel_built_for_this_torch_is_loaded_though_its_sources_are_newer(wheel, capsys):
    # The installed sources' times say nothing (pip sets them): the record's sources hash decides.
    pkg, loaded = wheel
    assert _native._load_prebuilt()
    assert loaded == [str(pkg / LIB)]
    assert _native._state["how"] == f"prebuilt by setup.py for torch {torch.__version__}: {pkg / LIB}"
    assert capsys.readouterr().err == ""


def test_a_wheel_built_for_another_torch_is_refused_in_one_line(wheel, capsys):
    pkg, loaded = wheel
    write_record(pkg, torch="2.0.1+cpu")
    assert not _native._load_prebuilt()
    assert loaded == []
    assert capsys.readouterr().err == (
        f"diffkernels: the prebuilt kernels were built for torch 2.0.1+cpu, this is torch {torch.__version__}; "
        "compiling them for this torch\n")
    assert _native._state["prebuilt_refused"].startswith("the prebuilt kernels were built for torch 2.0.1+cpu")


@pytest.mark.parametrize("field, value, words", [
    ("cxx11_abi", not _build_record.identity()["cxx11_abi"], "C++11 ABI"),
    ("cuda", "12.1" if torch.version.cuda != "12.1" else "11.8", "CUDA"),
    ("python", "cpython-39", "Python cpython-39"),
])
def test_the_same_torch_version_built_otherwise_is_refused(wheel, capsys, field, value, words):
    pkg, loaded = wheel
    write_record(pkg, **{field: value})
    assert not _native._load_prebuilt()
    assert loaded == []
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err and f"torch {torch.__version__} (" in err


def test_no_message_when_the_build_for_this_torch_is_already_cached(wheel, capsys):
    # After the first JIT build, refusing the prebuilt library again compiles nothing: nothing to say.
    pkg, loaded = wheel
    write_record(pkg, torch="2.0.1+cpu")
    name = _native._lib_name(pkg / "csrc", with_cuda=_native.cuda_build_unavailable() is None)
    cached = _native.cache_dir() / name / f"{name}.so"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"a library")
    _native._write_checksum(cached)
    assert not _native._load_prebuilt()
    assert loaded == [] and capsys.readouterr().err == ""
    assert "2.0.1+cpu" in _native._state["prebuilt_refused"]


def test_an_in_place_build_of_other_sources_is_ignored_silently(wheel, capsys):
    # The editable install after an edit of csrc/: the JIT build compiles the edited sources.
    pkg, loaded = wheel
    with open(pkg / "csrc" / "sparse_mse.cpp", "a") as f:
        f.write("\n// edited\n")
    assert not _native._load_prebuilt()
    assert loaded == [] and capsys.readouterr().err == ""
    assert _native._state["prebuilt_refused"] is None


def test_a_library_without_a_record_is_never_loaded(wheel, capsys):
    pkg, loaded = wheel
    (pkg / _build_record.RECORD).unlink()
    assert not _native._load_prebuilt()
    assert loaded == [] and capsys.readouterr().err == ""


@pytest.mark.parametrize("damage, words", [
    (lambda pkg: (pkg / _build_record.RECORD).write_text("{not json"), "is unreadable"),
    (lambda pkg: (pkg / LIB).unlink(), "is missing"),
])
def test_a_damaged_build_is_refused_with_the_reason(wheel, capsys, damage, words):
    pkg, loaded = wheel
    damage(pkg)
    assert not _native._load_prebuilt()
    assert loaded == []
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err and err.endswith("; compiling them for this torch\n")


def test_a_prebuilt_library_that_does_not_load_falls_back(wheel, monkeypatch, capsys):
    pkg, _ = wheel

    def fail(path):
        raise OSError(f"{path}: undefined symbol: _ZN3c10")

    monkeypatch.setattr(torch.ops, "load_library", fail)
    assert not _native._load_prebuilt()
    assert "does not load" in capsys.readouterr().err


def test_the_status_says_why_the_prebuilt_library_was_passed_over(wheel, monkeypatch, capsys):
    pkg, _ = wheel
    write_record(pkg, torch="2.0.1+cpu")
    monkeypatch.setattr(_native, "_build", lambda: "JIT-compiled, cached in /somewhere")
    monkeypatch.setattr(_native, "_has_cuda_kernels", lambda: False)
    monkeypatch.setattr(_native, "_state", dict(_native._state, loaded=False, error=None))
    assert _native.load()
    assert _native.status() == ("available (JIT-compiled, cached in /somewhere (the prebuilt library was passed "
                                f"over: the prebuilt kernels were built for torch 2.0.1+cpu, this is torch "
                                f"{torch.__version__}))")


def test_sources_digest_follows_contents_and_names_not_times(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        d.mkdir()
        (d / "k.cpp").write_text("int x;")
        (d / "notes.txt").write_text("not a source")
    os.utime(b / "k.cpp", (1, 1))
    (b / "notes.txt").write_text("other notes")
    assert _build_record.sources_digest(a) == _build_record.sources_digest(b)
    (b / "k.cpp").write_text("int y;")
    assert _build_record.sources_digest(a) != _build_record.sources_digest(b)
    (b / "k.cpp").rename(b / "k2.cpp")
    (b / "k2.cpp").write_text("int x;")
    assert _build_record.sources_digest(a) != _build_record.sources_digest(b)
