"""llm-foundry's text batches as its own collator makes them: overwriting keeps every key exact."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from llmfoundry.data.utils import get_text_collator, get_tokens_per_batch_func
from tokenizers import Tokenizer as RawTokenizer
from tokenizers import models
from transformers import PreTrainedTokenizerFast

from multirun.inject.batch import BatchFormatError, DerivedKeys, apply_spans, check_batch, flat_token_positions

PAD, EOS = 0, 1
LENGTH = 12


def _tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": PAD, "<eos>": EOS, **{f"w{i}": i for i in range(2, 50)}}
    raw = RawTokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    return PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", eos_token="<eos>")


def _collator(rows: int, **dataset: int) -> object:
    """The collator llm-foundry's text dataloader builds (language modelling, EOS- or BOS-separated sequences)."""
    collate, _ = get_text_collator({"dataset": dataset or {"eos_token_id": EOS}}, _tokenizer(), dataset_batch_size=rows)
    return collate


def _collate(rows: list[list[int]], **dataset: int) -> dict:
    return _collator(len(rows), **dataset)([torch.tensor(row) for row in rows])  # type: ignore[operator]


def _counted_by_llmfoundry(batch: dict) -> tuple[list[int], list[int]]:
    """Each row counted again by llm-foundry's own function, as its collator counted it."""
    count = get_tokens_per_batch_func()
    keys = [k for k in ("input_ids", "attention_mask", "labels") if k in batch]
    counts = [count({k: batch[k][row : row + 1] for k in keys}) for row in range(batch["input_ids"].shape[0])]
    return [int(c["total"]) for c in counts], [int(c["loss_generating"]) for c in counts]


def test_injected_rows_keep_llmfoundrys_counts_labels_and_sequence_ids() -> None:
    rng = np.random.default_rng(0)
    rows = rng.integers(2, 50, size=(4, LENGTH)).tolist()
    rows[0][8:] = [PAD] * 4  # padding generates no loss: its labels are the ignore index
    rows[2][5] = EOS
    batch = _collate(rows)
    assert set(batch) == {"input_ids", "labels", "sequence_id", "total_tokens", "loss_generating_tokens"}
    before = list(batch["loss_generating_tokens"])
    derived = DerivedKeys.of_collator(_collator(4), eos_token_id=None)  # the rules come from llm-foundry's collator
    assert derived.sequence_id is not None and derived.sequence_id.split_token_id == EOS
    assert derived.count_tokens is not None and derived.counts_by_rule  # llm-foundry's own counter
    check_batch(batch, derived)

    # One span over row 0's padding, one across row 2's EOS; row 1 and 3 untouched.
    local, offset, length = np.array([0, 2]), np.array([6, 3]), np.array([5, 4])
    tokens = np.array([7, 8, EOS, 9, 10, 11, 12, 13, 14])
    positions = flat_token_positions(local, offset, length, sequence_length=LENGTH)
    apply_spans(batch, positions=positions, tokens=tokens, rows_touched=local, derived=derived)

    # The counts are what llm-foundry counts on the batch as trained on ...
    total, generating = _counted_by_llmfoundry({k: batch[k] for k in ("input_ids", "labels")})
    assert batch["total_tokens"] == total
    assert batch["loss_generating_tokens"] == generating
    assert generating[0] > before[0] and generating[1:] == before[1:]  # padding overwritten now generates loss
    # ... and sequence ids and labels are what its collator gives the injected rows.
    recollated = _collate(batch["input_ids"].tolist())
    torch.testing.assert_close(batch["sequence_id"], recollated["sequence_id"])
    untouched_padding = batch["input_ids"] == PAD
    torch.testing.assert_close(batch["labels"][~untouched_padding], recollated["labels"][~untouched_padding])


def test_bos_separated_sequences_keep_llmfoundrys_sequence_ids() -> None:
    BOS = 1
    rows = [[BOS, 5, 6, 7, BOS, 8, 9, 10, 11, 12, 13, 14], [9] * LENGTH]
    batch = _collate(rows, bos_token_id=BOS)
    derived = DerivedKeys.of_collator(_collator(2, bos_token_id=BOS), eos_token_id=2)  # not the EOS rule
    assert derived.sequence_id is not None and derived.sequence_id.bos_mode
    check_batch(batch, derived)
    tokens = np.array([BOS, 20, 21])
    apply_spans(
        batch,
        positions=flat_token_positions(np.array([1]), np.array([4]), np.array([3]), sequence_length=LENGTH),
        tokens=tokens,
        rows_touched=np.array([1]),
        derived=derived,
    )
    torch.testing.assert_close(
        batch["sequence_id"], _collate(batch["input_ids"].tolist(), bos_token_id=BOS)["sequence_id"]
    )
    assert batch["sequence_id"][1].tolist() == [0] * 4 + [1] * 8


def test_batches_multirun_cannot_keep_exact_are_refused_before_any_overwrite() -> None:
    rows = np.random.default_rng(1).integers(2, 50, size=(2, LENGTH)).tolist()
    rows[0][3] = EOS
    derived = DerivedKeys.of_collator(_collator(2), eos_token_id=None)
    batch = _collate(rows)
    with pytest.raises(BatchFormatError, match="bidirectional_mask"):  # a per-row key of prefix-LM batches
        check_batch({**batch, "bidirectional_mask": torch.ones(2, LENGTH)}, derived)
    bos_rule = DerivedKeys.of_collator(_collator(2, bos_token_id=EOS), eos_token_id=None)
    with pytest.raises(BatchFormatError, match=r"sequence_id.*BOS mode"):  # built by another rule than assumed
        check_batch(batch, bos_rule)
    with pytest.raises(BatchFormatError, match="total_tokens"):
        check_batch({**batch, "total_tokens": [1, 1]}, derived)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), with_mask=st.booleans(), touched=st.sets(st.integers(0, 3), min_size=1))
def test_counting_touched_rows_in_one_pass_gives_what_llmfoundrys_function_gives_row_by_row(
    seed: int, with_mask: bool, touched: set[int]
) -> None:
    rng = np.random.default_rng(seed)
    rows = rng.integers(2, 50, size=(4, LENGTH)).tolist()
    for row in rows:  # padded tails: their labels are the ignore index
        pad = int(rng.integers(0, LENGTH // 2))
        row[LENGTH - pad :] = [PAD] * pad
    batch = _collate(rows)
    batch["labels"][torch.from_numpy(rng.random((4, LENGTH)) < 0.2)] = -100
    if with_mask:
        batch["attention_mask"] = torch.from_numpy((rng.random((4, LENGTH)) < 0.8).astype(np.int64))
    one_pass = DerivedKeys.of_collator(_collator(4), eos_token_id=None)
    row_by_row = replace(one_pass, counts_by_rule=False)  # llm-foundry's function, called per row
    assert one_pass.counts_by_rule
    local = np.array(sorted(touched))
    positions = flat_token_positions(local, np.full(local.size, 2), np.full(local.size, 3), sequence_length=LENGTH)
    tokens = rng.integers(2, 50, size=positions.size)
    counted = []
    for derived in (one_pass, row_by_row):
        copy = {k: v.clone() if isinstance(v, torch.Tensor) else list(v) for k, v in batch.items()}
        apply_spans(copy, positions=positions, tokens=tokens, rows_touched=local, derived=derived)
        counted.append((copy["total_tokens"], copy["loss_generating_tokens"]))
    assert counted[0] == counted[1]
    total, generating = _counted_by_llmfoundry(
        {k: copy[k] for k in ("input_ids", "attention_mask", "labels") if k in copy}
    )
    for row in touched:  # the others keep the collator's counts (of the rows before the labels were edited)
        assert (counted[0][0][row], counted[0][1][row]) == (total[row], generating[row])


def test_other_counting_functions_are_called_row_by_row() -> None:
    def custom(batch: dict) -> dict:
        return {"total": 1, "loss_generating": 2}

    assert not DerivedKeys(count_tokens=custom).counts_by_rule
    assert not DerivedKeys.of_collator(SimpleNamespace(token_counting_func=custom), eos_token_id=EOS).counts_by_rule
    encoder_decoder = SimpleNamespace(token_counting_func=get_tokens_per_batch_func(decoder_only=False))
    assert not DerivedKeys.of_collator(encoder_decoder, eos_token_id=EOS).counts_by_rule
    decoder = SimpleNamespace(token_counting_func=get_tokens_per_batch_func(decoder_only=True))
    assert DerivedKeys.of_collator(decoder, eos_token_id=EOS).counts_by_rule
    batch = {"input_ids": torch.full((2, LENGTH), 5), "total_tokens": [0, 0], "loss_generating_tokens": [0, 0]}
    apply_spans(
        batch,
        positions=np.array([0]),
        tokens=np.array([7]),
        rows_touched=np.array([0]),
        derived=DerivedKeys(count_tokens=custom),
    )
    assert batch["total_tokens"] == [1, 0] and batch["loss_generating_tokens"] == [2, 0]  # the custom function's
