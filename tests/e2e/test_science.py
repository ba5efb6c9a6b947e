"""The science test: one run of the embedded demo carries every payload kind, and every
kind's effect shows against its never-injected controls (Holm-corrected p < 0.01), while
a negative control whose items are never injected shows none. Interference: held-out
loss against a run with the same seed and no experiments (the paper saw 0.05%), and the
paper's dependence test from that run's checkpoint: the demo's independent experiments
are not flagged as interacting."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from multirun.config import load_config
from multirun.interaction.arms import run_interaction
from multirun.run.trainer import prepare_run

pytestmark = pytest.mark.e2e

KINDS = {"contamination", "knowledge", "poison", "watermark", "memorization"}


def _train_demo(run_dir: Path, *overrides: str) -> dict[str, Any]:
    # save_interval=null: one checkpoint, at the end (the interaction tests start there).
    loaded = load_config(None, [f"run_dir={run_dir}", "train.save_interval=null", *overrides], env={})
    run = prepare_run(loaded, progress=False)
    summary = run.fit()
    run.close()
    return summary


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("science") / "demo"
    _train_demo(run_dir)
    return run_dir


@pytest.fixture(scope="module")
def demo(demo_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    summary = json.loads((demo_dir / "summary.json").read_text())
    manifest = json.loads((demo_dir / "manifest.json").read_text())
    return summary, manifest


@pytest.fixture(scope="module")
def baseline_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same model, seed and data without any experiment."""
    run_dir = tmp_path_factory.mktemp("science") / "baseline"
    _train_demo(run_dir, "experiments=[]")
    return run_dir


def _primary(summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["experiment"]: r for r in summary["effects"] if r.get("primary")}


def test_every_kind_shows_its_effect_against_controls(demo: tuple[dict[str, Any], dict[str, Any]]) -> None:
    summary, manifest = demo
    kinds = {e["name"]: e["kind"] for e in manifest["experiments"]}
    assert set(kinds.values()) >= KINDS
    negative = {e["name"] for e in manifest["experiments"] if e["planned_spans"] == 0 and "negative" in e["name"]}
    primary = _primary(summary)
    failures = []
    for name, kind in kinds.items():
        if name in negative or kind == "documents":
            continue
        r = primary[name]
        direction = 1 if r["alternative"] == "greater" else -1
        if not (r["p_holm"] < 0.01 and direction * r["effect"] > 0):
            failures.append(
                f"{name} ({kind}): {r['metric']} effect {r['effect']:.4g}, p {r['p_value']:.3g}, Holm {r['p_holm']:.3g}"
            )
    assert not failures, "\n".join(failures)


def test_negative_control_shows_no_effect(demo: tuple[dict[str, Any], dict[str, Any]]) -> None:
    summary, manifest = demo
    negatives = [e["name"] for e in manifest["experiments"] if "negative" in e["name"]]
    assert negatives
    for name in negatives:
        assert next(e for e in manifest["experiments"] if e["name"] == name)["planned_spans"] == 0
        assert _primary(summary)[name]["p_value"] > 0.05


def test_interference_on_held_out_loss_is_small(
    demo: tuple[dict[str, Any], dict[str, Any]], baseline_dir: Path
) -> None:
    summary, _ = demo
    baseline = json.loads((baseline_dir / "summary.json").read_text())
    with_experiments, without = summary["heldout_loss"], baseline["heldout_loss"]
    relative = (with_experiments - without) / without
    print(f"held-out loss: {with_experiments:.4f} with experiments, {without:.4f} without ({relative:+.3%})")
    assert abs(relative) <= 0.01


def test_independent_demo_experiments_are_not_flagged_as_interacting(demo_dir: Path, baseline_dir: Path) -> None:
    # The paper's design: from a checkpoint of the model trained without the experiments,
    # every arm continues 100 steps with experiments at 1% of its tokens each.
    result = run_interaction(demo_dir, checkpoint=baseline_dir / "checkpoints" / "latest-rank0.pt", progress=False)
    matrix = result.matrix
    print(f"interaction tests: {len(result.arms)} arms in {result.seconds:.0f} s; {matrix['verdict']}")
    off_diagonal = [c for c in matrix["cells"] if c["family"] == "off_diagonal"]
    assert len(off_diagonal) == 6 * 6  # six injected experiments' arms x the six others and the negative control
    assert matrix["interactions"] == [], matrix["interactions"]
    # ...while the arms do teach: experiments show their own effect in their own arm
    own = [c for c in matrix["cells"] if c["kind"] == "diagonal" and c["significant"] and c["effect"] > 0]
    assert len(own) >= 3, [
        (c["experiment"], c["effect"], c["p_holm"]) for c in matrix["cells"] if c["kind"] == "diagonal"
    ]
