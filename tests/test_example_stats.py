"""python_examples/stats.py (paired t-tests, non-inferiority, power) against scipy and published values,
and reproduce.py's verdicts built on them."""

import math
import sys
from pathlib import Path

import numpy as np
import pytest

scipy_stats = pytest.importorskip("scipy.stats")
EXAMPLES = Path(__file__).resolve().parent.parent / "python_examples"
sys.path.insert(0, str(EXAMPLES))

import stats  # noqa: E402

RNG = np.random.default_rng(7)
TREAT = RNG.normal(1.0, 0.3, 6)
CTRL = TREAT + RNG.normal(0.25, 0.2, 6)  # treatment lower (better) by ~0.25


def test_paired_test_matches_scipy_ttest_rel():
    r = stats.paired_test(TREAT, CTRL)  # lower is better: d = CTRL - TREAT
    ref = scipy_stats.ttest_rel(CTRL, TREAT, alternative="greater")
    assert r.t == pytest.approx(ref.statistic, rel=1e-12) and r.p == pytest.approx(ref.pvalue, rel=1e-10)
    assert r.df == 5 and r.n == 6
    d = CTRL - TREAT
    lo, hi = scipy_stats.t.interval(0.95, 5, loc=d.mean(), scale=scipy_stats.sem(d))
    assert (r.ci_low, r.ci_high) == pytest.approx((lo, hi), rel=1e-12)
    hb = stats.paired_test(-TREAT, -CTRL, higher_is_better=True)  # the same comparison, mirrored
    assert hb.p == pytest.approx(r.p, rel=1e-12) and hb.mean == pytest.approx(r.mean, rel=1e-12)
    assert stats.paired_test(CTRL, TREAT).p == pytest.approx(1 - r.p, rel=1e-9)  # the other direction
    # by hand: d = (1, 2, 3): mean 2, sd 1, se 1/sqrt(3), t = 2 sqrt(3)
    h = stats.paired_test([0, 0, 0], [1, 2, 3])
    assert h.t == pytest.approx(2 * math.sqrt(3)) and h.se == pytest.approx(1 / math.sqrt(3))
    assert h.p == pytest.approx(scipy_stats.t.sf(2 * math.sqrt(3), 2))


def test_noninferiority_is_a_shifted_one_sided_test():
    margin = 0.1
    worse = CTRL + RNG.normal(0.05, 0.05, 6)  # slightly worse than the control, within the margin on average
    r = stats.noninferiority(worse, CTRL, margin)
    ref = scipy_stats.ttest_1samp(CTRL - worse + margin, 0.0, alternative="greater")
    assert r.p == pytest.approx(ref.pvalue, rel=1e-10) and r.margin == margin
    assert r.mean == pytest.approx(float((CTRL - worse).mean()))
    # worse by exactly nothing, tiny noise: non-inferior; worse by far more than the margin: not
    assert stats.noninferiority(CTRL + 1e-3 * RNG.standard_normal(6), CTRL, margin).significant
    assert not stats.noninferiority(CTRL + 0.5, CTRL, margin).significant
    with pytest.raises(ValueError, match="margin"):
        stats.noninferiority(TREAT, CTRL, 0.0)
    with pytest.raises(ValueError, match="paired"):
        stats.paired_test(TREAT, CTRL[:3])


def test_degenerate_cases():
    one = stats.paired_test([1.0], [2.0])
    assert one.n == 1 and math.isnan(one.p) and not one.significant and "no test" in one.describe()
    same = stats.paired_test([1.0, 2.0, 3.0], [2.0, 3.0, 4.0])  # identical differences: the sign decides
    assert same.p == 0.0 and same.se == 0.0 and same.significant
    assert stats.paired_test([2.0, 3.0], [2.0, 3.0]).p == 1.0


def test_power_and_seeds_needed_against_published_values():
    # one-sided paired t-test, alpha 0.05, power 0.8 (G*Power): d_z = 0.5 -> 27, 1.0 -> 8
    assert stats.seeds_needed(0.5) == 27 and stats.seeds_needed(1.0) == 8
    assert stats.power(0.5, 27) >= 0.8 > stats.power(0.5, 26)
    assert stats.seeds_needed(0.0) == math.inf and stats.seeds_needed(-1.0) == math.inf
    # power at d_z = 0 is the level; the detectable effect inverts the power
    assert stats.power(0.0, 10) == pytest.approx(0.05, rel=1e-9)
    d = stats.detectable_effect(5)
    assert stats.power(d, 5) == pytest.approx(0.8, abs=1e-8) and stats.detectable_effect(1) == math.inf
    # a Monte-Carlo check of the noncentral-t power (5 seeds, d_z = 1.2): 20000 simulated experiments
    rng = np.random.default_rng(0)
    d_sim = rng.normal(1.2, 1.0, (20000, 5))
    t = d_sim.mean(1) / (d_sim.std(1, ddof=1) / math.sqrt(5))
    hit = float((t > scipy_stats.t.ppf(0.95, 4)).mean())
    assert hit == pytest.approx(stats.power(1.2, 5), abs=4 * math.sqrt(0.25 / 20000))


def test_reproduce_verdicts_use_the_tests():
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    import reproduce

    reproduce.CLAIMS.clear()
    clear = reproduce.compare([1.0, 1.1, 0.9, 1.0], [2.0, 2.2, 1.9, 2.1], "clear")
    assert clear.startswith("**reproduced at this scale**") and "p = " in clear and "95% CI" in clear
    noisy = reproduce.compare([1.0, 2.0, 0.5], [1.2, 1.5, 1.3], "noisy")
    assert "not significant" in noisy and "seeds would give 80% power" in noisy
    assert reproduce.compare([2.0, 2.1, 2.2], [1.0, 1.1, 1.3]).startswith("**not reproduced")
    ni = reproduce.noninferior([10.2, 9.9, 10.1], [10.0, 10.0, 10.0], 1.0, "ni")
    assert "non-inferior" in ni and "margin 1" in ni
    table = reproduce.claims_table()
    assert len(table) == 2 + 3 and "one-sided p" in table[0]  # the unlabelled comparison is not recorded
    assert [c["claim"] for c in reproduce.CLAIMS] == ["clear", "noisy", "ni"]
