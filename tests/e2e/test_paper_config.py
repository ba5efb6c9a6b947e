"""The paper's ten experiments in one config (``experiments/paper/run.yaml``): `multirun
check` accepts it as shipped, and a short run of it trains every experiment: each one's
spans (or, for removal, its removals) are in the ledgers and each one's monitor reports
against its controls. The effects themselves need the full run (see
``benchmarks/gpu_paper.py``); here the point is that every experiment takes part."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from multirun.config import load_config
from multirun.ledger import Ledger
from multirun.run.trainer import prepare_run
from multirun.run_dir import read_jsonl
from tests.support import REPO, run_cli

pytestmark = pytest.mark.e2e

PAPER = REPO / "experiments" / "paper" / "run.yaml"
STEPS = 80


def test_the_paper_config_is_valid_as_shipped(tmp_path: Path) -> None:
    done = run_cli(["check", str(PAPER), "--set", f"run_dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "are valid" in done.stdout


def test_a_short_run_of_the_paper_config_trains_every_experiment(tmp_path: Path) -> None:
    names = [e.name for e in load_config(PAPER, [], env={}).config.experiments]
    overrides = [
        f"run_dir={tmp_path / 'paper'}",
        f"train.max_duration={STEPS}ba",
        "train.save_interval=null",
        # The doses are planned for 1000 steps of 16 rows: the short run gets wider batches,
        # a higher cap, smaller doses for the two largest experiments, and places what fits.
        "train.global_batch_size=64",
        f"monitoring.every={STEPS // 2}ba",
        "monitoring.n_resamples=200",
        "monitoring.ci_resamples=200",
        "injection.on_unplaceable=warn",
        "injection.max_modified_fraction=0.6",
        f"experiments.{names.index('mr-math')}.repetitions=8",
        f"experiments.{names.index('muse-news')}.options.duplicates=[0,1,2,4]",
        # FC's whole batch inside the short run: 32 treated canaries twice fill one batch of 64 rows.
        f"experiments.{names.index('fc-forgetting')}.placement.steps=[10]",
        f"experiments.{names.index('fc-forgetting')}.repetitions=2",
    ]
    run = prepare_run(load_config(PAPER, overrides, env={}), progress=False)
    summary = run.fit()
    run.close()
    run_dir = tmp_path / "paper"
    assert summary["steps_trained"] == STEPS

    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert [e["name"] for e in manifest["experiments"]] == names
    kinds = {e["name"]: e["kind"] for e in manifest["experiments"]}
    never_injected = {"negative-control"}
    removal = {name for name, kind in kinds.items() if kind == "removal"}
    assert removal and len(set(kinds.values())) >= 9
    injected = set(Ledger.open(run_dir).table.column("experiment").to_pylist())
    removed = set(Ledger.open_removals(run_dir).table.column("experiment").to_pylist())
    assert removed == removal
    assert injected == set(names) - never_injected - removal

    measured = {r["experiment"] for r in read_jsonl(run_dir / "metrics.jsonl") if r.get("step") == STEPS}
    assert measured >= set(names), sorted(set(names) - measured)
