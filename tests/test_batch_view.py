"""``multirun inspect``: step T's rows read again in training order are the rows the model trained on,
the marked spans are the payload's tokens and everything else is the original data."""

from __future__ import annotations

import html
import json
import shutil
from dataclasses import replace
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from injectors.replay import ReplayInjector
from multirun.batch_view import BatchViewError, render_plain, view_step, write_html
from multirun.cli import main
from multirun.config import ExperimentConfig, load_config
from multirun.data.mds import build_dataloader, read_rows
from multirun.data.tokenizers import ByteTokenizer
from multirun.errors import InputError, PayloadError
from multirun.export import open_run
from multirun.kinds.experiments import run_sources
from multirun.kinds.payloads import load_package
from multirun.kinds.probes import DocumentsProbes
from multirun.kinds.sdk import PrepareContext
from multirun.ledger import Ledger, _write_shard_atomic
from multirun.run.trainer import TrainingRun, prepare_run
from multirun.types import Placement
from tests.helpers_payload import write_payload
from tests.support import CaptureBatches, as_numpy, make_dataset, run_config

pytestmark = pytest.mark.e2e

STEPS = 12  # 40 samples in batches of 8: 5 steps per epoch, so the run spans three epochs


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[TrainingRun, CaptureBatches]:
    tmp = tmp_path_factory.mktemp("inspect")
    dataset = make_dataset(tmp / "mds", samples=40)
    config = run_config(tmp, dataset, steps=STEPS, save_interval=None, name="insp")
    capture = CaptureBatches()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run = prepare_run(load_config(config), extra_callbacks=[capture], progress=False)
        run.fit()
        run.close()
    finally:
        torch.set_num_threads(threads)
    return run, capture


def test_every_step_is_the_batch_the_model_trained_on(trained: tuple[TrainingRun, CaptureBatches]) -> None:
    run, capture = trained
    ledger = Ledger.open(run.run_dir).table.to_pylist()
    contents = open_run(run.run_dir)
    epochs = set()
    for step in range(STEPS):
        view = view_step(run.run_dir, step, contents=contents)
        epochs.add(view.epoch)
        batch = as_numpy(capture.batches[step]["input_ids"])
        # The same rows (as a multiset) as the captured batch ...
        assert sorted(map(tuple, (r.trained for r in view.rows))) == sorted(map(tuple, batch))
        # ... and each span's row is the very row the ledger says the callback wrote it into.
        spans = [s for s in ledger if s["step"] == step]
        assert view.span_count == len(spans)
        for span in spans:
            np.testing.assert_array_equal(view.rows[span["global_row"]].trained, batch[span["local_row"]])
            assert view.rows[span["global_row"]].sample_id == span["sample_id"]
    assert epochs == {0, 1, 2}


def test_marked_spans_are_the_payload_and_the_rest_is_the_original_row(
    trained: tuple[TrainingRun, CaptureBatches],
) -> None:
    run, _ = trained
    tokenizer = ByteTokenizer()
    source = build_dataloader(run.dataset.path, batch_size=1, shuffle=False).dataset
    payload = {
        json.loads(line)["id"]: json.loads(line)["text"]
        for line in (run.run_dir.parent / "payloads" / "canaries" / "items.jsonl").read_text().splitlines()
    }
    steps = sorted(set(Ledger.open(run.run_dir).table.column("step").to_pylist()))
    step = steps[len(steps) // 2]
    view = view_step(run.run_dir, step)
    assert view.span_count > 0
    expected_lines = [view.header()]
    for row in view.rows:
        original = as_numpy(source.get_item(row.sample_id)["input_ids"])
        np.testing.assert_array_equal(row.original, original)
        parts, position = [], 0
        for span in row.spans:
            experiment = next(e for e in run.plan.experiments if e.name == span.experiment)
            item_tokens = experiment.sequence_tokens(span.sequence)
            assert experiment.item_ids[int(experiment.seq_items[span.sequence])] == span.item
            np.testing.assert_array_equal(row.trained[span.offset : span.end], item_tokens)
            np.testing.assert_array_equal(span.replaced, original[span.offset : span.end])
            if span.experiment == "canaries":
                assert tokenizer.decode(item_tokens.tolist()) == payload[span.item]
            parts.append(tokenizer.decode(original[position : span.offset].tolist()))
            parts.append(f"⟦{span.experiment}/{span.item}: {tokenizer.decode(item_tokens.tolist())}⟧")
            position = span.end
        parts.append(tokenizer.decode(original[position:].tolist()))
        # Outside the spans the trained row is the stored row, token for token.
        outside = np.ones(original.shape[0], dtype=bool)
        for span in row.spans:
            outside[span.offset : span.end] = False
        np.testing.assert_array_equal(row.trained[outside], original[outside])
        expected_lines += [
            f"── row {row.global_row} · sample {row.sample_id} · {len(row.spans)} span(s)",
            "".join(parts),
        ]
    assert render_plain(view) == "\n".join(expected_lines) + "\n"


def test_cli_prints_marked_rows_and_writes_html(
    trained: tuple[TrainingRun, CaptureBatches], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run, _ = trained
    first = Ledger.open(run.run_dir).table.slice(0, 1).to_pylist()[0]
    page = tmp_path / "step.html"
    row = str(first["global_row"])
    assert main(["inspect", str(run.run_dir), "--step", str(first["step"]), "--rows", row, "--html", str(page)]) == 0
    out = capsys.readouterr().out
    assert f"⟦{first['experiment']}/{first['item']}: " in out
    assert f"── row {row} ·" in out
    assert out.count("── row ") == 1  # --rows keeps only that row

    view = view_step(run.run_dir, first["step"])
    text = page.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>")
    marks = list(view.rows[first["global_row"]].spans)
    assert text.count("<mark ") == len(marks) > 0
    for span in marks:
        assert f"data-item='{html.escape(span.item, quote=True)}'" in text
        assert f"token hash: {span.token_hash:#018x}" in text
        assert html.escape(ByteTokenizer().decode(span.tokens.tolist())) in text

    assert main(["inspect", str(run.run_dir), "--step", str(STEPS)]) == 2
    assert "outside the run's steps" in capsys.readouterr().out
    assert main(["inspect", str(run.run_dir), "--step", "0", "--rows", "99"]) == 2


def test_a_changed_dataset_is_refused(trained: tuple[TrainingRun, CaptureBatches], tmp_path: Path) -> None:
    run, _ = trained
    copy = tmp_path / "copy"
    shutil.copytree(run.run_dir, copy, ignore=shutil.ignore_patterns("checkpoints", "report"))
    # As if the rows had been different: the ledger's fingerprint of one overwritten row no longer matches.
    shard = sorted((copy / "ledger").glob("rank-*/*.parquet"))[0]
    table = pq.read_table(shard)
    fingerprints = table.column("row_fingerprint").to_numpy().copy()
    fingerprints[0] ^= np.uint64(1)
    index = table.schema.get_field_index("row_fingerprint")
    # Written as the ledger writes shards (with a valid checksum): a consistent ledger about other rows.
    _write_shard_atomic(table.set_column(index, "row_fingerprint", pa.array(fingerprints, pa.uint64())), shard)
    step = int(table.column("step")[0].as_py())
    with pytest.raises(BatchViewError, match="changed since the run"):
        view_step(copy, step)

    (copy / "llmfoundry.yaml").write_text("max_seq_len: 64\n")
    with pytest.raises(InputError, match="llm-foundry"):
        view_step(copy, step)


class _PreText(HTMLParser):
    """The text of each <pre> of a page, without the span tags (``class='tag'``)."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[str] = []
        self._in_pre = False
        self._in_tag = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "pre":
            self._in_pre = True
            self.rows.append("")
        elif tag == "span" and ("class", "tag") in attrs:
            self._in_tag = True

    def handle_endtag(self, tag: str) -> None:
        if tag == "pre":
            self._in_pre = False
        elif tag == "span":
            self._in_tag = False

    def handle_data(self, data: str) -> None:
        if self._in_pre and not self._in_tag:
            self.rows[-1] += data


def test_html_rows_read_back_as_the_trained_text(trained: tuple[TrainingRun, CaptureBatches], tmp_path: Path) -> None:
    run, _ = trained
    view = view_step(run.run_dir, 0)
    page = write_html(view, tmp_path / "all.html")
    decoded = [ByteTokenizer().decode(r.trained.tolist()) for r in view.rows]
    assert any(c in "".join(decoded) for c in "<&'\"")  # Python source: something to escape
    parser = _PreText()
    parser.feed(page.read_text(encoding="utf-8"))
    # Decoding segment by segment may split a multi-byte character; the demo's rows are ASCII.
    assert parser.rows == decoded


def test_replay_steps_name_the_rows_trained_at_those_steps(
    trained: tuple[TrainingRun, CaptureBatches], tmp_path: Path
) -> None:
    """A replay item naming step t of the training order is a row the Trainer drew at step t."""
    run, capture = trained
    loaded = open_run(run.run_dir).loaded
    sources = run_sources(loaded, ByteTokenizer())
    assert sources.train_steps is not None
    by_step = sources.train_steps([0, 1, 3, 4])
    for step, ids in by_step.items():
        assert sorted(ids) == sorted(as_numpy(capture.batches[step]["sample_id"]).tolist()), step

    root = write_payload(tmp_path / "p", [{"source": "train", "steps": [3, 6]}], kind="replay")
    ctx = PrepareContext(
        payload=load_package(root),
        spec=ExperimentConfig(name="iid", payload=str(root)),
        tokenizer=ByteTokenizer(),
        sequence_length=run.dataset.sequence_length,
        seed=1,
        placement=Placement("uniform", 0, STEPS),
        sources=sources,
    )
    with pytest.raises(PayloadError, match="outside the first epoch") as err:  # 40 samples: 5 steps of 8
        ReplayInjector().prepare(ctx)
    assert (err.value.line, err.value.key) == (1, "steps")
    root = write_payload(
        tmp_path / "q", [{"source": "train", "step": 3}, {"source": "train", "steps": [0, 2]}], kind="replay"
    )
    exp = ReplayInjector().prepare(replace(ctx, payload=load_package(root)))
    rows = read_rows(run.dataset.path, 40)
    named = [(3, i) for i in by_step[3]] + [(s, i) for s in (0, 1) for i in sources.train_steps([s])[s]]
    assert exp.item_ids == [f"train:{i}" for _, i in named]
    assert [(w["step"], w["sample"]) for w in exp.metadata["items"]] == named
    assert isinstance(exp.probes, DocumentsProbes)
    for sequence, (_, i) in zip(exp.probes.sequences, named):
        assert sequence[1:-1] == rows[i][: run.dataset.sequence_length - 2].tolist()
