"""``multirun inspect``: the rows of one training step as the model trained on them, injected spans marked.

The step's global batch is read again from the run's dataset in training order: a
Streaming dataset with the run's shuffle, seed and ``num_canonical_nodes``, in one
process, with the whole global batch as its batch size, resumed at the step's first
sample of the step's epoch (``load_state_dict``'s ``sample_in_epoch``, as Composer
resumes), so only the step's own samples are read. Streaming gives every world size the
same samples per global step when ``num_canonical_nodes`` is pinned; the rows are then
ordered as :func:`multirun.inject.batch.global_rows` orders them (sample id, then
position). The ledger's spans of the step are written over those rows with the tokens
of their sequences, then the removals ledger's spans (``removal`` experiments) with
their replacement.

Nothing is taken on trust: every span's row must have the ledger's ``sample_id`` and
``row_fingerprint`` (xxh64 of the original row), and the written tokens must hash to its
``token_hash``; otherwise :class:`BatchViewError` says the dataset changed or the order
could not be reproduced.

Example::

    view = view_step("runs/demo", 120)
    print(render_plain(view))
    write_html(view, "step-120.html")
"""

from __future__ import annotations

import html
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from multirun.data.tokenizers import Tokenizer
from multirun.errors import InputError, MultirunError
from multirun.export import RunContents, open_run
from multirun.ledger import token_hash
from multirun.run_dir import RunDir

__all__ = [
    "BatchViewError",
    "MarkedSpan",
    "StepRow",
    "StepView",
    "render_plain",
    "render_rich",
    "view_step",
    "write_html",
]

#: Colours of the experiments' spans, by the experiment's position in the config.
PALETTE = ("#ffd166", "#8ecae6", "#b5e48c", "#f4a261", "#cdb4db", "#ff8fab", "#90dbf4", "#e9c46a")
_RICH_PALETTE = ("yellow", "cyan", "green", "dark_orange", "magenta", "bright_red", "bright_blue", "gold3")


class BatchViewError(MultirunError):
    """The step's rows read again do not match what the ledger recorded."""


@dataclass(frozen=True)
class MarkedSpan:
    """One injected span of a row, with the tokens it wrote and those it replaced."""

    experiment: str
    experiment_index: int
    item: str
    sequence: int
    repetition: int
    offset: int
    length: int
    token_hash: int
    tokens: np.ndarray
    replaced: np.ndarray

    @classmethod
    def of_ledger_row(
        cls, span: dict[str, Any], names: list[str], *, tokens: np.ndarray, replaced: np.ndarray
    ) -> MarkedSpan:
        """The span a ledger (or removals ledger) row describes, with its written and replaced tokens."""
        return cls(
            experiment=span["experiment"],
            experiment_index=names.index(span["experiment"]),
            item=span["item"],
            sequence=int(span["sequence"]),
            repetition=int(span["repetition"]),
            offset=int(span["offset"]),
            length=int(span["length"]),
            token_hash=int(span["token_hash"]),
            tokens=tokens,
            replaced=replaced,
        )

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass(frozen=True)
class StepRow:
    """One global row of the step: the stored row and the row the model trained on."""

    global_row: int
    sample_id: int
    original: np.ndarray
    trained: np.ndarray
    spans: tuple[MarkedSpan, ...]

    def segments(self) -> list[tuple[np.ndarray, MarkedSpan | None]]:
        """The trained row cut into untouched pieces (None) and spans, in order."""
        out: list[tuple[np.ndarray, MarkedSpan | None]] = []
        position = 0
        for span in self.spans:
            if span.offset > position:
                out.append((self.trained[position : span.offset], None))
            out.append((self.trained[span.offset : span.end], span))
            position = span.end
        if position < self.trained.shape[0]:
            out.append((self.trained[position:], None))
        return out


@dataclass(frozen=True)
class StepView:
    """Step ``step`` of a run: its rows in global-row order, with the ledger's spans."""

    run_dir: Path
    step: int
    epoch: int
    sample_in_epoch: int
    world_size: int
    rows: tuple[StepRow, ...]
    experiments: tuple[str, ...]
    tokenizer: Tokenizer

    @property
    def span_count(self) -> int:
        return sum(len(r.spans) for r in self.rows)

    def header(self) -> str:
        return (
            f"step {self.step} of {self.run_dir} (epoch {self.epoch}, samples {self.sample_in_epoch}-"
            f"{self.sample_in_epoch + len(self.rows) - 1} of the epoch): {len(self.rows)} rows x "
            f"{self.rows[0].trained.shape[0] if self.rows else 0} tokens, {self.span_count} injected spans"
        )


def view_step(run_dir: str | os.PathLike[str], step: int, *, contents: RunContents | None = None) -> StepView:
    """Read step ``step``'s rows in training order and apply the ledger's spans of that step.

    Args:
        run_dir: a run directory of ``multirun train``.
        step: the global step (0-based, Composer's batch count when it was drawn).
        contents: the run already read by :func:`multirun.export.open_run` (saves preparing it again).

    Raises:
        InputError: an llm-foundry run, a step outside the run, a dataset that is not
            multirun's MDS.
        BatchViewError: the rows read again do not carry the ledger's sample ids or
            fingerprints, or a span's tokens do not hash to its ``token_hash``.
    """
    from multirun.data.order import read_training_steps
    from multirun.inject.batch import row_fingerprints
    from multirun.inject.boundary import inserted_row
    from multirun.run.inputs import resolve_dataset

    root = Path(run_dir)
    files = RunDir(root)
    if files.llmfoundry_config.is_file():
        raise InputError(
            "multirun inspect does not support llm-foundry runs yet: their rows come from llm-foundry's dataloader "
            "(without sample ids); use `multirun ledger --steps` for the spans of a step",
            file=files.llmfoundry_config,
        )
    contents = contents if contents is not None else open_run(root)
    geometry = contents.geometry
    trained_steps = int(contents.summary["steps_trained"]) if contents.summary else geometry.num_steps
    if not 0 <= step < trained_steps:
        raise InputError(f"step {step} is outside the run's steps 0..{trained_steps - 1}", key="--step")
    config = contents.loaded.config
    dataset = resolve_dataset(contents.loaded, contents.tokenizer, progress=False)
    world = _world_size(contents)
    batch = geometry.global_batch_size
    # Steps per epoch as the run's Trainer counted them: each rank drops its last partial batch.
    steps_per_epoch = math.ceil(dataset.num_samples / world) // (batch // world)
    epoch, step_in_epoch = divmod(step, steps_per_epoch)
    first = step_in_epoch * batch

    try:
        tokens, ids = read_training_steps(
            dataset.path, config.data, global_batch_size=batch, epoch=epoch, first_step_in_epoch=step_in_epoch, steps=1
        )
    except InputError as err:
        raise BatchViewError(err.message) from err
    tokens, ids = tokens[0], ids[0]
    fingerprints = row_fingerprints(tokens)

    spans = contents.ledger.query(steps=(step, step + 1))
    contents.check_span_tokens(spans)
    names = [e.name for e in contents.experiments]
    by_row: dict[int, list[MarkedSpan]] = {}
    trained = tokens.copy()
    for span in spans.to_pylist():
        row = int(span["global_row"])
        where = f"step {step}, global row {row}, span {span['experiment']}/{span['item']} at offset {span['offset']}"
        if not 0 <= row < batch:
            raise BatchViewError(f"{where}: the global batch has {batch} rows")
        if span["sample_id"] >= 0 and span["sample_id"] != ids[row]:
            raise BatchViewError(
                f"{where}: the ledger says it overwrote sample {span['sample_id']}, the row read again is sample "
                f"{ids[row]}: the training order could not be reproduced (world size {world}, "
                f"num_canonical_nodes {config.data.num_canonical_nodes})"
            )
        if span["row_fingerprint"] != fingerprints[row]:
            raise BatchViewError(
                f"{where}: the original row's xxh64 is {int(fingerprints[row]):#018x}, the ledger recorded "
                f"{span['row_fingerprint']:#018x}: the dataset at {dataset.path} changed since the run"
            )
        experiment = contents.experiment(span["experiment"])
        written = experiment.sequence_tokens(int(span["sequence"])).astype(np.int64)
        start, end = int(span["offset"]), int(span["offset"]) + int(span["length"])
        if experiment.placement.at == "boundary":  # inserted, the row's rest shifted right (docs/placement.md)
            trained[row] = inserted_row(tokens[row], written, start)
        else:
            trained[row, start:end] = written
        if token_hash(trained[row, start:end]) != span["token_hash"]:
            raise BatchViewError(f"{where}: the written tokens do not hash to the ledger's token_hash")
        by_row.setdefault(row, []).append(
            MarkedSpan.of_ledger_row(span, names, tokens=written, replaced=tokens[row, start:end].copy())
        )
    _apply_removals(root, step, contents, trained, ids, fingerprints, by_row, names)
    rows = tuple(
        StepRow(
            global_row=g,
            sample_id=int(ids[g]),
            original=tokens[g],
            trained=trained[g],
            spans=tuple(sorted(by_row.get(g, []), key=lambda s: s.offset)),
        )
        for g in range(batch)
    )
    return StepView(root, step, epoch, first, world, rows, tuple(names), contents.tokenizer)


def _apply_removals(
    root: Path,
    step: int,
    contents: RunContents,
    trained: np.ndarray,
    ids: np.ndarray,
    fingerprints: np.ndarray,
    by_row: dict[int, list[MarkedSpan]],
    names: list[str],
) -> None:
    """Write the removals ledger's spans of ``step`` over the rows, after the injected ones
    (the order of training, docs/kinds/removal.md); a removal replaces the marks of the
    injected spans it overwrote."""
    from multirun.inject.removal import tiled
    from multirun.ledger import Ledger

    removals = Ledger.open_removals(root)
    if not len(removals):
        return
    for span in removals.query(steps=(step, step + 1)).to_pylist():
        row = int(span["global_row"])
        where = f"step {step}, global row {row}, removal {span['experiment']}/{span['item']} at offset {span['offset']}"
        if (span["sample_id"] >= 0 and span["sample_id"] != ids[row]) or span["row_fingerprint"] != fingerprints[row]:
            raise BatchViewError(f"{where}: the row read again is not the row the removals ledger recorded")
        spec = contents.experiment(span["experiment"]).removal
        if spec is None:
            raise BatchViewError(f"{where}: experiment {span['experiment']!r} removes nothing in this config")
        start, end = int(span["offset"]), int(span["offset"]) + int(span["length"])
        written = tiled(spec.replacement, end - start)
        replaced = trained[row, start:end].copy()
        trained[row, start:end] = written
        if token_hash(written) != span["token_hash"]:
            raise BatchViewError(f"{where}: the replacement does not hash to the removals ledger's token_hash")
        kept = [s for s in by_row.get(row, []) if s.end <= start or s.offset >= end]
        by_row[row] = [*kept, MarkedSpan.of_ledger_row(span, names, tokens=written, replaced=replaced)]


def _world_size(contents: RunContents) -> int:
    """The run's world size: ``summary.json`` records it; an unfinished run has one ledger folder per rank."""
    if contents.summary is not None:
        recorded = contents.summary.get("row_identity", {}).get("world_size")
        if recorded:
            return int(recorded)
    folders = list(RunDir(contents.run_dir).ledger.glob("rank-*"))
    return max(len(folders), 1)


def select_rows(view: StepView, rows: Sequence[int] | None) -> list[StepRow]:
    """The view's rows with the given global row numbers (all when None).

    Raises:
        InputError: a row outside the step's global batch (key ``--rows``).
    """
    if rows is None:
        return list(view.rows)
    bad = [r for r in rows if not 0 <= r < len(view.rows)]
    if bad:
        raise InputError(f"rows {bad} are outside the step's rows 0..{len(view.rows) - 1}", key="--rows")
    return [view.rows[r] for r in rows]


def _row_title(row: StepRow) -> str:
    return f"row {row.global_row} · sample {row.sample_id} · {len(row.spans)} span(s)"


def render_plain(view: StepView, rows: Sequence[int] | None = None) -> str:
    """The rows as plain text, each span as ``⟦experiment/item: text⟧`` (for logs and pipes)."""
    lines = [view.header()]
    for row in select_rows(view, rows):
        lines.append(f"── {_row_title(row)}")
        parts = []
        for tokens, span in row.segments():
            text = view.tokenizer.decode(tokens.tolist())
            parts.append(text if span is None else f"⟦{span.experiment}/{span.item}: {text}⟧")
        lines.append("".join(parts))
    return "\n".join(lines) + "\n"


def render_rich(view: StepView, rows: Sequence[int] | None = None) -> list[object]:
    """The rows as rich renderables: each span coloured by experiment and tagged ``[experiment/item]``."""
    from rich.rule import Rule
    from rich.text import Text

    out: list[object] = [Text(view.header(), style="bold")]
    for row in select_rows(view, rows):
        out.append(Rule(_row_title(row), align="left"))
        text = Text()
        for tokens, span in row.segments():
            decoded = view.tokenizer.decode(tokens.tolist())
            if span is None:
                text.append(decoded)
                continue
            colour = _RICH_PALETTE[span.experiment_index % len(_RICH_PALETTE)]
            text.append(f"[{span.experiment}/{span.item}]", style=f"bold {colour}")
            text.append(decoded, style=f"black on {colour}")
        out.append(text)
    return out


_HTML_HEAD = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5rem; }}
pre {{ white-space: pre-wrap; word-break: break-all; font-size: 0.85rem; border: 1px solid #ddd; padding: 0.5rem; }}
mark {{ border-radius: 3px; padding: 0 1px; cursor: help; }}
.tag {{ font-weight: bold; font-size: 0.75rem; margin-right: 2px; }}
.legend span {{ margin-right: 1rem; padding: 0 4px; }}
{styles}
</style></head><body>
"""


def write_html(view: StepView, path: str | os.PathLike[str], rows: Sequence[int] | None = None) -> Path:
    """A standalone HTML page of the rows: spans coloured, their provenance in a tooltip (``title``)."""
    from multirun.run_dir import write_text_atomic

    decode = view.tokenizer.decode
    styles = "\n".join(f".e{i} {{ background: {PALETTE[i % len(PALETTE)]}; }}" for i in range(len(view.experiments)))
    parts = [_HTML_HEAD.format(title=html.escape(view.header()), styles=styles)]
    parts.append(f"<h1>{html.escape(view.header())}</h1>\n<p class='legend'>")
    parts.extend(f"<span class='e{i}'>{html.escape(name)}</span>" for i, name in enumerate(view.experiments))
    parts.append("</p>\n")
    for row in select_rows(view, rows):
        parts.append(f"<h2 id='row-{row.global_row}'>{html.escape(_row_title(row))}</h2>\n<pre>")
        for tokens, span in row.segments():
            text = html.escape(decode(tokens.tolist()))
            if span is None:
                parts.append(text)
                continue
            title = "\n".join(
                (
                    f"experiment: {span.experiment}",
                    f"item: {span.item}",
                    f"sequence: {span.sequence}, repetition: {span.repetition}",
                    f"offset: {span.offset}, length: {span.length}",
                    f"token hash: {span.token_hash:#018x}",
                    f"replaced: {decode(span.replaced.tolist())}",
                )
            )
            parts.append(
                f"<mark class='e{span.experiment_index}' title='{html.escape(title, quote=True)}' "
                f"data-experiment='{html.escape(span.experiment, quote=True)}' "
                f"data-item='{html.escape(span.item, quote=True)}'>"
                f"<span class='tag'>[{html.escape(span.experiment)}/{html.escape(span.item)}]</span>{text}</mark>"
            )
        parts.append("</pre>\n")
    parts.append("</body></html>\n")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(target, "".join(parts))
    return target
