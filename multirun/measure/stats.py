"""Effects against controls: effect sizes, confidence intervals, p-values, Holm.

Every experiment is measured against its *controls* (items that were never
injected). For each experiment and metric this module returns one
:class:`EffectResult`: treated and control means, an effect size, a two-sided
confidence interval and a p-value from a test that fits the metric. Across the
experiments of one run, :func:`holm_adjust` adds Holm-corrected p-values; reports
show both the raw and the corrected value.

Which function for which metric:

==============================  ==========================================  ==================
metric                          p-value                                     CI
==============================  ==========================================  ==================
continuous per-item scores      permutation test, difference of means       bootstrap (BCa)
(:func:`compare_means`)         (exact when the splits are few)             per arm
binary outcomes                 Fisher's exact test                         Newcombe hybrid
(:func:`compare_rates`)                                                     score (Wilson)
Gaussian watermark statistic    z test of the mean against the exact        t interval
(:func:`one_sample_z`)          N(0, 1) null                                of the mean
paired scores of two arms       sign-flip permutation test of the           paired bootstrap
(:func:`paired_difference`)     mean paired difference (exact when small)   (BCa)
==============================  ==========================================  ==================

Conventions shared by all functions:

* ``alternative`` is one of ``"greater"`` (treated above control, the default:
  injection is expected to *raise* a score), ``"less"`` or ``"two-sided"``.
* Confidence intervals are always **two-sided** at ``ci_level``, whatever the
  alternative of the test, because reports show an effect with its interval. A
  one-sided test at 0.05 can therefore reject while a 95% interval touches 0.
* NaN entries of score arrays mean "no score for this item" and are dropped
  (pairwise for paired data). Infinite scores are an error: their mean is not a
  usable effect size.
* Empty arms never crash: the result carries NaN effect, CI and p-value, and the
  counts say why. An arm with a single item still gets an exact p-value, but no
  bootstrap interval (NaN): one observation says nothing about its spread.
* Constant data: the bootstrap interval collapses to the point estimate, and a
  permutation test of no difference gives p = 1.
* Resampling is seeded (``seed``); the same inputs and seed give identical
  results. Monte Carlo p-values are ``(hits + 1) / (n_resamples + 1)``, so they
  are valid but never below ``1 / (n_resamples + 1)``; raise ``n_resamples``
  when many experiments must survive Holm's correction.
"""

from __future__ import annotations

import inspect
import math
import operator
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Literal, get_args

import numpy as np
from numpy.typing import ArrayLike
from scipy import special as _sp
from scipy import stats as _st

Alternative = Literal["greater", "less", "two-sided"]
_ALTERNATIVES: tuple[str, ...] = get_args(Alternative)

# Largest number of floats one vectorised resampling batch may hold (32 MiB of
# float64): scipy otherwise materialises n_resamples x n values at once, which is
# gigabytes for arms of tens of thousands of items.
_MAX_BATCH_ELEMENTS = 1 << 22

# scipy >= 1.15 takes ``rng``; older releases (pyproject allows >= 1.11) only
# ``random_state``.
_RNG_KW = "rng" if "rng" in inspect.signature(_st.permutation_test).parameters else "random_state"

# Relative tolerance used by scipy.stats.permutation_test to count numerically
# distinct but theoretically equal null statistics as ties; the hand-written
# exact paths below use the same one so that both agree.
_TIE_EPS = float(np.finfo(np.float64).eps) * 100


@dataclass
class EffectResult:
    """One metric of one experiment: treated vs control, effect, CI, p-value.

    Attributes:
        metric: the metric's name, e.g. ``"answer_logprob"``.
        test: the test behind ``p_value``, named so that reports show it.
        alternative: the alternative hypothesis of that test.
        n_treated, n_control: observations that entered the comparison (after
            dropping NaN scores).
        treated_mean, control_mean: arm means (rates for binary outcomes; for
            :func:`one_sample_z` the control mean is of fresh control noise).
        effect: ``treated_mean - control_mean``; for :func:`one_sample_z` it is
            ``treated_mean - null_mean`` (see there).
        ci_low, ci_high, ci_level: two-sided confidence interval of ``effect``.
        p_value: raw p-value.
        p_holm: Holm-adjusted p-value, set by :func:`holm_adjust`.
        ci_method: how the interval was computed (e.g. ``"bootstrap BCa"``).
        exact: whether ``p_value`` is exact (full enumeration, Fisher, exact
            null) rather than a Monte Carlo estimate; None when there is none.

    Example:
        >>> r = compare_rates(9, 10, 2, 10, metric="exact_match")
        >>> (r.test, round(r.effect, 2), r.p_value < 0.01)
        ('Fisher exact', 0.7, True)
    """

    metric: str
    test: str
    alternative: Alternative
    n_treated: int
    n_control: int
    treated_mean: float
    control_mean: float
    effect: float
    ci_low: float
    ci_high: float
    ci_level: float
    p_value: float
    p_holm: float | None = None
    ci_method: str = ""
    exact: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain, strict-JSON dict: non-finite floats (NaN, inf) become None.

        Example:
            >>> import json
            >>> r = compare_rates(0, 0, 1, 4, metric="m")
            >>> json.dumps(r.to_dict(), allow_nan=False) is not None
            True
        """
        out: dict[str, Any] = {}
        for key, value in asdict(self).items():
            if isinstance(value, (float, np.floating)):
                value = float(value) if math.isfinite(value) else None
            elif isinstance(value, np.integer):
                value = int(value)
            elif isinstance(value, np.bool_):
                value = bool(value)
            out[key] = value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EffectResult:
        """Inverse of :meth:`to_dict` (None in a float field becomes NaN;
        ``p_holm`` stays None). Unknown keys are an error, missing optional
        ones take their defaults."""
        names = {f.name: f for f in fields(cls)}
        unknown = set(data) - set(names)
        if unknown:
            raise ValueError(f"EffectResult.from_dict: unknown keys {sorted(unknown)}")
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if key in _FLOAT_FIELDS:
                value = math.nan if value is None else float(value)
            kwargs[key] = value
        return cls(**kwargs)


_FLOAT_FIELDS = frozenset({"treated_mean", "control_mean", "effect", "ci_low", "ci_high", "ci_level", "p_value"})


# --------------------------------------------------------------------- helpers


def _check_common(
    alternative: str,
    ci_level: float,
    n_resamples: int | None = None,
    seed: int | None = None,
    ci_resamples: int | None = None,
) -> None:
    if alternative not in _ALTERNATIVES:
        raise ValueError(f"alternative must be one of {_ALTERNATIVES}, got {alternative!r}")
    if not 0.0 < ci_level < 1.0:
        raise ValueError(f"ci_level must be in (0, 1), got {ci_level!r}")
    for name, count in (("n_resamples", n_resamples), ("ci_resamples", ci_resamples)):
        if count is not None and (int(count) != count or count < 1):
            raise ValueError(f"{name} must be a positive integer, got {count!r}")
    if seed is not None and (int(seed) != seed or seed < 0):
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")


def _scores(values: ArrayLike | None, *, metric: str, name: str) -> np.ndarray:
    """1-D float64 copy of a score array, NaN ("no score") dropped."""
    if values is None:
        return np.empty(0)
    arr = np.asarray(values, dtype=np.float64).ravel()
    if np.isinf(arr).any():
        raise ValueError(f"metric {metric!r}: {name} contains infinite scores")
    return arr[~np.isnan(arr)]


def _mean(x: np.ndarray) -> float:
    """Mean that is NaN (not a RuntimeWarning) for an empty array."""
    return float(np.mean(x)) if x.size else math.nan


def _is_constant(x: np.ndarray) -> bool:
    return x.size > 0 and bool(np.all(x == x[0]))


def _batch(n_values: int, n_resamples: int) -> int:
    return max(1, min(n_resamples, _MAX_BATCH_ELEMENTS // max(n_values, 1)))


def _rng(seed: int, stream: int) -> np.random.Generator:
    # Independent streams for the permutation test and the bootstrap, so that
    # changing one's n_resamples does not change the other's draws.
    return np.random.default_rng([int(seed), stream])


def _diff_of_means(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(x, axis=axis) - np.mean(y, axis=axis)


def _mean_stat(x: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(x, axis=axis)


def _p_from_null(null: np.ndarray, observed: float, alternative: str, *, monte_carlo: bool = False) -> float:
    """p-value from a null distribution with scipy's conventions (relative tie
    tolerance; two-sided = 2 * min of one-sided). An enumerated null gives the
    exact p; a Monte Carlo one counts the observed split too, (k + 1) / (n + 1),
    so p is never 0."""
    gamma = abs(_TIE_EPS * observed)
    adjustment = 1 if monte_carlo else 0
    p_greater = float(np.count_nonzero(null >= observed - gamma) + adjustment) / (null.size + adjustment)
    p_less = float(np.count_nonzero(null <= observed + gamma) + adjustment) / (null.size + adjustment)
    p = {"greater": p_greater, "less": p_less, "two-sided": 2 * min(p_greater, p_less)}[alternative]
    return min(p, 1.0)


def _random_split_null(t: np.ndarray, c: np.ndarray, *, n_resamples: int, seed: int) -> np.ndarray:
    """Differences of means under ``n_resamples`` random re-splits of the pooled scores.

    What ``scipy.stats.permutation_test`` draws for ``permutation_type="independent"``,
    but vectorised: each split is a row of treated indices, and its treated sum one
    gather. The splits depend only on the arm sizes and the seed, not on the scores,
    so they are drawn once and reused: monitors test the same items at every evaluation.
    (A gather, not a BLAS product: BLAS worker threads spin after a call and take the
    cores from the training steps that follow.)
    """
    pooled = np.concatenate([t, c])
    n, n_t = pooled.size, t.size
    treated_sums = np.concatenate([pooled[split].sum(axis=1) for split in _random_splits(n, n_t, n_resamples, seed)])
    return treated_sums / n_t - (pooled.sum() - treated_sums) / (n - n_t)


# Resampling indices kept between calls (least recently used first out): they depend
# only on the arm sizes and the seed, and monitors test the same items at every
# evaluation. 10,000 splits of 50 treated items take 1 MB; larger draws are made anew.
_DRAW_CACHE: OrderedDict[tuple[Any, ...], tuple[np.ndarray, ...]] = OrderedDict()
_DRAW_CACHE_MAX_BYTES = 64 << 20


def _cached_draws(key: tuple[Any, ...], draw: Callable[[], tuple[np.ndarray, ...]]) -> tuple[np.ndarray, ...]:
    """``draw()``, or what it returned for ``key`` before."""
    if key in _DRAW_CACHE:
        _DRAW_CACHE.move_to_end(key)
        return _DRAW_CACHE[key]
    arrays = draw()
    if sum(a.nbytes for a in arrays) <= _DRAW_CACHE_MAX_BYTES // 4:
        _DRAW_CACHE[key] = arrays
        while sum(a.nbytes for cached in _DRAW_CACHE.values() for a in cached) > _DRAW_CACHE_MAX_BYTES:
            _DRAW_CACHE.popitem(last=False)
    return arrays


def _index_type(n: int) -> type:
    return np.int16 if n <= np.iinfo(np.int16).max else np.int64


def _random_splits(n: int, n_treated: int, n_resamples: int, seed: int) -> tuple[np.ndarray, ...]:
    """``n_resamples`` random treated subsets of ``n`` items as rows of indices, in batches."""

    def draw() -> tuple[np.ndarray, ...]:
        rng = _rng(seed, 0)
        batches: list[np.ndarray] = []
        batch = _batch(n, n_resamples)
        for start in range(0, n_resamples, batch):
            rows = min(batch, n_resamples - start)
            order = rng.permuted(np.broadcast_to(np.arange(n), (rows, n)), axis=1)
            batches.append(order[:, :n_treated].astype(_index_type(n)))
        return tuple(batches)

    return _cached_draws(("splits", n, n_treated, n_resamples, seed), draw)


def _bootstrap_ci(
    data: tuple[np.ndarray, ...], *, n_resamples: int, ci_level: float, seed: int
) -> tuple[float, float, str]:
    """Two-sided bootstrap interval of ``mean(data[0]) - mean(data[1])`` (of
    ``mean(data[0])`` for one sample), each sample resampled separately.

    BCa (better coverage than percentile for skewed scores in small samples);
    percentile when BCa is degenerate (its bias or acceleration is not finite); a
    point when every sample is constant; NaN when a sample has fewer than two
    observations (it carries no spread).

    The interval is what ``scipy.stats.bootstrap`` gives for these statistics from the
    same draws (the tests compare the two), computed directly: it runs for every
    metric at every monitor evaluation, on every rank, between training steps, where
    scipy's generic path (validation, and a jackknife that recomputes the statistic
    once per observation) took most of an evaluation's statistics time. A mean's
    leave-one-out values are closed-form, so BCa costs O(n) at any arm size.
    """
    if any(x.size < 2 for x in data):
        return math.nan, math.nan, "none (fewer than 2 observations in an arm)"
    if all(_is_constant(x) for x in data):
        point = _contrast([np.mean(x) for x in data])
        return point, point, "degenerate (constant data)"
    distribution = _contrast(_resampled_means(data, n_resamples, seed))
    alpha = (1 - ci_level) / 2
    for method, levels in (("BCa", _bca_levels(data, distribution, alpha)), ("percentile", (alpha, 1 - alpha))):
        if all(0.0 <= level <= 1.0 for level in levels):  # False for NaN
            low, high = (float(v) for v in np.quantile(distribution, levels))
            if math.isfinite(low) and math.isfinite(high):
                return low, high, f"bootstrap {method}"
    return math.nan, math.nan, "none (bootstrap degenerate)"


def _contrast(means: Sequence[Any]) -> Any:
    """The statistic: the first sample's mean, minus the second's when there are two."""
    return means[0] - means[1] if len(means) == 2 else means[0]


def _resampled_means(data: tuple[np.ndarray, ...], n_resamples: int, seed: int) -> list[np.ndarray]:
    """Each sample's mean in ``n_resamples`` bootstrap resamples."""
    indices = _bootstrap_indices(tuple(x.size for x in data), n_resamples, seed)
    # The blocks come batch by batch, one per sample within a batch.
    return [np.concatenate([x[block].mean(axis=-1) for block in indices[j :: len(data)]]) for j, x in enumerate(data)]


def _bootstrap_indices(sizes: tuple[int, ...], n_resamples: int, seed: int) -> tuple[np.ndarray, ...]:
    """Resampling indices in scipy's order: per batch, one ``(batch, n)`` block per sample,
    drawn from the bootstrap stream (as ``scipy.stats.bootstrap`` draws them)."""

    def draw() -> tuple[np.ndarray, ...]:
        rng = _rng(seed, 1)
        batch = _batch(sum(sizes), n_resamples)
        blocks: list[np.ndarray] = []
        for start in range(0, n_resamples, batch):
            rows = min(batch, n_resamples - start)
            blocks.extend(rng.integers(0, n, (rows, n)).astype(_index_type(n)) for n in sizes)
        return tuple(blocks)

    return _cached_draws(("bootstrap", sizes, n_resamples, seed), draw)


def _bca_levels(data: tuple[np.ndarray, ...], distribution: np.ndarray, alpha: float) -> tuple[float, float]:
    """The quantile levels of a BCa interval of nominal level ``1 - 2 alpha`` (Efron &
    Tibshirani 1993, 14.3 and 15.4, as scipy computes them): bias from where the
    estimate falls in the bootstrap distribution, acceleration from the jackknife,
    each sample left out one observation at a time while the others stay whole."""
    estimate = _contrast([np.mean(x) for x in data])
    below = np.count_nonzero(distribution < estimate) + np.count_nonzero(distribution <= estimate)
    bias = float(_sp.ndtri(below / (2 * distribution.size)))
    cubes = squares = 0.0
    for sign, x in zip((1.0, -1.0), data):
        leave_one_out = (x.sum() - x) / (x.size - 1)
        # Jackknife influence of each observation; the other samples' means cancel out.
        influence = (x.size - 1) * sign * (leave_one_out.mean() - leave_one_out)
        cubes += float(np.sum(influence**3)) / x.size**3
        squares += float(np.sum(influence**2)) / x.size**2
    with np.errstate(divide="ignore", invalid="ignore"):
        acceleration = float(np.float64(cubes) / 6 / np.float64(squares) ** 1.5)
        z = float(_sp.ndtri(alpha))
        low, high = (float(_sp.ndtr(bias + (bias + edge) / (1 - acceleration * (bias + edge)))) for edge in (z, -z))
    return low, high


def _nan_result(
    metric: str,
    test: str,
    alternative: str,
    ci_level: float,
    *,
    n_treated: int,
    n_control: int,
    treated_mean: float,
    control_mean: float,
    reason: str,
) -> EffectResult:
    return EffectResult(
        metric=metric,
        test=test,
        alternative=alternative,  # type: ignore[arg-type]
        n_treated=n_treated,
        n_control=n_control,
        treated_mean=treated_mean,
        control_mean=control_mean,
        effect=math.nan,
        ci_low=math.nan,
        ci_high=math.nan,
        ci_level=ci_level,
        p_value=math.nan,
        ci_method=f"none ({reason})",
        exact=None,
    )


# ----------------------------------------------------------------- the tests

TEST_MEANS = "permutation (difference of means)"
TEST_RATES = "Fisher exact"
TEST_PAIRED = "paired permutation (sign flips of differences)"


def compare_means(
    treated: ArrayLike,
    control: ArrayLike,
    *,
    metric: str,
    alternative: Alternative = "greater",
    n_resamples: int = 2000,
    ci_level: float = 0.95,
    seed: int = 0,
    ci_resamples: int | None = None,
) -> EffectResult:
    """Treated vs control on a continuous per-item score.

    For log-probabilities, exposures, match fractions and other per-item scores.
    ``effect = mean(treated) - mean(control)``.

    * p-value: permutation test of the difference of means
      (:func:`scipy.stats.permutation_test`, ``permutation_type="independent"``).
      It enumerates all ``C(n_t + n_c, n_t)`` splits when they are at most
      ``n_resamples`` (exact), else draws ``n_resamples`` random splits (Monte
      Carlo, p >= 1/(n_resamples+1)). An arm of one item is enumerated exactly
      here (scipy needs two per arm). Two-sided p is ``2 * min`` of the
      one-sided ones, capped at 1 (scipy's convention).
    * CI: bootstrap of the difference of means, each arm resampled separately,
      BCa (percentile if BCa is degenerate), ``ci_resamples`` resamples.

    Args:
        treated, control: per-item scores; NaN = no score (dropped).
        metric: name carried into the result.
        alternative: ``"greater"`` = treated scores higher.
        n_resamples: permutations (and bootstrap resamples unless ``ci_resamples``).
        ci_resamples: bootstrap resamples (default ``n_resamples``).
        ci_level: two-sided confidence level.
        seed: seeds both resampling streams.

    Example:
        >>> r = compare_means([5.0, 6, 7, 8], [1.0, 2, 3, 4], metric="logprob")
        >>> r.effect, r.p_value, r.exact   # 1 of C(8,4)=70 splits is as extreme
        (4.0, 0.014285714285714285, True)
    """
    _check_common(alternative, ci_level, n_resamples, seed, ci_resamples)
    ci_resamples = n_resamples if ci_resamples is None else ci_resamples
    t = _scores(treated, metric=metric, name="treated")
    c = _scores(control, metric=metric, name="control")
    t_mean, c_mean = _mean(t), _mean(c)
    if t.size == 0 or c.size == 0:
        return _nan_result(
            metric,
            TEST_MEANS,
            alternative,
            ci_level,
            n_treated=t.size,
            n_control=c.size,
            treated_mean=t_mean,
            control_mean=c_mean,
            reason="empty arm",
        )
    effect = t_mean - c_mean

    if t.size >= 2 and c.size >= 2 and math.comb(t.size + c.size, t.size) <= n_resamples:
        res = _st.permutation_test(
            (t, c),
            _diff_of_means,
            permutation_type="independent",
            vectorized=True,
            n_resamples=n_resamples,
            batch=_batch(t.size + c.size, n_resamples),
            alternative=alternative,
            **{_RNG_KW: _rng(seed, 0)},
        )
        p_value = float(res.pvalue)
        exact = True
    elif t.size >= 2 and c.size >= 2:
        null = _random_split_null(t, c, n_resamples=n_resamples, seed=seed)
        p_value = _p_from_null(null, effect, alternative, monte_carlo=True)
        exact = False
    else:
        # One arm holds a single item: the n_t + n_c splits are "which pooled
        # value is that item", few enough to enumerate outright.
        pooled = np.concatenate([t, c])
        total = pooled.sum()
        k = pooled.size
        if t.size == 1:
            null = pooled - (total - pooled) / (k - 1)
        else:
            null = (total - pooled) / (k - 1) - pooled
        p_value = _p_from_null(null, effect, alternative)
        exact = True

    low, high, ci_method = _bootstrap_ci((t, c), n_resamples=ci_resamples, ci_level=ci_level, seed=seed)
    return EffectResult(
        metric=metric,
        test=TEST_MEANS,
        alternative=alternative,
        n_treated=int(t.size),
        n_control=int(c.size),
        treated_mean=t_mean,
        control_mean=c_mean,
        effect=effect,
        ci_low=low,
        ci_high=high,
        ci_level=ci_level,
        p_value=p_value,
        ci_method=ci_method,
        exact=exact,
    )


def _count(value: int, name: str) -> int:
    """An integer count (Python or numpy int; bools and floats are rejected)."""
    if isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be an integer count, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer count, got {value!r}") from None


def _wilson(k: int, n: int, ci_level: float) -> tuple[float, float]:
    """Two-sided Wilson score interval of k successes in n (Newcombe 1998, method 3).

    ``scipy.stats.binomtest(k, n).proportion_ci(method="wilson")``'s formula, written
    out: binomtest first computes an exact p-value that the interval does not use,
    which made it most of a rate comparison's cost at every monitor evaluation.
    """
    z = float(_sp.ndtri(0.5 + 0.5 * ci_level))
    p = k / n
    denominator = 2 * (n + z**2)
    center = (2 * n * p + z**2) / denominator
    delta = z / denominator * math.sqrt(4 * n * p * (1 - p) + z**2)
    return (0.0 if k == 0 else center - delta), (1.0 if k == n else center + delta)


def compare_rates(
    treated_successes: int,
    treated_n: int,
    control_successes: int,
    control_n: int,
    *,
    metric: str,
    alternative: Alternative = "greater",
    ci_level: float = 0.95,
) -> EffectResult:
    """Treated vs control on a binary outcome (behaviour rate, exact-match rate).

    ``effect = treated_successes/treated_n - control_successes/control_n``.

    * p-value: Fisher's exact test (:func:`scipy.stats.fisher_exact`) on the
      table ``[[t_succ, t_fail], [c_succ, c_fail]]``; ``"greater"`` = the
      treated rate is higher (odds ratio > 1).
    * CI: Newcombe's hybrid score interval for a difference of proportions
      (Newcombe 1998, method 10), built from the two Wilson score intervals:
      ``[d - sqrt((p_t - l_t)^2 + (u_c - p_c)^2), d + sqrt((u_t - p_t)^2 + (p_c - l_c)^2)]``.
      Unlike the Wald interval it stays inside [-1, 1] and keeps its coverage
      at rates near 0 or 1, which is where poison and memorisation rates live.

    An arm with ``n = 0`` gives NaN effect, CI and p-value.

    Example:
        >>> r = compare_rates(12, 40, 3, 40, metric="leak_rate")
        >>> round(r.effect, 3), r.ci_low < r.effect < r.ci_high
        (0.225, True)
    """
    _check_common(alternative, ci_level)
    ts, tn = _count(treated_successes, "treated_successes"), _count(treated_n, "treated_n")
    cs, cn = _count(control_successes, "control_successes"), _count(control_n, "control_n")
    for succ, n, arm in ((ts, tn, "treated"), (cs, cn, "control")):
        if n < 0 or not 0 <= succ <= n:
            raise ValueError(f"metric {metric!r}: {arm} arm needs 0 <= successes <= n, got successes={succ}, n={n}")
    t_rate = ts / tn if tn else math.nan
    c_rate = cs / cn if cn else math.nan
    if tn == 0 or cn == 0:
        return _nan_result(
            metric,
            TEST_RATES,
            alternative,
            ci_level,
            n_treated=tn,
            n_control=cn,
            treated_mean=t_rate,
            control_mean=c_rate,
            reason="empty arm",
        )
    _, p_value = _st.fisher_exact([[ts, tn - ts], [cs, cn - cs]], alternative=alternative)
    effect = t_rate - c_rate
    lt, ut = _wilson(ts, tn, ci_level)
    lc, uc = _wilson(cs, cn, ci_level)
    low = effect - math.sqrt((t_rate - lt) ** 2 + (uc - c_rate) ** 2)
    high = effect + math.sqrt((ut - t_rate) ** 2 + (c_rate - lc) ** 2)
    return EffectResult(
        metric=metric,
        test=TEST_RATES,
        alternative=alternative,
        n_treated=tn,
        n_control=cn,
        treated_mean=t_rate,
        control_mean=c_rate,
        effect=effect,
        ci_low=max(-1.0, low),
        ci_high=min(1.0, high),
        ci_level=ci_level,
        p_value=min(1.0, float(p_value)),
        ci_method="Newcombe hybrid score (Wilson)",
        exact=True,
    )


def one_sample_z(
    values: ArrayLike,
    *,
    metric: str,
    null_mean: float = 0.0,
    null_sd: float = 1.0,
    alternative: Alternative = "greater",
    control_values: ArrayLike | None = None,
    ci_level: float = 0.95,
) -> EffectResult:
    """z test of a mean against a null whose distribution is known exactly.

    Made for the Gaussian-watermark statistic x = <grad, w> / (sigma ||grad||):
    under H0 (the model never saw noise w) each x ~ N(0, 1) exactly, because w is
    independent of the model. The test on the mean of n values is
    ``z = sqrt(n) * (mean - null_mean) / null_sd``, with one-sided
    ``p = 1 - Phi(z)`` for ``"greater"``, ``Phi(z)`` for ``"less"`` and
    ``2 * (1 - Phi(|z|))`` for ``"two-sided"``. (The paper scores each sample
    one-sided; TOAA's code uses a two-sided test on the mean: the test name says
    which one was run.)

    ``effect = mean(values) - null_mean``, the estimated shift of the statistic.
    ``control_values`` (scores of fresh, never-used noise) are reported as
    ``control_mean`` / ``n_control`` as a sanity check that the null holds, but
    they do **not** enter the p-value: the null is exact, and estimating it from
    controls would only add noise.

    The CI is the t interval of the mean with the *sample* standard deviation
    (a z interval with ``null_sd`` when n = 1): under H1 the statistic's spread
    grows (the paper's fits reach sd 1.23), so ``null_sd`` would make the
    interval too narrow exactly when there is an effect.

    Example:
        >>> r = one_sample_z([0.5] * 16, metric="gw_z")
        >>> r.effect, round(r.p_value, 5)     # z = 4 * 0.5 = 2
        (0.5, 0.02275)
    """
    _check_common(alternative, ci_level)
    if not (math.isfinite(null_sd) and null_sd > 0):
        raise ValueError(f"metric {metric!r}: null_sd must be positive and finite, got {null_sd!r}")
    if not math.isfinite(null_mean):
        raise ValueError(f"metric {metric!r}: null_mean must be finite, got {null_mean!r}")
    x = _scores(values, metric=metric, name="values")
    ctrl = _scores(control_values, metric=metric, name="control_values")
    side = "two-sided" if alternative == "two-sided" else "one-sided"
    if null_mean == 0.0 and null_sd == 1.0:
        test = f"{side} z (N(0,1) null)"
    else:
        test = f"{side} z (N({null_mean:g},{null_sd:g}^2) null)"
    x_mean, c_mean = _mean(x), _mean(ctrl)
    if x.size == 0:
        return _nan_result(
            metric,
            test,
            alternative,
            ci_level,
            n_treated=0,
            n_control=ctrl.size,
            treated_mean=x_mean,
            control_mean=c_mean,
            reason="no values",
        )
    n = x.size
    effect = x_mean - null_mean
    z = math.sqrt(n) * effect / null_sd
    if alternative == "greater":
        p_value = float(_st.norm.sf(z))
    elif alternative == "less":
        p_value = float(_st.norm.cdf(z))
    else:
        p_value = min(1.0, 2.0 * float(_st.norm.sf(abs(z))))
    if n >= 2:
        half = float(_st.t.ppf(0.5 + ci_level / 2, df=n - 1)) * float(np.std(x, ddof=1)) / math.sqrt(n)
        ci_method = "t interval (sample sd)"
    else:
        half = float(_st.norm.ppf(0.5 + ci_level / 2)) * null_sd
        ci_method = "z interval (null sd, n=1)"
    return EffectResult(
        metric=metric,
        test=test,
        alternative=alternative,
        n_treated=n,
        n_control=int(ctrl.size),
        treated_mean=x_mean,
        control_mean=c_mean,
        effect=effect,
        ci_low=effect - half,
        ci_high=effect + half,
        ci_level=ci_level,
        p_value=p_value,
        ci_method=ci_method,
        exact=True,
    )


def paired_difference(
    a: ArrayLike,
    b: ArrayLike,
    *,
    metric: str,
    alternative: Alternative = "two-sided",
    n_resamples: int = 2000,
    ci_level: float = 0.95,
    seed: int = 0,
) -> EffectResult:
    """Two arms scored on the same probe items: the mean paired difference.

    For interaction tests: ``a[i]`` and ``b[i]`` are the scores of probe item i
    under two arms (e.g. with and without another experiment). Pairs with a NaN
    on either side are dropped. ``treated_mean = mean(a)``,
    ``control_mean = mean(b)``, ``effect = mean(a - b)``; both counts are the
    number of pairs.

    * p-value: permutation test by random sign flips of the paired differences
      (:func:`scipy.stats.permutation_test`, ``permutation_type="samples"``),
      exact over all ``2^n`` flips when that is at most ``n_resamples``.
    * CI: paired bootstrap (pairs resampled together) of the mean difference,
      BCa, percentile if BCa is degenerate.

    Example:
        >>> r = paired_difference([3.0, 4, 5], [1.0, 1, 1], metric="qa", alternative="greater")
        >>> r.effect, r.p_value    # only the identity of 2^3 = 8 flips is as large
        (3.0, 0.125)
    """
    _check_common(alternative, ci_level, n_resamples, seed)
    a_arr = np.asarray(a, dtype=np.float64).ravel()
    b_arr = np.asarray(b, dtype=np.float64).ravel()
    if a_arr.shape != b_arr.shape:
        raise ValueError(f"metric {metric!r}: paired arms need equal lengths, got {a_arr.size} and {b_arr.size}")
    if np.isinf(a_arr).any() or np.isinf(b_arr).any():
        raise ValueError(f"metric {metric!r}: paired scores contain infinite values")
    keep = ~(np.isnan(a_arr) | np.isnan(b_arr))
    a_arr, b_arr = a_arr[keep], b_arr[keep]
    n = int(a_arr.size)
    a_mean, b_mean = _mean(a_arr), _mean(b_arr)
    if n == 0:
        return _nan_result(
            metric,
            TEST_PAIRED,
            alternative,
            ci_level,
            n_treated=0,
            n_control=0,
            treated_mean=a_mean,
            control_mean=b_mean,
            reason="no complete pairs",
        )
    d = a_arr - b_arr
    effect = _mean(d)
    if n >= 2:
        res = _st.permutation_test(
            (d,),
            _mean_stat,
            permutation_type="samples",
            vectorized=True,
            n_resamples=n_resamples,
            batch=_batch(2 * n, n_resamples),
            alternative=alternative,
            **{_RNG_KW: _rng(seed, 0)},
        )
        p_value = float(res.pvalue)
        exact = n < 63 and 2**n <= n_resamples
    else:
        # One pair: its two sign flips, enumerated (scipy needs two pairs).
        p_value = _p_from_null(np.array([effect, -effect]), effect, alternative)
        exact = True
    low, high, ci_method = _bootstrap_ci((d,), n_resamples=n_resamples, ci_level=ci_level, seed=seed)
    if ci_method.startswith("bootstrap"):
        ci_method = ci_method.replace("bootstrap", "paired bootstrap")
    return EffectResult(
        metric=metric,
        test=TEST_PAIRED,
        alternative=alternative,
        n_treated=n,
        n_control=n,
        treated_mean=a_mean,
        control_mean=b_mean,
        effect=effect,
        ci_low=low,
        ci_high=high,
        ci_level=ci_level,
        p_value=p_value,
        ci_method=ci_method,
        exact=exact,
    )


# ------------------------------------------------------- multiple testing


def holm(p_values: Sequence[float] | ArrayLike) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values, in the input order.

    With the m finite p-values sorted ascending, ``p_(1) <= ... <= p_(m)``, the
    adjusted value of ``p_(k)`` is ``min(1, max_{j<=k} (m - j + 1) p_(j))``.
    Rejecting where the adjusted value is <= alpha is Holm's step-down procedure
    and controls the family-wise error rate at alpha under any dependence. NaN
    p-values (tests that could not run) stay NaN and do not count in m.

    Example:
        >>> holm([0.01, 0.04, 0.03, float("nan")]).round(3).tolist()
        [0.03, 0.06, 0.06, nan]
    """
    p = np.asarray(p_values, dtype=np.float64).ravel()
    if np.any((p < 0) | (p > 1)):
        raise ValueError(f"p-values must lie in [0, 1], got {p[(p < 0) | (p > 1)].tolist()}")
    out = np.full(p.shape, np.nan)
    finite = np.flatnonzero(~np.isnan(p))
    m = finite.size
    if m == 0:
        return out
    order = finite[np.argsort(p[finite], kind="stable")]
    scaled = (m - np.arange(m)) * p[order]
    # The running maximum makes the adjustment monotone in the sorted order
    # (the step-down procedure stops at the first non-rejection).
    out[order] = np.minimum(1.0, np.maximum.accumulate(scaled))
    return out


def holm_adjust(results: Sequence[EffectResult]) -> list[EffectResult]:
    """Copies of ``results`` (same order) with ``p_holm`` set by :func:`holm`.

    Pass all the run's tests that form one family (one metric per experiment,
    across the run's experiments). Results with a NaN p-value get NaN ``p_holm``
    and do not count. The inputs are not modified.

    Example:
        >>> rs = [compare_rates(9, 10, 1, 10, metric="a"), compare_rates(5, 10, 5, 10, metric="b")]
        >>> [round(r.p_holm, 4) for r in holm_adjust(rs)]
        [0.0011, 0.6719]
    """
    adjusted = holm([r.p_value for r in results])
    return [replace(r, p_holm=float(q)) for r, q in zip(results, adjusted)]


def format_p(p: float | None, *, floor: float = 1e-4) -> str:
    """A p-value for tables: ``"<1e-4"`` below ``floor``, two significant digits
    below 0.1 (``"0.012"``, ``"0.00032"``), two decimals above (``"0.35"``),
    ``"n/a"`` for NaN or None.

    Example:
        >>> [format_p(x) for x in (3e-7, 0.01234, 0.0456, 0.351, 1.0, float("nan"))]
        ['<1e-4', '0.012', '0.046', '0.35', '1.00', 'n/a']
    """
    if p is None or (isinstance(p, (float, np.floating)) and math.isnan(p)):
        return "n/a"
    p = float(p)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p-value must lie in [0, 1], got {p!r}")
    if p < floor:
        return f"<{floor:.0e}".replace("e-0", "e-")
    if p < 0.1:
        text = f"{p:.2g}"
        # "%.2g" of 0.0999 rounds up to "0.1": show it like the values above 0.1.
        return "0.10" if text == "0.1" else text
    return f"{p:.2f}"


__all__ = [
    "Alternative",
    "EffectResult",
    "compare_means",
    "compare_rates",
    "format_p",
    "holm",
    "holm_adjust",
    "one_sample_z",
    "paired_difference",
]


def exposures(scores: Sequence[float] | np.ndarray, treated: Sequence[bool] | np.ndarray) -> np.ndarray:
    """Secret Sharer exposure (Carlini et al.) of every item against the never-injected controls.

    exposure = log2|R| - log2 rank, the item's rank (1 = most likely) among the control
    references R by score. Ties count 1/2. So that both arms have the same expectation
    when nothing was learnt, every item is ranked among ``n_c`` candidates: a control
    against the other controls (itself left out), a treated item against each set of
    ``n_c - 1`` controls, averaged.

    ``scores`` are per-item mean log-probabilities (higher = lower perplexity = better
    rank). NaN for everyone when there is no control.

    Example:
        >>> exposures([-1.0, -5.0, -2.0, -3.0], [True, True, False, False]).round(3).tolist()
        [1.0, 0.0, 1.0, 0.0]
    """
    s = np.asarray(scores, dtype=np.float64)
    t = np.asarray(treated, dtype=bool)
    ref = s[~t]
    n_c = ref.size
    out = np.full(s.size, np.nan)
    if n_c == 0:
        return out
    log_candidates = np.log2(n_c)
    # above[i, j]: control j outranks item i (1), ties count 1/2.
    above = (ref[None, :] > s[:, None]).astype(np.float64) + 0.5 * (ref[None, :] == s[:, None])
    rank_all = 1.0 + above.sum(axis=1)  # rank against every control
    for i in np.flatnonzero(t):
        # Leave each control out in turn: n_c - 1 references + the item = n_c candidates.
        out[i] = np.mean(log_candidates - np.log2(rank_all[i] - above[i]))
    control_idx = np.flatnonzero(~t)
    for pos, i in enumerate(control_idx):
        # A control against the other controls: its own entry (a tie with itself, 1/2) is removed.
        out[i] = log_candidates - np.log2(rank_all[i] - above[i, pos])
    return out
