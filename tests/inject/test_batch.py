"""Unit tests of batch rewriting and the global-row mapping."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from multirun.inject.batch import (
    BatchFormatError,
    apply_spans,
    flat_token_positions,
    global_rows,
    input_ids_of,
)


@settings(max_examples=50, deadline=None)
@given(
    world=st.integers(1, 4),
    per_rank=st.integers(1, 6),
    seed=st.integers(0, 2**16),
)
def test_global_rows_do_not_depend_on_how_samples_are_split_across_ranks(world: int, per_rank: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    total = world * per_rank
    ids = rng.choice(10_000, size=total, replace=False)
    # One process sees every sample; `world` processes see a random split of the same samples.
    single = global_rows(ids, rank=0, gathered_sample_ids=None, local_rows=total)
    split = np.array_split(rng.permutation(ids), world)
    row_of_id_single = dict(zip(ids.tolist(), single.global_row.tolist()))
    seen = []
    for rank in range(world):
        rows = global_rows(split[rank], rank=rank, gathered_sample_ids=split, local_rows=len(split[rank]))
        assert rows.total_rows == total
        for sample, row in zip(split[rank].tolist(), rows.global_row.tolist()):
            assert row_of_id_single[sample] == row
        seen.extend(rows.global_row.tolist())
    assert sorted(seen) == list(range(total))


def test_duplicate_sample_ids_still_get_distinct_rows() -> None:
    # Streaming pads an epoch with repeated samples: ids can repeat within a step.
    gathered = [np.array([5, 3]), np.array([5, 9])]
    rows0 = global_rows(gathered[0], rank=0, gathered_sample_ids=gathered, local_rows=2)
    rows1 = global_rows(gathered[1], rank=1, gathered_sample_ids=gathered, local_rows=2)
    assert sorted([*rows0.global_row, *rows1.global_row]) == [0, 1, 2, 3]
    assert rows0.global_row.tolist() == [1, 0]
    assert rows1.global_row.tolist() == [2, 3]


def test_rank_major_rows_without_sample_ids() -> None:
    rows = global_rows(None, rank=2, gathered_sample_ids=None, local_rows=4)
    assert rows.global_row.tolist() == [8, 9, 10, 11]


def test_local_rows_of_marks_rows_held_elsewhere_and_rows_beyond_the_batch() -> None:
    gathered = [np.array([10, 30]), np.array([20, 40])]
    rows = global_rows(gathered[1], rank=1, gathered_sample_ids=gathered, local_rows=2)
    # Sorted ids 10,20,30,40 -> rank 1 holds global rows 1 and 3.
    assert rows.local_rows_of(np.array([0, 1, 2, 3, 7])).tolist() == [-1, 0, -1, 1, -1]


def test_flat_positions_cover_each_span_in_order() -> None:
    positions = flat_token_positions(np.array([0, 2]), np.array([1, 0]), np.array([3, 2]), sequence_length=5)
    assert positions.tolist() == [1, 2, 3, 10, 11]


def _dict_batch(rows: int = 3, length: int = 8) -> dict[str, torch.Tensor]:
    ids = torch.arange(rows * length, dtype=torch.long).reshape(rows, length) % 50
    return {
        "input_ids": ids.clone(),
        "labels": ids.clone(),
        "attention_mask": torch.zeros(rows, length, dtype=torch.long),
        "sample_id": torch.arange(rows),
    }


def test_apply_overwrites_input_ids_labels_and_attention_and_nothing_else() -> None:
    batch = _dict_batch()
    original = {k: v.clone() for k, v in batch.items()}
    positions = flat_token_positions(np.array([1]), np.array([2]), np.array([3]), sequence_length=8)
    apply_spans(
        batch, positions=positions, tokens=np.array([97, 98, 99]), eos_token_id=None, rows_touched=np.array([1])
    )
    assert batch["input_ids"][1, 2:5].tolist() == [97, 98, 99]
    assert batch["labels"][1, 2:5].tolist() == [97, 98, 99]
    assert batch["attention_mask"][1, 2:5].tolist() == [1, 1, 1]
    changed = batch["input_ids"] != original["input_ids"]
    assert changed.sum().item() == 3
    assert torch.equal(batch["sample_id"], original["sample_id"])
    untouched = torch.ones_like(changed)
    untouched[1, 2:5] = False
    assert torch.equal(batch["attention_mask"][untouched], original["attention_mask"][untouched])


def test_apply_recomputes_sequence_id_from_eos() -> None:
    batch = _dict_batch(rows=1, length=6)
    batch["input_ids"][:] = 1
    batch["sequence_id"] = torch.zeros(1, 6, dtype=torch.long)
    positions = flat_token_positions(np.array([0]), np.array([1]), np.array([3]), sequence_length=6)
    apply_spans(batch, positions=positions, tokens=np.array([0, 7, 0]), eos_token_id=0, rows_touched=np.array([0]))
    # EOS at positions 1 and 3: a new sequence starts after each.
    assert batch["sequence_id"][0].tolist() == [0, 0, 1, 1, 2, 2]


def test_apply_on_plain_tensor_batch() -> None:
    batch = torch.zeros(2, 4, dtype=torch.long)
    positions = flat_token_positions(np.array([1]), np.array([0]), np.array([2]), sequence_length=4)
    apply_spans(batch, positions=positions, tokens=np.array([5, 6]), eos_token_id=None, rows_touched=np.array([1]))
    assert batch.tolist() == [[0, 0, 0, 0], [5, 6, 0, 0]]


def test_per_row_counts_follow_the_attention_mask_and_labels() -> None:
    # llm-foundry's counting rule, on a batch with an attention mask (the test in
    # tests/integration/test_llmfoundry_batches.py checks it against llm-foundry itself).
    batch = _dict_batch(rows=2, length=6)
    batch["attention_mask"][:] = 1
    batch["attention_mask"][0, 3:] = 0
    batch["labels"][0, 3:] = -100
    batch["total_tokens"] = [3, 6]
    batch["loss_generating_tokens"] = [2, 5]
    positions = flat_token_positions(np.array([0]), np.array([2]), np.array([3]), sequence_length=6)
    apply_spans(batch, positions=positions, tokens=np.array([7, 8, 9]), eos_token_id=None, rows_touched=np.array([0]))
    assert batch["total_tokens"] == [5, 6] and batch["loss_generating_tokens"] == [4, 5]


def test_a_count_that_is_not_one_per_row_is_named() -> None:
    batch = _dict_batch()
    batch["loss_generating_tokens"] = torch.ones(2)
    positions = flat_token_positions(np.array([0]), np.array([0]), np.array([1]), sequence_length=8)
    with pytest.raises(BatchFormatError, match="loss_generating_tokens"):
        apply_spans(batch, positions=positions, tokens=np.array([1]), eos_token_id=None, rows_touched=np.array([0]))


@pytest.mark.parametrize("batch", [{"tokens": torch.zeros(2, 2)}, torch.zeros(4), [torch.zeros(2, 2)]])
def test_unsupported_batches_are_named(batch: object) -> None:
    with pytest.raises(BatchFormatError):
        input_ids_of(batch)
