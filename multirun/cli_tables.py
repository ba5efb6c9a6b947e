"""The tables and lines `multirun` prints: plan, ledger summary, effects, interaction matrix, ledger rows.

One :data:`console` for every command (full width when stdout is not a terminal, so
tables in logs are not wrapped); the report's HTML and Markdown are in
:mod:`multirun.report`.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    import pyarrow as pa

    from multirun.interaction.arms import InteractionResult
    from multirun.plan.run_plan import RunPlan

__all__ = [
    "console",
    "print_effects",
    "print_interaction",
    "print_ledger_summary",
    "print_plan",
    "print_rows",
    "print_summary",
]

console = Console(width=None if sys.stdout.isatty() or "COLUMNS" in os.environ else 240)


def print_interaction(result: InteractionResult) -> None:
    from multirun.measure.stats import format_p

    matrix = result.matrix
    console.print(
        f"{len(result.arms)} arms x {matrix.get('steps')} steps from step {result.start_step} "
        f"({result.checkpoint}) in {result.seconds:.0f} s"
    )
    from multirun.report.sections import INTERACTION_ALPHA_KEY

    alpha = matrix.get("alpha")
    at = f"alpha {alpha:g} from {INTERACTION_ALPHA_KEY}" if isinstance(alpha, (int, float)) else INTERACTION_ALPHA_KEY
    table = Table(
        title="interaction matrix: change in each experiment's treated-control gap (vs the baseline arm); "
        f"verdict at {at}, Holm within each family"
    )
    for column in ("arm", "measured", "verdict", "p (Holm)", "p", "effect", "95% CI"):
        table.add_column(column, justify="right" if column in ("effect", "95% CI", "p", "p (Holm)") else "left")
    for c in matrix["cells"]:
        if "error" in c:
            table.add_row(c["arm"], c["experiment"], f"[red]{c['error']}[/]")
            continue
        if c["significant"]:
            # Off the diagonal a significant cell is an interaction; on it, the experiment's own effect.
            verdict = "[red]significant (interaction)[/]" if c["family"] == "off_diagonal" else "[green]significant[/]"
        else:
            verdict = "not significant"
        table.add_row(
            c["arm"],
            f"{c['experiment']}" + (" (own)" if c["diagonal"] else ""),
            verdict,
            format_p(c.get("p_holm")) if c.get("p_holm") is not None else "",
            format_p(c.get("p_value")),
            _sig(c.get("effect")),
            f"[{_sig(c.get('ci_low'))}, {_sig(c.get('ci_high'))}]",
        )
    console.print(table)
    console.print(f"[bold]{matrix['verdict']}[/]")
    console.print(f"matrix: {result.out_dir / 'matrix.json'} and matrix.csv")


def print_plan(plan: RunPlan) -> None:
    geometry = plan.geometry
    table = Table(
        title=f"plan: {geometry.num_steps} steps x {geometry.global_batch_size} rows x {geometry.sequence_length} tokens"
    )
    for column in ("experiment", "kind", "treated", "control", "spans", "tokens", "share", "steps"):
        table.add_column(column, justify="right" if column not in ("experiment", "kind") else "left")
    for entry in plan.manifest()["experiments"]:
        placement = entry["placement"]
        table.add_row(
            entry["name"],
            entry["kind"],
            str(entry["treated_items"]),
            str(entry["control_items"]),
            str(entry["planned_spans"]),
            str(entry["planned_tokens"]),
            f"{entry['planned_tokens'] / max(geometry.total_tokens, 1):.4%}",
            f"{placement['start_step']}-{placement['end_step']}",
        )
    console.print(table)


def print_summary(summary: dict) -> None:
    console.print(f"trained {summary['steps_trained']} steps, {summary['tokens_trained']:,} tokens")
    print_ledger_summary(summary["experiments"])
    if summary.get("effects"):
        print_effects(summary["effects"], alpha=summary.get("alpha", 0.01))
    if summary.get("heldout_loss") is not None:
        console.print(f"held-out loss at the end: {summary['heldout_loss']:.4f} nats/token")
    missed = {k: v for k, v in summary.get("missed_spans", {}).items() if v}
    if missed:
        console.print(f"[yellow]spans that found no row (short batches): {missed}[/]")


def print_ledger_summary(rows: list[dict], title: str | None = None) -> None:
    table = Table(title=title or "ledger: injected spans per experiment")
    columns = ("experiment", "spans", "tokens", "share", "items", "exposures/item", "first step", "last step")
    for column in columns:
        table.add_column(column, justify="left" if column == "experiment" else "right")
    for row in rows:
        exposures = row.get("exposures_per_item") or {}
        share = row.get("share_of_training_tokens")
        table.add_row(
            str(row["experiment"]),
            str(row["spans"]),
            str(row["tokens"]),
            "-" if share is None else f"{share:.4%}",
            str(row.get("items_exposed")),
            f"{exposures.get('min', '-')}/{_fmt(exposures.get('mean'))}/{exposures.get('max', '-')}",
            str(row.get("first_step")),
            str(row.get("last_step")),
        )
    console.print(table)


def print_effects(effects: list[dict], *, alpha: float) -> None:
    """Each experiment's metrics against its controls: verdict and p-values first, as in the report."""
    from multirun.measure.stats import format_p
    from multirun.report.sections import MONITORING_ALPHA_KEY, verdict_of

    table = Table(
        title=f"effects against never-injected controls (verdict at alpha {alpha:g} from {MONITORING_ALPHA_KEY}, "
        "on the Holm-corrected p; without one, on the raw p, marked uncorrected)"
    )
    for column in (
        "experiment",
        "metric",
        "group",
        "verdict",
        "p (Holm)",
        "p",
        "effect",
        "95% CI",
        "treated",
        "control",
    ):
        table.add_column(column, justify="left" if column in ("experiment", "metric", "group", "verdict") else "right")
    for r in effects:
        if "error" in r:
            table.add_row(r["experiment"], r.get("monitor", ""), "", f"[red]failed: {r['error']}[/]")
            continue
        holm = r.get("p_holm")
        text, cls = verdict_of(holm, r.get("p_value"), alpha)
        table.add_row(
            r["experiment"],
            r["metric"],
            r.get("group") or "",
            f"[green]{text}[/]" if cls == "sig" else text,
            format_p(holm) if holm is not None else "",
            format_p(r.get("p_value")),
            _fmt(r.get("effect")),
            f"[{_fmt(r.get('ci_low'))}, {_fmt(r.get('ci_high'))}]",
            _fmt(r.get("treated_mean")),
            _fmt(r.get("control_mean")),
        )
    console.print(table)


def print_rows(table: pa.Table, limit: int) -> None:
    # The columns docs/ledger.md explains; export for all of them (local_row, arm, row_fingerprint...).
    columns = [
        "step",
        "rank",
        "global_row",
        "sample_id",
        "offset",
        "length",
        "experiment",
        "item",
        "sequence",
        "repetition",
        "token_hash",
    ]
    out = Table(title=f"{table.num_rows} matching spans" + (f" (first {limit})" if table.num_rows > limit else ""))
    for column in columns:
        out.add_column(column)
    head = table.slice(0, limit).to_pylist()
    for row in head:
        out.add_row(*(str(row[c]) for c in columns))
    console.print(out)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _sig(value: float | None) -> str:
    """Three significant digits: interaction effects are often far below 0.01."""
    return "-" if value is None else f"{value:.3g}"
