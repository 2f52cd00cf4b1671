"""``diffkernels optimal-loss`` and ``diffkernels memorization``: loaders, outputs, resume, clear errors."""

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from diffkernels.cli import main
from diffkernels.optimal_loss import CurveResult, estimate_curve
from diffkernels.optimal_loss.io import DataError, load_data

FAST = ["--num-sigmas", "3", "--sigma-min", "0.1", "--sigma-max", "2", "--queries", "64", "--quiet"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: no OpenMP overhead


@pytest.fixture
def arr():
    return np.random.default_rng(0).standard_normal((120, 2, 3)).astype(np.float32)


def _error(capsys, argv):
    """Run the CLI expecting a clean failure: exit code 2 and one line on stderr."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("diffkernels ") and "error:" in err, err
    return err


def test_npy_writes_csv_json_and_matches_api(tmp_path, arr, capsys):
    np.save(tmp_path / "d.npy", arr)
    out = tmp_path / "res" / "curve"
    assert main(["optimal-loss", str(tmp_path / "d.npy"), *FAST, "--out", str(out), "--seed", "3"]) == 0
    assert "wrote" in capsys.readouterr().out
    saved = json.loads((tmp_path / "res" / "curve.json").read_text())
    api = estimate_curve(arr, np.geomspace(0.1, 2, 3), num_queries=64, seed=3, progress=False)
    np.testing.assert_array_equal(saved["j_star"], api.j_star)
    assert saved["dim"] == 6 and saved["num_data"] == 120 and saved["estimator"] == "full"
    res = CurveResult.from_dict(saved)
    np.testing.assert_array_equal(res.sigmas, api.sigmas)
    csv = (tmp_path / "res" / "curve.csv").read_text().splitlines()
    assert csv[0].split(",")[:3] == ["sigma", "j_star", "stderr"] and len(csv) == 4


def test_other_formats_and_subset_estimator(tmp_path, arr):
    np.savez(tmp_path / "d.npz", labels=np.arange(120), images=arr)
    torch.save({"x": torch.from_numpy(arr), "meta": 3}, tmp_path / "d.pt")
    torch.save(torch.from_numpy(arr), tmp_path / "t.pt")
    ref = load_data(str(tmp_path / "d.npz"), key="images")
    assert ref.shape == (120, 6)
    with pytest.raises(DataError, match="rank 1"):  # without --key: the first array, the labels (N,)
        load_data(str(tmp_path / "d.npz"))
    np.testing.assert_array_equal(load_data(str(tmp_path / "d.pt")).numpy(), ref)
    np.testing.assert_array_equal(load_data(str(tmp_path / "t.pt")).numpy(), ref)
    out = tmp_path / "c"
    assert main(["optimal-loss", str(tmp_path / "d.npz"), "--key", "images", *FAST, "--estimator", "cdol",
                 "--subset", "30", "--C", "8", "--out", str(out)]) == 0
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["estimator"] == "cdol" and saved["C"] == 8.0 and saved["subset_size"] == 30


def test_safetensors(tmp_path, arr, capsys):
    try:
        from safetensors.numpy import save_file
    except ImportError:
        (tmp_path / "d.safetensors").write_bytes(b"\x00" * 16)
        err = _error(capsys, ["optimal-loss", str(tmp_path / "d.safetensors"), *FAST, "--out", str(tmp_path / "o")])
        assert "needs the safetensors package" in err
        return
    save_file({"x": arr}, str(tmp_path / "d.safetensors"))
    np.testing.assert_array_equal(np.asarray(load_data(str(tmp_path / "d.safetensors"))), arr.reshape(120, 6))


def test_digits_plot_and_resume(tmp_path, capsys):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    out = tmp_path / "digits"
    argv = ["optimal-loss", "digits", "--num-sigmas", "4", "--sigma-min", "0.05", "--sigma-max", "5",
            "--queries", "64", "--out", str(out), "--plot"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "N = 1797, D = 64" in printed
    png = out.with_suffix(".png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    first = json.loads(out.with_suffix(".json").read_text())
    assert 0 < first["j_star_per_element"][-1] < 0.5  # digits in [-1, 1]: per-pixel variance < 1
    ckpt = tmp_path / "digits.ckpt.json"
    assert len(json.loads(ckpt.read_text())["levels"]) == 4
    assert main(argv + ["--resume", "--quiet"]) == 0  # loads all four levels
    assert json.loads(out.with_suffix(".json").read_text())["j_star"] == first["j_star"]
    # A resume with other settings is a clear error.
    err = _error(capsys, argv + ["--resume", "--queries", "32"])
    assert "other settings" in err and "num_queries" in err


def test_bad_data_errors(tmp_path, capsys):
    np.save(tmp_path / "rank1.npy", np.zeros(10))
    nan = np.ones((8, 4))
    nan[5, 2] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    np.save(tmp_path / "empty.npy", np.zeros((0, 4)))
    np.save(tmp_path / "nocols.npy", np.zeros((5, 0)))
    np.save(tmp_path / "strings.npy", np.array([["a", "b"]]))
    (tmp_path / "junk.npy").write_bytes(b"not a numpy file")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    (tmp_path / "d.txt").write_text("1 2 3")
    with zipfile.ZipFile(tmp_path / "empty.npz", "w"):
        pass
    np.savez(tmp_path / "k.npz", a=np.ones((3, 2)))
    cases = {
        "rank1.npy": "rank 1",
        "nan.npy": "row 5 contains NaN",
        "empty.npy": "empty",
        "nocols.npy": "empty",
        "strings.npy": "dtype",
        "junk.npy": "cannot read",
        "junk.pt": "cannot read",
        "d.txt": "unknown file type",
        "missing.npy": "no such file",
        "empty.npz": "no arrays",
    }
    for name, expected in cases.items():
        err = _error(capsys, ["optimal-loss", str(tmp_path / name), *FAST, "--out", str(tmp_path / "o")])
        assert expected in err and name in err, (name, err)
    err = _error(capsys, ["optimal-loss", str(tmp_path / "k.npz"), "--key", "b", *FAST, "--out", str(tmp_path / "o")])
    assert "no array named 'b'" in err and "a" in err
    err = _error(capsys, ["optimal-loss", str(tmp_path / "k.npz"), *FAST, "--estimator", "snis", "--subset", "9",
                          "--out", str(tmp_path / "o")])
    assert "larger than" in err
    err = _error(capsys, ["optimal-loss", str(tmp_path / "k.npz"), *FAST, "--sigma-min", "0", "--out", str(tmp_path / "o")])
    assert "sigma-min" in err
    with pytest.raises(DataError, match="directory"):
        load_data(str(tmp_path))
    assert not (tmp_path / "o.json").exists()


def test_memorization_command(tmp_path, capsys):
    rng = np.random.default_rng(1)
    train = rng.uniform(0, 255, (50, 3, 4, 4))
    samples = np.concatenate([train[:5] + 0.1, rng.uniform(0, 255, (5, 3, 4, 4))])
    np.save(tmp_path / "train.npy", train)
    np.save(tmp_path / "samples.npy", samples)
    assert main(["memorization", str(tmp_path / "samples.npy"), str(tmp_path / "train.npy"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["memorized_fraction"] == pytest.approx(0.5) and out["num_samples"] == 10
    # The same images on the 0..1 scale with --*-range unit.
    np.save(tmp_path / "train1.npy", train / 255)
    np.save(tmp_path / "samples1.npy", samples / 255)
    assert main(["memorization", str(tmp_path / "samples1.npy"), str(tmp_path / "train1.npy"),
                 "--samples-range", "unit", "--train-range", "unit"]) == 0
    text = capsys.readouterr().out
    assert "memorised fraction: 0.5000 (5 of 10" in text and f"mean d1: {out['mean_d1']:.4f}" in text
    err = _error(capsys, ["memorization", str(tmp_path / "samples.npy"), str(tmp_path / "missing.npy")])
    assert "missing.npy: no such file" in err


def test_entry_point_exit_code(tmp_path):
    """The real command line: argparse and our own errors both exit with code 2."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    np.save(tmp_path / "r.npy", np.zeros(4))
    proc = subprocess.run([sys.executable, "-m", "diffkernels", "optimal-loss", str(tmp_path / "r.npy"), "--out",
                           str(tmp_path / "o")], capture_output=True, text=True, env=env, check=False)
    assert proc.returncode == 2 and "rank 1" in proc.stderr and proc.stdout == ""
    proc = subprocess.run([sys.executable, "-m", "diffkernels", "optimal-loss", "--help"],
                          capture_output=True, text=True, env=env, check=False)
    assert proc.returncode == 0 and "--sigma-min" in proc.stdout and "--resume" in proc.stdout


def test_checkpoint_named_and_command_recorded(tmp_path, arr, capsys):
    """The 'wrote' line names the checkpoint; the JSON records this command line, not the host's sys.argv."""
    np.save(tmp_path / "d.npy", arr)
    argv = ["optimal-loss", str(tmp_path / "d.npy"), *FAST, "--out", str(tmp_path / "run")]
    assert main(argv) == 0
    wrote = capsys.readouterr().out.strip().splitlines()[-1]
    ckpt = tmp_path / "run.ckpt.json"
    assert wrote.startswith("wrote ") and f"{ckpt} (checkpoint)" in wrote and ckpt.is_file()
    saved = json.loads((tmp_path / "run.json").read_text())
    assert saved["extra"]["command"].split() == ["diffkernels", *argv]


def test_interrupt_names_the_checkpoint(tmp_path, arr, capsys, monkeypatch):
    from diffkernels import optimal_loss

    def interrupted(*args, checkpoint, **kwargs):
        Path(checkpoint).write_text("{}")  # as if some levels had finished
        raise KeyboardInterrupt

    monkeypatch.setattr(optimal_loss, "estimate_curve", interrupted)  # the command calls the public name
    np.save(tmp_path / "d.npy", arr)
    assert main(["optimal-loss", str(tmp_path / "d.npy"), *FAST, "--out", str(tmp_path / "run")]) == 130
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "interrupted" in err
    assert str(tmp_path / "run.ckpt.json") in err and "--resume" in err


@pytest.mark.parametrize("damage", ["not json", "list", "format", "no settings", "levels list", "level not object",
                                    "level key missing", "level index", "level value"])
def test_malformed_checkpoint_is_one_line(tmp_path, arr, capsys, damage):
    np.save(tmp_path / "d.npy", arr)
    argv = ["optimal-loss", str(tmp_path / "d.npy"), *FAST, "--out", str(tmp_path / "run")]
    assert main(argv) == 0
    ckpt = tmp_path / "run.ckpt.json"
    good = json.loads(ckpt.read_text())
    bad = json.loads(ckpt.read_text())
    level = bad["levels"]["0"]
    if damage == "not json":
        bad = "{not json"
    elif damage == "list":
        bad = [1, 2]
    elif damage == "format":
        bad["format"] = "something else"
    elif damage == "no settings":
        del bad["settings"]
    elif damage == "levels list":
        bad["levels"] = [level]
    elif damage == "level not object":
        bad["levels"]["0"] = 5
    elif damage == "level key missing":
        del level[next(k for k in level if k != "sigma")]
    elif damage == "level index":
        bad["levels"]["x"] = level
    elif damage == "level value":
        level[next(k for k in level if k != "sigma")] = "abc"
    ckpt.write_text(bad if isinstance(bad, str) else json.dumps(bad))
    capsys.readouterr()
    err = _error(capsys, argv + ["--resume"])
    assert str(ckpt) in err, err
    assert good != bad


@pytest.mark.parametrize("out, written", [("folder/", "folder/optimal_loss"), ("existing", "existing/optimal_loss"),
                                          ("plain", "plain"), ("named.json", "named")])
def test_out_folder_or_prefix(tmp_path, arr, monkeypatch, out, written):
    """--out names a file prefix; a folder (existing, or ending in /) gets the files optimal_loss.*."""
    monkeypatch.chdir(tmp_path)
    np.save("d.npy", arr)
    (tmp_path / "existing").mkdir()
    assert main(["optimal-loss", "d.npy", *FAST, "--out", out]) == 0
    for ext in (".csv", ".json", ".ckpt.json"):
        assert (tmp_path / (written + ext)).is_file(), written + ext


def test_load_data_rows_reads_only_those_rows_and_names_rows_globally(tmp_path):
    """rows=f: f gets N, only rows lo..hi-1 are checked and returned; errors give the row in the whole file."""
    arr = np.arange(40, dtype=np.float32).reshape(10, 2, 2)
    arr[1, 0, 0] = np.nan  # outside the rows asked for: not read, no error
    np.save(tmp_path / "d.npy", arr)
    seen = []
    got = load_data(str(tmp_path / "d.npy"), rows=lambda N: seen.append(N) or (4, 7))
    assert seen == [10]
    assert isinstance(got, np.memmap) and got.shape == (3, 4)
    np.testing.assert_array_equal(np.asarray(got), arr.reshape(10, 4)[4:7])
    arr[5, 1, 1] = np.inf
    np.save(tmp_path / "d.npy", arr)
    with pytest.raises(DataError, match=r"d\.npy row 5 contains NaN or Inf"):
        load_data(str(tmp_path / "d.npy"), rows=lambda N: (4, 7))
    with pytest.raises(DataError, match=r"row 1 contains NaN or Inf"):  # without rows: the whole file
        load_data(str(tmp_path / "d.npy"))
