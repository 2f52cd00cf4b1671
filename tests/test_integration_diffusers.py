"""diffkernels.integrations.diffusers: the optimal training loss against direct float64 computations
that use diffusers' own forward process (add_noise / scale_noise / get_velocity / compute_snr).

Schedulers are built from keyword arguments, so nothing is downloaded.
"""

import doctest
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

diffusers = pytest.importorskip("diffusers")
from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler  # noqa: E402
from diffusers.training_utils import compute_snr  # noqa: E402

from diffkernels.integrations import diffusers as integration  # noqa: E402
from diffkernels.integrations.diffusers import optimal_training_loss  # noqa: E402
from diffkernels.optimal_loss import estimators, loss_factor  # noqa: E402

N, SHAPE = 40, (3, 2, 2)  # D = 12
D = int(np.prod(SHAPE))
VP_STEPS = [100, 200, 300, 450, 999]  # s from 0.34 to 157
EXAMPLES = Path(__file__).resolve().parent.parent / "python_examples"


@pytest.fixture(scope="module")
def data():
    """N images in [-1, 1] in two loose clusters (so the posterior is neither one row nor uniform)."""
    g = torch.Generator().manual_seed(1234)
    centre = torch.where(torch.arange(N)[:, None] % 2 == 0, 0.4, -0.4)
    x = (centre + 0.5 * (torch.rand(N, D, generator=g) * 2 - 1)).clamp(-1, 1)
    return x.reshape(N, *SHAPE).float()


def _fm(shift=1.0):
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)


def _fm_steps(scheduler):
    return scheduler.timesteps[[0, 300, 600, 850, 950]]  # includes sigma = 1 (s = inf)


# (scheduler factory, its timesteps, prediction types to check)
FAMILIES = {
    "ddpm": (lambda: DDPMScheduler(num_train_timesteps=1000), lambda s: VP_STEPS, ["epsilon", "v_prediction", "sample"]),
    "ddim-zero-snr": (lambda: DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear",
                                            rescale_betas_zero_snr=True),
                      lambda s: VP_STEPS, ["epsilon", "v_prediction", "sample"]),
    "flow": (_fm, _fm_steps, ["flow_prediction", "epsilon", "sample"]),
    "flow-shift3": (lambda: _fm(3.0), _fm_steps, ["flow_prediction", "epsilon", "sample"]),
}
CASES = [(fam, pt) for fam, (_, _, pts) in FAMILIES.items() for pt in pts]


# --- the direct computation --------------------------------------------------------------------


def _alpha_sigma(scheduler, t):
    """x_t = alpha x0 + sigma eps at timestep t, read off diffusers' own forward process in float64."""
    one, zero = torch.ones(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        tt = torch.as_tensor([t], dtype=scheduler.timesteps.dtype)
        return scheduler.scale_noise(one, tt, zero).item(), scheduler.scale_noise(zero, tt, one).item()
    tt = torch.tensor([int(t)])
    return scheduler.add_noise(one, zero, tt).item(), scheduler.add_noise(zero, one, tt).item()


def _targets(scheduler, prediction_type, x0, eps, t):
    """The training target of each (x0, eps) row, as diffusers' scripts form it."""
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "sample":
        return x0
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(x0, eps, torch.full((x0.shape[0],), int(t)))
    assert prediction_type == "flow_prediction"
    return eps - x0


def _posterior_of_target(scheduler, prediction_type, x, t, xt):
    """For each noisy x_t (M, D): E[target | x_t] and tr Cov[target | x_t] by a float64 softmax over all rows."""
    alpha, sigma = _alpha_sigma(scheduler, t)
    M = xt.shape[0]
    eps = (xt[:, None, :] - alpha * x[None]) / sigma  # (M, N, D): the noise if row n were the source
    w = torch.softmax(-0.5 * eps.square().sum(-1), dim=1)  # p(n | x_t)
    tgt = _targets(scheduler, prediction_type, x[None].expand(M, -1, -1).reshape(M * N, D),
                   eps.reshape(M * N, D), t).reshape(M, N, D)
    mean = (w[..., None] * tgt).sum(1)
    var = (w * (tgt - mean[:, None]).square().sum(-1)).sum(1)
    return mean, var


def _estimator_queries(x, s_levels, level, M, seed):
    """The VE queries x_src + s eps that estimate_curve draws for noise level index ``level``."""
    out = []
    for b in range(-(-M // estimators.QUERY_BLOCK)):
        size = min(estimators.QUERY_BLOCK, M - b * estimators.QUERY_BLOCK)
        source, _, eps = estimators.block_draws(seed, level, b, size, N, D, None, torch.device("cpu"))
        out.append(x[source] + s_levels[level] * eps)
    return torch.cat(out)


# --- against the direct computation ------------------------------------------------------------


@pytest.mark.parametrize("family,prediction_type", CASES, ids=[f"{f}-{p}" for f, p in CASES])
def test_equals_direct_posterior_on_the_same_queries(data, family, prediction_type, one_thread):
    """Per timestep, the mean over the estimator's own queries of tr Cov[target | x_t] / D, computed
    directly in the target's space from diffusers' forward process: equal to float64 rounding."""
    make, steps_of, _ = FAMILIES[family]
    scheduler = make()
    steps = steps_of(scheduler)
    M, seed = 200, 7
    opt = optimal_training_loss(data, scheduler, steps, prediction_type=prediction_type, num_queries=M, seed=seed,
                                progress=False)
    x = data.reshape(N, D).double()
    coeffs = [_alpha_sigma(scheduler, t) for t in steps]
    s = np.array([sg / a if a > 0 else np.inf for a, sg in coeffs])
    np.testing.assert_allclose(opt.s, s, rtol=1e-12)
    levels = np.unique(s[np.isfinite(s)])
    direct = []
    for t, (alpha, _), s_t in zip(steps, coeffs, s):
        if np.isfinite(s_t):
            xt = alpha * _estimator_queries(x, levels, int(np.searchsorted(levels, s_t)), M, seed)
        else:  # alpha = 0: x_t is pure noise and the posterior is uniform whatever the query
            xt = torch.randn(M, D, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        direct.append(_posterior_of_target(scheduler, prediction_type, x, t, xt)[1].mean().item() / D)
    direct = np.array(direct)
    assert (direct > 1e-6).any()  # not a vacuous comparison of zeros
    np.testing.assert_allclose(opt.loss, direct, rtol=1e-8, atol=1e-14)
    if not np.isfinite(s).all():  # s = inf: the exact total variance, no error bar
        assert (opt.stderr[~np.isfinite(s)] == 0).all()


@pytest.mark.parametrize("family,prediction_type,snr_gamma", [
    ("ddpm", "epsilon", 5.0), ("ddpm", "v_prediction", 5.0), ("flow-shift3", "flow_prediction", None)])
def test_script_loss_of_the_optimal_model(data, family, prediction_type, snr_gamma, one_thread):
    """The training script's own loss (float32 F.mse_loss, min-SNR weights from compute_snr) with the
    optimal model E[target | x_t] on fresh random batches: within 4.5 standard errors of the optimum,
    per timestep and for the min-SNR-weighted mean over timesteps."""
    make, steps_of, _ = FAMILIES[family]
    scheduler = make()
    if prediction_type == "v_prediction":
        scheduler.register_to_config(prediction_type="v_prediction")
    steps = torch.as_tensor(steps_of(scheduler))
    opt = optimal_training_loss(data, scheduler, steps, num_queries=1000, seed=3, snr_gamma=snr_gamma,
                                progress=False)
    assert opt.prediction_type == prediction_type
    g = torch.Generator().manual_seed(99)
    x = data.reshape(N, D).double()
    B = 1200  # per timestep
    per_step, weighted = [], []
    for k, t in enumerate(steps):
        x0 = data[torch.randint(N, (B,), generator=g)]
        noise = torch.randn(x0.shape, generator=g)
        tt = t.repeat(B)
        if family.startswith("flow"):
            noisy = scheduler.scale_noise(x0, tt, noise)
        else:
            noisy = scheduler.add_noise(x0, noise, tt)
        target = _targets(scheduler, prediction_type, x0.reshape(B, D), noise.reshape(B, D), t).reshape(x0.shape)
        model_pred = _posterior_of_target(scheduler, prediction_type, x, t, noisy.reshape(B, D).double())[0]
        loss = F.mse_loss(model_pred.reshape(x0.shape).float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        mean, se = loss.double().mean().item(), loss.double().std().item() / math.sqrt(B)
        assert abs(mean - opt.loss[k]) <= 4.5 * math.hypot(se, opt.stderr[k]) + 1e-7, (k, mean, opt.loss[k])
        per_step.append(loss.double())
        if snr_gamma is not None:  # train_text_to_image.py's weighting, verbatim
            snr = compute_snr(scheduler, tt)
            w = torch.stack([snr, snr_gamma * torch.ones_like(tt)], dim=1).min(dim=1)[0]
            w = w / snr if prediction_type == "epsilon" else w / (snr + 1)
            weighted.append((loss * w).double())
    if snr_gamma is not None:
        batch = torch.stack(weighted)  # (timesteps, B): equal counts, so the mean is over uniform timesteps
        mean = batch.mean().item()
        se = math.sqrt(sum(r.var().item() / B for r in batch)) / len(batch)
        opt_mean, opt_se = opt.expected_loss()
        assert abs(mean - opt_mean) <= 4.5 * math.hypot(se, opt_se), (mean, opt_mean)


# --- factors, weights, conventions -------------------------------------------------------------


def test_factors_match_the_conversions_module(data, one_thread):
    ddpm = DDPMScheduler(num_train_timesteps=1000)
    for pt, ref in [("epsilon", lambda s: loss_factor(s, "eps")), ("sample", lambda s: loss_factor(s, "x0")),
                    ("v_prediction", lambda s: 1 + 1 / s**2)]:
        opt = optimal_training_loss(data, ddpm, VP_STEPS, prediction_type=pt, num_queries=64, progress=False)
        np.testing.assert_allclose(opt.factor, ref(opt.s), rtol=1e-6)
        np.testing.assert_allclose(opt.loss, opt.factor * opt.x0_loss, rtol=1e-14)
    fm = _fm(3.0)
    opt = optimal_training_loss(data, fm, fm.timesteps[[100, 500, 900]], num_queries=64, progress=False)
    np.testing.assert_allclose(opt.factor, loss_factor(opt.s, "velocity"), rtol=1e-12)
    np.testing.assert_allclose(opt.sigma, fm.sigmas[[100, 500, 900]].double().numpy(), rtol=0)


def test_snr_gamma_weights_are_those_of_the_training_script(data, one_thread):
    """Weights from a float64 SNR computed here; and weight * loss = min(snr, gamma) * x0-loss for every target."""
    ddpm = DDPMScheduler(num_train_timesteps=1000)
    ac = ddpm.alphas_cumprod.double().numpy()[VP_STEPS]
    snr = ac / (1 - ac)
    for pt, divisor in [("epsilon", snr), ("v_prediction", snr + 1), ("sample", 1.0)]:
        opt = optimal_training_loss(data, ddpm, VP_STEPS, prediction_type=pt, num_queries=64, snr_gamma=5,
                                    progress=False)
        np.testing.assert_allclose(opt.weights, np.minimum(snr, 5.0) / divisor, rtol=1e-6)
        np.testing.assert_allclose(opt.weighted_loss, np.minimum(snr, 5.0) * opt.x0_loss, rtol=1e-5)
        np.testing.assert_allclose(opt.weighted_stderr, opt.weights * opt.stderr, rtol=1e-14)
    plain = optimal_training_loss(data, ddpm, VP_STEPS, num_queries=64, progress=False)
    assert plain.weights is None and plain.weighted_loss is None
    with pytest.raises(ValueError, match="snr_gamma"):
        plain.expected_loss(weighted=True)


def test_prediction_type_none_reads_the_config(data, one_thread):
    v = DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction")
    a = optimal_training_loss(data, v, VP_STEPS, num_queries=64, progress=False)
    b = optimal_training_loss(data, DDPMScheduler(num_train_timesteps=1000), VP_STEPS,
                              prediction_type="v_prediction", num_queries=64, progress=False)
    assert a.prediction_type == "v_prediction"
    np.testing.assert_array_equal(a.loss, b.loss)
    assert optimal_training_loss(data, _fm(), [500], num_queries=64,
                                 progress=False).prediction_type == "flow_prediction"


def test_layouts_nchw_numpy_and_flat_agree(data, one_thread):
    ddpm = DDPMScheduler(num_train_timesteps=1000)
    kw = dict(num_queries=100, progress=False, seed=5)
    ref = optimal_training_loss(data.reshape(N, D), ddpm, VP_STEPS, **kw)
    for variant in (data, data.numpy(), data.reshape(N, D).numpy()):
        got = optimal_training_loss(variant, ddpm, VP_STEPS, **kw)
        np.testing.assert_array_equal(got.loss, ref.loss)
        np.testing.assert_array_equal(got.stderr, ref.stderr)
    assert ref.dim == D and ref.num_data == N
    # Timesteps as a tensor, a numpy array or a list; repeats get the repeated level's estimate.
    got = optimal_training_loss(data, ddpm, torch.tensor(VP_STEPS + [100]), **kw)
    np.testing.assert_array_equal(got.loss[:-1], ref.loss)
    assert got.loss[-1] == got.loss[0] and got.timesteps.dtype == np.int64


def test_expected_loss_and_read_only_result(data, one_thread):
    ddpm = DDPMScheduler(num_train_timesteps=1000)
    opt = optimal_training_loss(data, ddpm, [100, 100, 300], num_queries=64, progress=False)
    mean, se = opt.expected_loss()
    assert mean == pytest.approx(opt.loss.mean(), rel=1e-14)
    # The two 100s share one estimate: their errors add before squaring.
    assert se == pytest.approx(math.hypot(2 * opt.stderr[0], opt.stderr[2]) / 3, rel=1e-12)
    with pytest.raises(ValueError):
        opt.loss[0] = 0.0
    with pytest.raises(AttributeError):
        opt.seed = 1


def test_docstring_example_runs():
    result = doctest.testmod(integration, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 3 and result.failed == 0


# --- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize("make,steps,kwargs,exc,match", [
    (lambda: DDPMScheduler(), [10], dict(prediction_type="x0"), ValueError, "prediction_type"),
    (lambda: DDPMScheduler(), [10], dict(prediction_type="flow_prediction"), ValueError, "prediction_type"),
    (lambda: _fm(), [500], dict(prediction_type="v_prediction"), ValueError, "prediction_type"),
    (lambda: DDPMScheduler(), [1000], {}, ValueError, r"timesteps must lie in \[0, 999\]"),
    (lambda: DDPMScheduler(), [-1], {}, ValueError, "timesteps must lie"),
    (lambda: DDPMScheduler(), [3.5], {}, ValueError, "timesteps must be integers"),
    (lambda: DDPMScheduler(), [], {}, ValueError, "timesteps is empty"),
    (lambda: DDPMScheduler(), ["a"], {}, TypeError, "timesteps"),
    (lambda: DDPMScheduler(), [float("nan")], {}, ValueError, "timesteps must be finite"),
    (lambda: _fm(3.0), [500.4], {}, ValueError, "values of noise_scheduler.timesteps"),
    (lambda: _fm(), [0], {}, ValueError, "values of noise_scheduler.timesteps"),
    (lambda: diffusers.EDMEulerScheduler(), [10], {}, TypeError, "noise_scheduler"),
    (lambda: object(), [10], {}, TypeError, "noise_scheduler"),
    (lambda: diffusers.DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction"), [10], {},
     ValueError, "use_flow_sigmas"),
    (lambda: _fm(), [500], dict(snr_gamma=5.0), ValueError, "snr_gamma"),
    (lambda: DDPMScheduler(), [10], dict(snr_gamma=0.0), ValueError, "snr_gamma"),
    (lambda: DDPMScheduler(), [10], dict(snr_gamma="5"), TypeError, "snr_gamma"),
    (lambda: DDPMScheduler(), [10], dict(num_queries=0), ValueError, "num_queries"),
    (lambda: DDPMScheduler(), [10], dict(num_queries=1.5), TypeError, "num_queries"),
    (lambda: DDPMScheduler(), [10], dict(estimator="exact"), ValueError, "estimator"),
    (lambda: DDPMScheduler(), [10], dict(seed=-1), TypeError, "seed"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_bad_input_raises_a_clear_error(data, make, steps, kwargs, exc, match):
    kwargs = {"num_queries": 8, "progress": False, **kwargs}
    with pytest.raises(exc, match=match):
        optimal_training_loss(data, make(), steps, **kwargs)


@pytest.mark.parametrize("bad,exc", [([[1.0, 2.0]], TypeError), (torch.zeros(5), ValueError),
                                     (torch.zeros(0, 3), ValueError), (torch.zeros(4, 3, dtype=torch.bool), TypeError)])
def test_bad_data_raises(bad, exc):
    with pytest.raises(exc, match="data"):
        optimal_training_loss(bad, DDPMScheduler(), [10], num_queries=8, progress=False)


def test_missing_diffusers_gives_install_hint(data, monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # makes `import diffusers` raise ImportError
    with pytest.raises(ImportError, match=r"pip install diffkernels\[diffusers\]"):
        optimal_training_loss(data, object(), [10], num_queries=8)


def test_importing_the_integrations_does_not_import_diffusers():
    code = ("import sys, diffkernels, diffkernels.integrations, diffkernels.integrations.diffusers; "
            "assert 'diffusers' not in sys.modules, 'diffusers imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


# --- the example script ------------------------------------------------------------------------


def test_example_script_quick(tmp_path):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    sys.path.insert(0, str(EXAMPLES))
    try:
        import diffusers_sparse_training as example
    finally:
        sys.path.remove(str(EXAMPLES))
    threads = torch.get_num_threads()
    try:
        summary = example.main(["--quick", "--device", "cpu", "--out", str(tmp_path), "--no-progress"])
    finally:
        torch.set_num_threads(threads)
    for name in ("plot", "json"):
        assert Path(summary["files"][name]).stat().st_size > 0
    assert np.isfinite(summary["train_loss"]) and summary["steps"] >= 1
    assert all(np.isfinite(v) and v >= 0 for v in summary["optimal_loss"])


def test_meta_data_raises_even_when_only_s_inf_is_asked():
    """At sigma = 1 alone (s = inf) the estimator never runs; the data check still rejects a meta tensor."""
    scheduler = _fm()
    with pytest.raises(ValueError, match="data is a meta tensor"):
        optimal_training_loss(torch.empty(4, *SHAPE, device="meta"), scheduler, scheduler.timesteps[[0]],
                              num_queries=8, progress=False)
