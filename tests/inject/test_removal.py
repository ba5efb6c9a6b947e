"""Removal on a batch's tokens (multirun/inject/removal.py), against a brute-force search."""

from __future__ import annotations

import numpy as np
import pytest

from multirun.inject.removal import StreamRemoval, _NgramTable, find_ngrams, tiled, window_hashes
from multirun.ledger import token_hash
from multirun.types import RemovalSpec


def _spec(sequences: list[list[int]], n: int, replacement: list[int], span: str = "match") -> RemovalSpec:
    windows, owner, start = [], [], []
    seen: set[tuple[int, ...]] = set()
    for j, seq in enumerate(sequences):
        for s in range(len(seq) - n + 1):
            w = tuple(seq[s : s + n])
            if w not in seen:
                seen.add(w)
                windows.append(w)
                owner.append(j)
                start.append(s)
    return RemovalSpec(
        n=n,
        ngrams=np.array(windows, dtype=np.int64),
        ngram_sequence=np.array(owner),
        ngram_start=np.array(start),
        replacement=np.array(replacement, dtype=np.int64),
        span=span,  # type: ignore[arg-type]
    )


def _naive_hits(tokens: np.ndarray, ngrams: set[tuple[int, ...]], n: int) -> list[tuple[int, int]]:
    return [
        (r, j)
        for r in range(tokens.shape[0])
        for j in range(tokens.shape[1] - n + 1)
        if tuple(tokens[r, j : j + n].tolist()) in ngrams
    ]


def test_window_hashes_equal_for_equal_windows_only() -> None:
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 3, size=(4, 200))  # a tiny vocabulary: many equal windows
    h = window_hashes(tokens, 6)
    flat = np.lib.stride_tricks.sliding_window_view(tokens, 6, axis=1).reshape(-1, 6)
    _, inverse = np.unique(flat, axis=0, return_inverse=True)
    _, hash_inverse = np.unique(h.ravel(), return_inverse=True)
    # Same windows, same hash; and on this data no two distinct windows collide.
    pairs = np.unique(np.stack([inverse.ravel(), hash_inverse.ravel()]), axis=1).shape[1]
    assert pairs == inverse.max() + 1 == hash_inverse.max() + 1  # the same partition of the windows


@pytest.mark.parametrize("span", ["match", "row"])
def test_no_removed_ngram_survives_and_nothing_else_changes(span: str) -> None:
    rng = np.random.default_rng(1)
    n, length = 8, 64
    sequences = [rng.integers(3, 50, size=int(rng.integers(n, 20))).tolist() for _ in range(5)]
    spec = _spec(sequences, n, [0, 1], span)
    tokens = rng.integers(3, 50, size=(16, length))
    for r in range(0, 16, 2):  # plant whole sequences and bare n-grams, some overlapping or adjacent
        seq = sequences[r % 5]
        at = int(rng.integers(0, length - len(seq)))
        tokens[r, at : at + len(seq)] = seq
        if r % 4 == 0:
            tokens[r, at + len(seq) - 2 : at + len(seq) - 2 + n] = sequences[(r + 1) % 5][:n][
                : length - at - len(seq) + 2
            ]
    original = tokens.copy()
    expected = _naive_hits(original, {tuple(w) for w in spec.ngrams.tolist()}, n)
    assert expected  # the test plants matches

    removed = StreamRemoval([(3, spec)]).apply(tokens, step=0)

    assert _naive_hits(tokens, {tuple(w) for w in spec.ngrams.tolist()}, n) == []
    covered = np.zeros_like(tokens, dtype=bool)
    for r, o, m, h in zip(removed.local_row, removed.offset, removed.length, removed.token_hash):
        assert not covered[r, o : o + m].any()  # spans of one row never overlap
        covered[r, o : o + m] = True
        assert np.array_equal(tokens[r, o : o + m], tiled(np.array([0, 1]), int(m)))
        assert token_hash(tokens[r, o : o + m]) == int(h)
    # Every matched window is inside a removed span; every untouched token is the original.
    for r, j in expected:
        assert covered[r, j : j + n].all()
    assert np.array_equal(tokens[~covered], original[~covered])
    if span == "row":
        assert set(removed.length.tolist()) == {length}
    # Each span records an n-gram that really was at its start in the row before removal.
    assert set(removed.experiment.tolist()) == {3}
    for r, o, s, start in zip(removed.local_row, removed.offset, removed.sequence, removed.ngram_start):
        if span == "match":
            assert np.array_equal(original[r, o : o + n], sequences[s][start : start + n])


def test_hash_collisions_are_checked_exactly() -> None:
    spec = _spec([[5, 6, 7, 8]], 4, [0])
    table = _NgramTable(spec)
    tokens = np.array([[1, 2, 3, 4, 9, 9]])
    # Pretend a window of other tokens hashes like the n-gram: the exact check must reject it.
    table.keys = window_hashes(tokens, 4)[0, :1].copy()
    table.bitmap[:] = True
    assert all(a.size == 0 for a in find_ngrams(tokens, table))
    assert find_ngrams(np.array([[0, 5, 6, 7, 8, 0]]), _NgramTable(spec))[1].tolist() == [1]


def test_a_replacement_that_forms_an_ngram_with_its_row_replaces_the_row() -> None:
    # [5, 5, 7] removed with 5s written over it: the row then reads 9 5 5 5 7, holding [5, 5, 7] again.
    spec = _spec([[5, 5, 7]], 3, [5])
    tokens = np.array([[9, 5, 5, 7, 7, 1], [1, 2, 3, 4, 5, 6]])
    removed = StreamRemoval([(0, spec)]).apply(tokens, step=0)
    assert tokens.tolist() == [[5] * 6, [1, 2, 3, 4, 5, 6]]
    assert (removed.offset.tolist(), removed.length.tolist(), removed.ngram_start.tolist()) == ([0], [6], [0])


def test_steps_outside_the_placement_are_not_scanned() -> None:
    spec = _spec([[5, 6, 7]], 3, [0])
    window = RemovalSpec(**{**spec.__dict__, "start_step": 2, "end_step": 4})
    removal = StreamRemoval([(0, window)])
    assert [removal.active_at(t) for t in range(5)] == [False, False, True, True, False]
    tokens = np.array([[5, 6, 7, 1]])
    assert len(removal.apply(tokens, step=1)) == 0 and tokens.tolist() == [[5, 6, 7, 1]]
    assert len(removal.apply(tokens, step=2)) == 1 and tokens.tolist() == [[0, 0, 0, 1]]
