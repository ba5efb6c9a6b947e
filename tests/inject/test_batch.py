"""Unit tests of batch rewriting and the global-row mapping."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from multirun.inject.batch import (
    BatchFormatError,
    DerivedKeys,
    LocalRows,
    SequenceIdRule,
    apply_spans,
    flat_token_positions,
    global_rows,
    input_ids_of,
    row_fingerprints,
)
from multirun.ledger import token_hash


def _rows(sample_ids: list[int] | np.ndarray, fingerprints: list[int] | np.ndarray | None = None) -> LocalRows:
    ids = np.asarray(sample_ids, dtype=np.int64)
    prints = np.arange(len(ids)) * 7 + 1 if fingerprints is None else fingerprints
    return LocalRows(sample_id=ids, fingerprint=np.asarray(prints, dtype=np.uint64))


@settings(max_examples=50, deadline=None)
@given(
    world=st.integers(1, 4),
    per_rank=st.integers(1, 6),
    seed=st.integers(0, 2**16),
    with_ids=st.booleans(),
    duplicates=st.booleans(),
)
def test_global_rows_do_not_depend_on_how_samples_are_split_across_ranks(
    world: int, per_rank: int, seed: int, with_ids: bool, duplicates: bool
) -> None:
    rng = np.random.default_rng(seed)
    total = world * per_rank
    # Streaming pads an epoch with repeated samples: a step can hold one sample twice.
    samples = rng.choice(total // 2 + 1 if duplicates else 10_000, size=total, replace=duplicates)
    tokens = rng.integers(0, 50_000, size=(10_000, 16))[samples]  # the content of each sample
    ids = samples if with_ids else np.full(total, -1)
    single = global_rows(LocalRows(ids, row_fingerprints(tokens)), rank=0, gathered_keys=None)
    content_of_row = {row: tokens[i].tolist() for i, row in enumerate(single.global_row.tolist())}
    # `world` processes see a random split of the same samples.
    split = np.array_split(rng.permutation(total), world)
    parts = [LocalRows(ids[i], row_fingerprints(tokens[i])) for i in split]
    seen = []
    for rank, part in enumerate(parts):
        rows = global_rows(part, rank=rank, gathered_keys=[p.key for p in parts])
        assert rows.total_rows == total
        for i, row in zip(split[rank].tolist(), rows.global_row.tolist()):
            assert content_of_row[row] == tokens[i].tolist()  # the same original tokens at each global row
        seen.extend(rows.global_row.tolist())
    assert sorted(seen) == list(range(total))


def test_rows_are_keyed_by_sample_id_when_the_dataset_gives_ids_else_by_content() -> None:
    tokens = np.array([[5, 6], [1, 2]])
    with_ids = LocalRows.of_batch({"input_ids": torch.from_numpy(tokens), "sample_id": torch.tensor([9, 4])})
    bare = LocalRows.of_batch(torch.from_numpy(tokens))
    assert with_ids.keyed_by == "sample_id" and with_ids.key.tolist() == [9, 4]
    assert bare.keyed_by == "content" and bare.sample_id.tolist() == [-1, -1]
    # The fingerprint is the ledger's token hash of the whole row, whatever the tensor's integer type.
    assert bare.fingerprint.tolist() == [token_hash([5, 6]), token_hash([1, 2])]
    assert (
        LocalRows.of_batch(torch.from_numpy(tokens.astype(np.int32))).fingerprint.tolist() == bare.fingerprint.tolist()
    )
    assert bare.key.tolist() == bare.fingerprint.view(np.int64).tolist()
    assert global_rows(bare, rank=0, gathered_keys=None).global_row.tolist() == list(np.argsort(np.argsort(bare.key)))


def test_duplicate_sample_ids_still_get_distinct_rows() -> None:
    parts = [_rows([5, 3]), _rows([5, 9])]
    keys = [p.key for p in parts]
    rows0 = global_rows(parts[0], rank=0, gathered_keys=keys)
    rows1 = global_rows(parts[1], rank=1, gathered_keys=keys)
    assert sorted([*rows0.global_row, *rows1.global_row]) == [0, 1, 2, 3]
    assert rows0.global_row.tolist() == [1, 0]
    assert rows1.global_row.tolist() == [2, 3]


def test_local_rows_of_marks_rows_held_elsewhere_and_rows_beyond_the_batch() -> None:
    parts = [_rows([10, 30]), _rows([20, 40])]
    rows = global_rows(parts[1], rank=1, gathered_keys=[p.key for p in parts])
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
        batch, positions=positions, tokens=np.array([97, 98, 99]), rows_touched=np.array([1]), derived=DerivedKeys()
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
    apply_spans(
        batch,
        positions=positions,
        tokens=np.array([0, 7, 0]),
        rows_touched=np.array([0]),
        derived=DerivedKeys(SequenceIdRule(0)),
    )
    # EOS at positions 1 and 3: a new sequence starts after each.
    assert batch["sequence_id"][0].tolist() == [0, 0, 1, 1, 2, 2]


def test_apply_on_plain_tensor_batch() -> None:
    batch = torch.zeros(2, 4, dtype=torch.long)
    positions = flat_token_positions(np.array([1]), np.array([0]), np.array([2]), sequence_length=4)
    apply_spans(batch, positions=positions, tokens=np.array([5, 6]), rows_touched=np.array([1]), derived=DerivedKeys())
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
    apply_spans(
        batch, positions=positions, tokens=np.array([7, 8, 9]), rows_touched=np.array([0]), derived=DerivedKeys()
    )
    assert batch["total_tokens"] == [5, 6] and batch["loss_generating_tokens"] == [4, 5]


def test_a_count_that_is_not_one_per_row_is_named() -> None:
    batch = _dict_batch()
    batch["loss_generating_tokens"] = torch.ones(2)
    positions = flat_token_positions(np.array([0]), np.array([0]), np.array([1]), sequence_length=8)
    with pytest.raises(BatchFormatError, match="loss_generating_tokens"):
        apply_spans(batch, positions=positions, tokens=np.array([1]), rows_touched=np.array([0]), derived=DerivedKeys())


@pytest.mark.parametrize("batch", [{"tokens": torch.zeros(2, 2)}, torch.zeros(4), [torch.zeros(2, 2)]])
def test_unsupported_batches_are_named(batch: object) -> None:
    with pytest.raises(BatchFormatError):
        input_ids_of(batch)
