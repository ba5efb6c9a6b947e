"""The science test: one run of the embedded demo carries every payload kind, and every
kind's effect shows against its never-injected controls (Holm-corrected p < 0.01), while
a negative control whose items are never injected shows none. Interference: held-out
loss against a run with the same seed and no experiments (the paper saw 0.05%)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from multirun.config import load_config
from multirun.train import prepare_run

pytestmark = pytest.mark.e2e

KINDS = {"contamination", "knowledge", "poison", "watermark", "memorization"}


def _train_demo(run_dir: Path, *overrides: str) -> dict[str, Any]:
    loaded = load_config(None, [f"run_dir={run_dir}", "train.save_interval=null", *overrides], env={})
    run = prepare_run(loaded, progress=False)
    summary = run.fit()
    run.close()
    return summary


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], dict[str, Any]]:
    run_dir = tmp_path_factory.mktemp("science") / "demo"
    summary = _train_demo(run_dir)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    return summary, manifest


def _primary(summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["experiment"]: r for r in summary["effects"] if r.get("primary")}


def test_every_kind_shows_its_effect_against_controls(demo: tuple[dict[str, Any], dict[str, Any]]) -> None:
    summary, manifest = demo
    kinds = {e["name"]: e["kind"] for e in manifest["experiments"]}
    assert KINDS <= set(kinds.values())
    negative = {e["name"] for e in manifest["experiments"] if e["planned_spans"] == 0 and "negative" in e["name"]}
    primary = _primary(summary)
    failures = []
    for name, kind in kinds.items():
        if name in negative or kind == "documents":
            continue
        r = primary[name]
        direction = 1 if r["alternative"] == "greater" else -1
        if not (r["p_holm"] < 0.01 and direction * r["effect"] > 0):
            failures.append(f"{name} ({kind}): {r['metric']} effect {r['effect']:.4g}, p {r['p_value']:.3g}, Holm {r['p_holm']:.3g}")
    assert not failures, "\n".join(failures)


def test_negative_control_shows_no_effect(demo: tuple[dict[str, Any], dict[str, Any]]) -> None:
    summary, manifest = demo
    negatives = [e["name"] for e in manifest["experiments"] if "negative" in e["name"]]
    assert negatives
    for name in negatives:
        assert next(e for e in manifest["experiments"] if e["name"] == name)["planned_spans"] == 0
        assert _primary(summary)[name]["p_value"] > 0.05


def test_interference_on_held_out_loss_is_small(demo: tuple[dict[str, Any], dict[str, Any]], tmp_path: Path) -> None:
    summary, _ = demo
    baseline = _train_demo(tmp_path / "baseline", "experiments=[]")
    with_experiments, without = summary["heldout_loss"], baseline["heldout_loss"]
    relative = (with_experiments - without) / without
    print(f"held-out loss: {with_experiments:.4f} with experiments, {without:.4f} without ({relative:+.3%})")
    assert abs(relative) <= 0.01
