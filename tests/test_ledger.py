"""Tests of the provenance ledger (multirun/ledger.py) with real pyarrow/Parquet files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import xxhash

from multirun.errors import InputError
from multirun.ledger import (
    FORMAT_VERSION,
    SCHEMA,
    Ledger,
    LedgerIntegrityError,
    LedgerWriter,
    token_hash,
    truncate_ledger,
)

NAMES = ["contam", "canary", "facts"]
ITEMS = [[f"q{i}" for i in range(7)], [f"c{i}" for i in range(4)], [f"f{i}" for i in range(5)]]
# "q1" also in another experiment: item ids need not be unique across experiments.
ITEMS[2][0] = "q1"
SEQ_LEN = 64
INT_COLS = [
    "step",
    "global_row",
    "local_row",
    "sample_id",
    "offset",
    "length",
    "experiment",
    "item_index",
    "sequence",
    "repetition",
]


def gen_spans(steps: range, rows: int = 8, seed: int = 0) -> dict[str, np.ndarray]:
    """Non-overlapping spans (1-2 per chosen row), with real token fingerprints."""
    rng = np.random.default_rng(seed)
    out: dict[str, list] = {k: [] for k in [*INT_COLS, "token_hash", "row_fingerprint"]}
    for step in steps:
        for row in rng.choice(rows, size=rng.integers(1, rows + 1), replace=False):
            cut = int(rng.integers(8, SEQ_LEN - 8))
            for lo, hi in ((0, cut), (cut, SEQ_LEN))[: int(rng.integers(1, 3))]:
                length = int(rng.integers(1, hi - lo + 1))
                offset = lo + int(rng.integers(0, hi - lo - length + 1))
                e = int(rng.integers(0, len(NAMES)))
                tokens = rng.integers(0, 50_000, length)
                for k, v in dict(
                    step=step,
                    global_row=row,
                    local_row=row // 2,
                    sample_id=1000 * step + row,
                    offset=offset,
                    length=length,
                    experiment=e,
                    item_index=int(rng.integers(0, len(ITEMS[e]))),
                    sequence=int(rng.integers(0, 30)),
                    repetition=int(rng.integers(0, 4)),
                    token_hash=token_hash(tokens),
                    row_fingerprint=token_hash(rng.integers(0, 50_000, SEQ_LEN)),
                ).items():
                    out[k].append(v)
    cols = {k: np.asarray(v, dtype=np.int64) for k, v in out.items() if k in INT_COLS}
    cols["token_hash"] = np.asarray(out["token_hash"], dtype=np.uint64)
    cols["row_fingerprint"] = np.asarray(out["row_fingerprint"], dtype=np.uint64)
    return cols


def take(spans: dict[str, np.ndarray], mask: np.ndarray) -> dict[str, np.ndarray]:
    return {k: v[mask] for k, v in spans.items()}


def write(
    run_dir: Path, spans: dict[str, np.ndarray], rank: int = 0, flush_every_step: int | None = None
) -> LedgerWriter:
    """Append ``spans`` one step at a time (as the callback does); flush as asked."""
    w = LedgerWriter(run_dir, rank=rank, experiment_names=NAMES, item_ids=ITEMS)
    steps = np.unique(spans["step"])
    for i, s in enumerate(steps):
        w.append(**take(spans, spans["step"] == s))
        if flush_every_step and (i + 1) % flush_every_step == 0:
            w.flush()
    w.close()
    return w


def expected_table(parts: list[tuple[int, dict[str, np.ndarray]]]) -> dict[str, list]:
    """What the ledger should contain, as Python lists sorted by (step, global_row, offset)."""
    rows = []
    for rank, sp in parts:
        for i in range(len(sp["step"])):
            e = int(sp["experiment"][i])
            rows.append(
                dict(
                    step=int(sp["step"][i]),
                    rank=rank,
                    global_row=int(sp["global_row"][i]),
                    local_row=int(sp["local_row"][i]),
                    sample_id=int(sp["sample_id"][i]),
                    offset=int(sp["offset"][i]),
                    length=int(sp["length"][i]),
                    experiment=NAMES[e],
                    item=ITEMS[e][int(sp["item_index"][i])],
                    item_index=int(sp["item_index"][i]),
                    sequence=int(sp["sequence"][i]),
                    repetition=int(sp["repetition"][i]),
                    arm="treated",
                    token_hash=int(sp["token_hash"][i]),
                    row_fingerprint=int(sp["row_fingerprint"][i]),
                )
            )
    rows.sort(key=lambda r: (r["step"], r["global_row"], r["offset"]))
    return {k: [r[k] for r in rows] for k in SCHEMA.names}


def test_token_hash_definition() -> None:
    toks = np.array([5, 0, 49_999, 7], dtype=np.int64)
    assert token_hash(toks) == xxhash.xxh64_intdigest(toks.astype(np.int32).tobytes())
    assert token_hash([5, 0, 49_999, 7]) == token_hash(toks.astype(np.uint16))
    assert token_hash(toks[::-1]) != token_hash(toks)
    assert token_hash(np.arange(10)[::2]) == token_hash([0, 2, 4, 6, 8])  # non-contiguous views
    assert 0 <= token_hash([1]) < 2**64


def test_round_trip_exact_columns_and_schema(tmp_path: Path) -> None:
    spans = gen_spans(range(12))
    write(tmp_path, spans)
    led = Ledger.open(tmp_path)
    assert len(led) == len(spans["step"]) > 20
    assert led.table.schema.remove_metadata().equals(SCHEMA)
    for name in ("experiment", "item", "arm"):
        assert pa.types.is_dictionary(led.table.schema.field(name).type)
    assert led.table.to_pydict() == expected_table([(0, spans)])
    shard = next((tmp_path / "ledger" / "rank-00000").glob("*.parquet"))
    meta = pq.read_schema(shard).metadata
    assert meta[b"multirun.ledger.format_version"] == str(FORMAT_VERSION).encode()
    assert json.loads(meta[b"multirun.ledger.experiments"]) == NAMES
    assert led.experiments == NAMES
    led.check_integrity()


def test_append_broadcasts_scalars_and_copies_arrays(tmp_path: Path) -> None:
    w = LedgerWriter(tmp_path, rank=3, experiment_names=NAMES, item_ids=ITEMS)
    offsets = np.array([0, 10, 20])
    common = dict(
        step=4,
        global_row=np.array([1, 1, 1]),
        local_row=0,
        sample_id=-1,
        length=5,
        experiment=np.array([0, 1, 2]),
        item_index=np.array([6, 3, 0]),
        sequence=0,
        repetition=2,
        token_hash=np.array([1, 2, 2**64 - 1], dtype=np.uint64),
        row_fingerprint=np.uint64(2**64 - 2),
    )
    w.append(offset=offsets, **common)
    offsets[:] = 40  # the writer must have copied
    w.append(offset=np.array([30, 40, 50]), **common)
    assert w.buffered_rows == 6
    assert w.flush() == 6 and w.buffered_rows == 0
    t = Ledger.open(tmp_path).table.to_pydict()
    assert t["offset"] == [0, 10, 20, 30, 40, 50]
    assert t["arm"] == ["treated"] * 6  # only treated items are ever injected
    assert set(t["sample_id"]) == {-1} and set(t["rank"]) == {3} and set(t["step"]) == {4}
    assert t["item"][:3] == ["q6", "c3", "q1"]
    assert t["token_hash"][2] == 2**64 - 1
    assert t["row_fingerprint"] == [2**64 - 2] * 6


def test_append_rejects_bad_input(tmp_path: Path) -> None:
    w = LedgerWriter(tmp_path, rank=0, experiment_names=NAMES, item_ids=ITEMS)
    ok = dict(
        step=np.array([0, 0]),
        global_row=np.array([0, 1]),
        local_row=np.array([0, 1]),
        sample_id=-1,
        offset=np.array([0, 0]),
        length=np.array([4, 4]),
        experiment=np.array([0, 1]),
        item_index=np.array([0, 0]),
        sequence=0,
        repetition=0,
        token_hash=np.array([1, 2], dtype=np.uint64),
        row_fingerprint=np.array([3, 4], dtype=np.uint64),
    )
    with pytest.raises(ValueError, match="differ in length"):
        w.append(**{**ok, "offset": np.array([0, 0, 0])})
    with pytest.raises(ValueError, match="experiment index"):
        w.append(**{**ok, "experiment": np.array([0, 3])})
    with pytest.raises(ValueError, match="item_index 4 out of range for experiment 'canary'"):
        w.append(**{**ok, "item_index": np.array([6, 4])})  # 6 is fine for contam, 4 is not for canary
    with pytest.raises(TypeError, match="'length' must be integer"):
        w.append(**{**ok, "length": np.array([4.0, 4.0])})
    with pytest.raises(ValueError, match="outside int32"):
        w.append(**{**ok, "offset": np.array([0, 2**40])})
    with pytest.raises(ValueError, match="lengths must be positive"):
        w.append(**{**ok, "length": np.array([4, 0])})
    assert w.buffered_rows == 0
    w.close()
    with pytest.raises(RuntimeError):
        w.append(**ok)
    with pytest.raises(ValueError):
        LedgerWriter(tmp_path, rank=0, experiment_names=["a", "a"], item_ids=[[], []])


def test_multiple_flushes_make_named_shards(tmp_path: Path) -> None:
    spans = gen_spans(range(10))
    w = LedgerWriter(tmp_path, rank=0, experiment_names=NAMES, item_ids=ITEMS)
    assert w.flush() == 0
    rank_dir = tmp_path / "ledger" / "rank-00000"
    assert list(rank_dir.iterdir()) == []  # an empty flush writes nothing
    written = 0
    for lo, hi in [(0, 4), (4, 7), (7, 10)]:
        for s in range(lo, hi):
            w.append(**take(spans, spans["step"] == s))
        written += w.flush()
    w.close()
    assert written == len(spans["step"])
    assert sorted(p.name for p in rank_dir.iterdir()) == [
        "part-000000000000-000000000003.parquet",
        "part-000000000004-000000000006.parquet",
        "part-000000000007-000000000009.parquet",
    ]
    assert Ledger.open(tmp_path).table.to_pydict() == expected_table([(0, spans)])


def test_flushes_covering_the_same_steps_do_not_overwrite(tmp_path: Path) -> None:
    spans = gen_spans(range(5, 6))
    half = np.arange(len(spans["step"])) % 2 == 0
    w = LedgerWriter(tmp_path, rank=0, experiment_names=NAMES, item_ids=ITEMS)
    w.append(**take(spans, half))
    w.flush()
    w.append(**take(spans, ~half))
    w.flush()
    assert len(list((tmp_path / "ledger" / "rank-00000").glob("*.parquet"))) == 2
    assert len(Ledger.open(tmp_path)) == len(spans["step"])


def test_multiple_ranks_and_sort_order(tmp_path: Path) -> None:
    s0, s1 = gen_spans(range(9), seed=1), gen_spans(range(9), seed=2)
    s1["global_row"] += 8  # rank 1 owns global rows 8..15
    write(tmp_path, s0, rank=0, flush_every_step=3)
    write(tmp_path, s1, rank=1, flush_every_step=4)
    led = Ledger.open(tmp_path)
    assert led.table.to_pydict() == expected_table([(0, s0), (1, s1)])
    assert set(led.query(rank=1).column("global_row").to_pylist()) <= set(range(8, 16))
    assert len(led.query(rank=0)) == len(s0["step"]) and len(led.query(rank=1)) == len(s1["step"])
    # Sorted by (step, global_row, offset) across ranks.
    keys = list(zip(*(led.table.column(c).to_pylist() for c in ("step", "global_row", "offset"))))
    assert keys == sorted(keys)


def test_query_filters(tmp_path: Path) -> None:
    s0, s1 = gen_spans(range(20), seed=3), gen_spans(range(20), seed=4)
    write(tmp_path, s0, rank=0, flush_every_step=5)
    write(tmp_path, s1, rank=1)
    led = Ledger.open(tmp_path)
    exp = expected_table([(0, s0), (1, s1)])
    rows = [dict(zip(exp, vals)) for vals in zip(*exp.values())]

    def expect(pred) -> list[tuple]:
        return [(r["step"], r["rank"], r["global_row"], r["offset"]) for r in rows if pred(r)]

    def got(t: pa.Table) -> list[tuple]:
        return list(zip(*(t.column(c).to_pylist() for c in ("step", "rank", "global_row", "offset"))))

    assert got(led.query(experiment="canary")) == expect(lambda r: r["experiment"] == "canary") != []
    assert got(led.query(item="q1")) == expect(lambda r: r["item"] == "q1")
    assert {r["experiment"] for r in rows if r["item"] == "q1"} == {"contam", "facts"}  # shared id, both matched
    assert got(led.query(experiment="facts", item="q1")) == expect(
        lambda r: r["experiment"] == "facts" and r["item"] == "q1"
    )
    assert got(led.query(steps=(5, 9))) == expect(lambda r: 5 <= r["step"] < 9) != []
    assert got(led.query(steps=(5, 9), rank=1, experiment="contam")) == expect(
        lambda r: 5 <= r["step"] < 9 and r["rank"] == 1 and r["experiment"] == "contam"
    )
    assert len(led.query()) == len(led)


def test_query_names_unknown_filters_and_rejects_empty_ranges(tmp_path: Path) -> None:
    """A typo is an error naming what exists, never a silent zero rows (issue 15, friction 7)."""
    write(tmp_path, gen_spans(range(10), seed=3), rank=0)
    write(tmp_path, gen_spans(range(10), seed=4), rank=1)
    (tmp_path / "arms.json").write_text(json.dumps({"canary": {"treated": ["c0"], "control": ["c-control"]}}))
    led = Ledger.open(tmp_path)
    with pytest.raises(InputError, match=r"unknown experiment 'nope'; the ledger has .*'canary'") as info:
        led.query(experiment="nope")
    assert info.value.key == "--experiment"
    with pytest.raises(InputError, match=r"unknown item 'nope'; the run has .*'q1'"):
        led.query(item="nope")
    with pytest.raises(InputError, match=r"unknown item 'q1'; experiment 'canary' has"):
        led.query(experiment="canary", item="q1")  # q1 exists, but in other experiments
    with pytest.raises(InputError, match=r"unknown rank 7; the ledger has ranks 0, 1"):
        led.query(rank=7)
    for steps, problem in (((9, 5), "reversed"), ((7, 7), "empty"), ((-1, 3), "below 0")):
        with pytest.raises(InputError, match=problem) as info:
            led.query(steps=steps)
        assert info.value.key == "--steps"
    # A control item is known (arms.json) though never injected: zero rows, no error.
    assert len(led.query(experiment="canary", item="c-control")) == 0
    assert led.known_items("canary")[0] == "c0"


def test_summary_and_exposures_match_independent_counts(tmp_path: Path) -> None:
    spans = gen_spans(range(3, 40), seed=5)
    # Make "facts" absent from the spans: it must still be listed, with zero counts.
    spans = take(spans, spans["experiment"] != 2)
    write(tmp_path, spans, flush_every_step=10)
    led = Ledger.open(tmp_path)
    total = 40 * 8 * SEQ_LEN
    summary = {row["experiment"]: row for row in led.summary(total_training_tokens=total)}
    assert list(summary) == NAMES
    for e, name in enumerate(NAMES[:2]):
        idx = [i for i in range(len(spans["step"])) if spans["experiment"][i] == e]
        tokens = sum(int(spans["length"][i]) for i in idx)
        per_item = Counter(int(spans["item_index"][i]) for i in idx)
        row = summary[name]
        assert row["spans"] == len(idx) > 0
        assert row["tokens"] == tokens
        assert row["share_of_training_tokens"] == pytest.approx(tokens / total)
        assert row["items_exposed"] == len(per_item)
        assert row["exposures_per_item"] == {
            "min": min(per_item.values()),
            "mean": pytest.approx(len(idx) / len(per_item)),
            "max": max(per_item.values()),
        }
        assert row["first_step"] == min(int(spans["step"][i]) for i in idx)
        assert row["last_step"] == max(int(spans["step"][i]) for i in idx)
        assert led.exposures(name) == {ITEMS[e][k]: v for k, v in per_item.items()}
    assert summary["facts"]["spans"] == 0 and summary["facts"]["tokens"] == 0
    assert summary["facts"]["first_step"] is None and led.exposures("facts") == {}
    assert led.summary()[0]["share_of_training_tokens"] is None
    with pytest.raises(KeyError, match="unknown experiment"):
        led.exposures("nope")


def test_export_all_formats_round_trip(tmp_path: Path) -> None:
    spans = gen_spans(range(6), seed=6)
    spans["token_hash"][0] = np.uint64(2**64 - 3)  # above int64: must survive every format
    write(tmp_path / "run", spans)
    led = Ledger.open(tmp_path / "run")
    want = expected_table([(0, spans)])

    p = led.export(tmp_path / "out" / "ledger.parquet")
    back = pq.read_table(p)
    assert back.to_pydict() == want
    assert pa.types.is_dictionary(back.schema.field("item").type)

    p = led.export(tmp_path / "out" / "ledger.csv")
    types = {f.name: (pa.string() if pa.types.is_dictionary(f.type) else f.type) for f in SCHEMA}
    back = pacsv.read_csv(p, convert_options=pacsv.ConvertOptions(column_types=types))
    assert back.column_names == SCHEMA.names
    assert back.to_pydict() == want

    p = led.export(tmp_path / "out" / "ledger.jsonl")
    lines = p.read_text().splitlines()
    assert len(lines) == len(led)
    recs = [json.loads(line) for line in lines]
    assert {k: [r[k] for r in recs] for k in SCHEMA.names} == want

    p = led.export(tmp_path / "out" / "ledger.txt", format="csv")
    assert p.read_text().splitlines()[0].replace('"', "").split(",") == SCHEMA.names
    with pytest.raises(InputError, match="infer"):
        led.export(tmp_path / "out" / "ledger.xlsx")


def _shards(run: Path, rank: int) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((run / "ledger" / f"rank-{rank:05d}").glob("*.parquet"))}


def test_truncate_removes_rewrites_and_resumes(tmp_path: Path) -> None:
    s0, s1 = gen_spans(range(30), seed=7), gen_spans(range(30), seed=8)
    s1["global_row"] += 8
    write(tmp_path, s0, rank=0, flush_every_step=10)  # shards 0-9, 10-19, 20-29
    write(tmp_path, s1, rank=1, flush_every_step=15)  # shards 0-14, 15-29
    before0, before1 = _shards(tmp_path, 0), _shards(tmp_path, 1)

    removed = truncate_ledger(tmp_path, from_step=15)
    assert removed == int((s0["step"] >= 15).sum() + (s1["step"] >= 15).sum())
    after0, after1 = _shards(tmp_path, 0), _shards(tmp_path, 1)
    # rank 0: 0-9 untouched, 10-19 rewritten and renamed to 10-14, 20-29 removed.
    assert sorted(after0) == ["part-000000000000-000000000009.parquet", "part-000000000010-000000000014.parquet"]
    assert after0["part-000000000000-000000000009.parquet"] == before0["part-000000000000-000000000009.parquet"]
    # rank 1: 0-14 untouched, 15-29 removed.
    assert after1 == {"part-000000000000-000000000014.parquet": before1["part-000000000000-000000000014.parquet"]}
    keep0, keep1 = take(s0, s0["step"] < 15), take(s1, s1["step"] < 15)
    assert Ledger.open(tmp_path).table.to_pydict() == expected_table([(0, keep0), (1, keep1)])
    assert truncate_ledger(tmp_path, from_step=15) == 0  # idempotent
    assert truncate_ledger(tmp_path, from_step=1000) == 0

    # Resume with a different world size: one rank re-trains steps 15..29.
    again = gen_spans(range(15, 30), seed=9)
    write(tmp_path, again, rank=0, flush_every_step=5)
    led = Ledger.open(tmp_path)
    assert led.table.to_pydict() == expected_table([(0, keep0), (1, keep1), (0, again)])
    led.check_integrity()
    assert truncate_ledger(tmp_path / "no-such-run", from_step=3) == 0


def test_truncate_at_zero_and_inside_single_step_shards(tmp_path: Path) -> None:
    spans = gen_spans(range(4), seed=10)
    write(tmp_path, spans, flush_every_step=1)
    assert truncate_ledger(tmp_path, from_step=2) == int((spans["step"] >= 2).sum())
    assert sorted(_shards(tmp_path, 0)) == [
        "part-000000000000-000000000000.parquet",
        "part-000000000001-000000000001.parquet",
    ]
    assert truncate_ledger(tmp_path, from_step=0) == int((spans["step"] < 2).sum())
    assert len(Ledger.open(tmp_path)) == 0


def test_tmp_leftovers_are_ignored_and_cleaned(tmp_path: Path) -> None:
    spans = gen_spans(range(5), seed=11)
    write(tmp_path, spans)
    for rank in (0, 7):
        d = tmp_path / "ledger" / f"rank-{rank:05d}"
        d.mkdir(exist_ok=True)
        (d / "part-000000000005-000000000009.parquet.tmp").write_bytes(b"PAR1 half a file")
    led = Ledger.open(tmp_path)  # must not try to read the .tmp files
    assert led.table.to_pydict() == expected_table([(0, spans)])
    # A writer clears its own rank's leftover; truncate clears everyone's.
    LedgerWriter(tmp_path, rank=0, experiment_names=NAMES, item_ids=ITEMS).close()
    assert not list((tmp_path / "ledger" / "rank-00000").glob("*.tmp"))
    assert list((tmp_path / "ledger" / "rank-00007").glob("*.tmp"))
    truncate_ledger(tmp_path, from_step=100)
    assert not list((tmp_path / "ledger").glob("rank-*/*.tmp"))


def test_open_errors_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no ledger directory") as info:
        Ledger.open(tmp_path / "missing")
    assert "missing" in str(info.value)
    write(tmp_path, gen_spans(range(2)))
    bad = tmp_path / "ledger" / "rank-00001" / "part-000000000000-000000000001.parquet"
    bad.parent.mkdir()
    bad.write_bytes(b"not parquet at all")
    with pytest.raises(InputError, match="unreadable ledger shard") as info:
        Ledger.open(tmp_path)
    assert info.value.file == str(bad)
    bad.unlink()
    assert len(Ledger.open(tmp_path / "ledger")) > 0  # the ledger dir itself is accepted too
    assert len(Ledger.open(tmp_path / "ledger" / "..")) > 0


def test_empty_ledger(tmp_path: Path) -> None:
    LedgerWriter(tmp_path, rank=0, experiment_names=NAMES, item_ids=ITEMS).close()
    led = Ledger.open(tmp_path)
    assert len(led) == 0 and led.summary() == [] and len(led.query()) == 0 and led.ranks == [0]
    with pytest.raises(InputError, match="unknown experiment 'contam'; the ledger has none"):
        led.query(experiment="contam")
    assert led.table.schema.remove_metadata().equals(SCHEMA)
    led.check_integrity()


def test_integrity_catches_duplicates_and_overlaps(tmp_path: Path) -> None:
    base = dict(
        step=np.array([1, 1, 2]),
        global_row=np.array([0, 0, 0]),
        local_row=0,
        sample_id=-1,
        length=np.array([4, 4, 4]),
        experiment=0,
        item_index=0,
        sequence=0,
        repetition=0,
        token_hash=np.array([1, 2, 3], dtype=np.uint64),
        row_fingerprint=7,
    )
    ok = tmp_path / "ok"
    with LedgerWriter(ok, 0, NAMES, ITEMS) as w:
        w.append(offset=np.array([0, 4, 0]), **base)  # touching spans, a new step: fine
    Ledger.open(ok).check_integrity()

    dup = tmp_path / "dup"
    with LedgerWriter(dup, 0, NAMES, ITEMS) as w:
        w.append(offset=np.array([0, 8, 0]), **base)
    with LedgerWriter(dup, 1, NAMES, ITEMS) as w:  # another rank claims the same (step, row, offset)
        w.append(
            **{
                **base,
                "step": np.array([1]),
                "global_row": np.array([0]),
                "length": np.array([4]),
                "token_hash": np.array([9], dtype=np.uint64),
            },
            offset=np.array([8]),
        )
    with pytest.raises(LedgerIntegrityError, match=r"1 duplicate span\(s\).*step=1, global_row=0"):
        Ledger.open(dup).check_integrity()

    over = tmp_path / "over"
    with LedgerWriter(over, 0, NAMES, ITEMS) as w:
        w.append(offset=np.array([0, 3, 0]), **base)
    with pytest.raises(LedgerIntegrityError, match="1 overlapping"):
        Ledger.open(over).check_integrity()


KILL_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    from multirun.ledger import LedgerWriter

    K = 20_000  # spans per step; one flush per step
    w = LedgerWriter(sys.argv[1], rank=0, experiment_names=["a", "b"],
                     item_ids=[[f"a{i}" for i in range(100)], [f"b{i}" for i in range(50)]])
    r = np.arange(K, dtype=np.int64)
    for step in range(1_000_000):
        h = (np.uint64(step) * np.uint64(1_000_003) + r.astype(np.uint64)) * np.uint64(0x9E3779B97F4A7C15)
        w.append(step=step, global_row=r % 512, local_row=r % 512, sample_id=step * K + r,
                 offset=(r // 512) * 40, length=np.full(K, 32), experiment=r % 2,
                 item_index=(7 * r + step) % np.where(r % 2 == 0, 100, 50), sequence=r % 13,
                 repetition=np.full(K, step % 5), token_hash=h, row_fingerprint=h ^ np.uint64(1))
        w.flush()
        print(step, flush=True)  # printed only once the flush is durable
""")


@pytest.mark.parametrize("delay", [0.0, 0.004, 0.013, 0.071])
def test_sigkill_leaves_a_readable_consistent_ledger(tmp_path: Path, delay: float) -> None:
    script = tmp_path / "writer.py"
    script.write_text(KILL_SCRIPT)
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(script), str(run)], stdout=subprocess.PIPE, text=True)
    try:
        for _ in range(3):  # wait for three durable flushes, then kill at an arbitrary moment
            assert proc.stdout is not None and proc.stdout.readline() != ""
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    last_reported = int(out.split()[-1]) if out.split() else 2

    led = Ledger.open(run)
    t = led.table.to_pydict()
    K = 20_000
    steps = np.asarray(t["step"])
    n_steps = len(steps) // K
    # Every flushed step is there in full, nothing after; no partial shard.
    assert len(steps) == n_steps * K and n_steps >= last_reported + 1
    assert np.array_equal(np.bincount(steps), np.full(n_steps, K))
    assert len(list((run / "ledger" / "rank-00000").glob("*.parquet"))) == n_steps
    # Every row is consistent with what the writer computed for it.
    r = (np.asarray(t["sample_id"]) - steps * K).astype(np.int64)
    assert np.array_equal(np.sort(r.reshape(n_steps, K), axis=1), np.tile(np.arange(K), (n_steps, 1)))
    assert np.array_equal(t["global_row"], r % 512) and np.array_equal(t["offset"], (r // 512) * 40)
    assert np.array_equal(t["item_index"], (7 * r + steps) % np.where(r % 2 == 0, 100, 50))
    assert t["item"] == [("a" if ri % 2 == 0 else "b") + str(ii) for ri, ii in zip(r.tolist(), t["item_index"])]
    assert t["experiment"] == ["a" if ri % 2 == 0 else "b" for ri in r.tolist()]
    want_hash = (steps.astype(np.uint64) * np.uint64(1_000_003) + r.astype(np.uint64)) * np.uint64(0x9E3779B97F4A7C15)
    assert np.array_equal(np.asarray(t["token_hash"], dtype=np.uint64), want_hash)
    led.check_integrity()
    # Resuming after the crash: truncation and a new writer work on what was left.
    truncate_ledger(run, from_step=1)
    assert not list(run.glob("ledger/rank-*/*.tmp"))
    assert set(Ledger.open(run).table.column("step").to_pylist()) == {0}
