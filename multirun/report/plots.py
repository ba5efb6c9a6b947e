"""The report's figures, drawn with matplotlib's Agg canvas (no display, no pyplot).

Each function takes plain numbers and returns a :class:`matplotlib.figure.Figure`;
:func:`png_bytes` renders it. Figures are built without ``pyplot`` so no global
backend or figure registry is touched: safe inside a training process or a test.
"""

from __future__ import annotations

import io
import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import matplotlib
import numpy as np

# The Agg canvas is attached per figure: matplotlib.use() would switch the backend
# of whoever imported us (a notebook, a training process), so it is never called.
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Normalize, to_hex
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from multirun.report.rundata import Series

WIDTH = 8.0  # inches; at DPI 110 the PNG is ~880 px, the HTML column's width
DPI = 110
BASELINE_COLOR = "#7a7a7a"
MAX_BARS = 80  # binned over more steps than this: a bar per bin, not per step


def palette(names: Sequence[str]) -> dict[str, str]:
    """A stable colour per experiment (tab10, then tab20), in run order."""
    cmap = matplotlib.colormaps["tab10" if len(names) <= 10 else "tab20"]
    return {name: to_hex(cmap(i % cmap.N)) for i, name in enumerate(names)}


def png_bytes(fig: Figure) -> bytes:
    """Render ``fig`` as PNG (no timestamp in the metadata: identical runs, identical files)."""
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    return buffer.getvalue()


def _figure(height: float, width: float = WIDTH) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _style(ax) -> None:
    ax.spines[["top", "right"]].set_visible(False)
    ax.grid(True, color="#e6e9ef", linewidth=0.8)
    ax.set_axisbelow(True)


def token_share(names: Sequence[str], shares: Sequence[float], colors: Mapping[str, str]) -> Figure:
    """Horizontal bars: share of training tokens each experiment overwrote (percent)."""
    fig = _figure(0.9 + 0.38 * len(names))
    ax = fig.add_subplot()
    y = np.arange(len(names))[::-1]
    percent = np.asarray(shares, dtype=float) * 100
    ax.barh(y, percent, color=[colors[n] for n in names], height=0.6)
    ax.set_yticks(y, labels=list(names))
    ax.set_xlabel("share of training tokens (%)")
    top = float(np.nanmax(percent)) if len(percent) and np.isfinite(percent).any() else 1.0
    ax.set_xlim(0, max(top, 1e-9) * 1.18)
    for yi, p in zip(y, percent):
        ax.text(p, yi, f" {p:.3g}%", va="center", fontsize=9)
    _style(ax)
    ax.grid(False, axis="y")
    return fig


def injected_tokens(
    steps: Mapping[str, np.ndarray],
    lengths: Mapping[str, np.ndarray],
    colors: Mapping[str, str],
    *,
    num_steps: int,
    steps_reached: int,
    cap_tokens: float | None = None,
) -> Figure:
    """Stacked bars of injected tokens per step (mean per step within a bin) by experiment."""
    width = max(1, math.ceil(num_steps / MAX_BARS))
    n_bins = max(1, math.ceil(num_steps / width))
    left = np.arange(n_bins) * width
    fig = _figure(3.4)
    ax = fig.add_subplot()
    bottom = np.zeros(n_bins)
    for name in steps:
        if steps[name].size == 0:
            continue
        per_bin = np.bincount(steps[name] // width, weights=lengths[name], minlength=n_bins)[:n_bins] / width
        ax.bar(left, per_bin, width=width * 0.92, align="edge", bottom=bottom, color=colors[name], label=name)
        bottom += per_bin
    if cap_tokens is not None:
        ax.axhline(cap_tokens, color="#b03a2e", linestyle="--", linewidth=1, label="cap per step")
    if steps_reached < num_steps:
        ax.axvspan(steps_reached, num_steps, color="#eeeeee", zorder=0, label="not trained yet")
    ax.set_xlim(0, num_steps)
    ax.set_xlabel("step")
    ax.set_ylabel("injected tokens per step" + (f"\n(mean over {width} steps)" if width > 1 else ""))
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8, frameon=False)
    _style(ax)
    return fig


def exposure_histograms(exposures: Mapping[str, np.ndarray], colors: Mapping[str, str]) -> Figure:
    """One histogram per experiment: how many spans each treated item got (0 = never placed yet)."""
    names = list(exposures)
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig = _figure(2.3 * rows + 0.3)
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, name in zip(axes.flat, names):
        counts = exposures[name]
        top = int(counts.max()) if counts.size else 0
        # One bar per exposure count while that stays readable, else automatic bins.
        bins = np.arange(-0.5, top + 1.5, 1.0) if top <= MAX_BARS else "auto"
        ax.hist(counts, bins=bins, color=colors[name], rwidth=0.85)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("exposures (spans) per item", fontsize=9)
        ax.set_ylabel("items", fontsize=9)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.yaxis.get_major_locator().set_params(integer=True)
        _style(ax)
    for ax in list(axes.flat)[len(names) :]:
        ax.set_visible(False)
    return fig


@dataclass(frozen=True)
class CurveMark:
    """A point drawn over the metric curves: one metric of an evaluation outside training
    (``multirun evaluate``) at a known step."""

    label: str
    step: int
    treated: float
    control: float
    effect: float


#: Markers of the marked evaluations, in order (the curves use circles and squares).
MARK_STYLES = ("D", "^", "v", "P", "X", "*", "h")


def metric_curves(
    experiment: str,
    metrics: Mapping[str, Mapping[str, Series]],
    color: str,
    *,
    acquired_steps: Sequence[int] = (),
    acquisition_label: str = "",
    marks: Mapping[str, Sequence[CurveMark]] | None = None,
) -> Figure:
    """Per metric: treated vs control mean (top) and the effect with its CI band (bottom).

    ``metrics[name]`` holds Series ``treated``, ``control``, ``effect``, ``ci_low``,
    ``ci_high`` (all over the same evaluation steps); ``marks[name]`` are points of
    evaluations of saved weights, drawn with a marker per label.
    """
    names = list(metrics)
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig = _figure(4.2 * rows, WIDTH if cols > 1 else WIDTH * 0.8)
    grid = fig.add_gridspec(2 * rows, cols, height_ratios=[3, 2] * rows)
    for index, metric in enumerate(names):
        r, c = divmod(index, cols)
        top = fig.add_subplot(grid[2 * r, c])
        bottom = fig.add_subplot(grid[2 * r + 1, c], sharex=top)
        m = metrics[metric]
        treated, control = m["treated"], m["control"]
        top.plot(treated.steps, treated.values, marker="o", markersize=3.5, color=color, label="treated")
        top.plot(control.steps, control.values, marker="s", markersize=3.5, color=BASELINE_COLOR, label="control")
        top.set_title(metric, fontsize=10)
        top.set_ylabel("mean score", fontsize=9)
        effect, low, high = m["effect"], m["ci_low"], m["ci_high"]
        bottom.fill_between(effect.steps, low.values, high.values, color=color, alpha=0.2, linewidth=0, label="CI")
        bottom.plot(effect.steps, effect.values, marker="o", markersize=3.5, color=color, label="effect")
        bottom.axhline(0, color="#444444", linewidth=0.8)
        bottom.set_xlabel("step", fontsize=9)
        bottom.set_ylabel("effect", fontsize=9)
        for i, step in enumerate(sorted(set(acquired_steps))):
            for ax in (top, bottom):
                ax.axvline(
                    step,
                    color="#2e7d32",
                    linestyle=":",
                    linewidth=1,
                    label=(acquisition_label or "item acquired") if i == 0 and ax is top else None,
                )
        _draw_marks(top, bottom, (marks or {}).get(metric, ()), color)
        for ax in (top, bottom):
            _style(ax)
            ax.tick_params(labelsize=8)
        top.tick_params(labelbottom=False)
        top.legend(fontsize=7.5, frameon=False)
        bottom.legend(fontsize=7.5, frameon=False)
    fig.suptitle(experiment, fontsize=11, fontweight="bold")
    return fig


def _draw_marks(top, bottom, marks: Sequence[CurveMark], color: str) -> None:
    """Each label's points: treated (filled) and control (grey) on top, the effect below."""
    labels = list(dict.fromkeys(m.label for m in marks))
    for index, label in enumerate(labels):
        mine = [m for m in marks if m.label == label]
        style = dict(marker=MARK_STYLES[index % len(MARK_STYLES)], s=46, edgecolors="black", linewidths=0.8, zorder=5)
        steps = [m.step for m in mine]
        top.scatter(steps, [m.treated for m in mine], color=color, label=label, **style)
        top.scatter(steps, [m.control for m in mine], color=BASELINE_COLOR, **style)
        bottom.scatter(steps, [m.effect for m in mine], color=color, label=label, **style)


def controller_trajectories(
    experiments: Mapping[str, Mapping[str, Series]],
    *,
    booleans: Collection[tuple[str, str]] = (),
) -> Figure:
    """One axis per controller field: ``experiments[name][field]`` over steps.

    Booleans, counts, thresholds and scores live on unrelated scales, so no two fields
    share an axis; a ``(name, field)`` in ``booleans`` is drawn as a false/true step line.
    An experiment's fields fill rows of at most three axes, under its name.
    """
    names = list(experiments)
    flags = set(booleans)
    cols = 3
    rows_per = {name: max(1, math.ceil(len(experiments[name]) / cols)) for name in names}
    total_rows = sum(rows_per.values()) or 1
    fig = _figure(1.9 * total_rows + 0.4)
    grid = fig.add_gridspec(total_rows, cols)
    row = 0
    for name in names:
        fields = list(experiments[name])
        if not fields:
            ax = fig.add_subplot(grid[row, :])
            ax.set_title(name, fontsize=10)
            ax.text(0.5, 0.5, "no numeric fields", ha="center", va="center", transform=ax.transAxes, color="#888888")
            ax.set_axis_off()
        for index, field in enumerate(fields):
            r, c = divmod(index, cols)
            ax = fig.add_subplot(grid[row + r, c])
            s = experiments[name][field]
            if (name, field) in flags:
                ax.step(s.steps, s.values, where="post", marker="o", markersize=3)
                ax.set_yticks([0, 1], labels=["false", "true"])
                ax.set_ylim(-0.2, 1.2)
            else:
                ax.plot(s.steps, s.values, marker="o", markersize=3)
            ax.set_title(f"{name}: {field}", fontsize=8.5)
            ax.set_xlabel("step", fontsize=8)
            _style(ax)
            ax.tick_params(labelsize=7.5)
        row += rows_per[name]
    return fig


def interaction_heatmap(
    arms: Sequence[str],
    columns: Sequence[str],
    effect: np.ndarray,
    significant: np.ndarray,
    diagonal: np.ndarray,
    *,
    p_holm: np.ndarray | None = None,
    alpha: float | None = None,
) -> Figure:
    """Arms (rows) x measured metric (columns), coloured by significance on one shared scale.

    A cell's colour is ``sign(effect) * -log10(Holm p)`` for a significant cell and 0
    (white) for any other, on one symmetric scale for the whole matrix: metrics live on
    different scales, so the effect itself cannot be coloured comparably, and scaling each
    column to its own largest effect made non-significant cells look strong. The cell
    text is the raw effect; a star marks a significant cell, a black box a diagonal one
    (an experiment's own metric in its own arm). Without ``p_holm``, significant cells get
    the sign of their effect at full strength.
    """
    strength = np.ones_like(effect, dtype=float)
    if p_holm is not None:
        with np.errstate(divide="ignore", invalid="ignore"):
            strength = -np.log10(np.clip(np.asarray(p_holm, dtype=float), 1e-300, 1.0))
    colour = np.where(significant, np.sign(np.nan_to_num(effect)) * np.nan_to_num(strength), 0.0)
    colour = np.where(np.isnan(effect), np.nan, colour)
    floor = -math.log10(alpha) if alpha else 1.0
    finite_colour = colour[np.isfinite(colour)]
    limit = max(2.0 * floor, float(np.abs(finite_colour).max()) if finite_colour.size else 0.0)
    fig = _figure(0.9 + 0.5 * len(arms), max(5.0, min(WIDTH, 2.2 + 1.1 * len(columns))))
    ax = fig.add_subplot()
    cmap = matplotlib.colormaps["RdBu_r"].with_extremes(bad="#eeeeee")
    image = ax.imshow(np.ma.masked_invalid(colour), cmap=cmap, norm=Normalize(-limit, limit), aspect="auto")
    for i in range(len(arms)):
        for j in range(len(columns)):
            value = effect[i, j]
            text = "–" if np.isnan(value) else f"{value:.3g}" + (" ★" if significant[i, j] else "")
            dark = not np.isnan(colour[i, j]) and abs(colour[i, j]) > 0.6 * limit
            ax.text(
                j,
                i,
                text,
                ha="center",
                va="center",
                fontsize=8,
                color="white" if dark else "#1f2430",
                fontweight="bold" if significant[i, j] else "normal",
            )
            if diagonal[i, j]:
                ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=1.6))
    ax.set_xticks(range(len(columns)), labels=list(columns), rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(arms)), labels=list(arms), fontsize=8)
    ax.set_xlabel("measured (experiment: metric)")
    ax.set_ylabel("arm")
    label = "sign(effect) × −log10(Holm p); 0: not significant" if p_holm is not None else "sign of significant effect"
    fig.colorbar(image, ax=ax, label=label, shrink=0.85)
    return fig


def forgetting_curves(experiment: str, batches: Mapping[str, Series], control: Series, color: str) -> Figure:
    """Each replaced batch's mean row loss over training (one line per batch), the
    never-injected controls' in grey: the forgetting curves of a ``whole: batch`` experiment."""
    fig = _figure(3.4, WIDTH * 0.8)
    ax = fig.subplots(1, 1)
    shades = np.linspace(0.35, 1.0, max(len(batches), 1))
    for shade, (label, series) in zip(shades, batches.items()):
        ax.plot(series.steps, series.values, marker="o", markersize=3, color=color, alpha=float(shade), label=label)
        step = label.split()[-1]
        if step.isdigit():  # the batch's injection step
            ax.axvline(int(step), color=color, alpha=float(shade) * 0.5, linestyle=":", linewidth=1)
    ax.plot(control.steps, control.values, marker="s", markersize=3, color=BASELINE_COLOR, label="control")
    ax.set_xlabel("step", fontsize=9)
    ax.set_ylabel("row loss (nats/token)", fontsize=9)
    _style(ax)
    ax.tick_params(labelsize=8)
    ax.legend(fontsize=7.5, frameon=False, ncol=2)
    fig.suptitle(f"{experiment}: forgetting curves", fontsize=11, fontweight="bold")
    return fig


def loss_curves(
    training: Series,
    heldout: Series,
    *,
    baseline_training: Series | None = None,
    baseline_heldout: Series | None = None,
    baseline_name: str = "baseline",
) -> Figure:
    """Training loss (left) and held-out loss (right); the baseline run dashed in grey."""
    fig = _figure(3.3)
    left, right = fig.subplots(1, 2)
    panels = ((left, training, baseline_training, "training loss"), (right, heldout, baseline_heldout, "held-out loss"))
    for ax, run, base, title in panels:
        if len(run):
            ax.plot(
                run.steps,
                run.values,
                color="#2f5d9e",
                linewidth=1.2,
                marker="o" if len(run) < 40 else None,
                markersize=3,
                label="this run",
            )
        if base is not None and len(base):
            ax.plot(
                base.steps,
                base.values,
                color=BASELINE_COLOR,
                linestyle="--",
                linewidth=1.2,
                marker="s" if len(base) < 40 else None,
                markersize=3,
                label=baseline_name,
            )
        if not len(run) and (base is None or not len(base)):
            ax.text(0.5, 0.5, "no data yet", ha="center", va="center", transform=ax.transAxes, color="#888888")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step", fontsize=9)
        ax.set_ylabel("loss (nats/token)", fontsize=9)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, frameon=False)
        _style(ax)
    return fig
