"""The ``diffkernels`` command line: help, and bad input as one-line errors before any work.

Every bad-input case runs in-process and checks: exit code 2, exactly one line on stderr of the form
``diffkernels <command>: error: ...`` naming the culprit, and that nothing was started or created
(the command's work function is replaced by one that fails the test if it is reached).
"""

import argparse
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import diffkernels
from diffkernels import cli
from diffkernels.cli import build_parser, main

pytestmark = pytest.mark.usefixtures("one_thread")


def _no_work(*args, **kwargs):
    raise AssertionError("the command started its work despite bad input")


@pytest.fixture
def guarded(monkeypatch, tmp_path):
    """Work functions that fail if reached, and a data file; runs in tmp_path."""
    import diffkernels.demo  # noqa: F401
    import diffkernels.optimal_loss.estimators  # noqa: F401
    import diffkernels.optimal_loss.memorization  # noqa: F401

    # By module: the package re-exports a function under the name of its module `memorization`.
    monkeypatch.setattr(sys.modules["diffkernels.demo"], "run_demo", _no_work)
    monkeypatch.setattr(sys.modules["diffkernels.optimal_loss.estimators"], "estimate_curve", _no_work)
    monkeypatch.setattr(sys.modules["diffkernels.optimal_loss.memorization"], "memorization", _no_work)
    monkeypatch.chdir(tmp_path)
    np.save(tmp_path / "d.npy", np.random.default_rng(0).standard_normal((20, 3)))
    np.save(tmp_path / "d2.npy", np.random.default_rng(1).standard_normal((20, 2)))
    (tmp_path / "afile").write_text("not a folder")
    (tmp_path / "taken.csv").mkdir()
    return tmp_path


def _one_line_error(capsys, argv, command):
    before = set(os.listdir("."))
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"diffkernels {command}: error: "), err
    assert "Traceback" not in captured.err and captured.out == ""
    assert set(os.listdir(".")) == before, "bad input created files or folders"
    return err


OL = ["optimal-loss", "d.npy", "--out", "res/curve"]
MEM = ["memorization", "d.npy", "d.npy"]
BAD = [
    # (argv, text the error must contain)
    (OL + ["--out", "afile/x"], "afile exists and is not a directory"),
    (OL + ["--out", ""], "--out is empty"),
    (OL + ["--out", "taken"], "taken.csv is a directory"),
    (OL + ["--device", "tpu"], "unknown device 'tpu'"),
    (OL + ["--device", "meta"], "'meta' is not supported"),
    (OL + ["--num-sigmas", "0"], "--num-sigmas"),
    (OL + ["--num-sigmas", "-4"], "--num-sigmas"),
    (OL + ["--num-sigmas", str(10**9)], "--num-sigmas"),
    (OL + ["--num-sigmas", "2.5"], "--num-sigmas"),
    (OL + ["--queries", "0"], "--queries"),
    (OL + ["--queries", str(10**15)], "--queries"),
    (OL + ["--sigma-min", "0"], "--sigma-min"),
    (OL + ["--sigma-min", "-1"], "--sigma-min"),
    (OL + ["--sigma-max", "inf"], "--sigma-max"),
    (OL + ["--sigma-max", "nan"], "--sigma-max"),
    (OL + ["--sigma-min", "1e-320"], "--sigma-min"),  # s^2 underflows: J* would come out NaN
    (OL + ["--sigma-max", "1e160"], "--sigma-max"),  # s^2 overflows: likewise
    (OL + ["--sigma-min", "3", "--sigma-max", "2"], "--sigma-min <= --sigma-max"),
    (OL + ["--batch-size", "0"], "--batch-size"),
    (OL + ["--seed", "-1"], "--seed"),
    (OL + ["--subset", "5"], "--subset applies only"),
    (OL + ["--estimator", "dol"], "needs --subset"),
    (OL + ["--estimator", "dol", "--subset", "0"], "--subset"),
    (OL + ["--estimator", "snis", "--subset", "21"], "larger than the number of data rows N = 20"),
    (OL + ["--C", "3"], "--C applies only"),
    (OL + ["--estimator", "cdol", "--subset", "4", "--C", "-2"], "--C"),
    (OL + ["--estimator", "bogus"], "--estimator"),
    (OL + ["--bogus-option"], "unrecognized arguments: --bogus-option"),
    (["optimal-loss", "digits", "--key", "x", "--out", "o"], "--key does not apply"),
    (["optimal-loss", "missing.npy", "--out", "o"], "missing.npy: no such file"),
    (["optimal-loss", "afile", "--out", "o"], "unknown file type"),
    (["optimal-loss"], "DATA"),
    (MEM + ["--threshold", "0"], "--threshold"),
    (MEM + ["--threshold", "1.5"], "--threshold"),
    (MEM + ["--threshold", "nan"], "--threshold"),
    (MEM + ["--device", "tpu"], "--device"),
    (MEM + ["--per-sample"], "--per-sample needs --json"),
    (["memorization", "digits", "d.npy", "--samples-key", "a"], "--samples-key does not apply"),
    (["memorization", "d.npy", "missing.npy"], "missing.npy: no such file"),
    (["demo", "--steps", "0"], "--steps"),
    (["demo", "--steps", "-5"], "--steps"),
    (["demo", "--steps", "ten"], "--steps"),
    (["demo", "--mask-ratio", "1.0"], "--mask-ratio"),
    (["demo", "--mask-ratio", "-0.1"], "--mask-ratio"),
    (["demo", "--mask-ratio", "nan"], "--mask-ratio"),
    (["demo", "--threads", "0"], "--threads"),
    (["demo", "--seed", "-1"], "--seed"),
    (["demo", "--seed", str(2**64)], "--seed"),
    (["demo", "--device", "tpu"], "--device"),
    (["demo", "--device", ""], "--device"),
    (["demo", "--out", "afile"], "afile exists and is not a directory"),
    (["demo", "--out", "afile/sub"], "afile exists and is not a directory"),
    (["demo", "--out", ""], "--out is empty"),
]


@pytest.mark.parametrize("argv, expected", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_is_one_line_before_any_work(guarded, capsys, argv, expected):
    err = _one_line_error(capsys, argv, argv[0])
    assert expected in err, err


@pytest.mark.parametrize("command", [["demo"], ["optimal-loss", "d.npy"], ["memorization", "d.npy", "d.npy"]])
def test_cuda_requested_without_cuda(guarded, capsys, monkeypatch, command):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    err = _one_line_error(capsys, command + ["--device", "cuda"], command[0])
    assert "CUDA is not available" in err and "--device cpu" in err
    # With one CUDA device, cuda:1 does not exist.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    err = _one_line_error(capsys, command + ["--device", "cuda:1"], command[0])
    assert "only 1 CUDA device" in err


def test_unwritable_out_folder(guarded, capsys, monkeypatch):
    """A folder without write permission (checked with os.access, which root would pass)."""
    real_access = os.access
    monkeypatch.setattr(cli.os, "access", lambda p, mode: False if str(p) == "locked" else real_access(p, mode))
    (guarded / "locked").mkdir()
    assert "locked is not writable" in _one_line_error(capsys, ["demo", "--out", "locked/demo"], "demo")
    err = _one_line_error(capsys, ["optimal-loss", "d.npy", "--out", "locked/o"], "optimal-loss")
    assert "locked is not writable" in err


@pytest.mark.parametrize("backend, expected", [("foo", "DIFFKERNELS_BACKEND='foo' is not one of"),
                                               ("cuda", "backend 'cuda' was requested but cannot run here")])
def test_demo_forced_backend_that_cannot_run(guarded, capsys, monkeypatch, backend, expected):
    if backend == "cuda" and torch.cuda.is_available():
        pytest.skip("the CUDA backend can run here")
    monkeypatch.setenv("DIFFKERNELS_BACKEND", backend)
    assert expected in _one_line_error(capsys, ["demo", "--device", "cpu"], "demo")


def test_demo_missing_dependency(guarded, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "sklearn" else real(name, *a))
    err = _one_line_error(capsys, ["demo"], "demo")
    assert "scikit-learn" in err and "pip install" in err


def test_memorization_library_errors_are_one_line(tmp_path, capsys, monkeypatch):
    """Errors found by the library itself (different image sizes) also come out as one line."""
    monkeypatch.chdir(tmp_path)
    np.save("a.npy", np.zeros((5, 3)))
    np.save("b.npy", np.zeros((5, 2)))
    assert "different sizes per image" in _one_line_error(capsys, ["memorization", "a.npy", "b.npy"],
                                                           "memorization")


def test_demo_passes_checked_options(guarded, monkeypatch):
    seen = {}
    monkeypatch.setattr(sys.modules["diffkernels.demo"], "run_demo", lambda **kw: seen.update(kw))
    assert main(["demo", "--steps", "7", "--mask-ratio", "0", "--seed", "3", "--out", "x/y"]) == 0
    assert seen["steps"] == 7 and seen["mask_ratio"] == 0.0 and seen["seed"] == 3 and seen["threads"] == 1
    assert str(seen["out"]) == os.path.join("x", "y") and seen["device"] is None
    assert not (guarded / "x").exists()  # the demo itself creates its folder


def test_bare_command_prints_help(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: diffkernels") and "examples:" in out
    for command in ("demo", "optimal-loss", "memorization", "backends"):
        assert command in out


def test_top_level_help_is_plain_text_with_examples(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    # The epilog keeps its own line breaks (a reflowing formatter would join these lines).
    assert "\nexamples:\n  diffkernels demo --out diffkernels_demo\n  diffkernels optimal-loss digits" in out
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"diffkernels {diffkernels.__version__}"


def _subparsers(parser):
    return next(a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction))


def test_every_option_states_its_default():
    subs = _subparsers(build_parser())
    assert set(subs) == {"demo", "optimal-loss", "memorization", "backends"}
    checked = 0
    for name, parser in subs.items():
        formatter = parser._get_formatter()
        for action in parser._actions:
            if not action.option_strings or action.default is argparse.SUPPRESS:
                continue  # positionals, --help
            assert action.help, (name, action.option_strings)
            text = formatter._expand_help(action)
            assert "default" in text and "(default: None)" not in text, (name, action.option_strings, text)
            checked += 1
        help_text = parser.format_help()
        assert "METHODS.md" not in help_text
    assert checked >= 25


def test_default_outputs_are_folders():
    """The default outputs go into one folder per command (names listed in .gitignore)."""
    subs = _subparsers(build_parser())
    assert subs["demo"].get_default("out") == "diffkernels_demo"
    assert subs["optimal-loss"].get_default("out") == "optimal_loss_out/optimal_loss"


def test_closed_stdout_is_not_a_traceback(tmp_path):
    """`diffkernels backends | head -0`: the reader is gone before anything is written."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-m", "diffkernels", "backends"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, cwd=tmp_path)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    proc.wait(timeout=120)
    assert proc.returncode == 141 and err == "", err
