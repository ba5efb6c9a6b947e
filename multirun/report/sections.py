"""The report's seven sections, built from :class:`~multirun.report.rundata.RunData`.

Each builder returns a :class:`~multirun.report.document.Section`; a section with
nothing to show says "no data yet" (the run has not produced it yet) or "not run"
(an optional analysis whose file is absent) instead of failing.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from multirun.measure.records import EffectRecord
from multirun.report import plots
from multirun.report.document import Cell, Figure, Paragraph, Section, Table
from multirun.report.rundata import RunData, Series, finite
from multirun.run_dir import RunDir

#: File names as the report's notes show them, relative to the run directory.
_FILES = RunDir(".")
ACQUISITION = _FILES.acquisition.as_posix()
CONTROLLER_LOG = _FILES.controller_log.as_posix()
INTERACTION = _FILES.interaction_matrix.as_posix()

# --------------------------------------------------------------------------- formatting


def fmt_int(value: Any) -> str:
    return "–" if value is None else f"{int(value):,}"


def fmt_num(value: Any, digits: int = 4) -> str:
    x = finite(value)
    return "–" if math.isnan(x) else f"{x:.{digits}g}"


def fmt_pct(fraction: float | None) -> str:
    return "–" if fraction is None or math.isnan(fraction) else f"{fraction * 100:.3g}%"


def fmt_seconds(value: Any) -> str:
    x = finite(value)
    if math.isnan(x):
        return "–"
    if x < 1:
        return f"{x * 1000:.0f} ms"
    return f"{x:.1f} s" if x < 120 else f"{x / 60:.1f} min"


def slug(text: str) -> str:
    """A file-name-safe version of ``text`` (names from JSON files may hold anything)."""
    return re.sub(r"[^A-Za-z0-9.-]+", "-", text).strip("-.").lower() or "x"


def _figure(key: str, fig: Any, caption: str, alt: str = "") -> Figure:
    return Figure(key=key, png=plots.png_bytes(fig), caption=caption, alt=alt or caption)


def _note(text: str) -> Paragraph:
    return Paragraph(text, kind="note")


def status_line(run: RunData) -> tuple[str, bool]:
    """One sentence on how far the run got, and whether it was interrupted."""
    num_steps = run.geometry["num_steps"]
    of = f" of {num_steps:,} planned" if num_steps is not None else ""
    tokens = run.tokens_trained
    tokens_text = f" ({tokens:,} tokens)" if tokens is not None else ""
    if run.finished:
        return f"Finished: trained {run.steps_reached:,}{of} steps{tokens_text}.", False
    return (
        f"Interrupted at step {run.steps_reached:,}{of} (or still running): there is no summary.json, so this "
        "report is built from the ledger, metrics and training log, which reach that step. Records after the last "
        "checkpoint are lost when a run is killed; a resumed run trains those steps again."
    ), True


def short_status(run: RunData) -> str:
    """``finished at step N`` or ``interrupted at step N`` (for the report's subtitle)."""
    return f"{'finished' if run.finished else 'interrupted'} at step {run.steps_reached:,}"


# --------------------------------------------------------------------------- 1. overview


def overview(run: RunData, colors: Mapping[str, str]) -> Section:
    section = Section("overview", "1. Run overview")
    status, interrupted = status_line(run)
    section.blocks.append(Paragraph(status, kind="warning" if interrupted else "text"))
    # Records a killed run left half-written were left out: say so where the reader starts.
    section.blocks.extend(Paragraph(sentence, kind="warning") for sentence in run.dropped.values())
    cfg = run.config or {}
    g = run.geometry
    settings: list[list[Cell]] = [
        ["run name", run.run_name],
        ["model", _describe(cfg.get("model"), first="kind")],
        ["tokenizer", _describe(cfg.get("tokenizer"), first="kind")],
        ["data", _describe(cfg.get("data"), first="source", keys=_DATA_KEYS.get(_get_source(cfg), _DATA_KEYS["mds"]))],
        [
            "batch",
            f"{fmt_int(g['global_batch_size'])} rows × {fmt_int(g['sequence_length'])} tokens"
            + (f" = {run.tokens_per_step:,} tokens per step" if run.tokens_per_step else ""),
        ],
        ["planned steps", fmt_int(g["num_steps"])],
        ["steps trained", fmt_int(run.steps_reached) + ("" if run.finished else " (interrupted)")],
        ["tokens trained", fmt_int(run.tokens_trained)],
        ["seed", str((run.manifest or {}).get("seed", cfg.get("seed", "–")))],
        ["plan fingerprint", str((run.manifest or {}).get("plan_fingerprint", "–"))],
    ]
    summary = run.summary or {}
    for key, label in (
        ("fit_seconds", "fit time"),
        ("monitor_seconds", "monitoring time"),
        ("injection_seconds_rank0", "injection time (rank 0)"),
    ):
        if key in summary:
            settings.append([label, fmt_seconds(summary[key])])
    section.blocks.append(Table(["setting", "value"], settings))

    trained = run.tokens_trained
    rows: list[list[Cell]] = []
    shares: list[float] = []
    total_tokens = total_spans = 0
    for name in run.experiment_names:
        m = run.manifest_experiment(name)
        spans = run.provenance.spans(name) if run.provenance else 0
        tokens = run.provenance.tokens(name) if run.provenance else 0
        total_tokens += tokens
        total_spans += spans
        share = tokens / trained if trained else math.nan
        shares.append(share)
        items = f"{fmt_int(m.get('treated_items'))} / {fmt_int(m.get('control_items'))}" if m else "–"
        rows.append([name, str(m.get("kind", "–")), items, fmt_int(spans), fmt_int(tokens), fmt_pct(share)])
    if rows:
        rows.append(
            [
                ("total", "total"),
                "",
                "",
                fmt_int(total_spans),
                fmt_int(total_tokens),
                fmt_pct(total_tokens / trained if trained else math.nan),
            ]
        )
        section.blocks.append(
            Table(
                [
                    "experiment",
                    "kind",
                    "items treated / control",
                    "spans recorded",
                    "tokens modified",
                    "share of training tokens",
                ],
                rows,
                numeric=(2, 3, 4, 5),
                caption="Counted from the ledger: every token that was overwritten and trained on.",
            )
        )
    else:
        section.blocks.append(_note("No experiments in this run."))
    names = [n for n, s in zip(run.experiment_names, shares) if not math.isnan(s)]
    if names and total_tokens > 0:
        fig = plots.token_share(names, [s for s in shares if not math.isnan(s)], colors)
        section.blocks.append(
            _figure(
                "overview-token-share",
                fig,
                "Share of the training tokens each experiment overwrote.",
            )
        )
    else:
        section.blocks.append(_note("Tokens modified: no data yet (no span recorded in the ledger)."))
    return section


# The data settings worth a reader's attention, per source (the rest is in resolved_config.yaml).
_DATA_KEYS: dict[str, tuple[str, ...]] = {
    "mds": ("path", "heldout_path", "sequence_length", "shuffle"),
    "demo": ("sequence_length", "demo_max_bytes", "shuffle"),
}


def _get_source(cfg: Mapping[str, Any]) -> str:
    data = cfg.get("data")
    return str(data.get("source")) if isinstance(data, dict) else "mds"


def _describe(value: Any, *, first: str, keys: tuple[str, ...] | None = None) -> str:
    """``kind (a=1, b=2)`` from a config section; ``keys`` limits which settings are shown."""
    if not isinstance(value, dict):
        return "–"
    parts = [str(value.get(first, "?"))]
    for key, v in value.items():
        if key == first or v in (None, {}, [], "") or (keys is not None and key not in keys):
            continue
        parts.append(f"{key}={json.dumps(v) if isinstance(v, (dict, list)) else v}")
    return parts[0] + (" (" + ", ".join(parts[1:]) + ")" if len(parts) > 1 else "")


# --------------------------------------------------------------------------- 2. provenance


def provenance(run: RunData, colors: Mapping[str, str]) -> Section:
    section = Section("provenance", "2. Provenance")
    prov = run.provenance
    if prov is None:
        section.blocks.append(_note("No data yet: the ledger has not been written (it is flushed at each checkpoint)."))
        return section
    total_spans = sum(prov.spans(n) for n in run.experiment_names)
    num_steps = run.geometry["num_steps"] or max(run.steps_reached, 1)
    if total_spans:
        cap = None
        if run.max_modified_fraction is not None and run.tokens_per_step:
            cap = run.max_modified_fraction * run.tokens_per_step
        names = [n for n in run.experiment_names if n in prov.steps]
        fig = plots.injected_tokens(
            {n: prov.steps[n] for n in names},
            {n: prov.lengths[n] for n in names},
            colors,
            num_steps=max(num_steps, run.steps_reached),
            steps_reached=run.steps_reached,
            cap_tokens=cap,
        )
        section.blocks.append(
            _figure(
                "provenance-injected-tokens",
                fig,
                "Injected tokens per training step, stacked by experiment (from the ledger); the dashed line is the "
                "per-batch cap on modified tokens.",
            )
        )
        exposures: dict[str, np.ndarray] = {}
        for name in run.experiment_names:
            counts = prov.exposures.get(name, np.empty(0, np.int64))
            treated = run.manifest_experiment(name).get("treated_items")
            unexposed = max(0, int(treated) - counts.size) if isinstance(treated, int) else 0
            if counts.size or unexposed:
                exposures[name] = np.concatenate([counts, np.zeros(unexposed, np.int64)])
        if exposures:
            section.blocks.append(
                _figure(
                    "provenance-exposures",
                    plots.exposure_histograms(exposures, colors),
                    "Exposures per treated item: how many spans of each item were trained on (0: not injected yet).",
                )
            )
    else:
        section.blocks.append(_note("No data yet: the ledger holds no span."))

    rows: list[list[Cell]] = []
    mismatched: dict[str, str] = {}
    missed = (run.summary or {}).get("missed_spans", {}) or {}
    for name in run.experiment_names:
        m = run.manifest_experiment(name)
        spans = prov.spans(name)
        counts = prov.exposures.get(name, np.empty(0))
        steps = prov.steps.get(name, np.empty(0))
        planned = m.get("planned_spans")
        n_missed = int(missed.get(name, 0))
        # Fewer recorded spans than planned (less the missed ones) means lost provenance; more can
        # be legitimate (spans a controller added to the dynamic queue), so only fewer is flagged.
        if run.finished and isinstance(planned, int) and spans < planned - n_missed:
            mismatched[name] = f"{name} ({spans:,} recorded, {planned - n_missed:,} expected)"
        rows.append(
            [
                name,
                _placement(m.get("placement")),
                fmt_int(planned),
                (fmt_int(spans), "nonsig" if name in mismatched else ""),
                fmt_int(m.get("unplaced_spans")),
                fmt_int(n_missed) if run.finished else "–",
                f"{counts.size:,} / {fmt_int(m.get('treated_items'))}",
                f"{int(counts.min())} / {counts.mean():.3g} / {int(counts.max())}" if counts.size else "–",
                f"{int(steps.min())}–{int(steps.max())}" if steps.size else "–",
            ]
        )
    if rows:
        section.blocks.append(
            Table(
                [
                    "experiment",
                    "placement",
                    "planned spans",
                    "recorded spans",
                    "unplaced",
                    "missed",
                    "items exposed / treated",
                    "exposures min / mean / max",
                    "steps",
                ],
                rows,
                numeric=(2, 3, 4, 5, 6, 7),
                caption="Planned spans come from manifest.json (the static plan of the whole run); recorded spans from the "
                "ledger, including any a controller added. "
                "Unplaced spans did not fit under the caps; missed spans targeted rows of a short final batch.",
            )
        )
    if mismatched:
        section.blocks.append(
            Paragraph("Fewer spans recorded than planned for: " + ", ".join(mismatched.values()) + ".", kind="warning")
        )
    elif not run.finished:
        section.blocks.append(
            _note(
                f"The run is interrupted: recorded spans stop at step {run.steps_reached:,}, planned spans cover all steps."
            )
        )
    removals = run.removals
    if removals:  # removal experiments (docs/kinds/removal.md): what they took out of the stream
        section.blocks.append(
            Table(
                ["experiment", "removed spans", "removed tokens", "items removed / treated", "steps"],
                [
                    [
                        str(r["experiment"]),
                        fmt_int(r["spans"]),
                        fmt_int(r["tokens"]),
                        f"{fmt_int(r['items_exposed'])} / {fmt_int(run.manifest_experiment(r['experiment']).get('treated_items'))}",
                        f"{r['first_step']}–{r['last_step']}" if r["spans"] else "–",
                    ]
                    for r in removals
                    if r["spans"] or run.manifest_experiment(r["experiment"]).get("kind") == "removal"
                ],
                numeric=(1, 2, 3),
                caption="From the removals ledger (ledger/removals/): spans of training rows that held a removed "
                "n-gram, overwritten after injection.",
            )
        )
    return section


def _placement(placement: Any) -> str:
    if not isinstance(placement, dict):
        return "–"
    mode = str(placement.get("mode", "?"))
    steps = placement.get("steps") or []
    if steps:
        return f"{mode} ({len(steps)} steps)"
    return f"{mode} [{placement.get('start_step', '?')}, {placement.get('end_step', '?')})"


# --------------------------------------------------------------------------- 3. metric curves


def metric_curves(
    run: RunData, colors: Mapping[str, str], marks: Mapping[str, Mapping[str, list[plots.CurveMark]]] | None = None
) -> Section:
    """Per experiment, its metrics over training; ``marks``: points of evaluations of saved
    weights per experiment and metric (:func:`multirun.report.evaluations.curve_marks`)."""
    section = Section("metrics", "3. Metrics over training")
    records = [r for r in run.metric_records() if r.group is None]
    by_experiment: dict[str, dict[str, list[EffectRecord]]] = {}
    for r in records:
        by_experiment.setdefault(r.experiment, {}).setdefault(r.metric, []).append(r)
    if not by_experiment:
        section.blocks.append(_note("No data yet: no monitor evaluation has been recorded in metrics.jsonl."))
    order = [n for n in run.experiment_names if n in by_experiment]
    for name in order:
        metrics = {}
        for metric, recs in by_experiment[name].items():
            metrics[metric] = {
                key: Series.from_pairs([(r.step, getattr(r.effect, field)) for r in recs])
                for key, field in (
                    ("treated", "treated_mean"),
                    ("control", "control_mean"),
                    ("effect", "effect"),
                    ("ci_low", "ci_low"),
                    ("ci_high", "ci_high"),
                )
            }
        acquired, label = _acquired(run, name)
        marked = (marks or {}).get(name, {})
        fig = plots.metric_curves(
            name, metrics, colors.get(name, "#2f5d9e"), acquired_steps=acquired, acquisition_label=label, marks=marked
        )
        caption = (
            f"{name}: treated vs control mean per evaluation (top) and the effect with its confidence interval (bottom)"
        )
        caption += "; dotted green lines mark steps where treated items were acquired" if acquired else ""
        labels = list(dict.fromkeys(m.label for points in marked.values() for m in points))
        caption += f"; outlined markers: {', '.join(labels)} (section 8)." if labels else "."
        section.blocks.append(_figure(f"metrics-{slug(name)}", fig, caption))
        forgetting = _forgetting_figure(run, name, colors.get(name, "#2f5d9e"))
        if forgetting is not None:
            section.blocks.append(forgetting)

    errors = run.monitor_errors()
    if errors:
        section.blocks.append(Paragraph(f"{len(errors)} monitor evaluation(s) failed:", kind="warning"))
        section.blocks.append(
            Table(
                ["step", "experiment", "monitor", "error"],
                [[fmt_int(r.step), r.experiment, r.monitor, (r.error[:300], "code")] for r in errors],
                numeric=(0,),
            )
        )

    if run.acquisition is None:
        section.blocks.append(_note(f"Acquisition: not run (no {ACQUISITION})."))
    else:
        rows: list[list[Cell]] = []
        for name, items in run.acquisition.items():
            steps = [v["acquired_at_step"] for v in items.values() if v.get("acquired_at_step") is not None]
            exposures = [
                v["exposures_to_acquisition"] for v in items.values() if v.get("exposures_to_acquisition") is not None
            ]
            rows.append(
                [
                    name,
                    f"{len(steps):,} / {len(items):,}",
                    fmt_num(np.median(steps)) if steps else "–",
                    fmt_num(np.median(exposures)) if exposures else "–",
                ]
            )
        if rows:
            section.blocks.append(
                Table(
                    ["experiment", "items acquired", "median step of acquisition", "median exposures to acquisition"],
                    rows,
                    numeric=(1, 2, 3),
                    caption=f"From {ACQUISITION}.",
                )
            )
        else:
            section.blocks.append(_note(f"Acquisition: no data yet ({ACQUISITION} lists no experiment)."))
    return section


def _forgetting_figure(run: RunData, experiment: str, color: str) -> Figure | None:
    """The per-batch curves of a ``forgetting`` monitor's ``row_loss`` (docs/placement.md), if any."""
    records = [r for r in run.metric_records() if r.experiment == experiment and r.monitor == "forgetting" and r.group]
    if not records:
        return None
    by_batch: dict[str, list[tuple[int, float | None]]] = {}
    for r in records:
        by_batch.setdefault(str(r.group), []).append((r.step, r.effect.treated_mean))
    batches = {g: Series.from_pairs(p) for g, p in sorted(by_batch.items(), key=lambda kv: int(kv[0].split()[-1]))}
    control = Series.from_pairs([(r.step, r.effect.control_mean) for r in records])
    fig = plots.forgetting_curves(experiment, batches, control, color)
    caption = (
        f"{experiment}: mean row loss of each replaced batch at every evaluation (dotted: its injection step), "
        "and of the never-injected control rows."
    )
    return _figure(f"forgetting-{slug(experiment)}", fig, caption)


def _acquired(run: RunData, experiment: str) -> tuple[list[int], str]:
    items = (run.acquisition or {}).get(experiment)
    if not items:
        return [], ""
    steps = [int(v["acquired_at_step"]) for v in items.values() if v.get("acquired_at_step") is not None]
    return steps, f"item acquired ({len(steps)} of {len(items)})"


# --------------------------------------------------------------------------- 4. effect table


#: Where each alpha comes from, as the tables and verdict lines name it.
MONITORING_ALPHA_KEY = "monitoring.alpha"
INTERACTION_ALPHA_KEY = "interaction.alpha"


def verdict_of(p_holm: Any, p_value: Any, alpha: float) -> tuple[str, str]:
    """The one wording of a verdict, in the report and on the command line.

    ``significant`` / ``not significant`` at ``alpha`` on the Holm-corrected p when there
    is one, else on the raw p, marked ``(uncorrected)``; ``n/a`` without a p-value.
    Never "no effect": a test that does not reject says nothing about the effect's absence.
    """
    holm, p = finite(p_holm), finite(p_value)
    if not math.isnan(holm):
        return ("significant", "sig") if holm < alpha else ("not significant", "nonsig")
    if math.isnan(p):
        return ("n/a", "nonsig")
    return ("significant (uncorrected)", "sig") if p < alpha else ("not significant (uncorrected)", "nonsig")


def verdict(record: EffectRecord, alpha: float) -> Cell:
    """:func:`verdict_of` an effect record."""
    return verdict_of(record.p_holm, record.effect.p_value, alpha)


def effect_table(run: RunData) -> Section:
    section = Section("effects", "4. Effects at the last evaluation")
    step, records = run.last_effects()
    # A torn last line of metrics.jsonl (a killed run) held a record this table lacks.
    torn = run.dropped.get(RunDir(run.path).metrics.name)
    if step is None:
        section.blocks.append(_note("No data yet: no monitor evaluation has been recorded."))
        if torn:
            section.blocks.append(Paragraph(torn, kind="warning"))
        return section
    alpha = run.alpha
    when = {r.when for r in records if r.when}
    section.blocks.append(
        Paragraph(
            f"Last evaluation at step {step:,}"
            + (f" ({', '.join(sorted(when))})" if when else "")
            + f". Verdicts at alpha = {alpha:g} ({MONITORING_ALPHA_KEY}): primary metrics use the Holm-corrected "
            "p-value across the run's experiments; secondary metrics and groups have no Holm value and are judged "
            "on the raw p-value (marked uncorrected). The interaction tests have their own level "
            f"({INTERACTION_ALPHA_KEY})."
        )
    )
    if torn:
        section.blocks.append(Paragraph(torn, kind="warning"))
    rank = {n: i for i, n in enumerate(run.experiment_names)}
    ordered = sorted(records, key=lambda r: (rank.get(r.experiment, len(rank)), not r.primary, r.group is not None))
    rows: list[list[Cell]] = []
    for r in ordered:
        e = r.effect
        level = finite(e.ci_level)
        low, high = fmt_num(e.ci_low), fmt_num(e.ci_high)
        ci = "–" if low == "–" and high == "–" else f"[{low}, {high}]"
        if not math.isnan(level) and ci != "–":
            ci += f" ({level:.0%})"
        # The verdict and its p-values come right after the metric's name: a reader must
        # never scroll sideways to them (the HTML table also wraps inside its container).
        rows.append(
            [
                r.experiment,
                r.metric + (" (primary)" if r.primary else ""),
                r.group if r.group is not None else "all",
                verdict(r, alpha),
                fmt_num(r.p_holm, 3),
                fmt_num(e.p_value, 3),
                fmt_num(e.effect),
                ci,
                fmt_num(e.treated_mean),
                fmt_num(e.control_mean),
                f"{fmt_int(e.n_treated)} / {fmt_int(e.n_control)}",
                e.test,
            ]
        )
    section.blocks.append(
        Table(
            list(EFFECT_COLUMNS),
            rows,
            numeric=(4, 5, 6, 7, 8, 9, 10),
            caption=f"Verdict at alpha = {alpha:g} ({MONITORING_ALPHA_KEY}) on the Holm p (else the raw p).",
        )
    )
    return section


#: The effect table's columns: the verdict and p-values first, the details after.
EFFECT_COLUMNS = (
    "experiment",
    "metric",
    "group",
    "verdict",
    "Holm p",
    "p",
    "effect",
    "CI",
    "treated",
    "control",
    "n treated / control",
    "test",
)


# --------------------------------------------------------------------------- 5. controllers

MAX_SERIES = 8  # lines per controller panel; more would be unreadable


def controllers(run: RunData) -> Section:
    section = Section("controllers", "5. Controller trajectories")
    if run.controller is None:
        section.blocks.append(_note(f"Not run (no {CONTROLLER_LOG} in the run directory)."))
        return section
    if not run.controller:
        section.blocks.append(_note(f"No data yet: {CONTROLLER_LOG} holds no decision."))
        return section
    grouped: dict[str, list[dict[str, Any]]] = {}
    for r in run.controller:
        grouped.setdefault(str(r["experiment"]), []).append(r)
    trajectories: dict[str, dict[str, Series]] = {}
    booleans: set[tuple[str, str]] = set()
    truncated = False
    rows: list[list[Cell]] = []
    for name, records in grouped.items():
        trajectories[name] = {}
        for part in ("decision", "state"):
            pairs: dict[str, list[tuple[int, float | None]]] = {}
            flags: set[str] = set()
            for r in records:
                for key, value, is_bool in _numeric_leaves(r.get(part)):
                    pairs.setdefault(key, []).append((int(r["step"]), value))
                    if is_bool:
                        flags.add(key)
            truncated |= len(pairs) > MAX_SERIES
            for key, values in list(pairs.items())[:MAX_SERIES]:
                trajectories[name][f"{part}: {key}"] = Series.from_pairs(values)
                if key in flags:
                    booleans.add((name, f"{part}: {key}"))
        last = max(records, key=lambda r: int(r["step"]))
        text = json.dumps(last.get("decision"), sort_keys=True, default=str)
        rows.append(
            [
                name,
                str(last.get("controller", "–")),
                fmt_int(len(records)),
                fmt_int(last["step"]),
                (text if len(text) <= 160 else text[:157] + "...", "code"),
            ]
        )
    caption = (
        "Each numeric field of each controller's decisions and state over training steps, one axis per field "
        "(counts, thresholds, scores and flags have their own scales; flags are drawn as false/true steps)"
    )
    caption += f"; at most {MAX_SERIES} fields each of decision and state." if truncated else "."
    section.blocks.append(
        _figure("controllers", plots.controller_trajectories(trajectories, booleans=booleans), caption)
    )
    section.blocks.append(
        Table(
            ["experiment", "controller", "decisions", "last step", "last decision"],
            rows,
            numeric=(2, 3),
            caption=f"From {CONTROLLER_LOG}.",
        )
    )
    return section


def _numeric_leaves(value: Any, prefix: str = "") -> Iterable[tuple[str, float, bool]]:
    """``(dotted key, value, is_boolean)`` of every number in a JSON object."""
    if isinstance(value, dict):
        for key, v in value.items():
            yield from _numeric_leaves(v, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(value, bool) or (isinstance(value, (int, float)) and prefix):
        yield prefix, float(value), isinstance(value, bool)


# --------------------------------------------------------------------------- 6. interaction


def interaction(run: RunData) -> Section:
    section = Section("interaction", "6. Interaction matrix")
    matrix = run.interaction
    if matrix is None:
        section.blocks.append(_note(f"Not run (no {INTERACTION}; see `multirun interact`)."))
        return section
    cells = matrix["cells"]
    if not cells:
        section.blocks.append(_note(f"No data yet: {INTERACTION} holds no cell."))
        return section
    arms: list[str] = []
    columns: list[str] = []
    for c in cells:
        column = f"{c['experiment']}: {c['metric']}"
        if c["arm"] not in arms:
            arms.append(c["arm"])
        if column not in columns:
            columns.append(column)
    effect = np.full((len(arms), len(columns)), np.nan)
    p_holm = np.full_like(effect, np.nan)
    significant = np.zeros_like(effect, dtype=bool)
    diagonal = np.zeros_like(effect, dtype=bool)
    rows: list[list[Cell]] = []
    for c in cells:
        i, j = arms.index(c["arm"]), columns.index(f"{c['experiment']}: {c['metric']}")
        effect[i, j] = finite(c.get("effect"))
        significant[i, j] = bool(c.get("significant"))
        diagonal[i, j] = bool(c.get("diagonal"))
        p_holm[i, j] = finite(c.get("p_holm"))
        rows.append(
            [
                c["arm"],
                c["experiment"],
                c["metric"],
                ("significant", "sig") if c.get("significant") else ("not significant", "nonsig"),
                fmt_num(c.get("p_holm"), 3),
                fmt_num(c.get("p_value"), 3),
                fmt_num(c.get("effect")),
                f"[{fmt_num(c.get('ci_low'))}, {fmt_num(c.get('ci_high'))}]",
            ]
        )
    alpha = finite(matrix.get("alpha"))
    experiments = matrix.get("experiments") or []
    section.blocks.append(
        Paragraph(
            f"{len(arms)} arm(s) × {len(columns)} measured metric(s)"
            + (f" over experiments {', '.join(map(str, experiments))}" if experiments else "")
            + (
                f"; significance at alpha = {alpha:g} ({INTERACTION_ALPHA_KEY}, Holm)."
                if not math.isnan(alpha)
                else "."
            )
        )
    )
    if matrix.get("verdict"):
        start = matrix.get("start_step")
        design = (
            f"{matrix.get('steps')} steps per arm from step {start} ({matrix.get('checkpoint')}), "
            f"{matrix.get('intensity'):g} of the tokens per experiment. "
            if start is not None
            else ""
        )
        section.blocks.append(
            Paragraph(
                f"{design}Each cell: the change of the experiment's treated-minus-control gap against the baseline arm, "
                f"paired over probe items (permutation p, bootstrap CI). Verdict: {matrix['verdict']}."
            )
        )
    fig = plots.interaction_heatmap(
        arms, columns, effect, significant, diagonal, p_holm=p_holm, alpha=alpha if not math.isnan(alpha) else None
    )
    section.blocks.append(
        _figure(
            "interaction",
            fig,
            "Effect of each arm (rows) on each experiment's metric (columns). Only significant cells are coloured: "
            "by the effect's sign and the strength of the evidence (−log10 of the Holm p, one shared scale); "
            "non-significant cells stay white whatever their effect. ★ marks significant cells, a black box the "
            "diagonal (an experiment measured in its own arm); the text is the raw effect.",
        )
    )
    section.blocks.append(
        Table(
            ["arm", "experiment", "metric", "verdict", "Holm p", "p", "effect", "CI"],
            rows,
            numeric=(4, 5, 6, 7),
            caption=f"From {INTERACTION}; verdict at {INTERACTION_ALPHA_KEY} on the Holm p (Holm within each family).",
        )
    )
    return section


# --------------------------------------------------------------------------- 7. loss

TRAIN_LOSS_WINDOW = 10  # steps averaged when comparing training loss (one step is noisy)


def loss(run: RunData, baseline: RunData | None) -> Section:
    section = Section("loss", "7. Training and held-out loss")
    training, heldout = run.training_loss(), run.heldout_loss()
    b_training = baseline.training_loss() if baseline else None
    b_heldout = baseline.heldout_loss() if baseline else None
    if baseline is not None:
        b_status, _ = status_line(baseline)
        section.blocks.append(Paragraph(f"Baseline overlay: {baseline.run_name} ({baseline.path}). {b_status}"))
        if run.tokens_per_step and baseline.tokens_per_step and run.tokens_per_step != baseline.tokens_per_step:
            section.blocks.append(
                Paragraph(
                    f"The baseline trains {baseline.tokens_per_step:,} tokens per step, this run {run.tokens_per_step:,}: "
                    "curves over steps are not directly comparable.",
                    kind="warning",
                )
            )
    has_baseline = b_training is not None and b_heldout is not None and (len(b_training) or len(b_heldout))
    has_any = len(training) or len(heldout) or has_baseline
    if not has_any:
        section.blocks.append(
            _note("No data yet: no training loss (training.jsonl) and no held-out loss (metrics.jsonl) recorded.")
        )
        return section
    fig = plots.loss_curves(
        training,
        heldout,
        baseline_training=b_training,
        baseline_heldout=b_heldout,
        baseline_name=f"baseline: {baseline.run_name}" if baseline else "baseline",
    )
    section.blocks.append(
        _figure(
            "loss",
            fig,
            "Training loss per step (training.jsonl) and held-out loss per evaluation (metrics.jsonl)"
            + ("; the baseline run dashed." if baseline else "."),
        )
    )
    rows: list[list[Cell]] = []
    for label, mine, theirs, window in (
        ("held-out loss", heldout, b_heldout, 1),
        ("training loss", training, b_training, TRAIN_LOSS_WINDOW),
    ):
        rows.append(_loss_row(label, mine, theirs, window))
    columns = ["loss", "this run"] + (["baseline", "relative difference"] if baseline else [])
    section.blocks.append(
        Table(
            columns,
            [r[: len(columns)] for r in rows],
            numeric=tuple(range(1, len(columns))),
            caption=f"Values at the last step both runs reached (else each run's last); training loss averaged over the "
            f"last {TRAIN_LOSS_WINDOW} such steps. Relative difference = (this run − baseline) / baseline.",
        )
    )
    if baseline is not None:
        _, _, diff, step = compare_end(heldout, b_heldout)
        if math.isnan(diff):
            section.blocks.append(_note("Held-out loss: no evaluation to compare with the baseline yet."))
        else:
            section.blocks.append(
                Paragraph(f"Held-out loss at the end (step {step:,}): {diff:+.2%} relative to the baseline.")
            )
    return section


def compare_end(mine: Series, theirs: Series | None, window: int = 1) -> tuple[float, float, float, int]:
    """(this run's value, the baseline's value, relative difference, step) at the end.

    "The end" is the last step both runs reached (the mean over the last ``window``
    such steps); without a common step, each run's own last ``window`` values.
    Relative difference = (mine − theirs) / theirs; NaN where a side has no data.
    """
    if theirs is not None and len(mine) and len(theirs):
        common = np.intersect1d(mine.steps, theirs.steps)
        if common.size:
            steps = common[-window:]
            a = _mean([mine.at(int(s)) for s in steps])
            b = _mean([theirs.at(int(s)) for s in steps])
            return a, b, (a - b) / b if b else math.nan, int(steps[-1])
    a = _mean(mine.values[-window:]) if len(mine) else math.nan
    b = _mean(theirs.values[-window:]) if theirs is not None and len(theirs) else math.nan
    step = int(mine.steps[-1]) if len(mine) else -1
    return a, b, (a - b) / b if b else math.nan, step


def _mean(values: Iterable[float]) -> float:
    array = np.asarray(list(values), dtype=np.float64)
    array = array[~np.isnan(array)]
    return float(array.mean()) if array.size else math.nan


def _loss_row(label: str, mine: Series, theirs: Series | None, window: int) -> list[Cell]:
    a, b, diff, step = compare_end(mine, theirs, window)
    at = f" (step {step:,})" if step >= 0 else ""
    return [
        label,
        "–" if math.isnan(a) else f"{a:.4g}{at}",
        "–" if math.isnan(b) else f"{b:.4g}",
        "–" if math.isnan(diff) else f"{diff:+.2%}",
    ]
