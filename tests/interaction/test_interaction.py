"""Interaction tests: the arm design, the difference-in-differences matrix, exact restarts
from the checkpoint in every arm, and a planted interaction that must be flagged."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from composer import Callback
from composer.core import Event, State
from composer.loggers import Logger

from multirun.cli import main as cli_main
from multirun.config import load_config
from multirun.data.mds import PreparedDataset
from multirun.errors import ConfigError
from multirun.interaction.arms import run_interaction
from multirun.interaction.matrix import build_matrix, design, write_matrix
from multirun.ledger import Ledger
from multirun.measure.records import EffectRecord, EvaluationRecord, ItemScore
from multirun.measure.stats import compare_means
from multirun.run.trainer import prepare_run
from tests.helpers_payload import write_payload
from tests.support import CaptureBatches, make_dataset, make_payloads, placements, run_config

# ------------------------------------------------------------------ design


def test_design_has_the_papers_arms_and_leave_one_out() -> None:
    arms, comparisons = design(["a", "b", "c"], measured=["a", "b", "c", "neg"], leave_one_out=True)
    assert arms["none"] == () and arms["all"] == ("a", "b", "c") and arms["alone-b"] == ("b",)
    assert arms["without-a"] == ("b", "c")
    off = [c for c in comparisons if c.family == "off_diagonal"]
    # alone: 3 arms x 3 other measured; leave-one-out: 3 x 3 others
    assert len(off) == 9 + 9
    assert all(c.arm != "all" or c.baseline.startswith("without-") for c in off)
    own = [c for c in comparisons if c.kind == "diagonal"]
    assert [(c.arm, c.experiment) for c in own] == [("alone-a", "a"), ("alone-b", "b"), ("alone-c", "c")]
    # the never-injected negative control is measured in every arm but has no arm of its own
    assert not any(name.endswith("neg") for name in arms)
    assert sum(c.experiment == "neg" for c in comparisons) == 3 + 1 + 3  # alone arms, all, leave-one-out


# ------------------------------------------------------------------ matrix


def _records(scores: dict[str, dict[str, float]], treated: dict[str, set[str]]) -> list[EvaluationRecord]:
    out: list[EvaluationRecord] = []
    for name, items in scores.items():
        ids = list(items)
        effect = compare_means([0.0], [0.0], metric="logprob")  # the matrix reads only the per-item scores
        out.append(
            EffectRecord(
                step=0,
                when="fit_end",
                experiment=name,
                monitor="m",
                group=None,
                primary=True,
                effect=effect,
                items=ItemScore.of(ids, [i in treated[name] for i in ids], items.values()),
            )
        )
    return out


def _synthetic_arms(rng: np.random.Generator, *, planted: float) -> dict[str, list[EvaluationRecord]]:
    """Arms of two experiments; b's arm moves a's treated items by ``planted``; every arm
    shifts all items of both experiments by a common offset (the model moved)."""
    items = {name: [f"{name}{k}" for k in range(20)] for name in ("a", "b")}
    treated = {name: set(ids[:10]) for name, ids in items.items()}
    base = {name: {i: float(rng.normal(-3, 0.5)) for i in ids} for name, ids in items.items()}

    def arm(shift: float, boosts: dict[str, float]) -> list[EvaluationRecord]:
        scores = {
            name: {
                i: v + shift + (boosts.get(name, 0.0) if i in treated[name] else 0.0) + rng.normal(0, 0.02)
                for i, v in values.items()
            }
            for name, values in base.items()
        }
        return _records(scores, treated)

    return {
        "none": arm(0.0, {}),
        "alone-a": arm(0.3, {"a": 1.0}),
        "alone-b": arm(-0.2, {"b": 1.0, "a": planted}),
        "all": arm(0.1, {"a": 1.0 + planted, "b": 1.0}),
    }


def test_matrix_flags_a_planted_interaction_and_ignores_common_shifts() -> None:
    _, comparisons = design(["a", "b"], measured=["a", "b"])
    matrix = build_matrix(
        _synthetic_arms(np.random.default_rng(0), planted=0.5), comparisons, alpha=0.05, n_resamples=2000, seed=1
    )
    cell = {(c["arm"], c["experiment"]): c for c in matrix["cells"]}
    assert cell[("alone: b", "a")]["significant"] and cell[("alone: b", "a")]["effect"] == pytest.approx(0.5, abs=0.05)
    assert not cell[("alone: a", "b")]["significant"]  # its arm shifted every item by 0.3: no interaction
    assert cell[("alone: a", "a")]["significant"] and cell[("alone: a", "a")]["family"] == "diagonal"
    assert matrix["interactions"] == [
        {
            "arm": "alone: b",
            "experiment": "a",
            "metric": "logprob",
            "effect": cell[("alone: b", "a")]["effect"],
            "p_holm": cell[("alone: b", "a")]["p_holm"],
        }
    ]
    assert matrix["verdict"].startswith("1 interaction(s) detected among 2 off-diagonal")
    # Holm within the off-diagonal family of two cells
    off = sorted(c["p_value"] for c in matrix["cells"] if c["family"] == "off_diagonal")
    assert cell[("alone: b", "a")]["p_holm"] == pytest.approx(min(1.0, 2 * off[0]))


def test_matrix_without_interaction_flags_nothing() -> None:
    _, comparisons = design(["a", "b"], measured=["a", "b"])
    matrix = build_matrix(
        _synthetic_arms(np.random.default_rng(3), planted=0.0), comparisons, alpha=0.05, n_resamples=2000, seed=1
    )
    assert matrix["interactions"] == []
    assert all(c["significant"] for c in matrix["cells"] if c["family"] == "diagonal")


def test_matrix_files_round_trip_and_missing_scores_are_named(tmp_path: Path) -> None:
    arms = _synthetic_arms(np.random.default_rng(0), planted=0.5)
    del arms["alone-b"]  # e.g. an arm whose monitor failed
    _, comparisons = design(["a", "b"], measured=["a", "b"])
    matrix = build_matrix(arms, comparisons, alpha=0.05, n_resamples=500, seed=1)
    json_path, csv_path = write_matrix(tmp_path, matrix)
    loaded = json.loads(json_path.read_text())
    assert len(loaded["cells"]) == len(comparisons)
    broken = [c for c in loaded["cells"] if "error" in c]
    assert broken and all("alone-b" in c["error"] for c in broken) and all(not c["significant"] for c in broken)
    rows = list(csv.DictReader(csv_path.open()))
    assert [r["arm"] for r in rows] == [c["arm"] for c in loaded["cells"]]
    assert all(r["p_holm"] == "" or math.isfinite(float(r["p_holm"])) for r in rows)


# ------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> PreparedDataset:
    return make_dataset(tmp_path_factory.mktemp("interaction") / "mds", samples=120)


class ArmProbe(Callback):
    """Records the weights an arm starts from and the sample ids of each of its batches."""

    def __init__(self) -> None:
        self.start_weights: dict[str, torch.Tensor] = {}
        self.sample_ids: dict[int, list[int]] = {}
        self.start_step = -1

    def run_event(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.FIT_START:
            self.start_step = int(state.timestamp.batch)
            self.start_weights = {k: v.detach().clone() for k, v in state.model.state_dict().items()}
        elif event == Event.AFTER_DATALOADER:
            self.sample_ids[int(state.timestamp.batch)] = state.batch["sample_id"].tolist()


@pytest.mark.e2e
def test_every_arm_restarts_from_the_checkpoints_weights_and_data_position(
    tmp_path: Path, dataset: PreparedDataset
) -> None:
    config = run_config(tmp_path, dataset, steps=16, save_interval="8ba")
    capture = CaptureBatches()
    run = prepare_run(load_config(config), extra_callbacks=[capture], progress=False)
    run.fit()
    run.close()
    checkpoint = run.run_dir / "checkpoints" / "ep0-ba8-rank0.pt"
    saved = torch.load(checkpoint, map_location="cpu", weights_only=False)["state"]["model"]

    probes: dict[str, ArmProbe] = {}

    def probe(arm: str) -> list[Callback]:
        probes[arm] = ArmProbe()
        return [probes[arm]]

    result = run_interaction(
        run.run_dir,
        checkpoint=checkpoint,
        overrides=["interaction.steps=4", "interaction.intensity=0.1", "monitoring.every=2ba"],
        progress=False,
        extra_callbacks=probe,
    )
    assert result.start_step == 8 and set(probes) == {"none", "alone-canaries", "alone-facts", "all"}
    for arm, p in probes.items():
        assert p.start_step == 8, arm
        assert p.start_weights.keys() == saved.keys()
        for key, value in saved.items():
            torch.testing.assert_close(p.start_weights[key], value, rtol=0, atol=0, msg=f"{arm}: {key}")
        # the same data, in the same order, as the original run's steps 8..11
        assert p.sample_ids == {s: capture.batches[s]["sample_id"].tolist() for s in range(8, 12)}, arm

    # Each arm injects exactly its experiments' spans of the 'all' arm.
    ledgers = {arm: Ledger.open(result.out_dir / "arms" / arm).table for arm in probes}
    assert len(ledgers["none"]) == 0
    all_rows = placements(ledgers["all"])
    for name in ("canaries", "facts"):
        mine = placements(ledgers[f"alone-{name}"])
        assert mine and {r for r in all_rows if name in r} == set(mine)
    for arm in probes:  # one evaluation per arm, at its end (not at the run's monitoring cadence)
        records = (result.out_dir / "arms" / arm / "metrics.jsonl").read_text().splitlines()
        assert {json.loads(line)["step"] for line in records} == {12}, arm
    assert (result.out_dir / "matrix.json").is_file() and (result.out_dir / "matrix.csv").is_file()


def _one_character_items(first_code_point: int, n: int, prefix: str) -> list[dict[str, str]]:
    # One distinct accented letter per item, repeated: a tiny model learns an item it was
    # shown within a few exposures (its UTF-8 continuation byte), and nothing about others.
    return [{"id": f"{prefix}-{k:02d}", "text": chr(first_code_point + k) * 20} for k in range(n)]


@pytest.mark.e2e
def test_experiments_sharing_items_are_flagged_and_an_independent_one_is_not(
    tmp_path: Path, dataset: PreparedDataset
) -> None:
    shared = write_payload(tmp_path / "shared", _one_character_items(0xC0, 30, "s"), name="shared")
    independent = write_payload(tmp_path / "independent", _one_character_items(0xC0 + 30, 30, "i"), name="independent")
    experiments = [
        # Two experiments over the same items and the same treated/control split: injecting
        # either one trains the other's treated items (a planted interaction).
        {"name": "first", "payload": str(shared), "arms_key": "shared-split"},
        {"name": "second", "payload": str(shared), "arms_key": "shared-split"},
        {"name": "other", "payload": str(independent)},
    ]
    # The paper's design: the arms start from the same model trained without the experiments
    # (fresh items), and the experiment run only contributes its config.
    base_config = run_config(tmp_path, dataset, steps=32, save_interval="32ba", experiments=[], name="base")
    base = prepare_run(load_config(base_config), progress=False)
    base.fit()
    base.close()
    config = run_config(tmp_path, dataset, steps=24, experiments=experiments, name="planted")
    # writes planted/resolved_config.yaml; the cap leaves room for three experiments at 10% each
    prepare_run(load_config(config, ["injection.max_modified_fraction=0.5"]), progress=False).close()

    result = run_interaction(
        tmp_path / "planted",
        checkpoint=base.run_dir / "checkpoints" / "latest-rank0.pt",
        progress=False,
        overrides=["interaction.steps=24", "interaction.intensity=0.1", "interaction.lr=0.01"],
    )
    cells = {(c["arm"], c["experiment"]): c for c in result.matrix["cells"]}
    for name in ("first", "second", "other"):
        assert cells[(f"alone: {name}", name)]["significant"], f"{name}'s own effect was not detected"
    flagged = {(i["arm"], i["experiment"]) for i in result.matrix["interactions"]}
    assert flagged == {("alone: first", "second"), ("alone: second", "first")}


def _trained_run_dir(tmp_path: Path, dataset: PreparedDataset, *, save_interval: str) -> Path:
    """A 16-step run of the shared test config, trained and closed."""
    run = prepare_run(load_config(run_config(tmp_path, dataset, steps=16, save_interval=save_interval)), progress=False)
    run.fit()
    run.close()
    return run.run_dir


@pytest.mark.e2e
def test_bad_interaction_settings_fail_before_any_arm_trains(tmp_path: Path, dataset: PreparedDataset) -> None:
    run_dir = _trained_run_dir(tmp_path, dataset, save_interval="16ba")
    with pytest.raises(ConfigError, match=r"interaction.experiments\[0\].*not an injected experiment"):
        run_interaction(run_dir, overrides=["interaction.experiments=[nope]"], progress=False)
    with pytest.raises(ConfigError, match=r"interaction\.intensity"):
        run_interaction(run_dir, overrides=["interaction.intensity=0.2"], progress=False)
    assert not (run_dir / "interaction" / "arms").exists()
    # the CLI reports the same before training, with exit status 2 for bad input
    assert cli_main(["interact", str(run_dir), "--experiments", "nope"]) != 0
    assert not (run_dir / "interaction" / "arms").exists()


def test_interact_needs_a_run_directory(tmp_path: Path) -> None:
    assert cli_main(["interact", str(tmp_path)]) != 0
    make_payloads(tmp_path / "p")  # a folder without resolved_config.yaml is not a run
    with pytest.raises(ConfigError, match="not a run directory"):
        run_interaction(tmp_path / "p", progress=False)


@pytest.mark.e2e
def test_train_runs_the_interaction_tests_when_the_run_declares_them(tmp_path: Path, dataset: PreparedDataset) -> None:
    config = run_config(tmp_path, dataset, steps=16, save_interval="16ba", name="declared")
    overrides = ["interaction.after=end", "interaction.steps=2", "interaction.intensity=0.05"]
    assert cli_main(["train", str(config), "--no-progress", *[a for o in overrides for a in ("--set", o)]]) == 0
    run_dir = tmp_path / "declared"
    trigger = json.loads((run_dir / "interaction_trigger.json").read_text())
    settings = json.loads((run_dir / "interaction" / "settings.json").read_text())
    assert settings["checkpoint"] == trigger["checkpoint"] and settings["start_step"] == trigger["step"] == 16
    matrix = json.loads((run_dir / "interaction" / "matrix.json").read_text())
    assert {c["arm"] for c in matrix["cells"]} == {"alone: canaries", "alone: facts", "all", "all vs alone"}
    report = (run_dir / "report" / "report.md").read_text()
    assert matrix["verdict"] in report and "alone: canaries" in report


@pytest.mark.e2e
def test_checkpoint_step_reads_a_renamed_checkpoint(tmp_path: Path, dataset: PreparedDataset) -> None:
    from multirun.interaction.arms import find_checkpoint
    from multirun.run.continuation import checkpoint_step

    run_dir = _trained_run_dir(tmp_path, dataset, save_interval="8ba")
    latest = run_dir / "checkpoints" / "latest-rank0.pt"
    assert checkpoint_step(find_checkpoint(run_dir, latest)) == 16
    renamed = tmp_path / "start.pt"
    renamed.write_bytes((run_dir / "checkpoints" / "ep0-ba8-rank0.pt").read_bytes())
    assert checkpoint_step(renamed) == 8


@pytest.mark.e2e
def test_a_second_call_replaces_the_arms_of_the_first(tmp_path: Path, dataset: PreparedDataset) -> None:
    run_dir = _trained_run_dir(tmp_path, dataset, save_interval="8ba")
    overrides = ["interaction.steps=4", "interaction.intensity=0.1", "interaction.leave_one_out=true"]
    first = run_interaction(
        run_dir, checkpoint=run_dir / "checkpoints" / "ep0-ba8-rank0.pt", overrides=overrides, progress=False
    )
    assert (first.out_dir / "arms" / "without-facts").is_dir()
    second = run_interaction(run_dir, overrides=overrides[:2], progress=False)  # from step 16, no leave-one-out
    assert sorted(p.name for p in (second.out_dir / "arms").iterdir()) == sorted(second.arms)
    steps = Ledger.open(second.out_dir / "arms" / "all").table.column("step").to_pylist()
    assert steps and min(steps) >= 16  # no span left from the arms that started at step 8
