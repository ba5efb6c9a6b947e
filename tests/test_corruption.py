"""Detected corruption (issue 16, item 3): a changed byte in any ledger shard or JSON-lines
record is an error naming the file (and line), never a wrong value; a torn last line of an
interrupted run is dropped with a warning that names it, and the report says so.

The run directory is built directly (a real ledger from LedgerWriter, real metrics
records), so the whole file runs in seconds.
"""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from multirun.cli import main
from multirun.errors import CorruptionError, InputError
from multirun.ledger import Ledger, UncheckedShardWarning, truncate_ledger, verify_ledger, verify_shard
from multirun.measure.records import EffectRecord, ItemScore, RunMetricRecord
from multirun.measure.stats import compare_means, holm_adjust
from multirun.report.rundata import load_run
from multirun.run_dir import (
    CHECKSUM_FIELD,
    TornLineWarning,
    append_jsonl,
    jsonl_line,
    read_jsonl,
    read_jsonl_lines,
    truncate_jsonl,
    write_json_atomic,
)
from tests.test_ledger import ITEMS, NAMES, gen_spans, write

STEPS = 12


def _effect(step: int) -> EffectRecord:
    result = compare_means(
        np.array([1.0, 2.0, 3.0]), np.array([0.0, 0.5, 1.0]), metric="text_logprob", n_resamples=200, seed=0
    )
    return EffectRecord(
        step=step,
        when="interval",
        experiment="facts",
        monitor="knowledge",
        group=None,
        primary=True,
        effect=holm_adjust([result])[0],
        items=ItemScore.of(["f1", "c0"], np.array([True, False]), np.array([-1.5, -3.0])),
    )


def _make_run(root: Path) -> Path:
    """A run directory of two ranks, three shards each, and its three JSON-lines logs."""
    write(root, gen_spans(range(STEPS), seed=1), rank=0, flush_every_step=4)
    spans = gen_spans(range(STEPS), seed=2)
    spans["global_row"] += 8
    write(root, spans, rank=1, flush_every_step=4)
    write_json_atomic(
        root / "manifest.json",
        {
            "geometry": {"global_batch_size": 16, "sequence_length": 64, "num_steps": STEPS},
            "experiments": [{"name": n, "kind": "canary"} for n in NAMES],
        },
    )
    write_json_atomic(root / "arms.json", {n: {"treated": ids, "control": []} for n, ids in zip(NAMES, ITEMS)})
    for step in (4, 8, 12):
        append_jsonl(
            root / "metrics.jsonl",
            [_effect(step).to_json(), RunMetricRecord(step, "interval", "heldout_loss", 3.5 - step / 10).to_json()],
        )
    append_jsonl(root / "training.jsonl", [{"step": s, "loss": 4.0 - s / 10} for s in range(1, STEPS + 1)])
    return root


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _make_run(tmp_path_factory.mktemp("pristine") / "run")


@pytest.fixture
def run(pristine: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(pristine, tmp_path / "run"))


def _shards(run: Path) -> list[Path]:
    return sorted((run / "ledger").glob("rank-*/*.parquet"))


def _positions(path: Path) -> list[int]:
    """Byte positions spread over the whole file: the magic, data pages, the footer and its tail."""
    size = path.stat().st_size
    footer = size - 8 - int.from_bytes(path.read_bytes()[-8:-4], "little")
    pages = np.linspace(4, footer - 1, 9).astype(int).tolist()
    in_footer = np.linspace(footer, size - 9, 7).astype(int).tolist()
    return sorted({0, 3, *pages, *in_footer, size - 8, size - 5, size - 1})


def _flip(path: Path, pos: int, mask: int = 0x5A) -> bytes:
    data = path.read_bytes()
    changed = bytearray(data)
    changed[pos] ^= mask
    path.write_bytes(bytes(changed))
    return data


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(argv)
    out = capsys.readouterr()
    return code, (out.out + out.err).replace("\n", "")


# --------------------------------------------------------------------------- ledger shards


def test_a_clean_run_reads_without_warnings(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        led = Ledger.open(run)
        led.check_integrity()
        assert len(_shards(run)) == 6 and verify_ledger(run) == _shards(run) == led.shards
        assert _cli(["ledger", str(run)], capsys)[0] == 0
        assert _cli(["report", str(run)], capsys)[0] == 0
    meta = pq.read_metadata(_shards(run)[0]).metadata
    assert re.fullmatch(rb"[0-9a-f]{16}", meta[b"multirun.ledger.xxh64"])


def test_every_byte_of_a_shard_is_covered(tmp_path: Path) -> None:
    write(tmp_path, gen_spans(range(2), seed=3))
    (shard,) = _shards(tmp_path)
    original = shard.read_bytes()
    undetected = []
    with open(shard, "r+b", buffering=0) as f:  # changed in place: rewriting the file each time is slow
        for pos in range(len(original)):
            f.seek(pos)
            f.write(bytes([original[pos] ^ (1 << (pos % 8))]))  # every byte, each bit position in turn
            try:
                verify_shard(shard)  # the check every reader makes of a shard before using it
                undetected.append(pos)
            except CorruptionError as exc:
                assert exc.file == str(shard)
            f.seek(pos)
            f.write(original[pos : pos + 1])
    assert shard.read_bytes() == original
    assert undetected == [], f"flipped bits at {undetected[:10]} went unnoticed"
    verify_shard(shard)
    assert len(Ledger.open(tmp_path)) > 0


def test_a_flipped_byte_in_any_shard_fails_every_reader(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    clean = Ledger.open(run)
    expected_rows = len(clean)
    for shard in _shards(run):
        for i, pos in enumerate(_positions(shard)):
            original = _flip(shard, pos)
            with pytest.raises(CorruptionError) as err:
                Ledger.open(run)
            assert err.value.file == str(shard), pos
            with pytest.raises(CorruptionError, match=re.escape(shard.name)):
                clean.check_integrity()  # re-verifies the files the rows came from
            with pytest.raises(CorruptionError, match=re.escape(shard.name)):
                verify_ledger(run)
            before = {p: p.read_bytes() for p in _shards(run)}
            with pytest.raises(CorruptionError, match=re.escape(shard.name)):
                truncate_ledger(run, from_step=0)  # neither deletes nor launders it under a fresh checksum
            assert {p: p.read_bytes() for p in _shards(run)} == before
            if i % 4 == 0:  # the commands, at a few positions per shard (magic, pages, footer)
                for command in ("ledger", "report"):
                    code, out = _cli([command, str(run)], capsys)
                    assert code == 2 and str(shard) in out and "ledger shard" in out, (command, pos, out)
            shard.write_bytes(original)
    assert len(Ledger.open(run)) == expected_rows


def test_truncate_rewrites_shards_with_a_valid_checksum(run: Path) -> None:
    rows = len(Ledger.open(run))
    removed = truncate_ledger(run, from_step=6)  # one straddling shard per rank, rewritten
    led = Ledger.open(run)
    assert removed > 0 and len(led) == rows - removed and int(led.table.column("step").to_numpy().max()) < 6
    led.check_integrity()


def test_old_shards_without_checksum_are_read_with_a_warning_and_new_ones_must_have_one(run: Path) -> None:
    shard = _shards(run)[0]
    table = pq.read_table(shard)
    meta = dict(table.schema.metadata)
    # Format version 2 (before checksums), as an earlier multirun wrote it.
    pq.write_table(table.replace_schema_metadata(meta | {b"multirun.ledger.format_version": b"2"}), shard)
    with pytest.warns(UncheckedShardWarning, match=re.escape(str(shard)) + ".*version 2.*unverified"):
        assert len(Ledger.open(run)) > 0
    # Version 3 without its checksum: it was removed, not never written.
    pq.write_table(table, shard)
    with pytest.raises(CorruptionError, match="holds none") as err:
        Ledger.open(run)
    assert err.value.file == str(shard)


def test_a_file_that_is_not_parquet_is_named(run: Path) -> None:
    shard = _shards(run)[-1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # e.g. a copy cut short
    with pytest.raises(CorruptionError, match="unreadable ledger shard") as err:
        Ledger.open(run)
    assert err.value.file == str(shard)
    assert isinstance(err.value, InputError)  # exit code 2 in the CLI


# --------------------------------------------------------------------------- JSON-lines logs


def test_records_carry_a_checksum_that_readers_remove(run: Path) -> None:
    lines = (run / "training.jsonl").read_text().splitlines()
    assert all(json.loads(line)[CHECKSUM_FIELD] for line in lines)
    assert read_jsonl(run / "training.jsonl")[0] == {"step": 1, "loss": 3.9}
    with pytest.raises(ValueError, match="checksum field"):
        jsonl_line({"step": 1, CHECKSUM_FIELD: "0" * 16})
    truncate_jsonl(run / "training.jsonl", lambda r: r["step"] <= 5)  # rewritten, checksummed
    assert [r["step"] for r in read_jsonl(run / "training.jsonl")] == [1, 2, 3, 4, 5]
    assert all(CHECKSUM_FIELD in json.loads(line) for line in (run / "training.jsonl").read_text().splitlines())


def test_a_changed_character_anywhere_in_a_record_is_named(run: Path) -> None:
    path = run / "training.jsonl"
    text = path.read_text()
    lines = text.splitlines(keepends=True)
    for number in (1, 6, len(lines)):  # the first, a middle and the last (complete) line
        line = lines[number - 1]
        for pos in range(len(line) - 1):  # every character but the newline
            changed = line[:pos] + chr(ord(line[pos]) ^ 0x01) + line[pos + 1 :]
            path.write_text("".join([*lines[: number - 1], changed, *lines[number:]]))
            with pytest.raises(CorruptionError) as err:
                read_jsonl(path)
            assert (err.value.file, err.value.line) == (str(path), number), (number, pos, changed)
    path.write_text(text)


def test_a_flipped_digit_in_metrics_fails_the_report(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = run / "metrics.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    # A valid JSON line whose value changed: only its checksum tells.
    changed = lines[3].replace('"value": 2.7', '"value": 2.1', 1)  # the held-out loss at step 8
    assert changed != lines[3] and json.loads(changed)
    lines[3] = changed
    path.write_text("".join(lines))
    code, out = _cli(["report", str(run)], capsys)
    assert code == 2 and f"{path}:4" in out and "does not match its checksum" in out
    # A line that is no JSON at all, in the middle: damage, not a torn write.
    lines[3] = "{garbage\n"
    path.write_text("".join(lines))
    code, out = _cli(["report", str(run)], capsys)
    assert code == 2 and f"{path}:4" in out and "not a torn last line" in out


def test_a_torn_last_line_is_dropped_named_and_reported(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = run / "metrics.jsonl"
    complete = len(read_jsonl(path))
    line = jsonl_line(_effect(16).to_json())
    with open(path, "a") as f:
        f.write(line[: len(line) // 2])  # a kill mid-append: no newline after it
    torn_line = complete + 1
    with pytest.warns(TornLineWarning, match=re.escape(f"{path}:{torn_line}: torn last line")):
        content = read_jsonl_lines(path)
    assert content.torn_line == torn_line and len(content.lines) == complete
    with pytest.warns(TornLineWarning):
        assert load_run(run).dropped["metrics.jsonl"].startswith(f"{path}:{torn_line}")
    with pytest.warns(TornLineWarning):
        code, _ = _cli(["report", str(run)], capsys)
    assert code == 0
    report = (run / "report" / "report.md").read_text()
    assert report.count(f"metrics.jsonl:{torn_line}: torn last line dropped") == 2  # overview and effect table
    # The next append cuts the torn tail off first, so it never becomes a damaged middle line.
    with pytest.warns(TornLineWarning, match="dropped a torn last line"):
        append_jsonl(path, [_effect(16).to_json()])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert [r["step"] for r in read_jsonl(path)][-1] == 16 and len(read_jsonl(path)) == complete + 1


def test_a_damaged_last_line_that_ends_in_a_newline_is_not_torn(run: Path) -> None:
    path = run / "training.jsonl"
    path.write_text(path.read_text() + '{"step": 13, "lo\n')  # a kill never leaves the newline
    with pytest.raises(CorruptionError) as err:
        read_jsonl(path)
    assert err.value.line == STEPS + 1


def test_logs_of_older_runs_without_checksums_are_read(tmp_path: Path) -> None:
    path = tmp_path / "controller.jsonl"
    path.write_text("".join(json.dumps({"step": s, "experiment": "facts"}) + "\n" for s in (0, 4)))
    assert [r["step"] for r in read_jsonl(path)] == [0, 4]  # unverified, as they were written
    truncate_jsonl(path, lambda r: True)  # what a resume does: the log is rewritten, checksummed
    assert all(CHECKSUM_FIELD in json.loads(line) for line in path.read_text().splitlines())
    with open(path, "a") as f:  # a record without one among records with one
        f.write(json.dumps({"step": 8, "experiment": "facts"}) + "\n")
    with pytest.raises(CorruptionError, match="no checksum") as err:
        read_jsonl(path)
    assert err.value.line == 3
