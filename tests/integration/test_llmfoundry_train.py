"""The llm-foundry path end to end: ``experiments/foundry`` trained by llm-foundry itself.

``experiments/foundry/prepare.py`` makes the data (llm-foundry's own MDS converter, a
local BPE), and a tiny MPT from ``experiments/foundry/mpt.yaml`` trains through
llm-foundry's command line (``python -m llmfoundry.cli.cli train``) in a subprocess:
real llm-foundry, Composer and Streaming, the callback built from ``callbacks: multirun``
through the ``llmfoundry_callbacks_with_config`` entry point. Only the duration, the intervals and
the multirun config's repetitions and cadences are made smaller, so the worked example
and these tests cannot drift apart.

Capture callbacks (``tests/scripts/foundry_capture.py``, registered in llm-foundry's
callback registry through ``code_paths``) stand before and after ``multirun`` and save
the batches as llm-foundry made them and as the model trained on them. Exact provenance
(invariant 2) and exact resume (invariant 4) are checked on them.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
import pytest
import torch
import yaml

from multirun.config import load_config
from multirun.data.mds import IdStreamingDataset, build_dataloader
from multirun.ledger import Ledger, token_hash
from multirun.measure.records import EffectRecord, RunMetricRecord, read_records
from multirun.plan.run_plan import RunPlan, build_run_plan
from multirun.run.inputs import run_tokenizer
from multirun.run_dir import read_jsonl
from multirun.types import BatchGeometry
from tests.support import REPO, free_port, placements, read_json, run_cli

pytestmark = pytest.mark.e2e

EXAMPLE = REPO / "experiments" / "foundry"
CAPTURE_SCRIPT = REPO / "tests" / "scripts" / "foundry_capture.py"
STEPS = 40
SAVE_EVERY = 16
KILL_AT = 20  # after the step-16 checkpoint: steps 16..19 are trained again on resume
BATCH = 8  # mpt.yaml's global_train_batch_size
SEQUENCE_LENGTH = 128  # mpt.yaml's max_seq_len
EXPERIMENTS = ("memorization", "poison", "contamination", "knowledge")

#: Smaller than the example's 400 steps: fewer repetitions, a closer monitoring cadence.
SMALLER = {
    "memorization": {"repetitions": 2},
    "poison": {"repetitions": 2},
    "contamination": {"options": {"assign_groups": [0, 1, 2]}},
    "knowledge": {"monitor": {"every": "5ba"}},
}


@dataclass
class Trained:
    """One finished (or killed) llm-foundry run and what the capture callbacks saved."""

    root: Path
    process: subprocess.CompletedProcess

    @property
    def run_dir(self) -> Path:
        return self.root / "foundry-mpt" / "multirun"

    @property
    def checkpoints(self) -> Path:
        return self.root / "foundry-mpt" / "checkpoints"

    def batches(self, which: str) -> dict[int, dict[str, Any]]:
        """Rank 0's captured batches by step (``original`` or ``trained``)."""
        return {
            int(p.stem.removeprefix("step")): torch.load(p, weights_only=False)
            for p in sorted((self.root / "capture" / which / "rank0").glob("step*.pt"))
        }


def _example_yaml(out: Path, root: Path, *, kill_marker: Path | None = None) -> Path:
    """mpt.yaml as it is, with the capture callbacks around ``multirun`` (order matters:
    callbacks see AFTER_DATALOADER in the order of the mapping), and for a killed run the
    kill callback. The rest of the changes are command-line overrides (see ``_train``)."""
    config = yaml.safe_load((EXAMPLE / "mpt.yaml").read_text())
    example_callbacks: dict[str, Any] = config.pop("callbacks")
    callbacks: dict[str, Any] = {"foundry_capture_original": {"out": str(root / "capture" / "original")}}
    callbacks["multirun"] = example_callbacks.pop("multirun")
    callbacks["foundry_capture_trained"] = {"out": str(root / "capture" / "trained")}
    callbacks.update(example_callbacks)
    if kill_marker is not None:
        callbacks["foundry_kill_once"] = {"step": KILL_AT, "marker": str(kill_marker)}
    config["callbacks"] = callbacks
    config["code_paths"] = [str(CAPTURE_SCRIPT)]
    out.write_text(yaml.safe_dump(config, sort_keys=False))
    return out


def _train(
    config: Path, *, data: Path, root: Path, processes: int = 1, steps: int = STEPS
) -> subprocess.CompletedProcess:
    """``python -m llmfoundry.cli.cli train CONFIG overrides`` with the repository importable
    (under Composer's launcher when ``processes`` > 1)."""
    overrides = [
        f"variables.data_root={data}",
        f"variables.save_root={root}",
        f"max_duration={steps}ba",
        f"save_interval={SAVE_EVERY}ba",
        "save_num_checkpoints_to_keep=-1",
        "console_log_interval=10ba",
        "python_log_level=warning",
    ]
    # Another test in this process may have left torch.distributed's variables behind
    # (WORLD_SIZE=1 would stop the launcher starting 2 processes): each run starts clean.
    distributed = {"WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT"}
    env = {
        **{k: v for k, v in os.environ.items() if k not in distributed},
        "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "PYTHONUNBUFFERED": "1",
        "HF_HUB_OFFLINE": "1",  # the tokenizer and the model are local; never reach for the Hub
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",  # tiny matrices: one thread is as fast and shares a busy machine
    }
    launcher: list[str] = []
    if processes > 1:
        launcher = ["-m", "composer.cli.launcher", "-n", str(processes), "--master_port", str(free_port())]
        launcher += ["--stdout", str(root / "out_{rank}.log"), "--stderr", str(root / "err_{rank}.log")]
    return subprocess.run(
        [sys.executable, *launcher, "-m", "llmfoundry.cli.cli", "train", str(config), *overrides],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _tail(done: subprocess.CompletedProcess) -> str:
    return (done.stdout + done.stderr)[-4000:]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """prepare.py's data, small; its multirun.yaml with the repetitions and cadences of ``SMALLER``."""
    out = tmp_path_factory.mktemp("foundry") / "data"
    done = subprocess.run(
        [sys.executable, str(EXAMPLE / "prepare.py"), str(out), "--max-bytes", "300000", "--heldout-bytes", "40000"],
        cwd=out.parent,
        env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, _tail(done)
    assert "mds/train" in done.stdout
    config = yaml.safe_load((out / "multirun.yaml").read_text())
    config["monitoring"].update({"every": "10ba", "n_resamples": 200, "ci_resamples": 200, "heldout_rows": 8})
    # The knowledge controller decides every 5 steps here (25 in the example), so its windows
    # are too short for all it asks for: place what fits, as the example's larger windows do.
    config["injection"]["on_unplaceable"] = "warn"
    for experiment in config["experiments"]:
        experiment.update(SMALLER[experiment["name"]])
    (out / "multirun.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return out


@pytest.fixture(scope="module")
def straight(data: Path) -> Trained:
    """An uninterrupted run."""
    root = data.parent / "straight"
    root.mkdir()
    done = _train(_example_yaml(root / "mpt.yaml", root), data=data, root=root)
    assert done.returncode == 0, _tail(done)
    return Trained(root, done)


@pytest.fixture(scope="module")
def plan(data: Path, straight: Trained) -> RunPlan:
    """The run's plan, built again from the same config and geometry (the composition is deterministic)."""
    loaded = load_config(data / "multirun.yaml")
    rebuilt = build_run_plan(
        loaded, tokenizer=run_tokenizer(loaded), geometry=BatchGeometry(BATCH, SEQUENCE_LENGTH, STEPS)
    )
    assert rebuilt.fingerprint == read_json(straight.run_dir / "manifest.json")["plan_fingerprint"]
    return rebuilt


def _text_collator(data: Path) -> Any:
    """llm-foundry's own collator for the text loader, as mpt.yaml configures it."""
    from llmfoundry.data.utils import get_text_collator
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(data / "tokenizer")
    eos = yaml.safe_load((EXAMPLE / "mpt.yaml").read_text())["variables"]["eos_token_id"]
    assert eos == tokenizer.eos_token_id
    collate, _ = get_text_collator({"dataset": {"eos_token_id": eos}}, tokenizer, dataset_batch_size=BATCH)
    return collate


def _mds_rows(path: Path) -> np.ndarray:
    """Every row of an MDS folder with a ``tokens`` column (llm-foundry's converter writes one)."""
    dataset = build_dataloader(path, batch_size=1, shuffle=False).dataset
    assert isinstance(dataset, IdStreamingDataset)
    return np.stack([dataset.get_item(i)["input_ids"].numpy() for i in range(dataset.num_samples)])


def _assert_same_batch(actual: Mapping[str, Any], expected: Mapping[str, Any], *, step: int) -> None:
    assert set(actual) == set(expected), step
    for key, value in expected.items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(actual[key], value, rtol=0, atol=0, msg=f"step {step}, {key}")
        else:
            assert [int(v) for v in actual[key]] == [int(v) for v in value], (step, key)


# --------------------------------------------------------------------------- provenance


def test_llmfoundry_trains_the_example_with_every_experiment(straight: Trained) -> None:
    summary = read_json(straight.run_dir / "summary.json")
    assert summary["steps_trained"] == STEPS
    assert {e["experiment"]: e["spans"] > 0 for e in summary["experiments"]} == dict.fromkeys(EXPERIMENTS, True)
    assert sorted(p.name for p in straight.checkpoints.glob("ep*-ba*-rank0.pt")) == [
        "ep0-ba16-rank0.pt",
        "ep0-ba32-rank0.pt",
        "ep0-ba40-rank0.pt",
    ]
    assert sorted(straight.batches("trained")) == list(range(STEPS))


def test_ledger_reconstructs_every_injected_token_and_nothing_else_changed(
    straight: Trained, plan: RunPlan, data: Path
) -> None:
    ledger = Ledger.open(straight.run_dir)
    ledger.check_integrity()
    original, trained = straight.batches("original"), straight.batches("trained")
    experiments = {e.name: e for e in plan.experiments}
    injected = {step: np.zeros(tuple(b["input_ids"].shape), dtype=bool) for step, b in trained.items()}
    rows = ledger.table.to_pylist()
    assert {r["experiment"] for r in rows} == set(EXPERIMENTS)
    for row in rows:
        batch = trained[row["step"]]
        local, start, end = row["local_row"], row["offset"], row["offset"] + row["length"]
        assert row["rank"] == 0
        tokens = batch["input_ids"][local, start:end].numpy()
        experiment = experiments[row["experiment"]]
        np.testing.assert_array_equal(tokens, experiment.sequence_tokens(row["sequence"]))
        assert token_hash(tokens) == row["token_hash"]
        np.testing.assert_array_equal(batch["labels"][local, start:end].numpy(), tokens)
        item = experiment.item_ids[int(experiment.seq_items[row["sequence"]])]
        assert row["item"] == item and row["arm"] == "treated"
        assert not injected[row["step"]][local, start:end].any()  # no two spans overlap
        injected[row["step"]][local, start:end] = True
        # No sample ids on this path: the ledger names the overwritten row by its original content.
        assert row["sample_id"] == -1
        assert row["row_fingerprint"] == token_hash(original[row["step"]]["input_ids"][local].numpy())
    assert read_json(straight.run_dir / "summary.json")["row_identity"] == {
        "keyed_by": "content",
        "world_size": 1,
        "world_size_independent": True,
        "reason": "a StreamingDataset with num_canonical_nodes=1: every world size with the same global batch size "
        "trains on the same samples at each step",
    }

    # The original capture saw llm-foundry's rows before the overwrite: rows of its MDS.
    stored = {tuple(r) for r in _mds_rows(data / "mds" / "train").tolist()}
    for step, batch in trained.items():
        untouched = torch.from_numpy(~injected[step])
        for key in ("input_ids", "labels"):
            torch.testing.assert_close(batch[key][untouched], original[step][key][untouched], rtol=0, atol=0)
        assert all(tuple(r) in stored for r in original[step]["input_ids"].tolist()), step
        if injected[step].any():
            assert not torch.equal(batch["input_ids"], original[step]["input_ids"]), step


def test_every_planned_span_and_every_controller_span_was_trained_on(straight: Trained, plan: RunPlan) -> None:
    table = Ledger.open(straight.run_dir).table
    static = {e.name for e in plan.experiments if e.name != "knowledge"}
    recorded = sorted((r["step"], r["global_row"], r["offset"]) for r in table.to_pylist() if r["experiment"] in static)
    spans = plan.spans
    assert recorded == sorted(zip(spans.step.tolist(), spans.row.tolist(), spans.offset.tolist()))
    summary = read_json(straight.run_dir / "summary.json")
    controlled = table.column("experiment").to_pylist().count("knowledge")
    assert controlled == summary["dynamic_placed"]["knowledge"] > 0
    assert not any(summary["missed_spans"].values())


def test_llmfoundrys_batch_keys_stay_what_its_collator_makes_of_the_trained_rows(straight: Trained, data: Path) -> None:
    """labels, sequence_id, total_tokens and loss_generating_tokens of every trained batch
    are exactly what llm-foundry's own collator makes of the rows as trained on."""
    collate = _text_collator(data)
    original = straight.batches("original")
    for step, batch in straight.batches("trained").items():
        assert "sequence_id" in batch and "total_tokens" in batch and "loss_generating_tokens" in batch
        _assert_same_batch(batch, collate(list(batch["input_ids"])), step=step)
        _assert_same_batch(original[step], collate(list(original[step]["input_ids"])), step=step)


def test_monitors_heldout_loss_and_controller_are_recorded(straight: Trained) -> None:
    records = read_records(straight.run_dir)
    effects = [r for r in records if isinstance(r, EffectRecord)]
    assert {r.experiment for r in effects} == set(EXPERIMENTS)
    assert {r.when for r in effects} == {"fit_start", "interval", "fit_end"}
    assert sorted({r.step for r in effects if r.experiment == "knowledge"}) == list(range(0, STEPS + 1, 5))
    heldout = [r for r in records if isinstance(r, RunMetricRecord) and r.metric == "heldout_loss"]
    assert [r.step for r in heldout] == [0, 10, 20, 30, 40]
    assert all(np.isfinite(r.value) and r.value > 0 for r in heldout)
    assert heldout[-1].value < heldout[0].value  # the model learned the held-out text's distribution

    decisions = read_jsonl(straight.run_dir / "controller.jsonl")
    assert {d["experiment"] for d in decisions} == {"knowledge"}
    assert [d["step"] for d in decisions] == list(range(0, STEPS + 1, 5))
    assert sum(d["decision"]["placed"] for d in decisions) > 0


def test_multirun_ledger_and_report_read_the_run(straight: Trained) -> None:
    ledger = run_cli(["ledger", str(straight.run_dir)], cwd=straight.root)
    assert ledger.returncode == 0, ledger.stderr[-3000:]
    assert "knowledge" in ledger.stdout
    report = run_cli(["report", str(straight.run_dir)], cwd=straight.root)
    assert report.returncode == 0, report.stderr[-3000:]
    html = straight.run_dir / "report" / "report.html"
    assert html.is_file() and "memorization" in html.read_text()


# --------------------------------------------------------------------------- resume


def test_killed_run_resumed_by_llmfoundrys_autoresume_equals_the_uninterrupted_run(
    data: Path, straight: Trained
) -> None:
    root = data.parent / "resumed"
    root.mkdir()
    config = _example_yaml(root / "mpt.yaml", root, kill_marker=root / "killed")
    killed = _train(config, data=data, root=root)
    assert killed.returncode == -signal.SIGKILL, _tail(killed)
    run_dir = root / "foundry-mpt" / "multirun"
    partial = Ledger.open(run_dir)
    assert 0 < len(partial) < len(Ledger.open(straight.run_dir))
    assert set(partial.table.column("step").to_pylist()) <= set(range(SAVE_EVERY))  # flushed at the checkpoint
    assert not (run_dir / "summary.json").exists()
    assert (root / "foundry-mpt" / "checkpoints" / "latest-rank0.pt").exists()

    resumed = _train(config, data=data, root=root)  # the same command again
    assert resumed.returncode == 0, _tail(resumed)
    assert read_json(run_dir / "summary.json")["steps_trained"] == STEPS

    ledger = Ledger.open(run_dir)
    ledger.check_integrity()
    assert ledger.table.column_names == Ledger.open(straight.run_dir).table.column_names
    assert ledger.table.to_pylist() == Ledger.open(straight.run_dir).table.to_pylist()
    assert read_jsonl(run_dir / "controller.jsonl") == read_jsonl(straight.run_dir / "controller.jsonl")
    # Streaming's position was restored from the checkpoint: the resumed run trained on
    # the very batches of the uninterrupted one (its captures of steps 16..19 were rewritten).
    expected = straight.batches("trained")
    got = Trained(root, resumed).batches("trained")
    assert sorted(got) == sorted(expected)
    for step, batch in got.items():
        _assert_same_batch(batch, expected[step], step=step)


def test_a_longer_max_duration_extends_the_finished_run(data: Path, straight: Trained) -> None:
    root = data.parent / "extended"
    shutil.copytree(straight.root, root, symlinks=True)
    longer = _train(root / "mpt.yaml", data=data, root=root, steps=STEPS + 8)
    assert longer.returncode == 0, _tail(longer)
    run_dir = root / "foundry-mpt" / "multirun"
    assert read_json(run_dir / "summary.json")["steps_trained"] == STEPS + 8
    manifest = read_json(run_dir / "manifest.json")
    assert (manifest["static_steps"], manifest["durations"]) == (STEPS, [STEPS, STEPS + 8])
    before = Ledger.open(straight.run_dir).table
    after = Ledger.open(run_dir).table
    # Every span of the 40 trained steps is where it was; only a controller may add spans later.
    old = after.filter(pc.less(after.column("step"), STEPS))
    assert old.to_pylist() == before.to_pylist()
    assert set(after.filter(pc.greater_equal(after.column("step"), STEPS)).column("experiment").to_pylist()) <= {
        spec["name"]
        for spec in yaml.safe_load((data / "multirun.yaml").read_text())["experiments"]
        if spec.get("controller")
    }


# --------------------------------------------------------------------------- ranks and interaction


def test_two_processes_overwrite_the_same_original_rows_as_one(data: Path, straight: Trained) -> None:
    """Composer's launcher, gloo, 2 processes, the same YAML: llm-foundry's text dataset has no
    sample ids, so global rows are keyed by content; the ledgers must be equal, row identity included."""
    root = data.parent / "two"
    root.mkdir()
    config = _example_yaml(root / "mpt.yaml", root)
    done = _train(config, data=data, root=root, processes=2)
    assert done.returncode == 0, _tail(done) + "".join(p.read_text()[-3000:] for p in sorted(root.glob("err_*.log")))
    one, two = Ledger.open(straight.run_dir), Ledger.open(root / "foundry-mpt" / "multirun")
    two.check_integrity()
    assert set(two.table.column("rank").to_pylist()) == {0, 1}
    # Every span, the controller's included, in the same original row (sample id, row fingerprint).
    assert len(one) > 0 and placements(two.table) == placements(one.table)
    decisions = [
        [r["exposures"] for r in read_jsonl(run / "controller.jsonl")]
        for run in (straight.run_dir, root / "foundry-mpt" / "multirun")
    ]
    assert decisions[0] and decisions[1] == decisions[0]
    # Each process's captured original rows: the overwritten content is the same in both runs.
    for rank in (0, 1):
        for path in sorted((root / "capture" / "original" / f"rank{rank}").glob("step*.pt")):
            batch = torch.load(path, weights_only=False)
            step = int(path.stem.removeprefix("step"))
            for row in two.table.filter(_at(two, step, rank)).to_pylist():
                assert row["row_fingerprint"] == token_hash(batch["input_ids"][row["local_row"]].numpy())
    assert read_json(root / "foundry-mpt" / "multirun" / "summary.json")["row_identity"]["world_size"] == 2


def _at(ledger: Ledger, step: int, rank: int) -> Any:
    import pyarrow.compute as pc

    return pc.and_(pc.equal(ledger.table.column("step"), step), pc.equal(ledger.table.column("rank"), rank))


def test_evaluate_reproduces_the_fit_end_evaluation_from_llmfoundrys_mpt_checkpoint(straight: Trained) -> None:
    """An MPT checkpoint (llm-foundry's own model class and config class) scores as the run did."""
    checkpoint = straight.checkpoints / f"ep0-ba{STEPS}-rank0.pt"
    done = run_cli(
        ["evaluate", str(straight.run_dir), "--checkpoint", str(checkpoint), "--name", "final", "--no-progress"],
        cwd=straight.root,
        env={"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    written = read_jsonl(straight.run_dir / "evaluations" / "final" / "metrics.jsonl")
    expected = [r for r in read_jsonl(straight.run_dir / "metrics.jsonl") if r["when"] == "fit_end"]
    assert len(written) == len(expected) > len(EXPERIMENTS)
    assert [{k: v for k, v in r.items() if k != "when"} for r in written] == [
        {k: v for k, v in r.items() if k != "when"} for r in expected
    ]


def test_interaction_tests_run_on_the_llmfoundry_run(straight: Trained) -> None:
    """`multirun interact` rebuilds the arms with llm-foundry from the run's llmfoundry.yaml."""
    assert (straight.run_dir / "llmfoundry.yaml").is_file()
    assert (straight.run_dir / "resolved_config.yaml").is_file()
    out = straight.root / "interaction"
    done = run_cli(
        [
            "interact",
            str(straight.run_dir),
            "--steps",
            "4",
            "--intensity",
            "0.04",
            "--lr",
            "0.001",
            "--experiments",
            "memorization,poison",
            "--out",
            str(out),
            "--no-progress",
        ],
        cwd=straight.root,
        env={"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    matrix = read_json(out / "matrix.json")
    assert matrix["start_step"] == STEPS and matrix["steps"] == 4
    arms = read_json(out / "settings.json")["arms"]
    assert {"none", "all"} <= set(arms)
    for name, members in arms.items():
        ledger = Ledger.open(out / "arms" / name)
        assert set(ledger.table.column("experiment").to_pylist()) == set(members)
        steps = set(ledger.table.column("step").to_pylist())
        assert not members or steps <= set(range(STEPS, STEPS + 4))
