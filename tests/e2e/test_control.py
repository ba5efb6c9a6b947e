"""Closed-loop injection inside the running trainer (no restarts): decisions after each
evaluation place spans in the following window; acquired items stop; resume replays."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import yaml

from multirun.config import load_config
from multirun.data.mds import PreparedDataset
from multirun.errors import ConfigError
from multirun.ledger import Ledger
from multirun.run.trainer import prepare_run
from multirun.run_dir import read_jsonl
from tests.e2e.test_resume import _fail_at
from tests.support import make_dataset, make_payloads, placements, run_cli, run_config

pytestmark = pytest.mark.e2e

STEPS, EVERY = 24, 4


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> PreparedDataset:
    return make_dataset(tmp_path_factory.mktemp("control") / "mds", samples=90)


def _controlled_config(tmp: Path, dataset: PreparedDataset, *, name: str, threshold: float = -5.2) -> Path:
    payloads = make_payloads(tmp / "payloads")
    experiments = [
        {"name": "canaries", "payload": str(payloads["canaries"]), "repetitions": 2},
        {
            "name": "facts",
            "payload": str(payloads["facts"]),
            "control_fraction": 0.25,
            "controller": {
                "name": "acquire",
                "options": {"metric": "text_logprob", "threshold": threshold, "initial_rate": 1, "max_rate": 2},
            },
        },
    ]
    config = run_config(tmp, dataset, steps=STEPS, save_interval="8ba", experiments=experiments, name=name)
    text = config.read_text() + f"monitoring: {{every: {EVERY}ba, n_resamples: 200}}\n"
    config.write_text(text)
    return config


def test_acquire_controller_injects_until_acquired_then_stops(tmp_path: Path, dataset: PreparedDataset) -> None:
    run = prepare_run(load_config(_controlled_config(tmp_path, dataset, name="ctl")), progress=False)
    assert not (run.plan.spans.experiment == run.plan.experiment_names.index("facts")).any()  # no static spans
    run.fit()
    run.close()
    decisions = read_jsonl(run.run_dir / "controller.jsonl")
    assert [d["step"] for d in decisions] == list(range(0, STEPS + 1, EVERY))
    acquisition = json.loads((run.run_dir / "acquisition.json").read_text())["facts"]
    acquired = {item: v["acquired_at_step"] for item, v in acquisition.items() if v["acquired_at_step"] is not None}
    assert acquired, "no fact reached the threshold"

    facts = Ledger.open(run.run_dir).query(experiment="facts").to_pylist()
    assert facts
    for row in facts:
        if row["item"] in acquired:
            assert row["step"] < acquired[row["item"]]  # nothing after the window in which it was acquired
        # every dynamic span lies in the window of a decision that asked for its item
        window_start = (row["step"] // EVERY) * EVERY
        decision = next(d for d in decisions if d["step"] == window_start)
        assert decision["exposures"][row["item"]] > 0
    for item, info in acquisition.items():
        if info["acquired_at_step"] is not None:
            exposures = sum(1 for r in facts if r["item"] == item and r["step"] < info["acquired_at_step"])
            assert info["exposures_to_acquisition"] == exposures
    summary = json.loads((run.run_dir / "summary.json").read_text())
    assert summary["dynamic_placed"]["facts"] == len(facts)
    assert summary["acquisition"]["facts"] == acquisition  # exposures-to-acquisition in the summary too
    Ledger.open(run.run_dir).check_integrity()  # dynamic spans never overlap static ones


def test_killed_and_resumed_controlled_run_reproduces_decisions_and_spans(
    tmp_path: Path, dataset: PreparedDataset
) -> None:
    straight = _controlled_config(tmp_path, dataset, name="straight")
    done = run_cli(["train", str(straight), "--no-progress"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]

    resumed = _controlled_config(tmp_path, dataset, name="resumed")
    assert _fail_at(resumed, 13, "kill").returncode == -signal.SIGKILL
    again = run_cli(["train", str(resumed), "--no-progress"], cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]

    def decisions(run: str) -> list[tuple]:
        return [
            (d["step"], json.dumps(d["exposures"], sort_keys=True))
            for d in read_jsonl(tmp_path / run / "controller.jsonl")
        ]

    assert decisions("resumed") == decisions("straight")
    assert placements(Ledger.open(tmp_path / "resumed").table) == placements(Ledger.open(tmp_path / "straight").table)


@pytest.mark.parametrize(
    ("controller", "message"),
    [
        ({"name": "acquire", "options": {"metric": "no_such_metric", "threshold": -1.0}}, "metric"),
        ({"name": "acquire", "options": {"metric": "text_logprob", "threshold": 5.0}}, "threshold"),
        ({"name": "acquire", "options": {"metric": "text_logprob", "threshold": -1.0, "bogus": 1}}, "bogus"),
        ({"name": "nonsense"}, "controller.name"),
    ],
)
def test_bad_controller_configs_fail_before_training(
    tmp_path: Path, dataset: PreparedDataset, controller: dict, message: str
) -> None:
    config = _controlled_config(tmp_path, dataset, name="bad")
    doc = yaml.safe_load(config.read_text())
    doc["experiments"][1]["controller"] = controller
    config.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError) as err:
        prepare_run(load_config(config), progress=False)
    assert "bad.yaml" in str(err.value) and "experiments[1].controller" in str(err.value) and message in str(err.value)


def test_window_longer_than_the_run_is_refused(tmp_path: Path, dataset: PreparedDataset) -> None:
    config = _controlled_config(tmp_path, dataset, name="long")
    config.write_text(config.read_text().replace(f"every: {EVERY}ba", "every: 100ba"))
    with pytest.raises(ConfigError, match="window"):
        prepare_run(load_config(config), progress=False)


@pytest.mark.parametrize(
    ("after", "threshold", "trigger"), [("acquired", -5.5, "all_acquired"), ("end", -5.2, "end_of_training")]
)
def test_interaction_start_is_recorded_with_its_checkpoint(
    tmp_path: Path, dataset: PreparedDataset, after: str, threshold: float, trigger: str
) -> None:
    config = _controlled_config(tmp_path, dataset, name="trigger", threshold=threshold)
    config.write_text(config.read_text() + f"interaction: {{after: {after}}}\n")
    run = prepare_run(load_config(config), progress=False)
    run.fit()
    run.close()
    record = json.loads((run.run_dir / "interaction_trigger.json").read_text())
    assert record["trigger"] == trigger
    assert Path(record["checkpoint"]).is_file()
    if trigger == "all_acquired":
        acquisition = json.loads((run.run_dir / "acquisition.json").read_text())["facts"]
        assert record["step"] == max(v["acquired_at_step"] for v in acquisition.values()) < STEPS
    else:
        assert record["step"] == STEPS


def test_controlled_experiment_keeps_its_own_cadence_while_the_rest_are_scored_rarely(
    tmp_path: Path, dataset: PreparedDataset
) -> None:
    config = _controlled_config(tmp_path, dataset, name="cadence")
    loaded = load_config(config, ["monitoring.every=12ba", "experiments.1.monitor.every=4ba"])
    run = prepare_run(loaded, progress=False)
    run.fit()
    run.close()
    scored: dict[str, set[int]] = {}
    for record in read_jsonl(run.run_dir / "metrics.jsonl"):
        scored.setdefault(record["experiment"], set()).add(record["step"])
    assert scored["canaries"] == {0, 12, 24}
    assert scored["facts"] == set(range(0, STEPS + 1, EVERY))
    decisions = read_jsonl(run.run_dir / "controller.jsonl")
    assert [d["step"] for d in decisions] == list(range(0, STEPS + 1, EVERY))
