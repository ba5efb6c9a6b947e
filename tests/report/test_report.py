"""The post-run report, built from real run directories of tiny real training runs.

Three runs are trained once per module: a finished run, a run SIGKILLed after its
first checkpoint (in a subprocess, while the finished run trains), and a baseline
run without injection. Synthetic controller/acquisition/interaction files are
written into a copy of the finished run.
"""

from __future__ import annotations

import base64
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import yaml
from matplotlib.image import imread

from multirun.config import load_config
from multirun.errors import InputError
from multirun.ledger import Ledger
from multirun.measure.records import EffectRecord
from multirun.measure.runner import read_metrics
from multirun.report import ReportPaths, build_report
from multirun.report.rundata import Series, load_run
from multirun.report.sections import compare_end, verdict
from multirun.run.trainer import prepare_run
from multirun.run_dir import append_jsonl
from tests.support import REPO, make_dataset, run_config

pytestmark = pytest.mark.e2e

STEPS = 16
KILL_AT = 9  # just after the step-8 checkpoint: ledger, metrics and training log reach step 8
SECTION_TITLES = [
    "1. Run overview",
    "2. Provenance",
    "3. Metrics over training",
    "4. Effects at the last evaluation",
    "5. Controller trajectories",
    "6. Interaction matrix",
    "7. Training and held-out loss",
]
DATA_URI = re.compile(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


@dataclass
class Runs:
    finished: Path
    interrupted: Path
    baseline: Path


def _config(tmp: Path, dataset, heldout, name: str, *, inject: bool = True, save_interval: str | None = None) -> Path:
    path = run_config(tmp, dataset, steps=STEPS, save_interval=save_interval, name=name)
    doc = yaml.safe_load(path.read_text())
    doc["data"]["heldout_path"] = str(heldout.path)
    doc["monitoring"] = {"every": "8ba", "n_resamples": 200, "heldout_rows": 8}
    if not inject:  # a clean baseline: nothing injected, only the held-out loss measured
        for experiment in doc["experiments"]:
            experiment["inject"] = False
            experiment["monitor"] = {"enabled": False}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    tmp = tmp_path_factory.mktemp("report")
    dataset = make_dataset(tmp / "mds", samples=90)
    heldout = make_dataset(tmp / "heldout", samples=8)
    killed_config = _config(tmp, dataset, heldout, "killed", save_interval="8ba")
    # The killed run trains in a subprocess while this process trains the other two.
    killed = subprocess.Popen(
        [
            sys.executable,
            str(REPO / "tests" / "scripts" / "train_until_failure.py"),
            str(killed_config),
            str(KILL_AT),
            "kill",
        ],
        cwd=tmp,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")},
    )
    try:
        for name, inject in (("finished", True), ("baseline", False)):
            run = prepare_run(load_config(_config(tmp, dataset, heldout, name, inject=inject)), progress=False)
            try:
                run.fit()
            finally:
                run.close()
        _, err = killed.communicate(timeout=300)
    finally:
        if killed.poll() is None:
            killed.kill()
    assert killed.returncode == -signal.SIGKILL, err[-3000:]
    return Runs(tmp / "finished", tmp / "killed", tmp / "baseline")


# --------------------------------------------------------------------------- helpers


def _check_documents(paths: ReportPaths) -> tuple[str, str]:
    """Every plot is a real, non-empty PNG embedded once in the HTML and linked from the MD."""
    html, md = paths.html.read_text(encoding="utf-8"), paths.markdown.read_text(encoding="utf-8")
    embedded = DATA_URI.findall(html)
    assert len(embedded) == len(paths.plots)
    assert sorted(p.name for p in (paths.html.parent / "plots").glob("*.png")) == sorted(p.name for p in paths.plots)
    for uri, plot in zip(embedded, paths.plots):
        data = plot.read_bytes()
        assert len(data) > 1000 and data.startswith(b"\x89PNG\r\n\x1a\n")
        assert base64.b64decode(uri) == data  # the HTML embeds exactly the file, in document order
        pixels = imread(plot)
        assert pixels.shape[0] > 100 and pixels.shape[1] > 300
        assert pixels.std() > 0  # not a blank canvas
        assert f"](plots/{plot.name})" in md
    assert len(re.findall(r"!\[[^\]]*\]\(plots/", md)) == len(paths.plots)
    # Self-contained: no scripts, nothing fetched from the network.
    assert "<script" not in html.lower() and "http://" not in html and "https://" not in html
    for title in SECTION_TITLES:
        assert f"<h2>{title}</h2>" in html
        assert f"## {title.replace('.', chr(92) + '.', 1)}" in md
    return html, md


def _plain(md: str) -> str:
    """Markdown without its backslash escapes, to search for plain phrases."""
    return re.sub(r"\\(.)", r"\1", md)


class _Dom(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.title, self._in_title, self.images = "", False, []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "title":
            self._in_title = True
        elif tag == "img":
            self.images.append(dict(attrs))

    def handle_endtag(self, tag: str) -> None:
        if tag == "title":
            self._in_title = False

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title += data


# --------------------------------------------------------------------------- finished run


@pytest.fixture(scope="module")
def finished_report(runs: Runs) -> ReportPaths:
    return build_report(runs.finished)


def test_finished_run_report(runs: Runs, finished_report: ReportPaths) -> None:
    paths = finished_report
    assert paths.html == runs.finished / "report" / "report.html"
    assert paths.markdown == runs.finished / "report" / "report.md"
    html, md = _check_documents(paths)
    names = [p.name for p in paths.plots]
    assert names == [
        "01-overview-token-share.png",
        "02-provenance-injected-tokens.png",
        "03-provenance-exposures.png",
        "04-metrics-canaries.png",
        "05-metrics-facts.png",
        "06-loss.png",
    ]
    text = _plain(md)
    assert [r.to_json() for r in load_run(runs.finished).metrics] == read_metrics(
        runs.finished
    )  # the report reads what the run wrote
    summary = json.loads((runs.finished / "summary.json").read_text())
    assert f"Finished: trained {STEPS} of {STEPS} planned steps ({summary['tokens_trained']:,} tokens)" in text
    # Tokens modified per experiment and in total agree with the ledger.
    ledger = Ledger.open(runs.finished)
    lengths = ledger.table.column("length").to_numpy()
    experiments = ledger.table.column("experiment").to_pylist()
    canary_tokens = int(sum(n for n, e in zip(lengths, experiments) if e == "canaries"))
    total_share = lengths.sum() / summary["tokens_trained"]
    assert f"| canaries | documents | 9 / 3 | {sum(e == 'canaries' for e in experiments)} | {canary_tokens:,} |" in text
    assert f"| {lengths.sum():,} | {total_share * 100:.3g}% |" in text
    # The effect table holds the last evaluation's numbers and a verdict at alpha.
    last = [r for r in read_metrics(runs.finished) if r["step"] == STEPS and r.get("metric") == "text_logprob"]
    assert len(last) == 2
    for r in last:
        row = next(line for line in text.splitlines() if line.startswith(f"| {r['experiment']} | text_logprob"))
        assert f"| {r['effect']:.4g} |" in row and f"| {r['p_holm']:.3g} |" in row
        expected = "not significant" if r["p_holm"] >= 0.01 else "significant"
        # The verdict and the Holm p come right after the metric and group: never behind a scroll.
        assert f"| text_logprob (primary) | all | {expected} | {r['p_holm']:.3g} |" in row
    assert "Last evaluation at step 16 (fit_end)" in text
    # Optional analyses that never ran say so.
    assert "Not run (no controller.jsonl" in text and "Not run (no interaction/matrix.json" in text
    assert "Acquisition: not run" in text
    assert 'class="warning"' not in html  # nothing flagged: the ledger matches the plan
    assert " · finished at step 16</p>" in html


def test_report_dom_in_a_browser_or_parsed(finished_report: ReportPaths, tmp_path: Path) -> None:
    paths = finished_report
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if os.environ.get("MULTIRUN_REQUIRE_BROWSER") == "1":
        assert browser, "MULTIRUN_REQUIRE_BROWSER=1 but neither chromium nor chromium-browser is on PATH"
    if browser:
        done = subprocess.run(
            [
                browser,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                f"--user-data-dir={tmp_path / 'profile'}",
                "--dump-dom",
                paths.html.resolve().as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        dom_text = done.stdout
    else:
        dom_text = paths.html.read_text(encoding="utf-8")
    dom = _Dom()
    dom.feed(dom_text)
    assert dom.title == "multirun report: finished"
    assert len(dom.images) == len(paths.plots) == 6
    assert all(img["src"].startswith("data:image/png;base64,") and img.get("alt") for img in dom.images)


# --------------------------------------------------------------------------- interrupted run


def test_interrupted_run_report(runs: Runs, tmp_path: Path) -> None:
    assert not (runs.interrupted / "summary.json").exists()
    paths = build_report(runs.interrupted, out_dir=tmp_path / "report")
    html, md = _check_documents(paths)
    text = _plain(md)
    assert f"Interrupted at step 8 of {STEPS} planned" in text
    assert "steps trained | 8 (interrupted)" in text
    assert " · interrupted at step 8</p>" in html
    assert 'class="warning"' in html
    # Shares are of the tokens trained so far, and injections stop at the checkpoint.
    ledger = Ledger.open(runs.interrupted)
    assert int(ledger.table.column("step").to_numpy().max()) == 7
    share = ledger.table.column("length").to_numpy().sum() / (8 * 8 * 64)
    assert f"| {share * 100:.3g}% |" in text
    assert "recorded spans stop at step 8" in text
    assert "Last evaluation at step 8 (interval)" in text
    assert len(paths.plots) == 6


# --------------------------------------------------------------------------- baseline overlay


def test_baseline_overlay(runs: Runs, tmp_path: Path) -> None:
    paths = build_report(runs.finished, baseline=runs.baseline, out_dir=tmp_path / "report")
    _, md = _check_documents(paths)
    text = _plain(md)
    assert f"Baseline overlay: baseline ({runs.baseline})" in text
    held = {r["step"]: r["value"] for r in read_metrics(runs.finished) if r.get("metric") == "heldout_loss"}
    base = {r["step"]: r["value"] for r in read_metrics(runs.baseline) if r.get("metric") == "heldout_loss"}
    assert sorted(held) == sorted(base) == [0, 8, 16]
    expected = (held[16] - base[16]) / base[16]
    assert f"Held-out loss at the end (step 16): {expected:+.2%} relative to the baseline." in text
    assert f"| held-out loss | {held[16]:.4g} (step 16) | {base[16]:.4g} | {expected:+.2%} |" in text
    assert "baseline run dashed" in text
    # The baseline injected nothing, so its report says so without failing.
    clean = _plain(build_report(runs.baseline, out_dir=tmp_path / "clean").markdown.read_text())
    assert "| total |   |   | 0 | 0 | 0% |" in clean and "No data yet: the ledger holds no span." in clean
    # An interrupted baseline is compared at the last step both runs reached.
    partial = _plain(
        build_report(runs.finished, baseline=runs.interrupted, out_dir=tmp_path / "p").markdown.read_text()
    )
    assert "Held-out loss at the end (step 8):" in partial and "Interrupted at step 8 of 16" in partial


# --------------------------------------------------------------------------- future files


def test_controller_acquisition_and_interaction_sections(runs: Runs, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(runs.finished, run_dir, ignore=shutil.ignore_patterns("checkpoints", "report"))
    decisions = [
        {
            "step": s,
            "experiment": "canaries",
            "controller": "until_acquired",
            "decision": {"extra_repetitions": s // 4, "stop": s >= 12},
            "state": {"budget": {"left": 100 - 5 * s}},
        }
        for s in (0, 4, 8, 12)
    ]
    lines = [json.dumps(d) for d in decisions] + ['{"step": 16, "experim']  # torn last line of a killed writer
    (run_dir / "controller.jsonl").write_text("\n".join(lines))
    acquisition = {
        "canaries": {
            "canary-00": {"acquired_at_step": 8, "exposures_to_acquisition": 1},
            "canary-02": {"acquired_at_step": 16, "exposures_to_acquisition": 3},
            "canary-03": {"acquired_at_step": None, "exposures_to_acquisition": None},
        }
    }
    (run_dir / "acquisition.json").write_text(json.dumps(acquisition))
    cells = []
    for arm in ("all", "alone:canaries", "alone:facts", "leave-out:facts"):
        for experiment in ("canaries", "facts"):
            own = arm.endswith(":" + experiment)
            cells.append(
                {
                    "arm": arm,
                    "experiment": experiment,
                    "metric": "text_logprob",
                    "effect": 0.02 if own else -0.001,
                    "ci_low": 0.01 if own else -0.004,
                    "ci_high": 0.03,
                    "p_value": 0.001 if own else 0.6,
                    "p_holm": 0.004 if own else 1.0,
                    "significant": own,
                    "diagonal": own and arm.startswith("alone"),
                }
            )
    (run_dir / "interaction").mkdir()
    (run_dir / "interaction" / "matrix.json").write_text(
        json.dumps({"experiments": ["canaries", "facts"], "alpha": 0.01, "cells": cells})
    )
    paths = build_report(run_dir)
    _, md = _check_documents(paths)
    text = _plain(md)
    assert [p.name for p in paths.plots][-3:] == ["06-controllers.png", "07-interaction.png", "08-loss.png"]
    assert "| canaries | until_acquired | 4 | 12 |" in text  # the torn line is not a decision
    assert '"extra_repetitions": 3' in text
    assert "| canaries | 2 / 3 | 12 | 2 |" in text  # acquired / listed, median step, median exposures
    assert "dotted green lines mark steps where treated items were acquired" in text
    assert (
        "4 arm(s) × 2 measured metric(s) over experiments canaries, facts; significance at alpha = 0.01 "
        "(interaction.alpha, Holm)" in text
    )
    assert text.count("| text_logprob | significant |") == 3
    assert text.count("| text_logprob | not significant |") == 5
    assert "Not run" not in text

    # Rebuilt without them, the report drops those sections' plots from disk too.
    for name in ("controller.jsonl", "acquisition.json"):
        (run_dir / name).unlink()
    shutil.rmtree(run_dir / "interaction")
    again = build_report(run_dir)
    _check_documents(again)
    assert len(again.plots) == 6


def test_bad_future_files_name_the_file_and_line(runs: Runs, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(runs.finished, run_dir, ignore=shutil.ignore_patterns("checkpoints", "report"))
    (run_dir / "controller.jsonl").write_text(
        '{"step": 1, "experiment": "a"}\nnot json\n{"step": 2, "experiment": "a"}\n'
    )
    with pytest.raises(InputError, match=r"controller\.jsonl:2: not valid JSON"):
        build_report(run_dir)
    (run_dir / "controller.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(InputError, match=r"controller\.jsonl:1: experiment: missing field"):
        build_report(run_dir)
    (run_dir / "controller.jsonl").unlink()
    (run_dir / "acquisition.json").write_text(json.dumps({"canaries": {"c": {"acquired_at_step": "soon"}}}))
    with pytest.raises(InputError, match=r"acquisition\.json: canaries\.c\.acquired_at_step: must be an integer"):
        build_report(run_dir)
    with pytest.raises(InputError, match="not a multirun run directory"):
        build_report(tmp_path / "run" / "ledger")
    with pytest.raises(InputError, match="run directory not found"):
        build_report(tmp_path / "nowhere")


def test_a_run_that_has_not_trained_yet_says_no_data_yet(runs: Runs, tmp_path: Path) -> None:
    # What a run directory holds when training died before the first checkpoint or evaluation.
    run_dir = tmp_path / "fresh"
    run_dir.mkdir()
    for name in ("manifest.json", "resolved_config.yaml"):
        shutil.copy(runs.finished / name, run_dir / name)
    paths = build_report(run_dir)
    _, md = _check_documents(paths)
    assert paths.plots == []
    text = _plain(md)
    assert "Interrupted at step 0 of 16" in text
    assert text.count("No data yet") == 4  # provenance, metrics, effects, loss
    assert "Tokens modified: no data yet" in text


def test_metrics_are_read_typed_and_a_malformed_record_names_its_line(runs: Runs, tmp_path: Path) -> None:
    run_dir = tmp_path / "copied"
    run_dir.mkdir()
    for name in ("manifest.json", "resolved_config.yaml", "metrics.jsonl"):
        shutil.copy(runs.finished / name, run_dir / name)
    run = load_run(run_dir)
    assert run.metric_records() and all(isinstance(r, EffectRecord) for r in run.metric_records())
    assert len(run.heldout_loss()) == len(
        {r["step"] for r in read_metrics(run_dir) if r.get("metric") == "heldout_loss"}
    )
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    # Valid, checksummed JSON that is not a monitor record.
    append_jsonl(run_dir / "metrics.jsonl", [{"step": 3, "when": "interval", "experiment": "facts"}])
    with pytest.raises(InputError, match="not a monitor record") as err:
        load_run(run_dir)
    assert err.value.line == len(lines) + 1 and "metrics.jsonl" in str(err.value)


# --------------------------------------------------------------------------- pure helpers


def _record(p_value: float | None, p_holm: float | None = None) -> EffectRecord:
    """An effect record with these p-values (the rest does not enter the verdict)."""
    return EffectRecord.from_json(
        {
            "step": 16,
            "when": "fit_end",
            "experiment": "facts",
            "monitor": "knowledge",
            "group": None,
            "primary": True,
            "metric": "m",
            "test": "t",
            "alternative": "greater",
            "n_treated": 2,
            "n_control": 2,
            "treated_mean": 1.0,
            "control_mean": 0.0,
            "effect": 1.0,
            "ci_low": None,
            "ci_high": None,
            "ci_level": 0.95,
            "p_value": p_value,
            "p_holm": p_holm,
        }
    )


def test_verdict_uses_holm_when_present_and_says_when_uncorrected() -> None:
    assert verdict(_record(p_value=0.001, p_holm=0.02), 0.01) == ("not significant", "nonsig")
    assert verdict(_record(p_value=0.001, p_holm=0.005), 0.01) == ("significant", "sig")
    assert verdict(_record(p_value=0.001, p_holm=None), 0.01) == ("significant (uncorrected)", "sig")
    assert verdict(_record(p_value=None), 0.01) == ("n/a", "nonsig")


def test_compare_end_uses_the_last_common_step() -> None:
    mine = Series(np.array([0, 8, 16]), np.array([5.0, 4.0, 3.0]))
    theirs = Series(np.array([0, 8]), np.array([5.0, 5.0]))
    a, b, diff, step = compare_end(mine, theirs)
    assert (a, b, step) == (4.0, 5.0, 8) and diff == pytest.approx(-0.2)
    a, b, diff, step = compare_end(mine, theirs, window=2)
    assert (a, b, step) == (4.5, 5.0, 8) and diff == pytest.approx(-0.1)
    disjoint = Series(np.array([3]), np.array([2.0]))
    assert compare_end(mine, disjoint)[2] == pytest.approx(0.5)
    assert math.isnan(compare_end(mine, None)[2])
