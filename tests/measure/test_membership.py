"""Membership inference statistics: AUC and TPR at low FPR, their exact tests and bootstrap
intervals, and the memorization monitor's attack before and after training on its members."""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import roc_auc_score  # type: ignore[import-untyped]

from injectors.memorization import MemorizationInjector
from monitors.memorization import MemorizationMonitor
from multirun.config import ExperimentConfig
from multirun.data.tokenizers import ByteTokenizer
from multirun.kinds.payloads import load_payload
from multirun.kinds.sdk import PrepareContext
from multirun.measure.live_model import LiveModel
from multirun.measure.membership import auc, compare_membership, membership_scores, tpr_at_fpr
from multirun.measure.runner import effects_of
from multirun.types import Placement
from tests.kind_training import tiny_gpt2
from tests.kinds.test_muse import train_on

SCORES = st.lists(st.floats(-5, 5, allow_nan=False).map(lambda x: round(x, 1)), min_size=1, max_size=30)


@settings(max_examples=100, deadline=None)
@given(SCORES, SCORES)
def test_auc_is_sklearns_and_tpr_is_bounded(members: list[float], nonmembers: list[float]) -> None:
    labels = [1] * len(members) + [0] * len(nonmembers)
    assert auc(members, nonmembers) == pytest.approx(roc_auc_score(labels, members + nonmembers))
    tpr = tpr_at_fpr(members, nonmembers, fpr=0.01)
    assert 0.0 <= tpr <= 1.0
    # Its threshold calls at most floor(fpr * n_c) non-members members: here, with n_c < 100, none.
    assert tpr == np.mean(np.asarray(members) > max(nonmembers))
    r = compare_membership(members, nonmembers, metric="a", n_resamples=200)
    assert 0.0 <= r.p_value <= 1.0 and (np.isnan(r.ci_low) or 0.0 <= r.ci_low <= r.ci_high <= 1.0)


def test_identical_distributions_give_half_and_separated_ones_give_one() -> None:
    rng = np.random.default_rng(0)
    same = [auc(rng.normal(size=50), rng.normal(size=50)) for _ in range(200)]
    assert abs(np.mean(same) - 0.5) < 0.02
    assert auc([10.0, 11.0], [1.0, 2.0, 3.0]) == 1.0 and auc([1.0], [2.0]) == 0.0
    assert tpr_at_fpr([10.0, 11.0], [1.0, 2.0]) == 1.0
    # 200 non-members at 1%: two of them may be called members, the threshold is the third highest.
    nonmembers = np.arange(200.0)
    assert tpr_at_fpr([197.5, 198.5], nonmembers, fpr=0.01) == 1.0
    assert tpr_at_fpr([196.5], nonmembers, fpr=0.01) == 0.0


def test_tests_hold_their_level_under_the_null() -> None:
    """Under exchangeable scores p <= alpha at most alpha of the time (both exact tests)."""
    rng = np.random.default_rng(1)
    for statistic in ("auc", "tpr"):
        ps = np.array(
            [
                compare_membership(
                    rng.normal(size=20), rng.normal(size=20), metric="m", statistic=statistic, n_resamples=50
                ).p_value
                for _ in range(300)
            ]
        )
        assert np.mean(ps <= 0.05) <= 0.05 + 0.03, statistic


def test_bootstrap_is_seeded_and_covers_the_estimate() -> None:
    rng = np.random.default_rng(2)
    t, c = rng.normal(1.0, size=30), rng.normal(size=30)
    a = compare_membership(t, c, metric="m", seed=3)
    assert a == compare_membership(t, c, metric="m", seed=3)  # common random numbers
    assert a.ci_low < a.effect < a.ci_high and a.exact
    b = compare_membership(t, c, metric="m", statistic="tpr", fpr=0.1, seed=3)
    assert b.ci_low <= b.effect <= b.ci_high and "fpr 0.1" in b.test


def test_zlib_score_divides_by_the_compressed_length() -> None:
    text = b"abababababababababab"
    out = membership_scores([-20.0], [20], [text], kind="zlib")
    assert out[0] == pytest.approx(-20.0 / len(zlib.compress(text, 9)))
    with pytest.raises(ValueError, match="every item's text"):
        membership_scores([-1.0], [1], None, kind="zlib")


def test_members_are_detected_after_training_and_not_before(one_torch_thread: None) -> None:
    tok = ByteTokenizer()
    payload = load_payload("pkg:demo/memorization", base_dir=Path("."))
    spec = ExperimentConfig(name="memorization", payload="pkg:demo/memorization", repetitions=8, control_fraction=0.5)
    exp = MemorizationInjector().prepare(
        PrepareContext(
            payload, spec, tokenizer=tok, sequence_length=128, seed=17, placement=Placement("uniform", 0, 100)
        )
    )
    monitor = MemorizationMonitor.from_experiment(exp, tokenizer=tok, options={}, sequence_length=128)

    def attack(model: torch.nn.Module) -> dict[str, float]:
        live = LiveModel(model, pad_token_id=tok.pad_token_id, max_length=128, batch_size=40)
        out = {}
        for r in monitor.evaluate(live):
            if r.metric in ("mia_auc", "mia_tpr"):
                (group, effect), *_ = effects_of(r, n_resamples=1000, seed=0)
                assert group is None
                out[r.metric] = effect.p_value
                out[f"{r.metric}_value"] = effect.effect
        return out

    before = attack(tiny_gpt2(0, sequence_length=128))
    after = attack(train_on([exp.sequence_tokens(i).tolist() for i in range(len(exp.seq_items))]))
    print(before, after)
    assert before["mia_auc"] > 0.01 and before["mia_tpr"] > 0.01
    assert after["mia_auc"] < 0.01 and after["mia_auc_value"] > 0.8
