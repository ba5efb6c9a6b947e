"""The frictions of issue 15, item 7: each test fails without its fix.

Ledger queries that name what is unknown, tokenizer identity by fingerprint, the
report's and the CLI's one wording with the alpha they used, p-values in view, one axis
per controller field, a heatmap coloured by significance on one scale.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from multirun.cli import main
from multirun.cli_tables import print_effects, print_interaction
from multirun.errors import ConfigError as ConfigErrorType
from multirun.ledger import LedgerWriter
from multirun.report import plots
from multirun.report.document import Document, Section, Table, render_html
from multirun.report.rundata import Series
from multirun.report.sections import EFFECT_COLUMNS

# --------------------------------------------------------------------------- ledger queries


def _small_ledger(run_dir: Path) -> None:
    with LedgerWriter(run_dir, rank=0, experiment_names=["facts"], item_ids=[["f0", "f1"]]) as writer:
        writer.append(
            step=np.array([1, 2]),
            global_row=np.array([0, 1]),
            local_row=np.array([0, 1]),
            sample_id=-1,
            offset=np.array([0, 4]),
            length=np.array([3, 3]),
            experiment=np.array([0, 0]),
            item_index=np.array([0, 1]),
            sequence=np.array([0, 1]),
            repetition=np.array([0, 0]),
            token_hash=np.array([1, 2], dtype=np.uint64),
            row_fingerprint=np.array([3, 4], dtype=np.uint64),
        )


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--experiment", "fcats"], "unknown experiment 'fcats'; the ledger has 'facts'"),
        (["--item", "f9"], "unknown item 'f9'; the run has 'f0', 'f1'"),
        (["--rank", "3"], "unknown rank 3; the ledger has ranks 0"),
        (["--steps", "5:2"], "the step range [5, 2) is reversed"),
        (["--steps", "2:2", "--export", "x.csv"], "the step range [2, 2) is empty"),
    ],
)
def test_ledger_command_names_the_unknown_filter(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], message: str
) -> None:
    _small_ledger(tmp_path)
    assert main(["ledger", str(tmp_path), *flags]) == 2
    out = " ".join(capsys.readouterr().out.split())
    assert message in out, out
    assert not (tmp_path / "x.csv").exists()


# --------------------------------------------------------------------------- wording and alphas


def _effect(p_holm: float | None, p_value: float) -> dict:
    return {
        "experiment": "facts",
        "metric": "text_logprob",
        "group": None,
        "treated_mean": -1.0,
        "control_mean": -1.2,
        "effect": 0.2,
        "ci_low": 0.1,
        "ci_high": 0.3,
        "p_value": p_value,
        "p_holm": p_holm,
        "test": "permutation",
    }


def test_cli_effects_say_significant_or_not_and_the_alpha_with_its_key(capsys: pytest.CaptureFixture[str]) -> None:
    print_effects([_effect(0.5, 0.4), _effect(0.001, 0.001), _effect(None, 0.004)], alpha=0.01)
    out = " ".join(capsys.readouterr().out.split())
    assert "no effect" not in out  # a test that does not reject does not show absence
    assert "not significant" in out and "significant (uncorrected)" in out
    assert "alpha 0.01 from monitoring.alpha" in out


def test_cli_interaction_names_its_alpha_and_the_same_wording(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from multirun.interaction.arms import InteractionResult

    cell = {"arm": "all", "experiment": "facts", "metric": "m", "family": "off_diagonal", "diagonal": False}
    matrix = {
        "alpha": 0.05,
        "steps": 4,
        "verdict": "no interaction detected",
        "cells": [
            {**cell, "significant": False, "effect": 0.1, "p_value": 0.3, "p_holm": 0.6},
            {**cell, "arm": "alone:facts", "significant": True, "effect": 0.1, "p_value": 0.001, "p_holm": 0.002},
        ],
    }
    result = InteractionResult(
        out_dir=tmp_path, checkpoint=tmp_path / "c.pt", start_step=8, arms={"all": ("facts",)}, matrix=matrix, seconds=1
    )
    print_interaction(result)
    out = " ".join(capsys.readouterr().out.split())
    assert "alpha 0.05 from interaction.alpha" in out
    assert "not significant" in out and "significant (interaction)" in out
    assert " - " not in out


# --------------------------------------------------------------------------- report layout


def test_effect_table_puts_verdict_and_p_values_first_and_html_tables_scroll_in_a_box() -> None:
    # Key columns within the first five: visible without scrolling at any width.
    assert EFFECT_COLUMNS.index("verdict") < EFFECT_COLUMNS.index("Holm p") < EFFECT_COLUMNS.index("p") <= 5
    assert EFFECT_COLUMNS.index("p") < EFFECT_COLUMNS.index("effect") < EFFECT_COLUMNS.index("treated")
    doc = Document("t", [Section("s", "S", [Table(list(EFFECT_COLUMNS), [["x"] * len(EFFECT_COLUMNS)])])])
    html = render_html(doc, {})
    assert '<div class="table-wrap"><table>' in html
    assert ".table-wrap { overflow-x: auto;" in html and "position: sticky" in html


def test_controller_plot_has_one_axis_per_field_and_flags_on_a_boolean_axis() -> None:
    steps = np.array([10, 20, 30])
    fields = {
        "decision: extra_repetitions": Series(steps, np.array([0.0, 3.0, 6.0])),
        "state: threshold": Series(steps, np.array([-2.0, -2.0, -1.5])),
        "state: score": Series(steps, np.array([-9.0, -4.0, -1.0])),
        "state: acquired": Series(steps, np.array([0.0, 0.0, 1.0])),
    }
    other = {"decision: rate": Series(steps, np.array([0.1, 0.2, 0.4]))}
    fig = plots.controller_trajectories({"facts": fields, "canaries": other}, booleans={("facts", "state: acquired")})
    axes = [ax for ax in fig.axes if ax.get_visible() and ax.lines]
    assert len(axes) == 5  # one per field: no two quantities share a scale
    assert all(len(ax.lines) == 1 for ax in axes)
    titles = {ax.get_title(): ax for ax in axes}
    assert set(titles) == {f"facts: {k}" for k in fields} | {"canaries: decision: rate"}
    flag = titles["facts: state: acquired"]
    assert [t.get_text() for t in flag.get_yticklabels()] == ["false", "true"]


def test_interaction_heatmap_colours_only_significant_cells_on_one_symmetric_scale() -> None:
    # Column 0: a large non-significant effect; column 1: a tiny significant one.
    effect = np.array([[5.0, 0.001], [-4.0, -0.002]])
    significant = np.array([[False, True], [False, True]])
    p_holm = np.array([[0.4, 0.001], [0.3, 0.0001]])
    fig = plots.interaction_heatmap(
        ["a", "b"], ["x", "y"], effect, significant, np.zeros((2, 2), bool), p_holm=p_holm, alpha=0.05
    )
    image = fig.axes[0].images[0]
    values = np.ma.filled(image.get_array(), np.nan)
    assert values[0, 0] == 0 and values[1, 0] == 0  # not significant: neutral whatever the effect
    assert values[0, 1] == pytest.approx(3.0) and values[1, 1] == pytest.approx(-4.0)  # sign x -log10(p)
    assert image.norm.vmin == -image.norm.vmax  # one symmetric scale for the whole matrix
    assert image.norm.vmax >= 4.0
    assert sum("★" in t.get_text() for t in fig.axes[0].texts) == 2


# --------------------------------------------------------------------------- tokenizer identity


def _save_tokenizer(path: Path) -> Path:
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = RawTokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<eos>", "<pad>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    raw.train_from_iterator(["hello world", "the quick brown fox"] * 5, trainer)
    PreTrainedTokenizerFast(
        tokenizer_object=raw, unk_token="<unk>", eos_token="<eos>", pad_token="<pad>"
    ).save_pretrained(path)
    return path


def test_dataset_made_with_a_relative_tokenizer_path_is_the_same_tokenizer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from multirun.config import load_config
    from multirun.errors import ConfigError
    from multirun.run.inputs import resolve_dataset, run_tokenizer
    from tests.helpers_payload import write_config

    _save_tokenizer(tmp_path / "tok")
    (tmp_path / "corpus.txt").write_text("the quick brown fox jumps over the lazy dog. " * 40)
    monkeypatch.chdir(tmp_path)
    # Prepared with the path spelled relative: the dataset records 'hf:tok'.
    assert main(["prepare", "mds", "corpus.txt", "--sequence-length", "16", "--tokenizer", "tok"]) == 0
    assert json.loads((tmp_path / "mds" / "multirun_dataset.json").read_text())["tokenizer"] == "hf:tok"
    config = {
        "run_name": "t",
        "tokenizer": {"kind": "huggingface", "path": str(tmp_path / "tok")},
        "data": {"source": "mds", "path": str(tmp_path / "mds"), "sequence_length": 16},
        "train": {"max_duration": "2ba", "global_batch_size": 2},
        "experiments": [],
    }
    loaded = load_config(write_config(tmp_path / "elsewhere" / "run.yaml", config))
    info = resolve_dataset(loaded, run_tokenizer(loaded))  # same files: accepted
    assert info.num_samples > 0

    # Other tokenizer files: refused, naming both tokenizers and fingerprints.
    (tmp_path / "tok2").mkdir()
    for f in (tmp_path / "tok").iterdir():
        (tmp_path / "tok2" / f.name).write_bytes(f.read_bytes())
    special = tmp_path / "tok2" / "special_tokens_map.json"
    special.write_text(special.read_text().replace("<pad>", "<unk>"))
    config["tokenizer"]["path"] = str(tmp_path / "tok2")
    loaded = load_config(write_config(tmp_path / "elsewhere" / "run2.yaml", config))
    tokenizer = run_tokenizer(loaded)
    with pytest.raises(ConfigError, match=r"tokenized with 'hf:tok' \(fingerprint [0-9a-f]+\), the run uses") as info2:
        resolve_dataset(loaded, tokenizer)
    assert tokenizer.fingerprint() in str(info2.value) and info2.value.key == "data.path"


# --------------------------------------------------------------------------- payload check


def _fact(i: int, **changes: object) -> dict:
    fact: dict = {
        "id": f"fact-{i}",
        "texts": [f"Isle {i} exports copper.", f"Copper comes from isle {i}."],
        "probes": [{"question": f"Isle {i} exports", "target": " copper"}],
    }
    fact.update(changes)
    return fact


def test_payload_check_reports_every_problem_of_the_kind_at_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The issue's payload: a missing key, a duplicate paraphrase and an over-long target, in one run."""
    from tests.helpers_payload import write_payload

    missing = _fact(1)
    del missing["probes"]
    items = [
        _fact(0),
        missing,
        _fact(2, texts=["Isle 2 exports tin.", "Isle 2 exports tin."]),
        _fact(3),
        _fact(4, probes=[{"question": "Isle 4 exports", "target": " tin" * 40}]),
    ]
    root = write_payload(tmp_path / "facts", items, kind="knowledge", name="facts")
    items_file = root / "items.jsonl"
    assert main(["payload", "check", str(root), "--sequence-length", "64"]) == 2
    out = " ".join(capsys.readouterr().out.split())
    assert "3 problem(s)" in out and "tokenizer bytes, sequence length 64" in out
    assert f"{items_file}:2: probes: required key is missing" in out
    assert f"{items_file}:3: texts[1]: duplicate text (also texts[0])" in out
    assert (
        f"{items_file}:5: probes[0]: question + target are 175 tokens long, longer than the sequence length 64" in out
    )

    # `multirun check` of a run with this payload lists the same problems, not just the first.
    from tests.helpers_payload import minimal_config, write_config

    run = write_config(tmp_path / "run.yaml", minimal_config(facts={"payload": str(root)}))
    assert main(["check", str(run)]) == 2
    out = " ".join(capsys.readouterr().out.split())
    assert "experiment 'facts': 3 problems in its payload" in out
    assert f"{items_file}:2: probes: required key is missing" in out
    assert f"{items_file}:3: texts[1]: duplicate text (also texts[0])" in out

    # Fixed, it passes, and says what it checked with.
    write_payload(root, [_fact(i) for i in range(5)], kind="knowledge", name="facts")
    assert main(["payload", "check", str(root), "--sequence-length", "64"]) == 0
    assert "ok, fingerprint" in capsys.readouterr().out


def test_payload_check_takes_the_experiment_from_a_run_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Options live in the run config: a random-token watermark payload has no text on purpose."""
    from multirun.data.tokenizers import ByteTokenizer
    from multirun.kinds.experiments import check_payload
    from multirun.kinds.payloads import load_package
    from tests.helpers_payload import minimal_config, write_config, write_payload

    root = write_payload(tmp_path / "keys", [{"id": f"k{i}"} for i in range(8)], kind="watermark", name="keys")
    config = minimal_config(keys={"payload": str(root), "options": {"method": "random_tokens", "key_length": 6}})
    run = write_config(tmp_path / "run.yaml", config)
    assert main(["payload", "check", str(root), "--config", str(run)]) == 0
    assert "experiment 'keys' of" in capsys.readouterr().out
    # Without the options, every line lacks its text: reported once per message, with the lines.
    result = check_payload(root, tokenizer=ByteTokenizer(), sequence_length=64)
    assert result.package == load_package(root) and result.experiment is None
    assert [p.line for p in result.problems[:-1]] == list(range(1, 9))
    assert main(["payload", "check", str(root)]) == 2
    assert "items.jsonl:1,2,3,4,5,6,7,8: text: required key is missing" in capsys.readouterr().out


# --------------------------------------------------------------------------- held-out split


def _text_of(rows: np.ndarray) -> str:
    """Byte-tokenizer rows back to text (EOS and padding dropped)."""
    flat = rows.reshape(-1)
    return bytes(int(t) for t in flat if t < 256).decode("utf-8", errors="replace")


def test_prepare_heldout_fraction_writes_a_disjoint_split_that_runs_use_by_default(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from multirun.config import load_config
    from multirun.data.mds import is_heldout_document, read_dataset_info, read_rows
    from multirun.data.tokenizers import ByteTokenizer
    from multirun.run.inputs import heldout_rows
    from tests.helpers_payload import write_config

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(40):
        (corpus / f"doc{i:02d}.txt").write_text(f"document MARK{i:02d}X says " + "words and more words " * 8)
    held_names = {f"doc{i:02d}.txt" for i in range(40) if is_heldout_document(f"doc{i:02d}.txt", 0.25)}
    assert 3 <= len(held_names) <= 20  # the hash split is roughly the fraction

    out = tmp_path / "mds"
    assert main(["prepare", str(out), str(corpus), "--sequence-length", "32", "--heldout-fraction", "0.25"]) == 0
    assert f"held out {len(held_names)} documents" in capsys.readouterr().out
    info = read_dataset_info(out)
    assert info.heldout_path == out / "heldout" and info.metadata["num_documents"] == 40 - len(held_names)
    held = read_dataset_info(info.heldout_path)
    train_text = _text_of(read_rows(out, info.num_samples))
    held_text = _text_of(read_rows(held.path, held.num_samples))
    for i in range(40):
        marker = f"MARK{i:02d}X"
        if f"doc{i:02d}.txt" in held_names:
            assert marker not in train_text  # nothing held out was trained on
        else:
            assert marker not in held_text
    assert any(f"MARK{i:02d}X" in held_text for i in range(40))

    # A run over the dataset without data.heldout_path takes its rows from the split...
    config = {
        "run_name": "t",
        "data": {"source": "mds", "path": str(out), "sequence_length": 32},
        "train": {"max_duration": "2ba", "global_batch_size": 2},
        "monitoring": {"heldout_rows": 3},
        "experiments": [],
    }
    loaded = load_config(write_config(tmp_path / "run.yaml", config))
    rows = heldout_rows(loaded, ByteTokenizer(), 32)
    assert rows is not None and np.array_equal(rows, read_rows(held.path, 3, 32))
    # ... an explicit data.heldout_path still wins ...
    config["data"]["heldout_path"] = str(out)
    loaded = load_config(write_config(tmp_path / "run2.yaml", config))
    assert np.array_equal(heldout_rows(loaded, ByteTokenizer(), 32), read_rows(out, 3, 32))
    # ... and a split too small for monitoring.heldout_rows names the keys that decide.
    del config["data"]["heldout_path"]
    config["monitoring"]["heldout_rows"] = held.num_samples + 1
    loaded = load_config(write_config(tmp_path / "run3.yaml", config))
    with pytest.raises(ConfigErrorType, match="held-out split") as err:
        heldout_rows(loaded, ByteTokenizer(), 32)
    assert err.value.key == "monitoring.heldout_rows"


def test_prepare_heldout_fraction_needs_documents_on_both_sides(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "one.txt").write_text("a single document " * 20)
    assert main(["prepare", str(tmp_path / "mds"), str(tmp_path / "one.txt"), "--sequence-length", "8",
                 "--heldout-fraction", "0.5"]) == 2  # fmt: skip
    assert "documents are held out whole" in " ".join(capsys.readouterr().out.split())
    assert not (tmp_path / "mds").exists()


# --------------------------------------------------------------------------- progress in logs


def test_training_into_a_log_prints_plain_periodic_lines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Not on a terminal (here: captured stdout), no progress bar: a plain line every log_interval."""
    import io

    from multirun.config import load_config
    from multirun.run.progress import use_progress_bar
    from multirun.run.trainer import prepare_run
    from tests.support import make_dataset, run_config

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert use_progress_bar(True, Terminal()) and not use_progress_bar(True, io.StringIO())
    assert not use_progress_bar(False, Terminal())

    dataset = make_dataset(tmp_path / "mds", samples=64)
    config = run_config(tmp_path, dataset, steps=8, save_interval=None, experiments=[])
    loaded = load_config(config, ["train.log_interval=4ba", "monitoring.every=null"])
    run = prepare_run(loaded, progress=True)  # asked for, but stdout is not a terminal
    capsys.readouterr()
    run.fit()
    run.close()
    out = capsys.readouterr().out
    assert "\r" not in out
    lines = [line for line in out.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in lines] == ["4/8", "8/8"], out
    for line in lines:
        assert " loss " in line and " tok/s " in line and " elapsed " in line and " ETA " in line
