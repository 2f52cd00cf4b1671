"""``diffkernels optimal-loss`` under torchrun: 2 gloo processes on the CPU give one process's curve,
only rank 0 prints and writes, a resume works across process counts, and bad input stops every
process with the same one-line error instead of leaving one waiting in a collective."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from diffkernels.cli import main

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.timeout(300)]

# N = 101 rows: uneven shards (rows 0-50 on rank 0, 51-100 on rank 1).
FAST = ["--num-sigmas", "3", "--sigma-min", "0.3", "--sigma-max", "3", "--queries", "130", "--seed", "3",
        "--device", "cpu"]
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK")

# Run the command line with an audit hook on every rank but 0 that stops the process (exit code 3)
# the moment it creates, opens for writing, renames or deletes anything under $GUARD_DIR.
GUARDED = textwrap.dedent("""
    import os, sys

    guard, rank = os.path.realpath(os.environ["GUARD_DIR"]), os.environ["RANK"]

    def hook(event, args):
        if event == "open":
            path, mode, flags = args
            writes = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(
                flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
        elif event in ("os.remove", "os.rename", "os.mkdir"):
            path, writes = args[0], True
        else:
            return
        if writes and isinstance(path, (str, os.PathLike)) and os.path.realpath(path).startswith(guard):
            sys.stderr.write(f"rank {rank} wrote {path} ({event})\\n")
            os._exit(3)

    if rank != "0":
        sys.addaudithook(hook)
    from diffkernels.cli import main
    sys.exit(main())
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path), **extra}


def _torchrun(launcher_args, argv, cwd, **env):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", *launcher_args, *argv]
    return subprocess.run(cmd, cwd=cwd, env=_env(**env), capture_output=True, text=True, timeout=240,
                          check=False)


def _data(tmp_path):
    x = np.random.default_rng(0).standard_normal((101, 2, 3)).astype(np.float32)
    np.save(tmp_path / "d.npy", x)
    return x


def _single(tmp_path, capsys):
    """One process's outputs and checkpoint, the reference."""
    assert main(["optimal-loss", str(tmp_path / "d.npy"), *FAST, "--quiet", "--out", str(tmp_path / "single")]) == 0
    capsys.readouterr()
    return (json.loads((tmp_path / "single.json").read_text()),
            json.loads((tmp_path / "single.ckpt.json").read_text()))


def _close(got: dict, ref: dict, keys=("j_star", "stderr", "j_star_ab", "stderr_ab")):
    # The ranks' partials merge in another order than one process's chunks: float64 rounding, ~1e-15.
    for key in keys:
        np.testing.assert_allclose(got[key], ref[key], rtol=1e-12, atol=0, err_msg=key)


def _stale_checkpoint(ckpt: dict) -> dict:
    """The reference checkpoint with only level 0, its values changed: loading it is visible."""
    stale = json.loads(json.dumps(ckpt))
    stale["levels"] = {"0": {k: (v if k == "sigma" else 1.5 * v) for k, v in ckpt["levels"]["0"].items()}}
    return stale


def test_two_processes_match_one_and_only_rank0_prints_and_writes(tmp_path, capsys):
    _data(tmp_path)
    ref, ref_ckpt = _single(tmp_path, capsys)
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "guarded.py").write_text(GUARDED)
    # A stale checkpoint: a fresh run (no --resume) must ignore it; only rank 0 may delete it.
    (out / "run.ckpt.json").write_text(json.dumps(_stale_checkpoint(ref_ckpt)))
    proc = _torchrun(["--master-port", str(_free_port())],
                     [str(tmp_path / "guarded.py"), "optimal-loss", "d.npy", *FAST, "--out", "out/run"],
                     cwd=tmp_path, GUARD_DIR=str(out))
    assert proc.returncode == 0, proc.stderr
    # Rank 0's table and 'wrote' line, once; no progress bar in the captured stderr of rank 1 either.
    lines = proc.stdout.splitlines()
    assert sum(line.startswith("wrote ") for line in lines) == 1, proc.stdout
    assert sum(line.startswith("J*(s) of d.npy: N = 101, D = 6") for line in lines) == 1, proc.stdout
    assert "error" not in proc.stderr.lower(), proc.stderr
    got = json.loads((out / "run.json").read_text())
    _close(got, ref)
    assert got["num_data"] == 101 and got["extra"]["processes"] == 2
    # The checkpoint: every level, written with the checksum of all 101 rows (as one process's).
    ckpt = json.loads((out / "run.ckpt.json").read_text())
    assert ckpt["settings"] == ref_ckpt["settings"]
    assert sorted(ckpt["levels"]) == ["0", "1", "2"]
    for k, level in ckpt["levels"].items():
        np.testing.assert_allclose(list(level.values()), list(ref_ckpt["levels"][k].values()), rtol=1e-12)
    assert sorted(p.name for p in out.iterdir()) == ["run.ckpt.json", "run.csv", "run.json"]


def test_resume_under_torchrun_from_a_single_process_checkpoint(tmp_path, capsys):
    """The checkpoint of one process reading d.npy, resumed by two processes that each load the same
    values from a .pt file whole and keep their rows: the checkpoint records the values, not the
    file or the split."""
    torch.save(torch.from_numpy(_data(tmp_path)), tmp_path / "d.pt")
    ref, ref_ckpt = _single(tmp_path, capsys)
    # Level 0 done (with changed values), levels 1 and 2 to compute: every rank must skip level 0,
    # or the ranks' collectives would not match.
    stale = _stale_checkpoint(ref_ckpt)
    (tmp_path / "run.ckpt.json").write_text(json.dumps(stale))
    proc = _torchrun(["--standalone"], ["-m", "diffkernels", "optimal-loss", "d.pt", *FAST, "--quiet", "--resume",
                                        "--out", "run"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("wrote ") == 1, proc.stdout
    got = json.loads((tmp_path / "run.json").read_text())
    assert got["j_star"][0] == stale["levels"]["0"]["j_var"]  # loaded, not recomputed
    assert got["stderr"][0] == stale["levels"]["0"]["se_var"]
    np.testing.assert_allclose(got["j_star"][1:], ref["j_star"][1:], rtol=1e-12, atol=0)
    np.testing.assert_allclose(got["stderr"][1:], ref["stderr"][1:], rtol=1e-12, atol=0)
    levels = json.loads((tmp_path / "run.ckpt.json").read_text())["levels"]
    assert sorted(levels) == ["0", "1", "2"] and levels["0"] == stale["levels"]["0"]


def test_bad_shard_stops_every_process_with_one_line(tmp_path):
    """A NaN in rank 1's rows: rank 0 never reads them, yet both processes exit 2 with one line."""
    x = _data(tmp_path)
    x[70, 1, 2] = np.nan
    np.save(tmp_path / "nan.npy", x)
    port = str(_free_port())
    argv = [sys.executable, "-m", "diffkernels", "optimal-loss", "nan.npy", *FAST, "--out", "o"]
    # Started by hand rather than by torchrun, which would stop the other process when one fails.
    procs = [subprocess.Popen(argv, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=_env(RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                                       MASTER_PORT=port))
             for r in range(2)]
    try:
        results = [p.communicate(timeout=180) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (stdout, stderr) in zip(procs, results):
        assert p.returncode == 2 and stdout == "", (stdout, stderr)
        assert stderr.strip() == "diffkernels optimal-loss: error: rank 1: nan.npy row 70 contains NaN or Inf", stderr
    assert not any(tmp_path.glob("o.*"))


@pytest.mark.parametrize("env, extra, expected", [
    ({"RANK": "0"}, [], "WORLD_SIZE is not set"),
    ({"RANK": "2", "WORLD_SIZE": "2"}, [], "RANK=2 is not below WORLD_SIZE=2"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1"}, [], "MASTER_PORT is not set"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "x"}, [], "MASTER_PORT='x'"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}, ["--dist-backend", "nccl"],
     "--dist-backend nccl needs --device cuda"),
    ({}, ["--dist-backend", "gloo"], "--dist-backend applies only under torchrun"),
])
def test_launch_errors_before_any_process_group(tmp_path, monkeypatch, capsys, env, extra, expected):
    """Errors of the command line and the environment: one line, exit 2, no process group (with
    WORLD_SIZE=2 and no second process, creating one would wait for it)."""
    import torch.distributed as dist

    _data(tmp_path)
    for name in LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(["optimal-loss", str(tmp_path / "d.npy"), *FAST, *extra, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("diffkernels optimal-loss: error: ") and expected in err, err
    assert not dist.is_initialized() and not any(tmp_path.glob("o*"))


def test_help_describes_torchrun(capsys):
    assert main(["optimal-loss", "--help"]) == 0
    text = capsys.readouterr().out
    assert "torchrun" in text and "--dist-backend" in text and "cuda:LOCAL_RANK" in text
    assert "loads these whole" in text  # non-.npy formats are read whole by every process
