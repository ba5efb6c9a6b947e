"""The removal kind with the real Composer trainer on a real Streaming dataset (issue 18, item 2).

Known sentences are planted in the MDS training data. A ``removal`` experiment removes
half of them (the treated items) and keeps the others (controls); a documents
experiment injects texts that contain a removed sentence. A capture callback after
multirun's records what the model trained on: no removed n-gram is in it, the controls
are, every removal is a row of the removals ledger that reconstructs the batch, and
two runs give the same ledgers.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from multirun.config import load_config
from multirun.data.mds import build_dataloader, prepare_dataset
from multirun.data.tokenizers import ByteTokenizer
from multirun.inject.removal import tiled
from multirun.ledger import Ledger, token_hash
from multirun.run.trainer import TrainingRun, prepare_run
from multirun.run_dir import read_jsonl
from tests.helpers_payload import write_payload
from tests.support import REPO, CaptureBatches, as_numpy, placements, run_cli_ranks, run_config

pytestmark = pytest.mark.e2e

N = 16
STEPS = 24
SENTENCES = [
    "amber herons sleep under 4093 kelp",
    "violet otters count 7717 pebbles",
    "silent comets fold 2281 paper maps",
    "rusty lanterns hum 6043 old songs",
    "frozen tulips guard 5519 iron keys",
    "crimson moths weave 3307 wool nets",
]


def _plant(directory: Path) -> None:
    """60 small documents of filler with the sentences planted, each many times."""
    directory.mkdir(parents=True)
    words = [
        "the",
        "a",
        "of",
        "to",
        "in",
        "and",
        "is",
        "for",
        "on",
        "with",
        "as",
        "by",
        "at",
        "from",
        "this",
        "that",
        "it",
        "be",
        "or",
    ]
    rng = np.random.default_rng(0)
    for d in range(60):
        filler = [" ".join(rng.choice(words, size=12)) for _ in range(4)]
        text = f"{filler[0]}. {SENTENCES[d % 6]}. {filler[1]}. {SENTENCES[(d + 3) % 6]}. {filler[2]}.\n"
        (directory / f"doc{d:03d}.txt").write_text(text)


def _ngrams(tokens: list[int]) -> set[tuple[int, ...]]:
    return {tuple(tokens[i : i + N]) for i in range(len(tokens) - N + 1)}


def _windows(row: np.ndarray) -> set[tuple[int, ...]]:
    return {tuple(row[i : i + N].tolist()) for i in range(len(row) - N + 1)}


def _config(tmp: Path, name: str, save_interval: str | None = None) -> Path:
    if not (tmp / "mds").exists():
        _plant(tmp / "text")
        prepare_dataset([tmp / "text"], tmp / "mds", ByteTokenizer(), 64, progress=False)
    removal = write_payload(
        tmp / "removal",
        [{"id": f"s{i}", "text": s} for i, s in enumerate(SENTENCES)],
        name="removal",
        kind="removal",
    )
    # Inserts of another experiment holding every sentence: the removed ones must go too.
    inserts = write_payload(
        tmp / "inserts", [{"id": f"d{i}", "text": f"note: {s} end"} for i, s in enumerate(SENTENCES)], name="inserts"
    )
    dataset: Any = type("D", (), {"path": tmp / "mds", "sequence_length": 64})
    experiments = [
        {
            "name": "forget",
            "payload": str(removal),
            "control_fraction": 0.5,
            "options": {"ngram": N, "replacement": {"text": "~"}},
            "monitor": {"options": {"k": 8}},
        },
        {
            "name": "inserts",
            "payload": str(inserts),
            "repetitions": 3,
            "control_fraction": 0.0,
            "monitor": {"enabled": False},
        },
    ]
    return run_config(tmp, dataset, steps=STEPS, save_interval=save_interval, experiments=experiments, name=name)


def _train(config: Path) -> tuple[TrainingRun, CaptureBatches]:
    capture = CaptureBatches()
    run = prepare_run(load_config(config), extra_callbacks=[capture], progress=False)
    run.fit()
    run.close()
    return run, capture


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[TrainingRun, CaptureBatches]]:
    """An uninterrupted run, and a second one that dies at step 19 and is resumed from step 16."""
    tmp = tmp_path_factory.mktemp("removal")
    first = _train(_config(tmp, "first"))
    config = _config(tmp, "second", save_interval="8ba")
    died = subprocess.run(
        [sys.executable, str(REPO / "tests" / "scripts" / "train_until_failure.py"), str(config), "19", "raise"],
        cwd=tmp,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert died.returncode != 0 and "planned failure" in died.stderr, died.stderr[-2000:]
    assert max(Ledger.open_removals(tmp / "second").table.column("step").to_pylist()) >= 16  # cut back on resume
    return [first, _train(config)]


def _forget(run: TrainingRun) -> Any:
    return next(e for e in run.plan.experiments if e.name == "forget")


def test_the_model_never_trains_on_a_removed_ngram(runs: list[tuple[TrainingRun, CaptureBatches]]) -> None:
    run, capture = runs[0]
    forget = _forget(run)
    removed = set().union(*(_ngrams(forget.sequence_tokens(s).tolist()) for s in range(len(forget.seq_lengths))))
    assert len(removed) > 0 and len(capture.batches) == STEPS
    for batch in capture.batches.values():
        for name in ("input_ids", "labels"):
            for row in as_numpy(batch[name]):
                assert not (_windows(row) & removed)
    for microbatches in capture.microbatches.values():  # and what reached the forward pass
        for mb in microbatches:
            for row in as_numpy(mb):
                assert not (_windows(row) & removed)


def test_controls_stay_in_the_stream(runs: list[tuple[TrainingRun, CaptureBatches]]) -> None:
    run, capture = runs[0]
    forget = _forget(run)
    tok = ByteTokenizer()
    seen = set().union(*(_windows(row) for b in capture.batches.values() for row in as_numpy(b["input_ids"])))
    controls = [i for i, t in enumerate(forget.treated) if not t]
    assert len(controls) == 3
    for i in controls:
        assert _ngrams(tok.encode(SENTENCES[i])) <= seen  # every n-gram of every control was trained on


def test_every_removal_is_in_the_ledger_and_reconstructs_the_batch(
    runs: list[tuple[TrainingRun, CaptureBatches]],
) -> None:
    run, capture = runs[0]
    forget = _forget(run)
    removals = Ledger.open_removals(run.run_dir)
    injections = Ledger.open(run.run_dir)
    injections.check_integrity()
    assert Ledger.open_removals(run.run_dir).experiments == run.plan.experiment_names
    rows = removals.table.to_pylist()
    assert len(rows) >= STEPS  # the planted sentences are everywhere
    source = build_dataloader(run.dataset.path, batch_size=1, shuffle=False).dataset
    replacement = np.array(ByteTokenizer().encode("~"))
    expected = {step: as_numpy(b["input_ids"]).copy() for step, b in capture.batches.items()}
    for step, batch in capture.batches.items():  # the original rows, the inserts written over them
        for local, sample in enumerate(as_numpy(batch["sample_id"]).tolist()):
            expected[step][local] = np.asarray(source[sample]["input_ids"])
    for span in injections.table.to_pylist():
        experiment = next(e for e in run.plan.experiments if e.name == span["experiment"])
        o = span["offset"]
        expected[span["step"]][span["local_row"], o : o + span["length"]] = experiment.sequence_tokens(span["sequence"])
    removed = {step: np.zeros(b.shape, dtype=bool) for step, b in expected.items()}
    for row in rows:
        step, local, o, m = row["step"], row["local_row"], row["offset"], row["length"]
        batch = capture.batches[step]
        assert row["experiment"] == "forget" and row["arm"] == "treated"
        assert int(as_numpy(batch["sample_id"])[local]) == row["sample_id"]
        original = np.asarray(source[row["sample_id"]]["input_ids"])
        assert token_hash(original) == row["row_fingerprint"]
        # What was matched: the sequence's n-gram at ``repetition``, there before the removal.
        matched = forget.sequence_tokens(row["sequence"])[row["repetition"] : row["repetition"] + N]
        assert np.array_equal(expected[step][local, o : o + N], matched)
        assert forget.item_ids[int(forget.seq_items[row["sequence"]])] == row["item"]
        # What replaced it.
        trained = as_numpy(batch["input_ids"])[local, o : o + m]
        assert np.array_equal(trained, tiled(replacement, m)) and token_hash(trained) == row["token_hash"]
        expected[step][local, o : o + m] = trained
        removed[step][local, o : o + m] = True
    for step, batch in capture.batches.items():  # nothing else changed
        assert np.array_equal(as_numpy(batch["input_ids"]), expected[step])
    summary = run.run_dir / "summary.json"
    assert '"removals"' in summary.read_text()


def test_inserts_holding_a_removed_sentence_are_removed_too(runs: list[tuple[TrainingRun, CaptureBatches]]) -> None:
    run, _ = runs[0]
    forget = _forget(run)
    injected = Ledger.open(run.run_dir).table.to_pylist()
    removed = {
        (r["step"], r["global_row"], r["offset"], r["length"])
        for r in Ledger.open_removals(run.run_dir).table.to_pylist()
    }
    treated_inserts = [r for r in injected if forget.treated[int(r["item"][1:])]]
    assert treated_inserts
    for span in treated_inserts:
        # The sentence sits 6 tokens into the insert ("[eos]note: "): a removal covers it.
        start = span["offset"] + 7
        assert any(
            s == span["step"] and g == span["global_row"] and o <= start and start + N <= o + m
            for s, g, o, m in removed
        )


def test_removals_are_deterministic_and_resume_exactly(runs: list[tuple[TrainingRun, CaptureBatches]]) -> None:
    # The second run was killed by an exception at step 19 and resumed from its step-16 checkpoint.
    (first, _), (second, _) = runs
    for read in (Ledger.open_removals, Ledger.open):
        a, b = (placements(read(r.run_dir).table) for r in (first, second))
        assert len(a) > 0 and a == b


def test_the_monitor_scores_removed_texts_against_controls(runs: list[tuple[TrainingRun, CaptureBatches]]) -> None:
    run, _ = runs[0]
    records = [r for r in read_jsonl(run.run_dir / "metrics.jsonl") if r.get("experiment") == "forget"]
    final = {r["metric"]: r for r in records if r.get("when") == "fit_end"}
    assert set(final) >= {"continuation_logprob", "exact_continuation"}
    items = final["continuation_logprob"]["items"]
    assert len(items) == len(SENTENCES)


def test_inspect_shows_the_rows_as_trained(runs: list[tuple[TrainingRun, CaptureBatches]]) -> None:
    from multirun.batch_view import view_step
    from multirun.export import open_run

    run, capture = runs[0]
    contents = open_run(run.run_dir)
    removals = Ledger.open_removals(run.run_dir).table.to_pylist()
    steps = sorted({r["step"] for r in removals})[:3]
    for step in steps:
        view = view_step(run.run_dir, step, contents=contents)
        batch = as_numpy(capture.batches[step]["input_ids"])
        for r in (r for r in removals if r["step"] == step):
            row = view.rows[r["global_row"]]
            assert np.array_equal(row.trained, batch[r["local_row"]])
            marked = [s for s in row.spans if s.experiment == "forget"]
            assert (r["offset"], r["length"]) in {(s.offset, s.length) for s in marked}


def test_the_inserts_count_each_items_removals(runs: list[tuple[TrainingRun, CaptureBatches]]) -> None:
    from multirun.export import inserts_table, open_run

    run, _ = runs[0]
    removals = Ledger.open_removals(run.run_dir).table.to_pylist()
    assert removals
    rows = inserts_table(open_run(run.run_dir)).to_pylist()
    forget = [r for r in rows if r["experiment"] == "forget"]
    for row in forget:
        mine = [r for r in removals if r["item"] == row["item"]]
        assert row["exposures"] == 0 and row["removals"] == len(mine)
        assert row["tokens_removed"] == sum(r["length"] for r in mine)
    assert sum(r["removals"] for r in forget) == len(removals)
    assert all(r["removals"] == 0 == r["tokens_removed"] for r in rows if r["experiment"] != "forget")
    # A checkpoint's export counts only the steps its weights were trained on.
    cut = sorted(r["step"] for r in removals)[len(removals) // 2]
    early = inserts_table(open_run(run.run_dir), before_step=cut).to_pylist()
    assert sum(r["removals"] for r in early) == sum(1 for r in removals if r["step"] < cut)


def test_ledger_command_reads_the_removals(
    runs: list[tuple[TrainingRun, CaptureBatches]], capsys: pytest.CaptureFixture[str]
) -> None:
    from multirun.cli import main

    run, _ = runs[0]
    spans = len(Ledger.open_removals(run.run_dir))
    assert main(["ledger", str(run.run_dir), "--removals"]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if "forget" in line)
    assert "removals ledger" in out and str(spans) in line.split()
    assert main(["report", str(run.run_dir)]) == 0
    report = (run.run_dir / "report" / "report.md").read_text()
    assert "| experiment | removed spans |" in report and f"| forget | {spans} |" in report


def test_the_report_of_an_interrupted_run_reads_the_removals_ledger(
    runs: list[tuple[TrainingRun, CaptureBatches]], tmp_path: Path
) -> None:
    from multirun.cli import main

    run, _ = runs[0]
    spans = len(Ledger.open_removals(run.run_dir).table)
    copy = tmp_path / "interrupted"
    shutil.copytree(run.run_dir, copy, ignore=shutil.ignore_patterns("report", "checkpoints"))
    (copy / "summary.json").unlink()  # killed before FIT_END: no summary
    assert main(["report", str(copy)]) == 0
    report = (copy / "report" / "report.md").read_text()
    assert f"| forget | {spans} |" in report


def test_two_ranks_remove_what_one_rank_removes(runs: list[tuple[TrainingRun, CaptureBatches]]) -> None:
    # Invariant 3 for removals: each rank scans its own rows, and the removals ledger (global
    # rows, sample ids, offsets, hashes) equals the single process's.
    first, _ = runs[0]
    tmp = first.run_dir.parent
    config = _config(tmp, "ranks")
    code, logs = run_cli_ranks(["train", str(config), "--no-progress"], cwd=tmp)
    assert code == 0, logs[-4000:]
    two = Ledger.open_removals(tmp / "ranks")
    two.check_integrity()
    assert set(two.table.column("rank").to_pylist()) == {0, 1}  # both ranks removed and wrote shards
    for read in (Ledger.open_removals, Ledger.open):
        assert placements(read(tmp / "ranks").table) == placements(read(first.run_dir).table)
