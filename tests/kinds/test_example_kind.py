"""The example kind of docs/writing-a-kind.md, installed through entry points and trained with
the real Composer Trainer: the ledger holds its spans and its monitor scores treated vs control."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from multirun.config import load_config
from multirun.kinds.payloads import load_payload
from multirun.kinds.registry import injectors, monitors, payloads
from multirun.ledger import Ledger, token_hash
from multirun.measure.runner import read_metrics
from multirun.run.trainer import prepare_run
from tests.kinds.example_kind import slogans
from tests.support import make_dataset, run_config

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "writing-a-kind.md"
EXAMPLE = Path(slogans.__file__).parent

ENTRY_POINTS = """\
[multirun.injectors]
slogans = tests.kinds.example_kind.slogans:SlogansInjector

[multirun.monitors]
slogans = tests.kinds.example_kind.slogans:SlogansMonitor

[multirun.payloads]
example-slogans = tests.kinds.example_kind.payload
"""


def _refresh() -> None:
    for registry in (injectors, monitors, payloads):
        registry.refresh()


@pytest.fixture
def installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A real (if minimal) installed distribution whose entry points name the example kind."""
    dist = tmp_path / "site" / "multirun_example_slogans-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: multirun-example-slogans\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(ENTRY_POINTS)
    _refresh()
    assert "slogans" not in injectors.names() and "example-slogans" not in payloads.names()
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    _refresh()
    try:
        yield
    finally:
        monkeypatch.undo()
        _refresh()
        assert "slogans" not in injectors.names()


def test_the_doc_shows_the_example_code_and_entry_points() -> None:
    doc = DOC.read_text(encoding="utf-8")
    # Every line of the example module is in the doc, in order, so the doc cannot drift from the tested code.
    source = (EXAMPLE / "slogans.py").read_text(encoding="utf-8")
    assert source.strip() in doc
    assert ENTRY_POINTS.strip() in doc
    assert (EXAMPLE / "payload" / "payload.yaml").read_text(encoding="utf-8").strip() in doc


def test_installed_kind_is_found_by_name(installed: None) -> None:
    assert injectors.get("slogans") is slogans.SlogansInjector
    assert monitors.get("slogans") is slogans.SlogansMonitor
    package = load_payload("pkg:example-slogans", base_dir=Path("/"))
    assert package.kind == "slogans" and package.root == (EXAMPLE / "payload").resolve()


def test_trains_with_the_example_kind(installed: None, tmp_path: Path) -> None:
    dataset = make_dataset(tmp_path / "mds", samples=120)
    experiment = {"name": "slogans", "payload": "pkg:example-slogans", "repetitions": 6, "control_fraction": 0.5}
    config = run_config(tmp_path, dataset, steps=32, global_batch_size=8, save_interval=None, experiments=[experiment])
    run = prepare_run(load_config(config), progress=False)
    run.fit()
    run.close()

    arms = json.loads((run.run_dir / "arms.json").read_text())["slogans"]
    assert len(arms["treated"]) == len(arms["control"]) == 6
    prepared = run.plan.experiments[0]
    assert prepared.kind == "slogans" and isinstance(prepared.probes, slogans.SloganProbes)

    # The ledger holds every planned span of the kind: treated slogans only, each 6 times,
    # each span's tokens exactly the injected sequence (prefix, slogan, EOS-wrapped).
    ledger = Ledger.open(run.run_dir)
    ledger.check_integrity()
    rows = ledger.query(experiment="slogans").to_pylist()
    assert len(rows) == 36 == len(run.plan.spans)
    per_item = {item: sum(r["item"] == item for r in rows) for item in arms["treated"]}
    assert per_item == dict.fromkeys(arms["treated"], 6)
    assert all(r["arm"] == "treated" for r in rows)
    eos = run.plan.eos_token_id
    lines = (EXAMPLE / "payload" / "items.jsonl").read_text().splitlines()
    slogan_of = {rec["id"]: rec["slogan"] for rec in map(json.loads, lines)}
    for r in rows:
        expected = [eos, *b"Our motto: ", *slogan_of[r["item"]].encode(), eos]  # the byte tokenizer
        assert r["length"] == len(expected) and r["token_hash"] == token_hash(np.asarray(expected))

    # The monitor scored every slogan at fit end, treated against never-injected controls.
    records = [r for r in read_metrics(run.run_dir) if r.get("experiment") == "slogans" and r.get("when") == "fit_end"]
    assert [r["metric"] for r in records] == ["slogan_logprob"] and records[0]["monitor"] == "slogans"
    record = records[0]
    assert (record["n_treated"], record["n_control"]) == (6, 6) and record["primary"]
    scored = {item: (treated, score) for item, treated, score in record["items"]}
    assert {i for i, (t, _) in scored.items() if t} == set(arms["treated"])
    assert {i for i, (t, _) in scored.items() if not t} == set(arms["control"])
    assert all(np.isfinite(s) and s < 0 for _, s in scored.values())
    treated_mean = np.mean([s for t, s in scored.values() if t])
    control_mean = np.mean([s for t, s in scored.values() if not t])
    assert record["treated_mean"] == pytest.approx(treated_mean) and record["control_mean"] == pytest.approx(
        control_mean
    )
