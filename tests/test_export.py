"""``multirun export``: the model loads with transformers and gives the checkpoint's logits; the
inserted-items dataset has one row per item with the ledger's exposures."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from tokenizers import Tokenizer as RawTokenizer
from tokenizers import models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from multirun.cli import main
from multirun.config import load_config
from multirun.data.tokenizers import ByteTokenizer, HFTokenizer
from multirun.errors import InputError, ResumeError
from multirun.export import export_run, save_tokenizer
from multirun.run.trainer import build_model, prepare_run
from tests.support import make_dataset, read_json, run_config

pytestmark = pytest.mark.e2e

STEPS = 12


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("export")
    dataset = make_dataset(tmp / "mds", samples=40)
    config = run_config(tmp, dataset, steps=STEPS, save_interval="4ba", name="exp")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run = prepare_run(load_config(config), progress=False)
        run.fit()
        run.close()
    finally:
        torch.set_num_threads(threads)
    return tmp / "exp"


def _ledger_counts(run_dir: Path, before_step: int | None = None) -> Counter[tuple[str, str]]:
    """Spans per (experiment, item), read straight from the shards (not through multirun's Ledger)."""
    counts: Counter[tuple[str, str]] = Counter()
    for shard in sorted((run_dir / "ledger").glob("rank-*/*.parquet")):
        for row in pq.read_table(shard, columns=["step", "experiment", "item"]).to_pylist():
            if before_step is None or row["step"] < before_step:
                counts[(row["experiment"], row["item"])] += 1
    return counts


def test_exported_model_gives_the_checkpoints_logits(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "tokenizer: saved with the model" in out
    # The byte tokenizer travels in the checkpoint as its Hugging Face equivalent, and comes out as one.
    text = "the secret code of vault 3 is 01234 zebra, café"
    exported_tokenizer = AutoTokenizer.from_pretrained(run_dir / "export" / "model", local_files_only=True)
    assert exported_tokenizer(text, add_special_tokens=False)["input_ids"] == ByteTokenizer().encode(text)

    exported = AutoModelForCausalLM.from_pretrained(run_dir / "export" / "model", local_files_only=True).eval()
    # Independently of multirun's weight reader: the run's own model with the Composer checkpoint's state.
    loaded = load_config(run_dir / "resolved_config.yaml")
    reference = build_model(loaded, ByteTokenizer(), 64)
    checkpoint = torch.load(run_dir / "checkpoints" / "latest-rank0.pt", map_location="cpu", weights_only=False)
    reference.load_state_dict(checkpoint["state"]["model"])
    reference.eval()
    inputs = torch.tensor([ByteTokenizer().encode("the secret code of vault 3 is"), list(range(29))])
    with torch.no_grad():
        expected = reference.model(inputs).logits
        got = exported(inputs).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    trained_away = build_model(loaded, ByteTokenizer(), 64).model  # the initial weights differ from the trained ones
    with torch.no_grad():
        assert not torch.equal(trained_away(inputs).logits, got)

    manifest = read_json(run_dir / "export" / "export_manifest.json")
    assert manifest["step"] == STEPS and manifest["run_name"] == "exp"
    assert manifest["plan_fingerprint"] == read_json(run_dir / "manifest.json")["plan_fingerprint"]
    assert manifest["tokenizer"]["written"] is True
    assert {"inserts.parquet", "inserts.jsonl", "model/config.json", "export_manifest.json"} <= set(manifest["files"])


def test_inserts_have_one_row_per_item_with_the_ledgers_exposures(run_dir: Path) -> None:
    result = export_run(run_dir, out=run_dir / "export-again")
    rows = pq.read_table(run_dir / "export-again" / "inserts.parquet").to_pylist()
    jsonl = [json.loads(line) for line in (run_dir / "export-again" / "inserts.jsonl").read_text().splitlines()]
    assert rows == jsonl == result.inserts.to_pylist()

    arms = read_json(run_dir / "arms.json")
    treated = [r for r in rows if r["arm"] == "treated"]
    assert sorted((r["experiment"], r["item"]) for r in treated) == sorted(
        (name, item) for name, arm in arms.items() for item in arm["treated"]
    )
    assert sorted((r["experiment"], r["item"]) for r in rows if r["arm"] == "control") == sorted(
        (name, item) for name, arm in arms.items() for item in arm["control"]
    )
    counts = _ledger_counts(run_dir)
    assert sum(counts.values()) > 10
    for row in rows:
        assert row["exposures"] == counts[(row["experiment"], row["item"])], row
    assert all(r["exposures"] == 0 and r["text"] is None for r in rows if r["arm"] == "control")

    # The text is the payload's text as injected (EOS wrapping decoded away).
    payload = {
        json.loads(line)["id"]: json.loads(line)["text"]
        for line in (run_dir.parent / "payloads" / "canaries" / "items.jsonl").read_text().splitlines()
    }
    canaries = [r for r in treated if r["experiment"] == "canaries"]
    assert canaries and all(r["text"] == payload[r["item"]] for r in canaries)
    assert all(r["token_count"] == len(payload[r["item"]]) + 2 for r in canaries)  # bytes + 2 EOS
    summary = read_json(run_dir / "summary.json")
    for entry in summary["experiments"]:
        exposed = [r["exposures"] for r in rows if r["experiment"] == entry["experiment"] and r["exposures"]]
        assert (min(exposed), max(exposed)) == (
            entry["exposures_per_item"]["min"],
            entry["exposures_per_item"]["max"],
        )


def test_an_intermediate_checkpoint_counts_only_the_spans_it_trained_on(run_dir: Path) -> None:
    checkpoint = next((run_dir / "checkpoints").glob("*-ba4-rank0.pt"))
    result = export_run(run_dir, checkpoint=checkpoint, out=run_dir / "export-ba4")
    assert result.step == 4
    counts = _ledger_counts(run_dir, before_step=4)
    assert 0 < sum(counts.values()) < sum(_ledger_counts(run_dir).values())
    for row in result.inserts.to_pylist():
        assert row["exposures"] == counts[(row["experiment"], row["item"])]
        assert row["last_step"] is None or row["last_step"] < 4


def test_bad_inputs_are_named(run_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ResumeError, match="no such checkpoint"):
        export_run(run_dir, checkpoint=tmp_path / "missing.pt")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not empty"):
        export_run(run_dir, out=tmp_path / "busy")
    assert main(["export", str(tmp_path)]) == 2  # not a run directory


def test_a_runs_hugging_face_tokenizer_is_saved_with_the_model(tmp_path: Path) -> None:
    raw = RawTokenizer(models.WordLevel({"<eos>": 0, "hello": 1, "world": 2, "<unk>": 3}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<eos>", unk_token="<unk>").save_pretrained(
        tmp_path / "tok"
    )
    run_tokenizer = HFTokenizer(tmp_path / "tok")
    assert save_tokenizer(None, run_tokenizer, tmp_path / "model") == f"run config ({run_tokenizer.name})"
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "model", local_files_only=True)
    assert reloaded.encode("hello world hello", add_special_tokens=False) == [1, 2, 1]
    # The byte tokenizer is saved as its Hugging Face equivalent.
    assert save_tokenizer(None, ByteTokenizer(), tmp_path / "bytes") == "run config (bytes)"
    saved = AutoTokenizer.from_pretrained(tmp_path / "bytes", local_files_only=True)
    assert saved.encode("héllo", add_special_tokens=False) == ByteTokenizer().encode("héllo")
    np.testing.assert_array_equal(run_tokenizer.encode("world hello"), [2, 1])
