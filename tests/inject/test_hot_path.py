"""The callback's hot path (prepared windows, row lookup, bulk ledger rows) against the
reference step function: the same spans, positions, tokens, noise and ledger rows."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from multirun.config import load_config
from multirun.data.tokenizers import ByteTokenizer
from multirun.inject.batch import (
    BatchRows,
    DerivedKeys,
    LocalRows,
    apply_spans,
    global_rows,
    key_buffer,
    row_lookup,
    single_process_lookup,
    write_runs,
    write_tokens,
)
from multirun.inject.step import InjectionLog, StepInjection, StepSchedule, StepSpans, plan_step
from multirun.ledger import token_hash
from multirun.plan.run_plan import RunPlan, build_run_plan
from multirun.types import BatchGeometry, EmbeddingNoise, SpanTable
from tests.helpers_payload import documents, minimal_config, write_config, write_payload

GLOBAL_BATCH, SEQUENCE_LENGTH, STEPS = 8, 64, 12
NOISE = [None, EmbeddingNoise(sigma=0.1, seed=3)]


@pytest.fixture(scope="module")
def plan(tmp_path_factory: pytest.TempPathFactory) -> RunPlan:
    tmp = tmp_path_factory.mktemp("hot")
    write_payload(tmp / "payloads" / "a", documents(12, prefix="a"))
    write_payload(tmp / "payloads" / "b", documents(10, prefix="b", text="another text {i} of b"))
    doc = minimal_config(
        a={"payload": "payloads/a", "repetitions": 5},
        b={"payload": "payloads/b", "repetitions": 3},
    )
    doc["train"] = {"max_duration": f"{STEPS}ba", "global_batch_size": GLOBAL_BATCH}
    doc["injection"] = {"max_modified_fraction": 0.5}
    loaded = load_config(write_config(tmp / "run.yaml", doc), env={})
    return build_run_plan(
        loaded, tokenizer=ByteTokenizer(), geometry=BatchGeometry(GLOBAL_BATCH, SEQUENCE_LENGTH, STEPS)
    )


def _split_plan(plan: RunPlan) -> tuple[RunPlan, SpanTable]:
    """The plan without experiment b's spans, and those spans as a controller's dynamic ones."""
    is_b = plan.spans.experiment == 1
    static = replace(plan, result=replace(plan.result, spans=plan.spans.take(np.flatnonzero(~is_b))))
    return static, plan.spans.take(np.flatnonzero(is_b))


def _rank_batches(seed: int, world: int, rows: int, with_ids: bool) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """One step's rows split at random across ``world`` ranks: (tokens, sample ids or None) per rank.
    Rows repeat (the same ids, or the same tokens without ids), so keys tie across ranks."""
    rng = np.random.default_rng(seed)
    distinct = rng.integers(0, 256, size=(max(rows - 2, 1), SEQUENCE_LENGTH))
    pick = rng.integers(0, distinct.shape[0], size=rows)
    tokens, ids = distinct[pick], rng.choice(10_000, size=distinct.shape[0], replace=False)[pick]
    split = np.array_split(rng.permutation(rows), world)
    return [(tokens[i].copy(), ids[i].copy() if with_ids else None) for i in split]


def _batch(tokens: np.ndarray, ids: np.ndarray | None) -> dict[str, torch.Tensor]:
    batch = {"input_ids": torch.from_numpy(tokens.copy())}
    if ids is not None:
        batch["sample_id"] = torch.from_numpy(ids.astype(np.int64))
    return batch


def _local_rows(tokens: np.ndarray, ids: np.ndarray | None) -> LocalRows:
    fingerprints = np.array([token_hash(row) for row in tokens], dtype=np.uint64)
    return LocalRows(ids.astype(np.int64) if ids is not None else np.full(len(tokens), -1), fingerprints)


@settings(max_examples=40, deadline=None)
@given(
    world=st.sampled_from([1, 2, 3, 4]),
    seed=st.integers(0, 2**16),
    with_ids=st.booleans(),
    short=st.sampled_from([0, 0, 3]),
    window_tokens=st.sampled_from([1, 200, 1 << 20]),
    dynamic=st.booleans(),
    pending_bytes=st.sampled_from([None, 0, 3000, 1 << 20]),
    few_runs=st.sampled_from([0, 1, 64]),
)
def test_hot_path_injects_and_records_what_plan_step_does(
    plan: RunPlan,
    world: int,
    seed: int,
    with_ids: bool,
    short: int,
    window_tokens: int,
    dynamic: bool,
    pending_bytes: int | None,
    few_runs: int,
) -> None:
    """``pending_bytes``: None records each row's fingerprint; else a copy of the original
    rows, hashed in bulk past that many bytes (0: at once) or at the drain. ``few_runs``:
    the writes go run by run up to that many runs, else through index arrays."""
    static, dynamic_spans = _split_plan(plan) if dynamic else (plan, None)
    rows = GLOBAL_BATCH - short
    schedules = [StepSchedule(static, noise_specs=NOISE, window_tokens=window_tokens) for _ in range(world)]
    logs = [InjectionLog(plan, pending_bytes=pending_bytes or 0) for _ in range(world)]
    expected: list[list[dict[str, np.ndarray]]] = [[] for _ in range(world)]
    for step in range(STEPS + 1):  # one step past the plan: nothing to inject there
        ranks = _rank_batches(seed + step, world, rows, with_ids)
        locals_ = [_local_rows(tokens, ids) for tokens, ids in ranks]
        gathered_keys = [r.key for r in locals_] if world > 1 else None
        batch_rows = [BatchRows.of_batch(_batch(tokens, ids)) for tokens, ids in ranks]
        if world > 1:
            buffers = torch.stack([key_buffer(r.key, GLOBAL_BATCH) for r in batch_rows]).numpy()
        for rank in range(world):
            reference = plan_step(
                static,
                step=step,
                rows=global_rows(locals_[rank], rank=rank, gathered_keys=gathered_keys),
                sequence_length=SEQUENCE_LENGTH,
                dynamic=None if dynamic_spans is None else dynamic_spans.take(dynamic_spans.step_slice(step)),
                noise_specs=NOISE,
            )
            here = batch_rows[rank]
            assert here.keyed_by == locals_[rank].keyed_by
            np.testing.assert_array_equal(here.key, locals_[rank].key)
            lookup = here.order if world == 1 else row_lookup(buffers, rank)
            np.testing.assert_array_equal(here.order, single_process_lookup(here.key))
            assert len(lookup) == rows
            schedules[rank].set_dynamic(dynamic_spans)
            work = schedules[rank].at(step, lookup, every_row_here=world == 1)
            assert schedules[rank].has_spans(step) == (len(static.spans_at(step)) > 0 or step_has(dynamic_spans, step))
            assert work.missed == reference.located.missed
            np.testing.assert_array_equal(work.local_rows, reference.located.local_rows)
            np.testing.assert_array_equal(work.positions(sequence_length=SEQUENCE_LENGTH), reference.positions)
            np.testing.assert_array_equal(work.tokens, reference.tokens)
            assert work.noise() == reference.noise
            fingerprints = here.fingerprints_of(work.local_rows)
            np.testing.assert_array_equal(fingerprints, reference.row_fingerprints)
            _check_writes(work, reference, ranks[rank][0], few_runs)
            if pending_bytes is None:
                logs[rank].record(work, sample_ids=here.sample_ids_of(work.local_rows), row_fingerprints=fingerprints)
            else:
                originals = here.copies_of(work.local_rows)  # what the callback keeps, before the overwrite
                logs[rank].record(work, sample_ids=here.sample_ids_of(work.local_rows), original_rows=originals)
                here.tokens[work.local_rows] = -1  # the overwrite must not reach what the log kept
            if len(reference):
                expected[rank].append(reference.ledger_columns())
    for rank in range(world):
        drained = logs[rank].drain()
        assert len(logs[rank]) == 0 and logs[rank].drain() is None
        if not expected[rank]:
            assert drained is None
            continue
        assert drained is not None
        for name in expected[rank][0]:
            column = np.concatenate([e[name] for e in expected[rank]])
            np.testing.assert_array_equal(drained[name], column, err_msg=name)


def step_has(spans: SpanTable | None, step: int) -> bool:
    return spans is not None and bool((spans.step == step).any())


def test_a_new_dynamic_table_is_merged_into_the_next_step(plan: RunPlan) -> None:
    static, dynamic_spans = _split_plan(plan)
    schedule = StepSchedule(static)
    lookup = single_process_lookup(np.arange(GLOBAL_BATCH))
    step = int(dynamic_spans.step[0])
    before = schedule.at(step, lookup, every_row_here=True)
    window = schedule.window(step)
    schedule.set_dynamic(None)  # the same table: the window stays
    assert schedule.window(step) is window
    schedule.set_dynamic(dynamic_spans)  # a decision: the window is prepared again, with its spans
    after = schedule.at(step, lookup, every_row_here=True)
    assert schedule.window(step) is not window
    added = int((dynamic_spans.step == step).sum())
    assert added > 0 and len(after) == len(before) + added
    assert set((after.spans.experiment == 1).nonzero()[0].tolist()) and not (before.spans.experiment == 1).any()


def test_row_lookup_orders_rows_as_global_rows_does_with_ties_across_ranks() -> None:
    keys = [np.array([5, 3, 5]), np.array([3, 9]), np.array([], dtype=np.int64), np.array([5])]
    buffers = torch.stack([key_buffer(k, 4) for k in keys]).numpy()
    for rank, mine in enumerate(keys):
        reference = global_rows(
            LocalRows(np.asarray(mine, dtype=np.int64), np.zeros(len(mine), np.uint64)),
            rank=rank,
            gathered_keys=keys,
        )
        lookup = row_lookup(buffers, rank)
        assert lookup.shape[0] == 6
        np.testing.assert_array_equal(lookup[reference.global_row], np.arange(len(mine)))
        assert int((lookup >= 0).sum()) == len(mine)


def test_a_key_buffer_refuses_more_rows_than_the_batch_size() -> None:
    with pytest.raises(Exception, match="3 rows on one rank, but the dataloader's batch size is 2"):
        key_buffer(np.arange(3), 2)


def test_the_log_takes_fingerprints_or_original_rows_never_both_nor_neither(plan: RunPlan) -> None:
    work = StepSchedule(plan).at(int(plan.spans.step[0]), np.arange(GLOBAL_BATCH), every_row_here=True)
    ids = np.arange(len(work))
    rows = np.zeros((len(work), SEQUENCE_LENGTH), np.int64)
    log = InjectionLog(plan)
    with pytest.raises(ValueError, match="one of the two"):
        log.record(work, sample_ids=ids)
    with pytest.raises(ValueError, match="one of the two"):
        log.record(work, sample_ids=ids, row_fingerprints=np.zeros(len(work), np.uint64), original_rows=rows)
    assert len(log) == 0


def test_fingerprints_are_taken_only_of_overwritten_rows_when_rows_have_ids() -> None:
    tokens = np.arange(4 * SEQUENCE_LENGTH).reshape(4, SEQUENCE_LENGTH) % 251
    rows = BatchRows.of_batch(_batch(tokens, np.array([7, 1, 4, 2])))
    assert rows.fingerprint is None and rows.keyed_by == "sample_id"
    touched = np.array([2, 0, 2])
    assert rows.fingerprints_of(touched).tolist() == [token_hash(tokens[i]) for i in touched]
    content = BatchRows.of_batch(_batch(tokens, None))
    assert content.keyed_by == "content"
    assert content.fingerprints_of(touched).tolist() == [token_hash(tokens[i]) for i in touched]


def _check_writes(work: StepSpans, reference: StepInjection, tokens: np.ndarray, few_runs: int) -> None:
    """Writing the hot path's runs into a rank's batch changes it as writing the reference's
    positions does: the same tokens in ``input_ids`` and ``labels``, the same mask."""

    def batch() -> dict[str, torch.Tensor]:
        ids = torch.from_numpy(tokens.copy())
        return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.zeros_like(ids)}

    expected, written = batch(), batch()
    rows = reference.located.local_rows
    apply_spans(
        expected, positions=reference.positions, tokens=reference.tokens, rows_touched=rows, derived=DerivedKeys()
    )
    work.write(written, derived=DerivedKeys(), few_runs=few_runs)
    for key in expected:
        assert torch.equal(written[key], expected[key]), key


@pytest.mark.parametrize("writer", ["tokens", "runs"])
def test_tokens_are_written_through_strided_and_autograd_tensors_too(writer: str) -> None:
    base = torch.arange(3 * SEQUENCE_LENGTH).reshape(SEQUENCE_LENGTH, 3) % 200
    input_ids = base.t()  # strided: the numpy view writes through its strides
    assert not input_ids.is_contiguous()
    mask = torch.zeros(3, SEQUENCE_LENGTH, requires_grad=True)  # no numpy view: written by torch
    batch = {"input_ids": input_ids, "labels": input_ids.clone(), "attention_mask": mask}
    rows, columns, tokens = np.array([2, 2, 0]), np.array([5, 6, 1]), np.array([250, 251, 252])
    with torch.no_grad():
        if writer == "tokens":
            write_tokens(batch, rows=rows, columns=columns, tokens=tokens, rows_touched=rows, derived=DerivedKeys())
        else:  # the same writes as two runs: (2, 5..6) and (0, 1)
            runs = {"rows": [2, 0], "columns": [5, 1], "lengths": [2, 1], "starts": [0, 2]}
            write_runs(batch, **runs, source=tokens, derived=DerivedKeys())
    for key in ("input_ids", "labels"):
        assert batch[key][2, 5] == 250 and batch[key][2, 6] == 251 and batch[key][0, 1] == 252, key
    assert int(batch["attention_mask"].sum()) == 3
    assert base[5, 2] == 250  # the strided tensor's own memory


def test_ledger_rows_and_tokens_do_not_depend_on_the_window_size(plan: RunPlan) -> None:
    lookup = np.arange(GLOBAL_BATCH)
    small, large = StepSchedule(plan, window_tokens=1), StepSchedule(plan)
    for step in range(STEPS):
        a, b = small.at(step, lookup, every_row_here=True), large.at(step, lookup, every_row_here=True)
        assert small.window(step).end - small.window(step).first == 1
        np.testing.assert_array_equal(a.tokens, b.tokens)
        np.testing.assert_array_equal(a.token_rows, b.token_rows)
        np.testing.assert_array_equal(a.token_columns, b.token_columns)
