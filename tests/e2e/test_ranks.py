"""Global rows (invariant 3): two processes under Composer's launcher (gloo, CPU) with
the same global batch inject the same spans into the same samples as one process."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from multirun.ledger import Ledger
from multirun.measure.runner import read_metrics
from multirun.measure.stats import TEST_RATES
from multirun.run_dir import read_jsonl
from tests.support import make_dataset, make_payloads, placements, run_cli, run_cli_ranks, run_config

pytestmark = pytest.mark.e2e


def test_two_ranks_inject_what_one_rank_injects(tmp_path: Path) -> None:
    dataset = make_dataset(tmp_path / "mds", samples=90)
    payloads = make_payloads(tmp_path / "payloads")
    experiments = [
        {"name": "canaries", "payload": str(payloads["canaries"]), "repetitions": 3},
        {  # closed loop: decisions derive from all-gathered monitor results, identical on every rank
            "name": "facts",
            "payload": str(payloads["facts"]),
            "control_fraction": 0.25,
            "controller": {"name": "acquire", "options": {"metric": "text_logprob", "threshold": -5.5, "max_rate": 2}},
        },
        # Measured, never injected: multiple-choice questions, whose choices are scored
        # on their question's key/value cache, sharded by question.
        {"name": "quiz", "payload": "pkg:demo/contamination", "inject": False},
    ]
    config = run_config(
        tmp_path, dataset, steps=16, global_batch_size=8, save_interval=None, experiments=experiments, name="ranks"
    )
    config.write_text(config.read_text() + "monitoring: {every: 4ba, n_resamples: 200}\n")

    single = run_cli(["train", str(config), "--no-progress", "--run-dir", str(tmp_path / "one")], cwd=tmp_path)
    assert single.returncode == 0, single.stderr[-3000:]

    code, logs = run_cli_ranks(
        ["train", str(config), "--no-progress", "--run-dir", str(tmp_path / "two")], cwd=tmp_path
    )
    assert code == 0, logs[-4000:]

    one, two = Ledger.open(tmp_path / "one"), Ledger.open(tmp_path / "two")
    two.check_integrity()
    assert len(one) > 0
    assert set(two.table.column("rank").to_pylist()) == {0, 1}  # both ranks injected and wrote shards
    assert placements(two.table) == placements(one.table)

    # Monitors: probes sharded over two ranks and all-gathered score what one rank scores.
    metrics_one, metrics_two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [(r["step"], r["experiment"], r["metric"]) for r in metrics_one] == [
        (r["step"], r["experiment"], r["metric"]) for r in metrics_two
    ]
    assert {r["when"] for r in metrics_one} == {"fit_start", "interval", "fit_end"}
    scored = [(a, b) for a, b in zip(metrics_one, metrics_two) if "items" in a]  # not the per-group summaries
    assert {a["experiment"] for a, _ in scored} == {"canaries", "facts", "quiz"}
    for a, b in scored:
        assert [i for i, _, _ in a["items"]] == [i for i, _, _ in b["items"]]
        scores_a = np.array([s for _, _, s in a["items"]])
        scores_b = np.array([s for _, _, s in b["items"]])
        if a["step"] == 0:  # identical weights: every score agrees, argmax outcomes included
            np.testing.assert_allclose(scores_b, scores_a, rtol=1e-5, atol=1e-5)
        elif a["test"] != TEST_RATES:
            # After training, DDP's summation order moves the weights slightly: continuous
            # scores agree closely, while a 0/1 argmax outcome may flip on a near tie.
            np.testing.assert_allclose(scores_b, scores_a, rtol=1e-2, atol=1e-2)

    def decisions(run: str) -> list[tuple]:
        return [
            (d["step"], json.dumps(d["exposures"], sort_keys=True))
            for d in read_jsonl(tmp_path / run / "controller.jsonl")
        ]

    assert len(decisions("one")) == 5 and decisions("two") == decisions("one")


def test_two_ranks_run_the_interaction_tests_of_one_rank(tmp_path: Path) -> None:
    dataset = make_dataset(tmp_path / "mds", samples=90)
    config = run_config(tmp_path, dataset, steps=16, global_batch_size=8, save_interval="16ba", name="base")
    trained = run_cli(["train", str(config), "--no-progress"], cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr[-3000:]
    args = ["interact", str(tmp_path / "base"), "--steps", "4", "--intensity", "0.1", "--lr", "0.01", "--no-progress"]

    single = run_cli([*args, "--out", str(tmp_path / "one")], cwd=tmp_path)
    assert single.returncode == 0, single.stderr[-3000:]
    code, logs = run_cli_ranks([*args, "--out", str(tmp_path / "two")], cwd=tmp_path)
    assert code == 0, logs[-4000:]

    one = json.loads((tmp_path / "one" / "matrix.json").read_text())
    two = json.loads((tmp_path / "two" / "matrix.json").read_text())
    assert [(c["arm"], c["experiment"]) for c in two["cells"]] == [(c["arm"], c["experiment"]) for c in one["cells"]]
    for a, b in zip(one["cells"], two["cells"]):  # DDP sums gradients in another order: float tolerance
        assert b["effect"] == pytest.approx(a["effect"], abs=1e-3), (a["arm"], a["experiment"])
    for arm in ("alone-canaries", "all"):
        ledger = Ledger.open(tmp_path / "two" / "arms" / arm)
        assert set(ledger.table.column("rank").to_pylist()) == {0, 1}
        assert placements(ledger.table) == placements(Ledger.open(tmp_path / "one" / "arms" / arm).table)
