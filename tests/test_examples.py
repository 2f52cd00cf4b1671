"""The example scripts in python_examples/: --help, and each end to end in a tiny configuration.

Tiny models, a few steps: these check wiring and outputs, not results (docs/RESULTS.md has those).
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("sklearn")
pytest.importorskip("scipy")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

EXAMPLES = Path(__file__).resolve().parent.parent / "python_examples"
sys.path.insert(0, str(EXAMPLES))

import ema_control_variate  # noqa: E402
import optimal_loss_schedule  # noqa: E402
import reproduce  # noqa: E402
import train_image_diffusion  # noqa: E402
import train_masked_diffusion_lm  # noqa: E402

MODULES = [train_image_diffusion, train_masked_diffusion_lm, optimal_loss_schedule, reproduce, ema_control_variate]

TINY_IMAGE = ["--steps", "3", "--batch-size", "8", "--n-samples", "8", "--sample-steps", "3", "--eval-queries", "8",
              "--levels", "3", "--channels", "8", "--blocks", "1", "--no-progress", "--device", "cpu"]
TINY_MDM = ["--pretrain-steps", "3", "--steps", "2", "--batch-size", "8", "--dim", "16", "--layers", "1", "--heads", "2",
            "--var-nx", "3", "--var-nt", "2", "--var-nm", "2", "--ppots-grid", "4", "--ppots-examples", "3",
            "--ppots-masks", "2", "--test-size", "10", "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One quality classifier for the whole file (trained on first use, a few seconds)."""
    return str(tmp_path_factory.mktemp("classifier_cache"))


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_help(module, capsys):
    with pytest.raises(SystemExit) as exc:
        module.build_parser().parse_args(["--help"])
    assert exc.value.code == 0
    assert "usage" in capsys.readouterr().out


def test_script_entry_point():
    """Run as a script (the way users do): reproduce.py imports every other example."""
    proc = subprocess.run([sys.executable, str(EXAMPLES / "reproduce.py"), "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "--budget" in proc.stdout


def _files_exist(summary):
    for path in summary["files"].values():
        assert Path(path).is_file() and Path(path).stat().st_size > 0, path


def test_image_diffusion_edm(tmp_path, cache):
    out = tmp_path / "edm"
    s = train_image_diffusion.main(TINY_IMAGE + ["--mask-ratio", "0.9", "--granularity", "pixel", "--normalize", "kept",
                                                 "--n-train", "32", "--cache", cache, "--out", str(out)])
    _files_exist(s)
    assert len(s["losses"]) == 3 and all(np.isfinite(s["losses"]))
    assert 0.0 <= s["memorized_fraction"] <= 1.0 and s["mean_d1"] > 0
    assert np.isfinite(s["quality"]["fd"]) and np.isfinite(s["quality"]["fd_real_floor"])
    gap = s["gap"]
    assert len(gap["sigmas"]) == 3 and all(g >= 0 for g in gap["gap"]) and all(j >= 0 for j in gap["j_star"])
    # the optimal loss is a lower bound of every denoiser's loss, up to sampling noise of 8 queries
    assert gap["j_star"][-1] <= gap["model_loss"][-1] * 1.5
    assert json.loads((out / "summary.json").read_text())["config"]["mask_ratio"] == 0.9


def test_image_diffusion_flow_matching_on_npy(tmp_path, cache):
    """Flow matching on an arbitrary .npy array (RGB, 4x4): no quality score for non-digit data."""
    rng = np.random.default_rng(0)
    path = tmp_path / "images.npy"
    np.save(path, rng.integers(0, 255, size=(20, 4, 4, 3)).astype(np.uint8))
    s = train_image_diffusion.main(TINY_IMAGE + ["--objective", "fm", "--data", str(path), "--mask-ratio", "0.5",
                                                 "--cache", cache, "--out", str(tmp_path / "fm")])
    _files_exist(s)
    assert s["quality"] is None and s["n_train_images"] == 20
    assert all(np.isfinite(s["losses"])) and all(np.isfinite(s["gap"]["gap"]))


def test_masked_diffusion_lm(tmp_path):
    out = tmp_path / "mdm"
    s = train_masked_diffusion_lm.main(TINY_MDM + ["--t-sampler", "ppots", "--mirror", "--isad", "--out", str(out)])
    assert (out / "summary.json").is_file() and (out / "loss.png").is_file()
    assert s["method"] == "ppots+mirror+isad"
    assert 0.0 <= s["accuracy"] <= 1.0 and len(s["losses"]) == 2
    for where in ("variance_shared_checkpoint", "variance_final"):
        for part in ("loss", "grad"):
            assert all(np.isfinite(s[where][part][k]) for k in ("A", "B", "C", "total"))
    assert s["ppots"] is not None and len(s["ppots"]["w"]) == 3


def test_masked_diffusion_lm_ppots_reference_recipe(tmp_path):
    s = train_masked_diffusion_lm.main(TINY_MDM + ["--t-sampler", "ppots", "--ppots-reference",
                                                   "--out", str(tmp_path / "ref")])
    assert s["ppots"]["reference_recipe"] is True and all(np.isfinite(s["losses"]))


def test_masked_diffusion_lm_stratified(tmp_path):
    s = train_masked_diffusion_lm.main(TINY_MDM + ["--t-sampler", "stratified", "--out", str(tmp_path / "s")])
    assert s["method"] == "stratified" and s["ppots"] is None


def test_addition_task_encoding():
    task = train_masked_diffusion_lm.AdditionTask(2)
    import torch

    row = task.encode(torch.tensor([99]), torch.tensor([5]))[0]
    assert task.decode(row) == "99+05=104|"
    assert int(task.eligible.sum()) == task.answer_len == 4


def test_optimal_loss_schedule(tmp_path, cache):
    """--quick: every objective (EDM, flow matching) with every schedule (baseline, J* weight, J* weight +
    adaptive sampling), end to end."""
    out = tmp_path / "sched"
    s = optimal_loss_schedule.main(["--quick", "--cache", cache, "--no-progress", "--device", "cpu",
                                    "--out", str(out)])
    for name in ("jstar.png", "schedule.png", "schedule_summary.json"):
        assert (out / name).is_file()
    j = np.array(s["j_star"]["j_star"])
    assert (j >= 0).all() and j[-1] > j[0]  # J* grows with the noise level
    assert set(s["runs"]) == set(optimal_loss_schedule.RUN_NAMES.values())
    assert s["schedule"]["w_max"] > 0 and s["schedule"]["a"] > 0
    for name in ("jstar+adaptive", "fm jstar+adaptive"):
        sched = s["noise_schedules"][name]
        assert sched["adaptive"] and sched["refreshes"] >= 1 and sched["density"] is not None
    assert s["noise_schedules"]["fm jstar"]["density"] is None


def test_noise_schedule_adaptive_density_against_float64():
    """NoiseSchedule's p(s): (1 - m) w (J_theta - J*)_+ / Z + m * the baseline density, with J_theta the
    per-level mean of the observed x0-losses (nearest level in ln s), computed here directly."""
    import torch

    grid = np.geomspace(0.01, 10.0, 7)
    j = 0.1 * grid**2 / (0.1 + grid**2)
    weight = optimal_loss_schedule.JStarWeight(grid, j, bump=0.0, bump_width=0.5, objective="fm")
    sched = optimal_loss_schedule.NoiseSchedule("fm", grid, j, weight=weight, adaptive=True, warmup=2, refresh=2,
                                                mix=0.25)
    gen = torch.Generator().manual_seed(0)
    base_draw = sched.sample(5, gen)  # before the warmup: logit-normal t, ln s ~ N(0, 1)
    assert torch.equal(base_draw, torch.exp(torch.randn(5, generator=torch.Generator().manual_seed(0))))
    losses = 2.0 * j + 0.01 * np.arange(7)  # above J* at every level
    s_obs = torch.tensor(grid * 1.05, dtype=torch.float32)  # each observation nearest to its own level
    sched.observe(0, s_obs, torch.tensor(losses, dtype=torch.float32))
    assert sched.density is None  # still in the warmup
    sched.observe(1, s_obs, torch.tensor(losses, dtype=torch.float32))
    u = np.log(grid)
    w = weight.numpy(grid)
    p = w * (losses - j)
    p = p / np.trapezoid(p, u)
    base = np.exp(-0.5 * u**2) / np.sqrt(2 * np.pi)
    expected = 0.75 * p + 0.25 * base / np.trapezoid(base, u)
    np.testing.assert_allclose(sched.density, expected, rtol=1e-6)  # float32 losses
    # the next refresh averages the new window's means with the old (0.5 each)
    sched.observe(2, s_obs, torch.tensor(3 * losses, dtype=torch.float32))
    sched.observe(3, s_obs, torch.tensor(3 * losses, dtype=torch.float32))
    np.testing.assert_allclose(sched.j_theta, 2 * losses, rtol=1e-6)
    draws = sched.sample(1000, gen)
    assert draws.min() >= grid[0] * (1 - 1e-6) and draws.max() <= grid[-1] * (1 + 1e-6)
    # the baseline schedule has the objective's own weight: flow matching's (1 + s)^2 / s^2 on the x0-loss
    plain = optimal_loss_schedule.NoiseSchedule("fm", grid, j)
    s = torch.tensor([0.5, 2.0], dtype=torch.float64)
    assert torch.allclose(plain.weight(s), (1 + s) ** 2 / s**2)
    with pytest.raises(ValueError, match="adaptive"):
        optimal_loss_schedule.NoiseSchedule("edm", grid, j, adaptive=True)


def test_reproduce_writes_the_docs_only_when_asked():
    docs, work = reproduce.output_dirs(reproduce.build_parser().parse_args([]))
    assert docs == Path("out/reproduce") and work == Path("out/reproduce/runs")
    docs, work = reproduce.output_dirs(reproduce.build_parser().parse_args(["--write-docs", "--out", "x"]))
    assert docs == EXAMPLES.parent / "docs" and work == Path("x/runs")


def test_reproduce_tiny(tmp_path, cache):
    docs = tmp_path / "rep"
    r = reproduce.main(["--seeds", "0", "--out", str(docs), "--cache", cache,
                        "--extra", "image=" + " ".join(TINY_IMAGE[:-2]), "mdm=" + " ".join(TINY_MDM[:-2]),
                        "schedule=--quick", "jstar=6 16"])
    assert (docs / "runs" / "sparse" / "eta0.0_seed0" / "summary.json").is_file()
    text = (docs / "RESULTS.md").read_text()
    for heading in ("Sparse supervision", "Masked diffusion LM", "optimal loss", "Budget: `small`",
                    "Summary of the claims", "one-sided p", "seeds for 80% power", "non-inferior"):
        assert heading in text
    for name in ("sparse_metrics.png", "sparse_curves.png", "sparse_samples.png", "mdm_variance_accuracy.png",
                 "jstar_digits.png", "schedule_gap.png", "results_small.json"):
        assert (docs / "results" / name).is_file(), name
    assert len(r["results"]["sparse"]["runs"]) == len(reproduce.ETAS)
    assert len(r["results"]["mdm"]["runs"]) == len(reproduce.MDM_METHODS)
    # the report and figures can be rebuilt from the saved numbers alone
    (docs / "RESULTS.md").unlink()
    reproduce.main(["--from-json", str(docs / "results" / "results_small.json"), "--out", str(docs)])
    assert (docs / "RESULTS.md").read_text() == text


def test_ema_control_variate_quick(capsys):
    """The EMA control variate's measurement (docs/mdm_ema_control_variate.md) in --quick mode."""
    effect = ema_control_variate.main(["--quick", "--no-progress"])
    assert set(effect.seq_var) == {"raw", "1.0", "ema", "pooled"}
    assert all(v == 0.0 for v in effect.max_grad_diff.values())
    assert len(set(effect.grad_trace.values())) == 1  # the same gradients, so the same variance
    assert effect.training["max_param_diff"] == 0.0  # training on the adjusted loss: the same trajectory
    assert effect.settings["draws"] == ema_control_variate.QUICK["draws"]
    assert "trace of the gradient covariance" in capsys.readouterr().out


def test_ema_control_variate_runs_as_a_script(tmp_path):
    """Run from any folder as a script: it finds the checkout's diffkernels without _common."""
    proc = subprocess.run([sys.executable, str(EXAMPLES / "ema_control_variate.py"), "--quick", "--no-progress"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "| variance of a sequence's loss value |" in proc.stdout
