"""benchmarks/bench_end_to_end.py --quick on a CPU: it runs, writes its tables, and what it timed is right.

The correctness check that can fail: on the same batch, model and seed, the training step with the fused
loss gives the same loss value (and parameter gradients) as the step with the eager loss --
``diffkernels.reference.sparse_mse_loss`` (float64, the same Philox mask) for the diffusers UNet step and
the full-logits cross-entropy for the transformers Llama masked-diffusion step -- to float32 tolerances.
The timings are only checked to be present and positive, never compared.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout
from benchmarks import bench_end_to_end as e2e  # noqa: E402


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("end_to_end")
    rc = e2e.main(["--quick", "--device", "cpu", "--out", str(out)])
    payload = json.loads((out / "end_to_end_cpu_quick.json").read_text())
    md = (out / "end_to_end_cpu_quick.md").read_text()
    return rc, payload, md


def _finite_positive(t: dict) -> bool:
    return all(math.isfinite(t[k]) and t[k] > 0 for k in ("median_ms", "q1_ms", "q3_ms", "min_ms"))


def test_writes_outputs(run):
    rc, payload, md = run
    assert rc == 0, payload["failed_checks"]
    assert payload["failed_checks"] == [] and payload["part_errors"] == {}
    assert payload["meta"]["device_kind"] == "cpu" and payload["meta"]["fused_backend"] == "cpp"
    assert payload["ceilings"]["copy_GBps"] > 0 and payload["ceilings"]["fp64_TFLOPs"] > 0
    for title in ("## (a) Image diffusion", "## (b) Masked-diffusion LM", "## (c) Optimal-loss curve", "## Checks"):
        assert title in md
    assert "All correctness checks passed" in md and "FAILED" not in md


def test_image_step_same_loss_as_reference(run):
    _, payload, _ = run
    rows = payload["image_rows"]
    assert [r["eta"] for r in rows] == list(e2e.ETAS)
    for r in rows:
        assert set(r["time"]) == set(e2e.IMAGE_METHODS)
        assert all(_finite_positive(t) for t in r["time"].values())
        for name in ("fused/mse", "fused/eager"):
            q = r["ratio"][name]
            assert 0 < q["q1"] <= q["median"] <= q["q3"]
        ck = r["check"]
        ref_loss = ck["reference"]["loss"]
        assert math.isfinite(ref_loss) and ref_loss > 0
        # fp32 forward and loss against the float64 reference with the same mask: float32 rounding only.
        assert ck["fused"]["ok"] and ck["fused"]["loss"] == pytest.approx(ref_loss, rel=1e-5)
        assert ck["fused"]["grad_rel"] <= 1e-4
        for other in ("mse", "eager"):
            if r["eta"] == 0.0:  # nothing masked: F.mse_loss and the torch.rand baseline compute the same loss
                assert ck[other]["ok"] and ck[other]["loss"] == pytest.approx(ref_loss, rel=1e-5)
            else:
                assert "ok" not in ck[other]  # the dense loss, or another mask: not compared
        assert math.isfinite(r["final_loss"])


def test_lm_step_same_loss_as_eager_full_logits(run):
    _, payload, _ = run
    (r,) = payload["lm_rows"]
    assert r["precision"] == "fp32" and r["V"] == e2e.LM_CONFIGS["quick"]["V"]
    assert set(r["time"]) == set(e2e.LM_METHODS) and all(_finite_positive(t) for t in r["time"].values())
    ck = r["check"]
    assert 0 < ck["masked_fraction"] < 1
    assert ck["fused"]["ok"] and ck["fused"]["loss"] == pytest.approx(ck["eager_full"]["loss"], rel=1e-4)
    assert ck["fused"]["grad_rel"] <= 1e-3
    # ... and both equal the float64 oracle of diffkernels.reference.
    assert ck["oracle_float64"]["fused_rel"] <= 1e-5 and ck["oracle_float64"]["eager_full_rel"] <= 1e-5


def test_curve_measured_and_extrapolated(run):
    _, payload, md = run
    c = payload["curve"]
    cfg = e2e.CURVE_CONFIGS["quick"]
    assert c["levels"] == cfg["levels"] == len(c["per_level_seconds"]) == len(c["per_level_status"])
    assert [r["level"] for r in c["measured"]] == list(cfg["measure"])
    assert [k for k, s in enumerate(c["per_level_status"]) if s == "measured"] == list(cfg["measure"])
    assert all(s > 0 for s in c["per_level_seconds"])
    assert c["total_seconds_extrapolated"] == pytest.approx(sum(c["per_level_seconds"]))
    assert c["full_curve_seconds_measured"] > 0
    j = [r["j_star_per_element"] for r in c["measured"]]
    # J*(s)/D: ~0 at s = 2e-3 (the posterior is the source row), -> the data's variance per element at s = 80.
    assert all(v >= 0 for v in j) and j[0] < 1e-3 * e2e.DATA_RMS**2 and j == sorted(j)
    assert j[-1] == pytest.approx(c["data_variance_per_element"], rel=0.05)
    # The measured levels agree with the same levels of the whole-curve run (same estimator, other seeds).
    full, full_se = c["full_curve_j_star_per_element"], c["full_curve_stderr_per_element"]
    for r in c["measured"]:
        k = r["level"]
        assert abs(r["j_star_per_element"] - full[k]) <= 5 * math.hypot(r["stderr_per_element"], full_se[k]) + 1e-12
    assert "extrapolated" in md and "measured" in md
