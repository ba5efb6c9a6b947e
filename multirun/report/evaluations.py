"""The report's view of ``multirun evaluate``: saved weights scored after (or beside) training.

Each complete evaluation is a folder ``RUN_DIR/evaluations/<name>/`` with a
``summary.json`` (written last, so a folder without one is an evaluation that did not
finish, and is left out; folders starting with ``.`` are an evaluation's scratch space).
The report shows them in a section of their own (:func:`section`: where the weights
came from, their step, fingerprint and held-out loss, and each experiment's primary
effect with its Holm p-value and verdict), and draws those with a known step on the
metric curves as marked points (:func:`curve_marks`, legend ``evaluate: <name>``).

Example::

    for evaluation in load_evaluations("runs/demo"):
        print(evaluation.name, evaluation.step, evaluation.heldout_loss)
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from multirun.errors import InputError
from multirun.measure.records import EffectRecord, FailureRecord, RunMetricRecord, record_from_json
from multirun.measure.stats import EffectResult
from multirun.report import sections
from multirun.report.document import Cell, Paragraph, Section, Table
from multirun.report.plots import CurveMark
from multirun.report.rundata import RunData, finite
from multirun.run_dir import RunDir

SUMMARY = "summary.json"
_KINDS = {"composer_checkpoint": "composer checkpoint", "huggingface_folder": "Hugging Face folder"}


@dataclass
class Evaluation:
    """One evaluation's ``summary.json``, typed.

    Attributes:
        name: the folder's name under ``evaluations/``.
        source: the checkpoint file or model folder scored.
        source_kind: ``composer_checkpoint`` or ``huggingface_folder``.
        step: the weights' training step (None: unknown).
        weights_fingerprint: xxh64 of the weights' state dict.
        heldout_loss: nats per token (None: the run has no held-out rows).
        effects: the effect records (whole experiment and groups).
        failures: monitors that raised.
        alpha: the run's significance level when it was evaluated.
    """

    name: str
    source: str
    source_kind: str
    step: int | None
    weights_fingerprint: str
    heldout_loss: float | None
    effects: list[EffectRecord]
    failures: list[FailureRecord]
    alpha: float | None


def load_evaluations(run_dir: str | Path) -> list[Evaluation]:
    """Every complete evaluation of the run, by step (unknown steps last), then name.

    Raises:
        InputError: a ``summary.json`` that is not an evaluation's (naming the file and key).
    """
    root = RunDir(run_dir).evaluations
    if not root.is_dir():
        return []
    out = []
    for folder in sorted(root.iterdir()):
        path = folder / SUMMARY
        if folder.name.startswith(".") or not path.is_file():
            continue
        out.append(_read(path))
    return sorted(out, key=lambda e: (e.step is None, e.step or 0, e.name))


def _read(path: Path) -> Evaluation:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(f"not valid JSON: {exc.msg}", file=path, line=exc.lineno) from None
    if not isinstance(data, dict):
        raise InputError("expected an object", file=path)
    step = data.get("step")
    if step is not None and (not isinstance(step, int) or isinstance(step, bool)):
        raise InputError(f"must be an integer or null, got {step!r}", file=path, key="step")
    effects: list[EffectRecord] = []
    failures: list[FailureRecord] = []
    for index, entry in enumerate(data.get("effects") or []):
        try:
            record = record_from_json(entry)
        except ValueError as exc:
            raise InputError(f"not an evaluation record: {exc}", file=path, key=f"effects[{index}]") from None
        if isinstance(record, EffectRecord):
            effects.append(record)
        elif isinstance(record, FailureRecord):
            failures.append(record)
    alpha = data.get("alpha")
    return Evaluation(
        name=str(data.get("name") or path.parent.name),
        source=str(data.get("source", "–")),
        source_kind=str(data.get("source_kind", "")),
        step=step,
        weights_fingerprint=str(data.get("weights_fingerprint", "–")),
        heldout_loss=None if data.get("heldout_loss") is None else finite(data["heldout_loss"]),
        effects=effects,
        failures=failures,
        alpha=float(alpha) if isinstance(alpha, (int, float)) and not isinstance(alpha, bool) else None,
    )


def curve_marks(run: RunData) -> dict[str, dict[str, list[CurveMark]]]:
    """experiment -> metric -> the points of evaluations with a known step (whole-experiment records)."""
    marks: dict[str, dict[str, list[CurveMark]]] = {}
    for evaluation in load_evaluations(run.path):
        if evaluation.step is None:
            continue
        for r in evaluation.effects:
            if r.group is not None:
                continue
            e = r.effect
            point = CurveMark(
                label=f"evaluate: {evaluation.name}",
                step=evaluation.step,
                treated=finite(e.treated_mean),
                control=finite(e.control_mean),
                effect=finite(e.effect),
            )
            marks.setdefault(r.experiment, {}).setdefault(r.metric, []).append(point)
    return marks


def section(run: RunData) -> Section:
    """Section 8: the run's evaluations of saved weights (``multirun evaluate``)."""
    out = Section("evaluations", "8. Evaluations of saved weights")
    evaluations = load_evaluations(run.path)
    if not evaluations:
        folder = RunDir(".").evaluations.as_posix()
        out.blocks.append(
            Paragraph(f"None in {folder}/ (`multirun evaluate RUN_DIR --checkpoint PATH` adds one).", kind="note")
        )
        return out
    out.blocks.append(
        Paragraph(
            "Saved weights scored by `multirun evaluate` with the run's own monitors, held-out rows and statistics "
            "(the in-training evaluation's code path and seed). At a step where the run evaluated every experiment, "
            "a checkpoint of that step reproduces that evaluation exactly; the last column says whether it does."
        )
    )
    trained = _in_training_by_step(run)
    rows: list[list[Cell]] = []
    for ev in evaluations:
        rows.append(
            [
                ev.name,
                f"{_KINDS.get(ev.source_kind, ev.source_kind or '–')}: {ev.source}",
                "unknown" if ev.step is None else fmt_step(ev.step),
                "–" if ev.heldout_loss is None else f"{ev.heldout_loss:.4g}",
                (ev.weights_fingerprint, "code"),
                _agreement(ev, trained),
            ]
        )
    out.blocks.append(
        Table(
            ["evaluation", "source", "step", "held-out loss", "weights fingerprint", "in-training evaluation"],
            rows,
            numeric=(2, 3),
            caption=f"From {RunDir('.').evaluations.as_posix()}/<name>/summary.json (per-item scores in metrics.jsonl).",
        )
    )
    effect_rows: list[list[Cell]] = []
    for ev in evaluations:
        alpha = ev.alpha if ev.alpha is not None else run.alpha
        for r in ev.effects:
            if not r.primary:
                continue
            e = r.effect
            effect_rows.append(
                [
                    ev.name,
                    r.experiment,
                    r.metric,
                    sections.fmt_num(e.treated_mean),
                    sections.fmt_num(e.control_mean),
                    sections.fmt_num(e.effect),
                    sections.fmt_num(e.p_value, 3),
                    sections.fmt_num(r.p_holm, 3),
                    sections.verdict(r, alpha),
                ]
            )
        for failure in ev.failures:
            effect_rows.append(
                [ev.name, failure.experiment, failure.monitor, "", "", "", "", "", (f"failed: {failure.error}", "code")]
            )
    if effect_rows:
        out.blocks.append(
            Table(
                [
                    "evaluation",
                    "experiment",
                    "primary metric",
                    "treated",
                    "control",
                    "effect",
                    "p",
                    "Holm p",
                    "verdict",
                ],
                effect_rows,
                numeric=(3, 4, 5, 6, 7),
                caption=f"Verdicts at alpha = {run.alpha:g} on the Holm-corrected p-value across the run's experiments.",
            )
        )
    return out


def fmt_step(step: int) -> str:
    return f"{step:,}"


def _in_training_by_step(run: RunData) -> dict[int, dict[tuple[str, str, str | None], Any]]:
    """The run's own effect results and held-out loss per evaluated step, keyed as an evaluation's."""
    out: dict[int, dict[tuple[str, str, str | None], Any]] = {}
    for r in run.metrics:
        if isinstance(r, EffectRecord):
            out.setdefault(r.step, {})[(r.experiment, r.metric, r.group)] = r.effect
        elif isinstance(r, RunMetricRecord):
            out.setdefault(r.step, {})[("_run", r.metric, None)] = r.value
    return out


def _agreement(ev: Evaluation, trained: dict[int, dict[tuple[str, str, str | None], Any]]) -> Cell:
    """Whether the evaluation equals the run's own evaluation of the same step (every number)."""
    if ev.step is None or ev.step not in trained:
        return "–"
    theirs = trained[ev.step]
    mine: dict[tuple[str, str, str | None], Any] = {(r.experiment, r.metric, r.group): r.effect for r in ev.effects}
    if ev.heldout_loss is not None:
        mine[("_run", "heldout_loss", None)] = ev.heldout_loss
    shared = [key for key in mine if key in theirs]
    if not shared:
        return "–"
    same = all(_equal(mine[key], theirs[key]) for key in shared)
    partial = "" if len(shared) == len(mine) else f" ({len(shared)} of {len(mine)} results evaluated then)"
    return ("identical" + partial, "sig") if same else ("differs" + partial, "nonsig")


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, EffectResult) and isinstance(b, EffectResult):
        return a.to_dict() == b.to_dict()  # NaN as None: "no value" equals "no value"
    return False
