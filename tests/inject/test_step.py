"""The pure step function: what each rank injects at one step, without Composer."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from multirun.config import load_config
from multirun.data.tokenizers import ByteTokenizer
from multirun.inject.batch import LocalRows, RowMap, global_rows
from multirun.inject.step import StepInjection, plan_step
from multirun.ledger import token_hash
from multirun.plan.run_plan import RunPlan, build_run_plan
from multirun.types import BatchGeometry, EmbeddingNoise, SpanTable
from tests.helpers_payload import documents, minimal_config, write_config, write_payload

GLOBAL_BATCH, SEQUENCE_LENGTH, STEPS = 8, 64, 10


@pytest.fixture(scope="module")
def plan(tmp_path_factory: pytest.TempPathFactory) -> RunPlan:
    tmp = tmp_path_factory.mktemp("step")
    write_payload(tmp / "payloads" / "a", documents(12, prefix="a"))
    write_payload(tmp / "payloads" / "b", documents(10, prefix="b", text="another text {i} of b"))
    doc = minimal_config(
        a={"payload": "payloads/a", "repetitions": 6},
        b={"payload": "payloads/b", "repetitions": 4},
    )
    doc["train"] = {"max_duration": f"{STEPS}ba", "global_batch_size": GLOBAL_BATCH}
    doc["injection"] = {"max_modified_fraction": 0.5}
    loaded = load_config(write_config(tmp / "run.yaml", doc), env={})
    plan = build_run_plan(
        loaded, tokenizer=ByteTokenizer(), geometry=BatchGeometry(GLOBAL_BATCH, SEQUENCE_LENGTH, STEPS)
    )
    assert all(len(plan.spans_at(step)) for step in range(STEPS))  # every step has something to place
    return plan


def _local_rows(count: int, *, seed: int = 0, with_ids: bool = False) -> LocalRows:
    rng = np.random.default_rng(seed)
    ids = rng.choice(100_000, size=count, replace=False) if with_ids else np.full(count, -1)
    return LocalRows(sample_id=ids.astype(np.int64), fingerprint=rng.integers(0, 2**63, count).astype(np.uint64))


def _rank_row_maps(world: int, seed: int, with_ids: bool) -> list[RowMap]:
    """The same step's rows, split at random across ``world`` ranks."""
    rows = _local_rows(GLOBAL_BATCH, seed=seed, with_ids=with_ids)
    split = np.array_split(np.random.default_rng(seed + 1).permutation(GLOBAL_BATCH), world)
    parts = [LocalRows(rows.sample_id[i], rows.fingerprint[i]) for i in split]
    gathered = [p.key for p in parts] if world > 1 else None
    return [global_rows(p, rank=r, gathered_keys=gathered) for r, p in enumerate(parts)]


def _whole_batch(count: int = GLOBAL_BATCH) -> RowMap:
    return global_rows(_local_rows(count), rank=0, gathered_keys=None)


def _span_keys(spans: SpanTable) -> list[tuple[int, ...]]:
    return sorted(
        zip(
            spans.step.tolist(),
            spans.row.tolist(),
            spans.offset.tolist(),
            spans.experiment.tolist(),
            spans.sequence.tolist(),
        )
    )


@settings(max_examples=60, deadline=None)
@given(
    world=st.sampled_from([1, 2, 4, 8]),
    step=st.integers(0, STEPS - 1),
    seed=st.integers(0, 2**16),
    with_ids=st.booleans(),
)
def test_each_rank_gets_exactly_its_spans_with_the_plans_tokens_and_hashes(
    plan: RunPlan, world: int, step: int, seed: int, with_ids: bool
) -> None:
    placed: list[tuple[int, ...]] = []
    for rows in _rank_row_maps(world, seed, with_ids):
        injection = plan_step(plan, step=step, rows=rows, sequence_length=SEQUENCE_LENGTH)
        spans = injection.spans
        assert injection.located.total_rows == GLOBAL_BATCH and not injection.located.missed
        # Every span sits on a row this rank holds, at that row's local index.
        np.testing.assert_array_equal(rows.global_row[injection.located.local_rows], spans.row)
        # The positions cover exactly the spans, each token once, in span order.
        expected_positions = np.concatenate(
            [
                local * SEQUENCE_LENGTH + offset + np.arange(length)
                for local, offset, length in zip(injection.located.local_rows, spans.offset, spans.length)
            ]
            or [np.zeros(0, dtype=np.int64)]
        )
        np.testing.assert_array_equal(injection.positions, expected_positions)
        assert len(np.unique(injection.positions)) == len(injection.positions)
        # Tokens, items and hashes are the plan's, span by span.
        cuts = np.cumsum(spans.length)[:-1]
        for i, tokens in enumerate(np.split(injection.tokens, cuts) if len(spans) else []):
            experiment = plan.experiments[int(spans.experiment[i])]
            sequence = int(spans.sequence[i])
            np.testing.assert_array_equal(tokens, experiment.sequence_tokens(sequence))
            assert injection.token_hashes[i] == token_hash(tokens)
            assert injection.items[i] == experiment.seq_items[sequence]
        # Each span names the original row it overwrote: its sample id and content fingerprint.
        np.testing.assert_array_equal(injection.sample_ids, rows.local.sample_id[injection.located.local_rows])
        np.testing.assert_array_equal(injection.row_fingerprints, rows.local.fingerprint[injection.located.local_rows])
        columns = injection.ledger_columns()
        assert {len(v) for v in columns.values()} == {len(spans)}
        placed.extend(_span_keys(spans))
    # Together the ranks place every span of the step, none twice.
    assert sorted(placed) == _span_keys(plan.spans_at(step))


def test_dynamic_spans_are_injected_exactly_like_static_ones(plan: RunPlan) -> None:
    step = 3
    rows = _whole_batch()
    full = plan_step(plan, step=step, rows=rows, sequence_length=SEQUENCE_LENGTH)
    # Take experiment b's spans of this step out of the static plan and give them as a controller's.
    is_b = plan.spans.experiment == 1
    static = replace(plan, result=replace(plan.result, spans=plan.spans.take(np.flatnonzero(~is_b))))
    dynamic = plan.spans.take(np.flatnonzero(is_b & (plan.spans.step == step)))
    assert len(dynamic)
    split = plan_step(static, step=step, rows=rows, sequence_length=SEQUENCE_LENGTH, dynamic=dynamic)
    for name, column in full.ledger_columns().items():
        np.testing.assert_array_equal(split.ledger_columns()[name], column, err_msg=name)
    np.testing.assert_array_equal(split.positions, full.positions)
    np.testing.assert_array_equal(split.tokens, full.tokens)


def test_spans_beyond_a_short_batch_are_counted_not_placed(plan: RunPlan) -> None:
    step = 0
    short = 5  # a final batch with fewer rows than planned
    injection: StepInjection = plan_step(plan, step=step, rows=_whole_batch(short), sequence_length=SEQUENCE_LENGTH)
    planned = plan.spans_at(step)
    beyond = planned.row >= short
    assert beyond.any() and (~beyond).any()
    assert sum(injection.located.missed.values()) == int(beyond.sum())
    assert _span_keys(injection.spans) == _span_keys(planned.take(np.flatnonzero(~beyond)))


def test_noise_goes_with_the_spans_of_noised_experiments_only(plan: RunPlan) -> None:
    rows = _whole_batch()
    spec = EmbeddingNoise(sigma=0.1, seed=7)
    injection = plan_step(plan, step=2, rows=rows, sequence_length=SEQUENCE_LENGTH, noise_specs=[None, spec])
    spans = injection.spans
    of_b = np.flatnonzero(spans.experiment == 1)
    assert len(of_b) and len(of_b) < len(spans)
    assert [(n.local_row, n.offset, n.length, n.item) for n in injection.noise] == [
        (int(injection.located.local_rows[i]), int(spans.offset[i]), int(spans.length[i]), int(injection.items[i]))
        for i in of_b
    ]
    assert all(n.spec == spec for n in injection.noise)
    assert plan_step(plan, step=2, rows=rows, sequence_length=SEQUENCE_LENGTH).noise == []
