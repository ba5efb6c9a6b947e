"""``multirun evaluate``: saved weights scored exactly as the in-training evaluation scored them.

A 20-step run evaluates every experiment and the held-out loss at step 10 and saves a
checkpoint there; evaluating that checkpoint (and the Hugging Face folder exported from
it) must give the records of step 10 field by field: scores, p-values, Holm p-values,
intervals and the held-out loss.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from transformers import GPT2Config, GPT2LMHeadModel

from multirun.cli import main as cli_main
from multirun.config import load_config
from multirun.errors import ConfigError, InputError, ResumeError
from multirun.measure.evaluate import UNKNOWN_STEP, WHEN
from multirun.report import build_report
from multirun.run.reload import evaluate_checkpoint
from multirun.run.trainer import prepare_run
from multirun.run.weights import load_weights
from multirun.run_dir import RunDir, read_jsonl
from tests.support import make_dataset, run_config

STEPS, EVERY = 20, 10
OVERRIDES = [
    f"monitoring.every={EVERY}ba",
    "monitoring.n_resamples=200",
    "monitoring.ci_resamples=200",
    "monitoring.heldout_rows=8",
    # 10- and 20-step runs hold the test payloads' spans only for lucky draws; this file
    # tests evaluation, so a span that does not fit is reported, not an error.
    "injection.on_unplaceable=warn",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 20-step run with checkpoints at steps 10 and 20 and evaluations at 0, 10 and 20."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is fastest on a shared machine
    try:
        tmp = tmp_path_factory.mktemp("evaluate")
        dataset = make_dataset(tmp / "mds", samples=100)
        config = run_config(tmp, dataset, steps=STEPS, save_interval=f"{EVERY}ba")
        loaded = load_config(config, [*OVERRIDES, f"data.heldout_path={dataset.path}"])
        run = prepare_run(loaded, progress=False)
        run.fit()
        run.close()
        return run.run_dir
    finally:
        torch.set_num_threads(before)


def _without_when(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k != "when"} for r in records]


def _training_records(run_dir: Path, step: int) -> list[dict[str, Any]]:
    return [r for r in read_jsonl(RunDir(run_dir).metrics) if r["step"] == step]


def test_a_checkpoint_reproduces_the_in_training_evaluation_of_its_step_exactly(
    trained: Path, one_torch_thread: None
) -> None:
    metrics_before = RunDir(trained).metrics.read_bytes()
    checkpoint = RunDir(trained).checkpoints / f"ep0-ba{EVERY}-rank0.pt"
    result = evaluate_checkpoint(trained, checkpoint)

    expected = _training_records(trained, EVERY)
    assert {r["when"] for r in expected} == {"interval"}
    kinds = [("heldout" if r["experiment"] == "_run" else r["experiment"]) for r in expected]
    assert kinds[0] == "heldout" and {"canaries", "facts"} <= set(kinds)  # every experiment and the loss
    written = read_jsonl(result.folder / "metrics.jsonl")
    assert {r["when"] for r in written} == {WHEN}
    # Field by field: scores per item, means, effects, intervals, p, Holm p, held-out loss.
    assert _without_when(written) == _without_when(expected)
    assert [r.to_json() for r in result.records] == written
    assert any(r.get("p_holm") is not None for r in written)

    summary = json.loads((result.folder / "summary.json").read_text())
    assert result.folder == RunDir(trained).evaluations / f"ep0-ba{EVERY}-rank0"
    assert summary["step"] == EVERY and summary["source_kind"] == "composer_checkpoint"
    assert summary["source"] == str(checkpoint.resolve())
    assert summary["heldout_loss"] == expected[0]["value"]
    assert summary["effects"] == [{k: v for k, v in r.items() if k != "items"} for r in written[1:]]
    assert len(summary["weights_fingerprint"]) == 16
    # the run's own records are never touched
    assert RunDir(trained).metrics.read_bytes() == metrics_before
    # the last checkpoint (through Composer's link) reproduces the fit-end evaluation
    latest = evaluate_checkpoint(trained, RunDir(trained).latest_checkpoint, name="final")
    assert _without_when(read_jsonl(latest.folder / "metrics.jsonl")) == _without_when(
        _training_records(trained, STEPS)
    )
    assert latest.summary["weights_fingerprint"] != summary["weights_fingerprint"]


def test_a_hugging_face_folder_of_the_same_weights_gives_the_same_scores(
    trained: Path, tmp_path: Path, one_torch_thread: None
) -> None:
    checkpoint = RunDir(trained).checkpoints / f"ep0-ba{EVERY}-rank0.pt"
    folder = tmp_path / "hf-step10"
    # Composer's write_huggingface_pretrained_from_composer_checkpoint needs a tokenizer in the
    # checkpoint, and a byte-tokenizer run has none: save_pretrained of the checkpoint's model.
    load_weights(checkpoint).model.save_pretrained(folder)
    result = evaluate_checkpoint(trained, folder, step=EVERY)
    assert result.folder.name == "hf-step10" and result.summary["source_kind"] == "huggingface_folder"
    assert result.summary["step"] == EVERY
    assert _without_when(read_jsonl(result.folder / "metrics.jsonl")) == _without_when(
        _training_records(trained, EVERY)
    )
    from_checkpoint = evaluate_checkpoint(trained, checkpoint, name="again")
    assert result.summary["weights_fingerprint"] == from_checkpoint.summary["weights_fingerprint"]

    # Without a step, a folder's records say the step is unknown; the scores are the same.
    unknown = evaluate_checkpoint(trained, folder, name="no-step")
    assert unknown.summary["step"] is None
    assert {r.step for r in unknown.records} == {UNKNOWN_STEP}
    assert [{**r, "step": EVERY} for r in _without_when(read_jsonl(unknown.folder / "metrics.jsonl"))] == (
        _without_when(_training_records(trained, EVERY))
    )
    # A checkpoint's own step wins over a different --step.
    with pytest.raises(InputError, match=r"ep0-ba10-rank0.pt: --step 3, but the checkpoint was written at step 10"):
        evaluate_checkpoint(trained, checkpoint, step=3)


def test_the_report_lists_evaluations_and_marks_them_on_the_curves(trained: Path, one_torch_thread: None) -> None:
    checkpoint = RunDir(trained).checkpoints / f"ep0-ba{EVERY}-rank0.pt"
    evaluate_checkpoint(trained, checkpoint, name="mid")
    paths = build_report(trained)
    markdown = paths.markdown.read_text()
    assert "Evaluations of saved weights" in markdown
    row = next(line for line in markdown.splitlines() if line.startswith("| mid |"))
    assert f"| {EVERY} |" in row and "composer checkpoint" in row and row.endswith("| identical |")
    effect_rows = [line for line in markdown.splitlines() if line.startswith("| mid | canaries |")]
    assert effect_rows and ("significant" in effect_rows[0])  # the verdict (either wording)
    assert "evaluate: mid" in markdown  # the curves' caption names the marked evaluations


def test_bad_inputs_name_the_file(trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ConfigError, match="not a run directory"):
        evaluate_checkpoint(tmp_path, RunDir(trained).latest_checkpoint)
    missing = tmp_path / "nope.pt"
    with pytest.raises(ResumeError, match=r"nope.pt: no such checkpoint"):
        evaluate_checkpoint(trained, missing)
    garbage = tmp_path / "garbage.pt"
    garbage.write_text("not a checkpoint")
    with pytest.raises(ResumeError, match=r"garbage.pt: not a readable Composer checkpoint"):
        evaluate_checkpoint(trained, garbage)
    # weights of another vocabulary (the run's byte tokenizer has 258 ids)
    other = tmp_path / "other-vocab"
    GPT2LMHeadModel(GPT2Config(vocab_size=100, n_positions=64, n_layer=1, n_head=2, n_embd=32)).save_pretrained(other)
    with pytest.raises(InputError, match=r"other-vocab: the weights embed 100 token ids, but the run's tokenizer"):
        evaluate_checkpoint(trained, other)
    with pytest.raises(InputError, match="cannot name an evaluation"):
        evaluate_checkpoint(trained, RunDir(trained).latest_checkpoint, name="../escape")
    assert not (RunDir(trained).evaluations / "other-vocab").exists()
    evaluations = RunDir(trained).evaluations
    assert not evaluations.exists() or not [p for p in evaluations.iterdir() if p.name.startswith(".")]  # no scratch
    # the command line: exit status 2 and the file named
    capsys.readouterr()
    assert cli_main(["evaluate", str(trained), "--checkpoint", str(garbage)]) == 2
    assert "garbage.pt" in capsys.readouterr().out


def test_the_command_prints_the_effects_and_where_it_wrote(
    trained: Path, capsys: pytest.CaptureFixture[str], one_torch_thread: None
) -> None:
    checkpoint = RunDir(trained).checkpoints / f"ep0-ba{EVERY}-rank0.pt"
    capsys.readouterr()
    assert cli_main(["evaluate", str(trained), "--checkpoint", str(checkpoint), "--name", "cli", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "effects against never-injected controls" in out and "canaries" in out and "held-out loss" in out
    assert str(RunDir(trained).evaluations / "cli") in out.replace("\n", "")
    assert "loading weights" not in out  # --no-progress


def test_a_changed_experiment_is_refused_and_relative_paths_are_not_a_change(
    trained: Path, tmp_path: Path, one_torch_thread: None
) -> None:
    # resolved_config.yaml spells a config's relative paths absolute: the experiments are still the trained ones.
    dataset = make_dataset(tmp_path / "mds", samples=100)
    config = run_config(tmp_path, dataset, steps=EVERY, save_interval=f"{EVERY}ba", name="relative")
    doc = yaml.safe_load(config.read_text())
    for experiment in doc["experiments"]:
        experiment["payload"] = str(Path(experiment["payload"]).relative_to(tmp_path))
    config.write_text(yaml.safe_dump(doc))
    run = prepare_run(load_config(config, OVERRIDES), progress=False)
    run.fit()
    run.close()
    result = evaluate_checkpoint(run.run_dir, RunDir(run.run_dir).latest_checkpoint)
    assert _without_when(read_jsonl(result.folder / "metrics.jsonl")) == _without_when(
        _training_records(run.run_dir, EVERY)
    )
    assert (
        result.summary["plan_fingerprint"] == json.loads(RunDir(run.run_dir).manifest.read_text())["plan_fingerprint"]
    )

    # Another seed draws other treated and control items: not the run that was trained.
    copy = tmp_path / "copy"
    shutil.copytree(trained, copy, ignore=shutil.ignore_patterns("checkpoints", "evaluations"))
    resolved = yaml.safe_load(RunDir(copy).resolved_config.read_text())
    resolved["seed"] = resolved["seed"] + 1
    RunDir(copy).resolved_config.write_text(yaml.safe_dump(resolved))
    with pytest.raises(
        ResumeError,
        match=r"(manifest|arms).json: the run's config (and payloads now prepare other experiments|now splits)",
    ):
        evaluate_checkpoint(copy, RunDir(trained).latest_checkpoint)
    assert not list(RunDir(copy).evaluations.iterdir())  # nothing written, no scratch left
