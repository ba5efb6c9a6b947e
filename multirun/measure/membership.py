"""Membership inference: can the model's scores tell injected items from never-injected ones?

A membership-inference attack scores every item (higher = "more likely trained on")
and calls an item a member when its score passes a threshold. Against the
never-injected controls (the non-members) this module reports the attack's

``AUC`` (:func:`auc`)
    the probability that a random member scores above a random non-member (ties
    count 1/2): 0.5 when the scores cannot tell them apart, 1 when they separate
    perfectly. p-value: Mann-Whitney U (AUC = U / (n_t n_c)), exact without ties for
    up to :data:`EXACT_MAX_ITEMS` items, else asymptotic.
``TPR at low FPR`` (:func:`tpr_at_fpr`, 1% by default)
    the fraction of members called members at a threshold that calls at most
    ``floor(fpr * n_c)`` non-members members: the threshold is the
    ``(floor(fpr * n_c) + 1)``-th highest non-member score, and a member must score
    strictly above it. With fewer than ``1 / fpr`` non-members (under 100 at 1%) this
    is the TPR at zero false positives, the strictest reading. p-value: exact under
    exchangeability, the count of members above that non-member order statistic being
    negative-hypergeometric (:data:`scipy.stats.nhypergeom`).

Both come as :class:`~multirun.measure.stats.EffectResult` s (:func:`compare_membership`),
the statistic in ``effect`` (its null value is 0.5 for the AUC and about ``fpr`` for the
TPR, not 0), with a percentile bootstrap interval: members and non-members resampled
separately, from the same seeded draws as the difference-of-means bootstrap of
:mod:`multirun.measure.stats` (common random numbers across metrics and evaluations).

Which score: :func:`membership_scores`: ``loss`` (the LOSS attack of Yeom et al. 2018,
the mean per-token log-probability, i.e. minus the loss) or ``zlib`` (Carlini et al.
2021: the summed log-probability divided by the zlib-compressed length of the text in
bytes, which discounts texts that are easy because they are repetitive).

Example:
    >>> auc([3.0, 4.0], [1.0, 2.0]), auc([1.0, 2.0], [1.0, 2.0])
    (1.0, 0.5)
    >>> tpr_at_fpr([5.0, 3.0, 0.5], [1.0, 2.0, 4.0], fpr=0.01)   # only 5 is above every non-member
    0.3333333333333333
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats as _st

from multirun.errors import ConfigError
from multirun.measure.stats import (
    Alternative,
    EffectResult,
    _bootstrap_indices,
    _check_common,
    _nan_result,
    _scores,
)

__all__ = [
    "DEFAULT_FPR",
    "EXACT_MAX_ITEMS",
    "MembershipOptions",
    "MembershipStatistic",
    "ScoreKind",
    "auc",
    "compare_membership",
    "membership_options",
    "membership_scores",
    "tpr_at_fpr",
]

DEFAULT_FPR = 0.01
# Mann-Whitney's exact null is enumerated by scipy; beyond this many items (members plus
# non-members) the normal approximation is as good and much cheaper.
EXACT_MAX_ITEMS = 200

MembershipStatistic = Literal["auc", "tpr"]
ScoreKind = Literal["loss", "zlib"]


@dataclass(frozen=True)
class MembershipOptions:
    """The membership-inference options of a monitor (``monitor.options``): whether to
    report ``mia_auc``/``mia_tpr``, the attack's score and the false-positive rate."""

    enabled: bool = True
    score: ScoreKind = "loss"
    fpr: float = DEFAULT_FPR


def membership_options(options: Mapping[str, Any]) -> MembershipOptions:
    """``membership``, ``membership_score`` and ``fpr`` read from a monitor's options, the
    same for every kind that reports membership inference.

    Example:
        >>> membership_options({"membership_score": "zlib"})
        MembershipOptions(enabled=True, score='zlib', fpr=0.01)
    """
    enabled = options.get("membership", True)
    if not isinstance(enabled, bool):
        raise ConfigError(f"must be true or false, got {enabled!r}", key="monitor.options.membership")
    score = options.get("membership_score", "loss")
    if score not in ("loss", "zlib"):
        raise ConfigError(f"must be 'loss' or 'zlib', got {score!r}", key="monitor.options.membership_score")
    fpr = options.get("fpr", DEFAULT_FPR)
    if isinstance(fpr, bool) or not isinstance(fpr, (int, float)) or not 0 < fpr < 1:
        raise ConfigError(f"must be a number in (0, 1), got {fpr!r}", key="monitor.options.fpr")
    return MembershipOptions(enabled=enabled, score=cast(ScoreKind, score), fpr=float(fpr))


TEST_AUC = "Mann-Whitney U (AUC)"
TEST_TPR = "negative hypergeometric (TPR at FPR)"


def _pair_wins(t: np.ndarray, c: np.ndarray) -> np.ndarray:
    """``(n_t, n_c)``: 1 where the member outscores the non-member, 1/2 on a tie."""
    return (t[:, None] > c[None, :]) + 0.5 * (t[:, None] == c[None, :])


def auc(members: ArrayLike, nonmembers: ArrayLike) -> float:
    """Area under the ROC curve of scores that call higher-scoring items members.

    NaN when either arm is empty (NaN scores are dropped first).

    Example:
        >>> auc([0.9, 0.8, 0.1], [0.5, 0.2])
        0.6666666666666666
    """
    t = _scores(members, metric="auc", name="members")
    c = _scores(nonmembers, metric="auc", name="nonmembers")
    if t.size == 0 or c.size == 0:
        return math.nan
    return float(_pair_wins(t, c).mean())


def _threshold_rank(n_control: int, fpr: float) -> int:
    """How many non-members may be called members at ``fpr``: ``floor(fpr * n_c)``."""
    # The epsilon keeps 0.29 * 100 = 28.999999999999996 from flooring to 28.
    return math.floor(fpr * n_control + 1e-9)


def tpr_at_fpr(members: ArrayLike, nonmembers: ArrayLike, *, fpr: float = DEFAULT_FPR) -> float:
    """True-positive rate at a threshold whose false-positive rate is at most ``fpr``.

    The threshold is the ``(floor(fpr * n_c) + 1)``-th highest non-member score; members
    strictly above it count. NaN when either arm is empty.

    Example:
        >>> tpr_at_fpr([3.0, 2.5, 1.0], [0.0] * 99 + [2.0], fpr=0.01)   # one false positive allowed
        1.0
    """
    if not 0.0 <= fpr < 1.0:
        raise ValueError(f"fpr must be in [0, 1), got {fpr!r}")
    t = _scores(members, metric="tpr", name="members")
    c = _scores(nonmembers, metric="tpr", name="nonmembers")
    if t.size == 0 or c.size == 0:
        return math.nan
    k = _threshold_rank(c.size, fpr)
    threshold = np.sort(c)[c.size - 1 - k]
    return float(np.mean(t > threshold))


def membership_scores(
    logprob_sum: ArrayLike, n_tokens: ArrayLike, texts: Sequence[bytes] | None = None, *, kind: ScoreKind = "loss"
) -> np.ndarray:
    """Per-item attack scores from teacher-forced log-probabilities (higher = member).

    ``loss``: ``logprob_sum / n_tokens`` (minus the mean loss). ``zlib``:
    ``logprob_sum / len(zlib.compress(text))``, nats per compressed byte; needs ``texts``.

    Example:
        >>> membership_scores([-6.0, -2.0], [3, 2]).tolist()
        [-2.0, -1.0]
    """
    total = np.asarray(logprob_sum, dtype=np.float64)
    if kind == "loss":
        return total / np.maximum(np.asarray(n_tokens, dtype=np.float64), 1.0)
    if kind == "zlib":
        if texts is None or len(texts) != total.size:
            raise ValueError("the zlib score needs every item's text")
        compressed = np.array([len(zlib.compress(t, 9)) for t in texts], dtype=np.float64)
        return total / compressed
    raise ValueError(f"unknown membership score {kind!r} (known: loss, zlib)")


def _p_value(
    statistic: MembershipStatistic, t: np.ndarray, c: np.ndarray, fpr: float, alternative: str
) -> tuple[float, bool]:
    """p-value of the attack against exchangeable scores, and whether it is exact."""
    ties = np.unique(np.concatenate([t, c])).size < t.size + c.size
    if statistic == "auc":
        exact = not ties and t.size + c.size <= EXACT_MAX_ITEMS
        res = _st.mannwhitneyu(t, c, alternative=alternative, method="exact" if exact else "asymptotic")
        return float(res.pvalue), exact
    # Members above the (k+1)-th highest non-member: draw the pooled items from the top
    # until k + 1 non-members are out; the members drawn so far are nhypergeom(N, n_t, k + 1).
    k = _threshold_rank(c.size, fpr)
    threshold = np.sort(c)[c.size - 1 - k]
    above = int(np.count_nonzero(t > threshold))
    null = _st.nhypergeom(t.size + c.size, t.size, k + 1)
    greater, less = float(null.sf(above - 1)), float(null.cdf(above))
    p = {"greater": greater, "less": less, "two-sided": 2 * min(greater, less)}[alternative]
    # Ties at the threshold are not counted as members: the test stays valid, conservative.
    return min(1.0, p), not ties


def _bootstrap(
    statistic: MembershipStatistic, t: np.ndarray, c: np.ndarray, fpr: float, n_resamples: int, seed: int
) -> np.ndarray:
    """The statistic in ``n_resamples`` bootstrap resamples (members and non-members apart)."""
    blocks = _bootstrap_indices((t.size, c.size), n_resamples, seed)
    wins = _pair_wins(t, c) if statistic == "auc" else None
    out = []
    for ti, ci in zip(blocks[0::2], blocks[1::2]):  # (batch, n_t) and (batch, n_c) indices
        if wins is not None:
            # Counting wins through the pair table: resample weights times the table,
            # no BLAS (its worker threads would spin into the training steps).
            wt = np.stack([np.bincount(row, minlength=t.size) for row in ti]).astype(np.float64)
            wc = np.stack([np.bincount(row, minlength=c.size) for row in ci]).astype(np.float64)
            out.append(np.einsum("bi,ij,bj->b", wt, wins, wc) / (t.size * c.size))
        else:
            k = _threshold_rank(c.size, fpr)
            threshold = np.sort(c[ci], axis=1)[:, c.size - 1 - k]
            out.append(np.mean(t[ti] > threshold[:, None], axis=1))
    return np.concatenate(out)


def compare_membership(
    members: ArrayLike,
    nonmembers: ArrayLike,
    *,
    metric: str,
    statistic: MembershipStatistic = "auc",
    fpr: float = DEFAULT_FPR,
    alternative: Alternative = "greater",
    n_resamples: int = 2000,
    ci_level: float = 0.95,
    seed: int = 0,
) -> EffectResult:
    """A membership-inference attack's AUC (or TPR at ``fpr``) with its test and interval.

    ``treated_mean`` / ``control_mean`` are the arms' mean scores; ``effect`` is the AUC
    (``statistic="auc"``) or the TPR (``"tpr"``); ``ci_low`` / ``ci_high`` its two-sided
    percentile bootstrap interval; ``p_value`` the test of the module docstring
    (``"greater"``: members score higher).

    Example:
        >>> r = compare_membership([5.0, 6, 7, 8], [1.0, 2, 3, 4], metric="mia_auc")
        >>> r.effect, round(r.p_value, 4), r.exact    # 1 of C(8,4)=70 orders is as extreme
        (1.0, 0.0143, True)
        >>> compare_membership([5.0, 6, 7, 8], [1.0, 2, 3, 4], metric="mia_tpr", statistic="tpr").effect
        1.0
    """
    _check_common(alternative, ci_level, n_resamples, seed)
    if statistic not in ("auc", "tpr"):
        raise ValueError(f"statistic must be 'auc' or 'tpr', got {statistic!r}")
    if not 0.0 <= fpr < 1.0:
        raise ValueError(f"fpr must be in [0, 1), got {fpr!r}")
    t = _scores(members, metric=metric, name="treated")
    c = _scores(nonmembers, metric=metric, name="control")
    test = TEST_AUC if statistic == "auc" else f"{TEST_TPR} (fpr {fpr:g})"
    t_mean = float(t.mean()) if t.size else math.nan
    c_mean = float(c.mean()) if c.size else math.nan
    if t.size == 0 or c.size == 0:
        return _nan_result(
            metric,
            test,
            alternative,
            ci_level,
            n_treated=t.size,
            n_control=c.size,
            treated_mean=t_mean,
            control_mean=c_mean,
            reason="empty arm",
        )
    effect = auc(t, c) if statistic == "auc" else tpr_at_fpr(t, c, fpr=fpr)
    p_value, exact = _p_value(statistic, t, c, fpr, alternative)
    if t.size < 2 or c.size < 2:
        low, high, ci_method = math.nan, math.nan, "none (fewer than 2 observations in an arm)"
    else:
        distribution = _bootstrap(statistic, t, c, fpr, n_resamples, seed)
        alpha = (1 - ci_level) / 2
        low, high = (float(v) for v in np.quantile(distribution, (alpha, 1 - alpha)))
        ci_method = "bootstrap percentile"
    return EffectResult(
        metric=metric,
        test=test,
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
