"""The interaction matrix: did one experiment's injection move another's measurement?

Every arm of an interaction test ends with every experiment's monitor scored on the
same probe items. A *comparison* sets one arm against a baseline arm (``alone: j``
against ``none``, ``all`` against ``alone: i``, ...) on one experiment's primary metric.

The statistic is a difference in differences, paired over probe items: for every item
``k``, ``d_k = score_k(arm) - score_k(baseline)``; the effect is ``mean(d | treated) -
mean(d | control)``, the change in the experiment's treated-versus-control gap. Shifts
common to all items (the arm trained on other data, so the whole model moved a little)
cancel; what remains is what the arm did to the injected items specifically. Under the
null hypothesis (no interaction) the treated and control items' ``d`` are exchangeable:
the p-value is a permutation test of that split and the confidence interval a bootstrap
over items (:func:`multirun.measure.stats.compare_means`, two-sided).

Holm's correction runs within families: the off-diagonal cells (one experiment's arm,
another experiment's metric; leave-one-out cells too) are the interaction tests, and a
significant one is a detected interaction. Diagonal cells (an experiment's own effect),
``all`` against ``none`` and ``all`` against ``alone`` are corrected in families of their
own and never count as interactions.

Example:
    >>> arms, comparisons = design(["a", "b"], measured=["a", "b", "neg"])
    >>> sorted(arms)
    ['all', 'alone-a', 'alone-b', 'none']
    >>> [(c.label, c.experiment, c.family) for c in comparisons][:3]
    [('alone: a', 'a', 'diagonal'), ('alone: a', 'b', 'off_diagonal'), ('alone: a', 'neg', 'off_diagonal')]
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from multirun.measure.records import EffectRecord, EvaluationRecord
from multirun.measure.stats import EffectResult, compare_means, holm_adjust
from multirun.run_dir import MATRIX_CSV, MATRIX_JSON, atomic_path, write_json_atomic

CSV_COLUMNS = (
    "arm",
    "baseline",
    "kind",
    "family",
    "experiment",
    "metric",
    "effect",
    "ci_low",
    "ci_high",
    "p_value",
    "p_holm",
    "significant",
    "diagonal",
    "treated_change",
    "control_change",
    "n_treated",
    "n_control",
)


@dataclass(frozen=True)
class Comparison:
    """One cell: ``arm`` against ``baseline`` on ``experiment``'s primary metric.

    ``label`` is the matrix row (``alone: j``, ``all``, ``all vs alone``,
    ``all vs without: j``); ``arm`` and ``baseline`` are arm names (``alone-j``, ...).
    """

    label: str
    arm: str
    baseline: str
    kind: str  # pair | diagonal | all | all_vs_alone | leave_one_out
    family: str  # off_diagonal | diagonal | all | all_vs_alone
    experiment: str

    @property
    def diagonal(self) -> bool:
        return self.family == "diagonal" or self.kind == "all_vs_alone"


def alone(name: str) -> str:
    return f"alone-{name}"


def without(name: str) -> str:
    return f"without-{name}"


def design(
    participants: Sequence[str], *, measured: Sequence[str], leave_one_out: bool = False
) -> tuple[dict[str, tuple[str, ...]], list[Comparison]]:
    """Arms ({name: injected experiments}) and the comparisons between them.

    ``participants`` are injected in the arms; ``measured`` are scored in every arm
    (a never-injected negative control is measured without an arm of its own).
    """
    arms: dict[str, tuple[str, ...]] = {"none": ()}
    comparisons: list[Comparison] = []
    for j in participants:
        arms[alone(j)] = (j,)
        for i in measured:
            own = i == j
            comparisons.append(
                Comparison(
                    f"alone: {j}",
                    alone(j),
                    "none",
                    "diagonal" if own else "pair",
                    "diagonal" if own else "off_diagonal",
                    i,
                )
            )
    arms["all"] = tuple(participants)
    comparisons += [Comparison("all", "all", "none", "all", "all", i) for i in measured]
    comparisons += [
        Comparison("all vs alone", "all", alone(i), "all_vs_alone", "all_vs_alone", i) for i in participants
    ]
    if leave_one_out and len(participants) > 1:
        for j in participants:
            arms[without(j)] = tuple(p for p in participants if p != j)
            for i in measured:
                own = i == j
                comparisons.append(
                    Comparison(
                        f"all vs without: {j}",
                        "all",
                        without(j),
                        "leave_one_out",
                        "diagonal" if own else "off_diagonal",
                        i,
                    )
                )
    return arms, comparisons


@dataclass(frozen=True)
class ItemScores:
    """An experiment's primary metric in one arm: per item, (treated, score)."""

    metric: str
    scores: dict[str, tuple[bool, float]]


def primary_scores(records: Iterable[EvaluationRecord]) -> dict[str, ItemScores]:
    """Per experiment, the per-item scores of its primary metric in one evaluation's records.

    An experiment whose monitor marks no metric primary contributes its first metric.
    """
    chosen: dict[str, EffectRecord] = {}
    for record in records:
        if not isinstance(record, EffectRecord) or record.group is not None or record.items is None:
            continue
        name = record.experiment
        if name not in chosen or (record.primary and not chosen[name].primary):
            chosen[name] = record
    return {
        name: ItemScores(r.metric, {str(s.item): (bool(s.treated), _float(s.score)) for s in r.items or ()})
        for name, r in chosen.items()
    }


def compare_arms(arm: ItemScores, baseline: ItemScores, *, n_resamples: int, seed: int) -> EffectResult:
    """The difference in differences of ``arm`` against ``baseline`` (see module doc):
    ``treated_mean``/``control_mean`` are the mean score changes of treated/control items."""
    if arm.metric != baseline.metric:
        raise ValueError(f"arms measured different metrics: {arm.metric!r} and {baseline.metric!r}")
    treated: list[float] = []
    control: list[float] = []
    for item, (is_treated, score) in arm.scores.items():
        if item not in baseline.scores:
            continue
        change = score - baseline.scores[item][1]
        if math.isfinite(change):
            (treated if is_treated else control).append(change)
    return compare_means(
        np.array(treated),
        np.array(control),
        metric=arm.metric,
        alternative="two-sided",
        n_resamples=n_resamples,
        seed=seed,
    )


def build_matrix(
    arm_records: Mapping[str, Sequence[EvaluationRecord]],
    comparisons: Sequence[Comparison],
    *,
    alpha: float,
    n_resamples: int,
    seed: int,
) -> dict[str, Any]:
    """Every comparison's cell, Holm-corrected within its family, with verdicts.

    ``arm_records``: per arm name, the records of its final evaluation
    (:attr:`~multirun.measure.runner.MonitorRunner.last_records`, or ``metrics.jsonl``
    read back with :func:`~multirun.measure.records.records_from_json`).
    """
    scores = {arm: primary_scores(records) for arm, records in arm_records.items()}
    results: dict[int, EffectResult] = {}
    cells: list[dict[str, Any]] = []
    for index, c in enumerate(comparisons):
        cell: dict[str, Any] = {
            "arm": c.label,
            "arm_name": c.arm,
            "baseline": c.baseline,
            "kind": c.kind,
            "family": c.family,
            "experiment": c.experiment,
            "diagonal": c.diagonal,
            "p_holm": None,
            "significant": False,
        }
        arm, base = scores.get(c.arm, {}).get(c.experiment), scores.get(c.baseline, {}).get(c.experiment)
        if arm is None or base is None:
            missing = c.arm if arm is None else c.baseline
            cell.update(metric="?", error=f"no scores of {c.experiment!r} in arm {missing!r}")
        else:
            results[index] = compare_arms(arm, base, n_resamples=n_resamples, seed=seed + index)
        cells.append(cell)
    for family in sorted({c.family for c in comparisons}):
        members = [i for i in results if comparisons[i].family == family]
        for index, result in zip(members, holm_adjust([results[i] for i in members])):
            cells[index].update(_cell_fields(result))
            # NaN or None (no test) is not significant
            cells[index]["significant"] = result.p_holm is not None and bool(result.p_holm < alpha)
    interactions = [c for c in cells if c["family"] == "off_diagonal" and c["significant"]]
    tested = sum(1 for c in cells if c["family"] == "off_diagonal" and c["p_holm"] is not None)
    return {
        "experiments": sorted({c.experiment for c in comparisons}, key=[c.experiment for c in comparisons].index),
        "alpha": alpha,
        "n_resamples": n_resamples,
        "cells": cells,
        "interactions": [
            {
                "arm": c["arm"],
                "experiment": c["experiment"],
                "metric": c["metric"],
                "effect": c["effect"],
                "p_holm": c["p_holm"],
            }
            for c in interactions
        ],
        "verdict": (f"{len(interactions)} interaction(s) detected" if interactions else "no interaction detected")
        + f" among {tested} off-diagonal cell(s) at alpha {alpha:g} (Holm)",
    }


def _cell_fields(result: EffectResult) -> dict[str, Any]:
    """A cell's statistics, strict JSON (non-finite values are None)."""
    d = result.to_dict()
    return {
        "metric": d["metric"],
        "effect": d["effect"],
        "ci_low": d["ci_low"],
        "ci_high": d["ci_high"],
        "p_value": d["p_value"],
        "p_holm": d["p_holm"],
        "treated_change": d["treated_mean"],
        "control_change": d["control_mean"],
        "n_treated": d["n_treated"],
        "n_control": d["n_control"],
        "test": f"difference in differences over items; {d['test']}; {d['ci_method']}",
    }


def write_matrix(out_dir: str | Path, matrix: Mapping[str, Any]) -> tuple[Path, Path]:
    """``matrix.json`` and ``matrix.csv`` in ``out_dir``, each written atomically."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = out_dir / MATRIX_JSON, out_dir / MATRIX_CSV
    write_json_atomic(json_path, matrix)
    with atomic_path(csv_path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for cell in matrix["cells"]:
            writer.writerow({k: ("" if cell.get(k) is None else cell.get(k)) for k in CSV_COLUMNS})
    return json_path, csv_path


def _float(value: Any) -> float:
    return math.nan if value is None else float(value)


__all__ = ["Comparison", "ItemScores", "build_matrix", "compare_arms", "design", "primary_scores", "write_matrix"]
