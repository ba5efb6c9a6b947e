"""Tests of multirun/measure/stats.py against independent computations.

Reference values come from brute-force enumeration, closed formulas written out
here, scipy called directly, published tables (Newcombe 1998) and simulations
with binomial acceptance bands; nothing is a copy of the module's own output.
"""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import scipy.stats as st
from hypothesis import given, settings
from hypothesis import strategies as hst

from multirun.measure import stats
from multirun.measure.stats import (
    EffectResult,
    compare_means,
    compare_rates,
    format_p,
    holm,
    holm_adjust,
    one_sample_z,
    paired_difference,
)

ALTERNATIVES = ("greater", "less", "two-sided")


def _p_from_null(null: np.ndarray, observed: float, alternative: str) -> float:
    """p-value from an enumerated null; ties counted with an absolute tolerance
    far below the spacing of the small-integer data used here."""
    ge = np.mean(null >= observed - 1e-9)
    le = np.mean(null <= observed + 1e-9)
    return {"greater": ge, "less": le, "two-sided": min(1.0, 2 * min(ge, le))}[alternative]


def _brute_force_split_p(t: list[float], c: list[float], alternative: str) -> float:
    pooled = np.array(t + c, dtype=float)
    k, n = len(t), len(pooled)
    null = []
    for idx in itertools.combinations(range(n), k):
        mask = np.zeros(n, bool)
        mask[list(idx)] = True
        null.append(pooled[mask].mean() - pooled[~mask].mean())
    return _p_from_null(np.array(null), float(np.mean(t) - np.mean(c)), alternative)


def _brute_force_sign_flip_p(a: list[float], b: list[float], alternative: str) -> float:
    d = np.array(a, float) - np.array(b, float)
    null = [np.mean(d * np.array(signs)) for signs in itertools.product((1, -1), repeat=d.size)]
    return _p_from_null(np.array(null), float(d.mean()), alternative)


# --------------------------------------------------------------- compare_means


@pytest.mark.parametrize("alternative", ALTERNATIVES)
@pytest.mark.parametrize(
    "t, c",
    [
        ([5.0, 3.0, 7.0, 4.0], [1.0, 2.0, 3.0, 6.0, 2.0]),  # C(9,4) = 126 splits
        ([0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 0.0]),  # many ties
        ([2.0, -1.0, 4.0, 3.0, 0.0, 1.0], [1.0, -2.0, 0.0]),  # C(9,3) = 84
    ],
)
def test_compare_means_exact_p_equals_brute_force(t, c, alternative):
    r = compare_means(t, c, metric="m", alternative=alternative, n_resamples=2000)
    assert r.exact is True
    assert r.p_value == pytest.approx(_brute_force_split_p(t, c, alternative), abs=1e-12)
    assert r.effect == pytest.approx(np.mean(t) - np.mean(c))
    assert (r.n_treated, r.n_control) == (len(t), len(c))


@pytest.mark.parametrize("alternative", ALTERNATIVES)
@pytest.mark.parametrize("t, c", [([9.0], [1.0, 4.0, 2.0, 9.0, 3.0]), ([1.0, 5.0, 2.0], [3.0]), ([2.0], [1.0])])
def test_compare_means_single_item_arm_is_exact(t, c, alternative):
    # scipy's permutation_test needs two items per arm; the module enumerates
    # these splits itself and must agree with brute force.
    r = compare_means(t, c, metric="m", alternative=alternative)
    assert r.exact is True
    assert r.p_value == pytest.approx(_brute_force_split_p(t, c, alternative), abs=1e-12)
    assert math.isnan(r.ci_low) and math.isnan(r.ci_high)  # no spread from one item


def test_compare_means_monte_carlo_close_to_exact():
    rng = np.random.default_rng(5)
    t = rng.integers(0, 10, 7).astype(float).tolist()
    c = rng.integers(0, 8, 7).astype(float).tolist()  # C(14,7) = 3432 splits
    exact = _brute_force_split_p(t, c, "greater")
    r = compare_means(t, c, metric="m", n_resamples=3000, seed=1)
    assert r.exact is False
    # Monte Carlo standard error of p with 3000 draws is <= 0.0092.
    assert abs(r.p_value - exact) < 0.04


def test_compare_means_calibrated_under_null():
    # Both arms from one distribution: the rejection rate at 0.05 must be
    # binomial(reps, <=0.05). Seeds are fixed, so the test is deterministic.
    reps, rejections = 200, 0
    rng = np.random.default_rng(2024)
    for rep in range(reps):
        x = rng.gamma(2.0, size=30)  # skewed scores
        r = compare_means(x[:14], x[14:], metric="m", n_resamples=199, seed=rep)
        rejections += r.p_value <= 0.05
    lo, hi = st.binom.interval(0.999, reps, 0.05)
    assert lo <= rejections <= hi, rejections


def test_compare_means_power_and_ci():
    rng = np.random.default_rng(7)
    control = rng.normal(0.0, 1.0, 25)
    treated = rng.normal(2.0, 1.0, 25)
    r = compare_means(treated, control, metric="logprob")
    assert r.p_value < 0.01
    assert r.ci_method == "bootstrap BCa"
    assert 0 < r.ci_low < r.effect < r.ci_high
    # Two-sided and "less" for the same data: p(less) is near 1.
    assert compare_means(treated, control, metric="m", alternative="less").p_value > 0.99
    assert compare_means(treated, control, metric="m", alternative="two-sided").p_value < 0.01


def test_compare_means_ci_coverage():
    # The bootstrap interval of the difference of means covers the true
    # difference (1.0) at about its nominal rate.
    rng = np.random.default_rng(11)
    reps, covered = 150, 0
    for rep in range(reps):
        t = rng.exponential(2.0, 30)  # mean 2
        c = rng.exponential(1.0, 30)  # mean 1
        r = compare_means(t, c, metric="m", n_resamples=499, seed=rep)
        covered += r.ci_low <= 1.0 <= r.ci_high
    # BCa at n=30 under-covers a little for skewed data; accept 0.85 .. 0.99.
    assert 0.85 * reps <= covered <= 0.99 * reps, covered


def test_compare_means_deterministic_and_seeded():
    rng = np.random.default_rng(3)
    t, c = rng.normal(0.3, 1, 40), rng.normal(0, 1, 40)
    a = compare_means(t, c, metric="m", n_resamples=500, seed=4)
    b = compare_means(t.tolist(), c.tolist(), metric="m", n_resamples=500, seed=4)
    assert a == b
    other = compare_means(t, c, metric="m", n_resamples=500, seed=5)
    assert (other.p_value, other.ci_low) != (a.p_value, a.ci_low)


def test_cached_random_draws_give_what_a_fresh_draw_gives():
    # Monte Carlo path (C(60, 30) splits): the splits and the bootstrap resamples depend
    # on the arm sizes and the seed only, so later calls reuse them; a result must not
    # depend on the cache.
    rng = np.random.default_rng(11)
    first_scores = rng.normal(0.4, 1, 30), rng.normal(0, 1, 30)
    other_scores = rng.normal(0.1, 2, 30), rng.normal(0, 2, 30)
    stats._DRAW_CACHE.clear()
    first = compare_means(*first_scores, metric="m", n_resamples=3000, seed=8)
    cached = compare_means(*other_scores, metric="m", n_resamples=3000, seed=8)
    assert first.exact is False and sorted(key[0] for key in stats._DRAW_CACHE) == ["bootstrap", "splits"]
    stats._DRAW_CACHE.clear()
    assert compare_means(*other_scores, metric="m", n_resamples=3000, seed=8) == cached
    assert compare_means(*first_scores, metric="m", n_resamples=3000, seed=8) == first


def test_ci_resamples_sets_the_bootstrap_alone():
    rng = np.random.default_rng(12)
    t, c = rng.normal(0.5, 1, 25), rng.normal(0, 1, 25)
    both = compare_means(t, c, metric="m", n_resamples=2000, seed=3)
    assert compare_means(t, c, metric="m", n_resamples=2000, seed=3, ci_resamples=2000) == both
    fewer = compare_means(t, c, metric="m", n_resamples=2000, seed=3, ci_resamples=300)
    assert fewer.p_value == both.p_value
    assert (fewer.ci_low, fewer.ci_high) != (both.ci_low, both.ci_high)
    with pytest.raises(ValueError, match="ci_resamples must be a positive integer"):
        compare_means(t, c, metric="m", ci_resamples=0)


def test_compare_means_constant_data():
    same = compare_means([1.5] * 4, [1.5] * 5, metric="m")
    assert same.p_value == 1.0 and same.effect == 0.0
    assert same.ci_low == same.ci_high == 0.0
    shifted = compare_means([2.0] * 3, [1.0] * 3, metric="m")
    assert (shifted.ci_low, shifted.effect, shifted.ci_high) == (1.0, 1.0, 1.0)
    assert shifted.p_value == pytest.approx(1 / math.comb(6, 3))
    # Constant but for one ulp: the jackknife sees no spread, BCa's acceleration is 0/0,
    # and the interval falls back to the percentile one.
    almost = compare_means([1.0] * 9 + [1.0 + 2**-52], [0.0] * 3, metric="m")
    assert almost.ci_method == "bootstrap percentile" and almost.ci_low == almost.ci_high == 1.0


def test_compare_means_empty_and_nan(recwarn):
    r = compare_means([], [1.0, 2.0], metric="m")
    assert r.n_treated == 0 and r.n_control == 2
    assert math.isnan(r.effect) and math.isnan(r.p_value) and math.isnan(r.ci_low)
    assert math.isnan(r.treated_mean) and r.control_mean == 1.5
    both = compare_means(np.array([np.nan]), [], metric="m")
    assert (both.n_treated, both.n_control) == (0, 0) and math.isnan(both.p_value)
    # NaN scores mean "no score" and are dropped.
    with_nan = compare_means([5.0, np.nan, 3.0, 7.0, 4.0], [1.0, 2.0, np.nan, 3.0, 6.0, 2.0], metric="m")
    clean = compare_means([5.0, 3.0, 7.0, 4.0], [1.0, 2.0, 3.0, 6.0, 2.0], metric="m")
    assert with_nan == clean
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_compare_means_rejects_bad_arguments():
    with pytest.raises(ValueError, match="infinite"):
        compare_means([1.0, -np.inf], [0.0, 1.0], metric="logprob")
    with pytest.raises(ValueError, match="alternative"):
        compare_means([1.0, 2.0], [0.0, 1.0], metric="m", alternative="bigger")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="ci_level"):
        compare_means([1.0, 2.0], [0.0, 1.0], metric="m", ci_level=95)
    with pytest.raises(ValueError, match="n_resamples"):
        compare_means([1.0, 2.0], [0.0, 1.0], metric="m", n_resamples=0)


@pytest.mark.parametrize("sizes", [(2, 3), (7, 19), (40, 40), (3000, 2500), (25,)])
def test_bootstrap_interval_is_scipys_from_the_same_draws(sizes):
    # The interval is computed directly (closed-form jackknife), not by scipy.stats.bootstrap;
    # from the same seeded draws both must give the same BCa interval, one sample or two,
    # small or large (above a few thousand items scipy's generic jackknife is slow).
    rng = np.random.default_rng(sum(sizes))
    data = tuple(rng.lognormal(0, 1, n) for n in sizes)  # skewed: BCa's corrections matter
    resamples = 999
    low, high, method = stats._bootstrap_ci(data, n_resamples=resamples, ci_level=0.9, seed=6)
    statistic = stats._diff_of_means if len(data) == 2 else stats._mean_stat
    reference = st.bootstrap(
        data,
        statistic,
        n_resamples=resamples,
        batch=stats._batch(sum(sizes), resamples),
        vectorized=True,
        paired=False,
        confidence_level=0.9,
        method="BCa",
        **{stats._RNG_KW: stats._rng(6, 1)},
    ).confidence_interval
    assert method == "bootstrap BCa"
    assert (low, high) == pytest.approx((reference.low, reference.high), rel=1e-9)


def test_compare_means_large_arms_get_bca():
    rng = np.random.default_rng(0)
    r = compare_means(rng.normal(0.1, 1, 30000), rng.normal(0, 1, 30000), metric="m", n_resamples=300)
    assert r.ci_method == "bootstrap BCa" and r.exact is False
    assert r.ci_low < r.effect < r.ci_high


# --------------------------------------------------------------- compare_rates


@pytest.mark.parametrize("alternative", ALTERNATIVES)
def test_compare_rates_p_equals_scipy_fisher(alternative):
    rng = np.random.default_rng(1)
    for _ in range(25):
        tn, cn = int(rng.integers(1, 40)), int(rng.integers(1, 40))
        ts, cs = int(rng.integers(0, tn + 1)), int(rng.integers(0, cn + 1))
        r = compare_rates(ts, tn, cs, cn, metric="rate", alternative=alternative)
        expected = st.fisher_exact([[ts, tn - ts], [cs, cn - cs]], alternative=alternative).pvalue
        assert r.p_value == pytest.approx(min(1.0, expected), rel=1e-12)
        assert r.effect == pytest.approx(ts / tn - cs / cn)
        assert r.test == "Fisher exact" and r.exact is True


@pytest.mark.parametrize(
    "counts, ci",
    [
        # Newcombe (1998), Stat. Med. 17:873-890, Table II, method 10.
        ((56, 70, 48, 80), (0.0524, 0.3339)),
        ((9, 10, 3, 10), (0.1705, 0.8090)),
        ((5, 56, 0, 29), (-0.0381, 0.1926)),
        ((0, 10, 0, 20), (-0.1611, 0.2775)),
        ((10, 10, 0, 20), (0.6791, 1.0)),
    ],
)
def test_compare_rates_ci_matches_newcombe_table(counts, ci):
    r = compare_rates(*counts, metric="rate")
    assert (round(r.ci_low, 4), round(r.ci_high, 4)) == ci


def test_wilson_interval_is_scipys():
    for n in (1, 2, 7, 40, 1000):
        for k in sorted({0, 1, n // 3, n - 1, n}):
            for level in (0.9, 0.95, 0.99):
                reference = st.binomtest(k, n).proportion_ci(confidence_level=level, method="wilson")
                assert stats._wilson(k, n, level) == pytest.approx(
                    (reference.low, reference.high), rel=1e-12, abs=1e-15
                )


def test_compare_rates_ci_coverage():
    rng = np.random.default_rng(2)
    p_t, p_c, n = 0.3, 0.1, 60
    reps = 1000
    ts = rng.binomial(n, p_t, reps)
    cs = rng.binomial(n, p_c, reps)
    covered = sum(
        (r := compare_rates(int(a), n, int(b), n, metric="m")).ci_low <= p_t - p_c <= r.ci_high for a, b in zip(ts, cs)
    )
    # Newcombe's interval has close to nominal coverage; allow the binomial
    # spread around 0.95 plus a little for the method's approximation.
    assert 0.93 * reps <= covered <= 0.975 * reps, covered


def test_compare_rates_empty_arm_and_bad_counts():
    r = compare_rates(0, 0, 3, 10, metric="m")
    assert math.isnan(r.effect) and math.isnan(r.p_value) and math.isnan(r.treated_mean)
    assert r.control_mean == pytest.approx(0.3)
    assert compare_rates(np.int64(3), np.int64(5), 1, 5, metric="m").n_treated == 5
    with pytest.raises(ValueError, match="successes <= n"):
        compare_rates(6, 5, 1, 5, metric="m")
    with pytest.raises(ValueError, match="integer count"):
        compare_rates(2.5, 5, 1, 5, metric="m")  # type: ignore[arg-type]


# ---------------------------------------------------------------- one_sample_z


@pytest.mark.parametrize("alternative", ALTERNATIVES)
def test_one_sample_z_matches_formula(alternative):
    x = [0.3, 1.2, -0.4, 0.9, 0.05, 1.7, 0.2]
    r = one_sample_z(x, metric="gw", alternative=alternative, null_mean=0.1, null_sd=1.1)
    z = math.sqrt(len(x)) * (np.mean(x) - 0.1) / 1.1
    upper = 0.5 * math.erfc(z / math.sqrt(2))  # 1 - Phi(z)
    expected = {"greater": upper, "less": 1 - upper, "two-sided": math.erfc(abs(z) / math.sqrt(2))}[alternative]
    assert r.p_value == pytest.approx(expected, rel=1e-9)
    assert r.effect == pytest.approx(np.mean(x) - 0.1)
    half = st.t.ppf(0.975, len(x) - 1) * np.std(x, ddof=1) / math.sqrt(len(x))
    assert (r.ci_low, r.ci_high) == pytest.approx((r.effect - half, r.effect + half))
    assert r.test.startswith("two-sided z" if alternative == "two-sided" else "one-sided z")


def test_one_sample_z_controls_are_reported_not_tested():
    x = [0.5, 0.2, 0.9, 0.1]
    plain = one_sample_z(x, metric="gw")
    with_ctrl = one_sample_z(x, metric="gw", control_values=[0.1, -0.3, np.nan, 0.4, 0.2])
    assert plain.test == "one-sided z (N(0,1) null)"
    assert with_ctrl.p_value == plain.p_value and with_ctrl.effect == plain.effect
    assert with_ctrl.n_control == 4 and with_ctrl.control_mean == pytest.approx(0.1)
    assert plain.n_control == 0 and math.isnan(plain.control_mean)


def test_one_sample_z_calibrated_and_powerful():
    rng = np.random.default_rng(9)
    reps = 400
    p = np.array([one_sample_z(rng.normal(size=50), metric="gw").p_value for _ in range(reps)])
    lo, hi = st.binom.interval(0.999, reps, 0.05)
    assert lo <= np.sum(p <= 0.05) <= hi
    assert one_sample_z(rng.normal(0.5, 1.0, 100), metric="gw").p_value < 1e-3


def test_one_sample_z_edge_cases():
    empty = one_sample_z([], metric="gw", control_values=[0.0, 1.0])
    assert math.isnan(empty.p_value) and empty.n_treated == 0 and empty.control_mean == 0.5
    one = one_sample_z([1.0], metric="gw")
    assert one.p_value == pytest.approx(0.5 * math.erfc(1 / math.sqrt(2)))
    assert one.ci_high - one.ci_low == pytest.approx(2 * st.norm.ppf(0.975))
    const = one_sample_z([0.2] * 5, metric="gw")
    assert const.ci_low == pytest.approx(0.2) and const.ci_high == pytest.approx(0.2)
    with pytest.raises(ValueError, match="null_sd"):
        one_sample_z([1.0], metric="gw", null_sd=0.0)


# ------------------------------------------------------------ paired_difference


@pytest.mark.parametrize("alternative", ALTERNATIVES)
@pytest.mark.parametrize(
    "a, b",
    [
        ([3.0, 1.0, 4.0, 1.0, 5.0], [2.0, 2.0, 1.0, 1.0, 3.0]),  # includes a zero difference
        ([0.0, 2.0, 1.0, 3.0, 2.0, 5.0, 1.0], [1.0, 0.0, 0.0, 1.0, 2.0, 1.0, 0.0]),
        ([1.0], [3.0]),  # one pair: handled by the module itself
    ],
)
def test_paired_difference_exact_equals_brute_force(a, b, alternative):
    r = paired_difference(a, b, metric="qa", alternative=alternative, n_resamples=2000)
    assert r.exact is True
    assert r.p_value == pytest.approx(_brute_force_sign_flip_p(a, b, alternative), abs=1e-12)
    assert r.effect == pytest.approx(np.mean(np.subtract(a, b)))
    assert r.n_treated == r.n_control == len(a)


def test_paired_difference_ci_nan_pairs_and_errors():
    rng = np.random.default_rng(4)
    base = rng.normal(size=40)
    a = base + 0.8 + rng.normal(0, 0.3, 40)
    r = paired_difference(a, base, metric="qa", alternative="greater")
    assert r.exact is False and r.p_value < 0.01
    assert r.ci_method == "paired bootstrap BCa" and r.ci_low < r.effect < r.ci_high
    # The pairing matters: the arms' own spread (sd 1) would make the
    # independent-samples interval much wider than the paired one.
    unpaired = compare_means(a, base, metric="qa")
    assert r.ci_high - r.ci_low < 0.5 * (unpaired.ci_high - unpaired.ci_low)
    # A NaN on either side drops the whole pair.
    a2, b2 = np.append(a, [np.nan, 1.0]), np.append(base, [0.0, np.nan])
    assert paired_difference(a2, b2, metric="qa", alternative="greater") == r
    with pytest.raises(ValueError, match="equal lengths"):
        paired_difference([1.0, 2.0], [1.0], metric="qa")
    empty = paired_difference([np.nan], [1.0], metric="qa")
    assert empty.n_treated == 0 and math.isnan(empty.p_value)


# ------------------------------------------------------------------------ Holm


def _holm_reference(p: list[float]) -> list[float]:
    """Textbook Holm, written as loops over the non-NaN values."""
    idx = [i for i, v in enumerate(p) if not math.isnan(v)]
    m = len(idx)
    ranked = sorted(idx, key=lambda i: p[i])
    out = [math.nan] * len(p)
    running = 0.0
    for k, i in enumerate(ranked):
        running = max(running, (m - k) * p[i])
        out[i] = min(1.0, running)
    return out


def _holm_step_down_rejections(p: list[float], alpha: float) -> set[int]:
    """Holm's sequential procedure: reject in ascending order until the first
    p_(k) with (m - k + 1) p_(k) > alpha."""
    idx = sorted((i for i, v in enumerate(p) if not math.isnan(v)), key=lambda i: p[i])
    m, rejected = len(idx), set()
    for k, i in enumerate(idx):
        if (m - k) * p[i] > alpha:
            break
        rejected.add(i)
    return rejected


p_lists = hst.lists(
    hst.one_of(hst.floats(0.0, 1.0), hst.just(math.nan), hst.sampled_from([0.01, 0.02, 0.5])),
    max_size=30,
)


@settings(max_examples=300, deadline=None)
@given(p_lists)
def test_holm_matches_reference_and_properties(p):
    adj = holm(p)
    assert adj.shape == (len(p),)
    ref = _holm_reference(p)
    np.testing.assert_allclose(adj, ref, rtol=1e-12, equal_nan=True)
    arr = np.array(p, dtype=float)
    fin = ~np.isnan(arr)
    assert np.array_equal(np.isnan(adj), ~fin)  # NaN stays NaN, nothing else does
    assert np.all(adj[fin] >= arr[fin]) and np.all(adj[fin] <= 1.0)
    order = np.argsort(arr[fin], kind="stable")
    assert np.all(np.diff(adj[fin][order]) >= 0)  # monotone in sorted order
    for alpha in (0.01, 0.05, 0.2):
        assert set(np.flatnonzero(fin & (adj <= alpha))) == _holm_step_down_rejections(p, alpha)


def test_holm_small_cases():
    np.testing.assert_allclose(holm([0.01, 0.04, 0.03]), [0.03, 0.06, 0.06])
    np.testing.assert_allclose(holm([0.5, 0.9]), [1.0, 1.0])
    assert holm([]).shape == (0,)
    assert np.isnan(holm([math.nan])).all()
    with pytest.raises(ValueError):
        holm([1.2])


def test_holm_adjust_copies_in_order():
    rs = [
        compare_rates(9, 10, 1, 10, metric="a"),
        compare_rates(0, 0, 1, 10, metric="empty"),  # NaN p: not counted
        compare_rates(5, 10, 5, 10, metric="b"),
        one_sample_z([0.8, 1.1, 0.4], metric="gw"),
    ]
    adjusted = holm_adjust(rs)
    assert [r.metric for r in adjusted] == ["a", "empty", "b", "gw"]
    assert all(r.p_holm is None for r in rs)  # inputs untouched
    finite_p = [rs[0].p_value, rs[2].p_value, rs[3].p_value]
    expected = _holm_reference(finite_p)
    got = [adjusted[0].p_holm, adjusted[2].p_holm, adjusted[3].p_holm]
    assert got == pytest.approx(expected)
    assert math.isnan(adjusted[1].p_holm)
    np.testing.assert_array_equal([a.p_value for a in adjusted], [r.p_value for r in rs])


# ------------------------------------------------------------------ reporting


FLOAT_FIELDS = {"treated_mean", "control_mean", "effect", "ci_low", "ci_high", "ci_level", "p_value"}


def test_to_dict_json_round_trip():
    results = holm_adjust(
        [
            compare_means([1.0, 2.5, 3.0], [0.5, 1.0, 0.0, 0.2], metric="lp"),
            compare_means([], [1.0], metric="lp_empty"),
            compare_rates(3, 10, 1, 10, metric="rate"),
            one_sample_z([0.3, 0.1], metric="gw", control_values=[0.0]),
            paired_difference([1.0, 2.0, 3.0], [0.0, 2.5, 1.0], metric="pair"),
        ]
    )
    for r in results:
        d = r.to_dict()
        text = json.dumps(d, allow_nan=False)  # strict JSON: NaN became null
        back = EffectResult.from_dict(json.loads(text))
        for key, value in d.items():
            got = getattr(back, key)
            if value is None and key in FLOAT_FIELDS:
                assert math.isnan(got), key
            elif value is None:
                assert got is None, key  # p_holm, exact: "not set" stays None
            else:
                assert got == value and type(got) is type(value), key
        if all(v is not None for v in d.values()):
            assert back == r
    with pytest.raises(ValueError, match="unknown keys"):
        EffectResult.from_dict({**results[0].to_dict(), "extra": 1})


@pytest.mark.parametrize(
    "p, text",
    [
        (0.0, "<1e-4"),
        (3e-7, "<1e-4"),
        (1e-4, "0.0001"),
        (0.00032, "0.00032"),
        (0.012, "0.012"),
        (0.0499, "0.05"),
        (0.0999, "0.10"),
        (0.1, "0.10"),
        (0.351, "0.35"),
        (1.0, "1.00"),
        (math.nan, "n/a"),
        (None, "n/a"),
    ],
)
def test_format_p(p, text):
    assert format_p(p) == text


def test_format_p_rejects_out_of_range():
    with pytest.raises(ValueError):
        format_p(1.5)
