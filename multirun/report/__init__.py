"""Post-run analysis report: one self-contained HTML file and a Markdown twin.

``build_report`` reads only the run directory (and a baseline run directory, if
given) and works on a finished or an interrupted run. It writes into ``out_dir``
(default ``RUN_DIR/report/``)::

    report.html      inline CSS, plots embedded as base64 PNG data URIs, no scripts, no network
    report.md        the same content; figures link to plots/*.png
    plots/NN-*.png   every figure of the report, in document order

Sections: run overview, provenance (ledger), metrics over training, effects at the
last evaluation, controller trajectories, interaction matrix, training and held-out
loss (with a baseline run overlaid), and evaluations of saved weights (``multirun evaluate``,
also marked on the metric curves). Optional inputs that are absent render as
"not run"; sections without data yet say "no data yet".

Example::

    paths = build_report("runs/demo", baseline="runs/clean")
    paths.html   # PosixPath('runs/demo/report/report.html')
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from multirun.report import evaluations, sections
from multirun.report.document import Document, Figure, render_html, render_markdown
from multirun.report.plots import palette
from multirun.report.rundata import RunData, load_run
from multirun.run_dir import RunDir

__all__ = ["ReportPaths", "RunData", "build_report", "load_run"]

PLOTS_DIRNAME = "plots"


@dataclass
class ReportPaths:
    """Where :func:`build_report` wrote the report."""

    html: Path
    markdown: Path
    plots: list[Path]


def build_report(
    run_dir: str | Path,
    *,
    baseline: str | Path | None = None,
    out_dir: str | Path | None = None,
) -> ReportPaths:
    """Write ``report.html``, ``report.md`` and ``plots/*.png`` for a run directory.

    Args:
        run_dir: the run directory (``manifest.json``, ledger, ``metrics.jsonl``, ...).
        baseline: another run directory whose training and held-out loss are overlaid
            (e.g. the same model trained without injection).
        out_dir: where to write; default ``RUN_DIR/report``. PNG files left in its
            ``plots/`` folder by an earlier report are replaced.

    Raises:
        InputError: ``run_dir`` (or ``baseline``) is not a run directory, or one of
            its files is malformed (naming the file and line).
    """
    run = load_run(run_dir)
    base = load_run(baseline) if baseline is not None else None
    out = Path(out_dir) if out_dir is not None else RunDir(run.path).report
    document = build_document(run, base)

    figures = [b for s in document.sections for b in s.blocks if isinstance(b, Figure)]
    names = {f.key: f"{i:02d}-{f.key}.png" for i, f in enumerate(figures, start=1)}
    plots_dir = out / PLOTS_DIRNAME
    plots_dir.mkdir(parents=True, exist_ok=True)
    for stale in plots_dir.glob("*.png"):  # a report of fewer figures must not leave old ones behind
        stale.unlink()
    plot_paths = []
    for figure in figures:
        path = plots_dir / names[figure.key]
        _write_atomic(path, figure.png)
        plot_paths.append(path)
    html_path, md_path = out / "report.html", out / "report.md"
    _write_atomic(html_path, render_html(document, names).encode("utf-8"))
    _write_atomic(md_path, render_markdown(document, names).encode("utf-8"))
    return ReportPaths(html=html_path, markdown=md_path, plots=plot_paths)


def build_document(run: RunData, baseline: RunData | None = None) -> Document:
    """The report's content (sections, tables, rendered figures) before it is written."""
    colors = palette(run.experiment_names)
    document = Document(
        title=f"multirun report: {run.run_name}",
        subtitle=f"{run.path.resolve()} · {sections.short_status(run)}",
        sections=[
            sections.overview(run, colors),
            sections.provenance(run, colors),
            sections.metric_curves(run, colors, marks=evaluations.curve_marks(run)),
            sections.effect_table(run),
            sections.controllers(run),
            sections.interaction(run),
            sections.loss(run, baseline),
            evaluations.section(run),
        ],
    )
    keys = [b.key for s in document.sections for b in s.blocks if isinstance(b, Figure)]
    if len(keys) != len(set(keys)):  # two experiments whose names slug alike: keep both files
        seen: dict[str, int] = {}
        for s in document.sections:
            for b in s.blocks:
                if isinstance(b, Figure):
                    seen[b.key] = seen.get(b.key, 0) + 1
                    if seen[b.key] > 1:
                        b.key = f"{b.key}-{seen[b.key]}"
    return document


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
