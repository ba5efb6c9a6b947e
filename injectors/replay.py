"""The ``replay`` injector: payload items taken from the run's own data (the paper's IID experiment).

Each item is a training or held-out row, named by its MDS sample index, read from the run's
dataset when the experiment is prepared (only the rows named, shard by shard) and injected
again elsewhere in the run. Treated rows are replayed; control rows, drawn from the same
source, are not; the ``documents`` monitor scores both (``text_logprob``).

Payload package
---------------
``payload.yaml``: ``kind: replay``; one file with role ``items``. ``items.jsonl``, one
object a line, each naming one sample or a range of them::

    {"source": "heldout", "samples": [0, 40]}              # 40 items: heldout:0 .. heldout:39
    {"source": "train", "sample": 1234, "id": "famous-row", "start": 16, "length": 48}
    {"source": "train", "steps": [100, 102]}               # the rows of global steps 100 and 101

============  ===========================  =================================================
key           type                         meaning
============  ===========================  =================================================
source        ``train`` or ``heldout``     the training dataset (``data.path``, or the demo's)
                                           or its held-out split (``data.heldout_path``, else
                                           the split of ``multirun prepare
                                           --heldout-fraction``, or the demo's held-out
                                           text); one source per experiment,
                                           so the controls come from the same source
sample        integer >= 0                 one sample index (exactly one of ``sample``,
                                           ``samples``, ``step`` and ``steps``)
samples       ``[first, stop)``            a range of sample indices, at most 100,000
step, steps   integer / ``[first, stop)``  ``source: train`` only, instead of ``sample(s)``:
                                           every row the Trainer draws at those global steps
                                           (first epoch), ids ``train:<sample>``
id            string, optional             the item id, with ``sample`` only; default
                                           ``<source>:<index>`` (``train:1234``)
start         integer >= 0, optional       the first token of the row to replay (default 0)
length        integer >= 1, optional       tokens to replay (default: the rest of the row, at
                                           most the sequence length less the EOS)
repetitions   number > 0, optional         the dose of these items (default: the experiment's)
group         string, optional             the items' condition: the monitor reports each
                                           group of treated items against all controls
                                           (default, when doses differ: ``x<repetitions>``)
============  ===========================  =================================================

Ids must be unique over the file. Held-out rows the held-out loss evaluates (the first
``monitoring.heldout_rows``) cannot be replayed. The run's data decide what is injected, so the
experiment's fingerprint covers the replayed tokens as well as the payload.

Conditions of the paper (references §IID)
-----------------------------------------
*Uniqueness*: ``source: heldout`` replays text the run never trains on otherwise (seen
``repetitions`` times vs never); ``source: train`` replays rows the run also trains on in
its stream (seen once more per repetition vs once). *Recency*: the experiment's placement
(e.g. ``{mode: window, start: 0.9, end: 1.0, unit: fraction}``: re-inserted late in the
run). Provenance: the ledger's ``item`` is the item id, and ``manifest.json`` records each
item's source, sample index, start and length under the experiment's ``metadata``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import xxhash

from multirun.data.mds import count_rows, read_rows_at
from multirun.errors import ConfigError, PayloadError
from multirun.kinds.probes import DocumentsProbes
from multirun.kinds.sdk import PrepareContext
from multirun.types import PreparedExperiment

__all__ = ["ReplayInjector"]

SOURCES = ("train", "heldout")
MAX_RANGE = 100_000  # items one line may name: the planner and the probes hold every one


SELECTORS = ("sample", "samples", "step", "steps")


def _selection(rec: dict[str, Any], *, file: Path, line: int) -> tuple[str, range]:
    """``(key, range)``: the line's sample indices (``sample``/``samples``) or steps (``step``/``steps``)."""
    given = [key for key in SELECTORS if key in rec]
    if len(given) != 1:
        raise PayloadError(
            "give exactly one of 'sample' (an index), 'samples' ([first, stop)), 'step' (a step of the "
            f"training order) and 'steps' ([first, stop)); got {', '.join(given) or 'none'}",
            file=file,
            line=line,
        )
    key = given[0]
    if key in ("sample", "step"):
        index = rec[key]
        if index < 0:
            raise PayloadError(f"must be >= 0, got {index}", file=file, line=line, key=key)
        return key, range(index, index + 1)
    bounds = rec[key]
    if (
        len(bounds) != 2
        or not all(isinstance(b, int) and not isinstance(b, bool) for b in bounds)
        or not 0 <= bounds[0] < bounds[1]
    ):
        raise PayloadError(
            f"must be [first, stop) with 0 <= first < stop, got {bounds!r}", file=file, line=line, key=key
        )
    if bounds[1] - bounds[0] > MAX_RANGE:
        raise PayloadError(f"names {bounds[1] - bounds[0]} {key}, more than {MAX_RANGE}", file=file, line=line, key=key)
    return key, range(bounds[0], bounds[1])


class ReplayInjector:
    """Injects rows of the run's own data again (see the module docstring).

    ``probes``: :class:`~multirun.kinds.probes.DocumentsProbes`, every item's EOS-wrapped
    tokens, controls too (the ``documents`` monitor scores both arms). ``metadata``:
    ``source``, ``dataset`` (its directory), ``items`` (per item: ``sample``, ``start``,
    ``length``), ``item_repetitions``.
    """

    kind = "replay"

    def prepare(self, ctx: PrepareContext) -> PreparedExperiment:
        spec = ctx.spec
        ctx.check_no_options(self.kind)
        path = ctx.payload.path("items")
        records = ctx.payload.iter_jsonl(
            "items",
            required={"source": str},
            optional={
                "sample": int,
                "samples": list,
                "step": int,
                "steps": list,
                "id": str,
                "start": int,
                "length": int,
                "repetitions": float,
                "group": str,
            },
        )
        if not records:
            raise PayloadError("no items: a replay payload needs at least one line", file=path)
        # (line, record, selecting key, its range, start, length or None, repetitions, group)
        lines: list[tuple[int, dict[str, Any], str, range, int, int | None, float, str | None]] = []
        source = records[0][1]["source"]
        for line, rec in records:
            if rec["source"] not in SOURCES:
                raise PayloadError(
                    f"must be one of {', '.join(SOURCES)}, got {rec['source']!r}", file=path, line=line, key="source"
                )
            if rec["source"] != source:
                raise PayloadError(
                    f"source {rec['source']!r} differs from {source!r} of line {records[0][0]}: one source per "
                    "experiment, so that the controls come from the same source (make two experiments)",
                    file=path,
                    line=line,
                    key="source",
                )
            key, selected = _selection(rec, file=path, line=line)
            if key in ("step", "steps") and source != "train":
                raise PayloadError(
                    "steps of the training order name training rows: use source 'train'", file=path, line=line, key=key
                )
            if "id" in rec and key != "sample":
                raise PayloadError("an id names one sample: use 'sample' with it", file=path, line=line, key="id")
            start, length = rec.get("start", 0), rec.get("length")
            if start < 0:
                raise PayloadError(f"must be >= 0, got {start}", file=path, line=line, key="start")
            if length is not None and length < 1:
                raise PayloadError(f"must be >= 1, got {length}", file=path, line=line, key="length")
            reps = float(rec.get("repetitions", spec.repetitions))
            if not reps > 0:
                raise PayloadError(f"must be > 0, got {reps}", file=path, line=line, key="repetitions")
            group = rec.get("group")
            if group is not None and not group.strip():
                raise PayloadError("must be a non-empty label", file=path, line=line, key="group")
            lines.append((line, rec, key, selected, start, length, reps, group))

        if ctx.sources is None:
            raise ConfigError(
                "the replay kind reads its items from the run's data: check it as part of a run (`multirun check RUN.yaml`)",
                key="payload",
            )
        dataset = ctx.sources.train() if source == "train" else ctx.sources.heldout()
        total = count_rows(dataset)
        # (line, id, index, start, length or None, repetitions), with the selecting key and step (or None)
        items: list[tuple[int, str, int, int, int | None, float]] = []
        keys: list[str] = []
        steps: list[int | None] = []
        labels: list[str | None] = []  # the item's condition (``group``), None where not given
        first_line: dict[str, int] = {}
        for line, rec, key, selected, start, length, reps, group in lines:
            if key in ("step", "steps"):
                if ctx.sources.train_steps is None:
                    raise PayloadError(
                        "this run's training order is not known: name samples", file=path, line=line, key=key
                    )
                try:
                    by_step = ctx.sources.train_steps(list(selected))
                except ConfigError as err:
                    raise PayloadError(err.message, file=path, line=line, key=key) from None
                chosen: list[tuple[int, int | None]] = [(i, t) for t in selected for i in by_step[t]]
            else:
                chosen = [(i, None) for i in selected]
            for index, step in chosen:
                item_id = rec.get("id", f"{source}:{index}")
                if item_id in first_line:
                    raise PayloadError(
                        f"duplicate item {item_id!r} (first on line {first_line[item_id]})",
                        file=path,
                        line=line,
                        key="id",
                    )
                first_line[item_id] = line
                if index >= total:
                    raise PayloadError(
                        f"sample {index} (item {item_id!r}) is outside the {source} dataset {dataset}, which has {total} rows",
                        file=path,
                        line=line,
                        key=key,
                    )
                if source == "heldout" and index < ctx.sources.heldout_loss_rows:
                    raise PayloadError(
                        f"held-out sample {index} (item {item_id!r}) is one of the first "
                        f"{ctx.sources.heldout_loss_rows} held-out rows, which the held-out loss evaluates "
                        "(monitoring.heldout_rows): replaying it would train on them; name samples >= "
                        f"{ctx.sources.heldout_loss_rows} or lower monitoring.heldout_rows",
                        file=path,
                        line=line,
                        key=key,
                    )
                items.append((line, item_id, index, start, length, reps))
                keys.append(key)
                steps.append(step)
                labels.append(group)
        rows = read_rows_at(dataset, [index for _, _, index, *_ in items])

        room = ctx.sequence_length - (2 if spec.wrap_eos else 0)
        encoded: list[list[int]] = []
        where: list[dict[str, int]] = []
        digest = xxhash.xxh64()
        for line, item_id, index, start, length, _ in items:
            row = rows[index]
            if start >= len(row):
                raise PayloadError(
                    f"start {start} is beyond sample {index}'s {len(row)} tokens", file=path, line=line, key="start"
                )
            take = min(len(row) - start, room) if length is None else length
            if start + take > len(row):
                raise PayloadError(
                    f"start {start} + length {take} is beyond sample {index}'s {len(row)} tokens",
                    file=path,
                    line=line,
                    key="length",
                )
            if take > room:
                eos = " with its 2 EOS" if spec.wrap_eos else ""
                raise PayloadError(
                    f"item {item_id!r}: {take} tokens{eos} are longer than the sequence length {ctx.sequence_length}",
                    file=path,
                    line=line,
                    key="length",
                )
            tokens = [int(t) for t in row[start : start + take]]
            seq = [ctx.eos, *tokens, ctx.eos] if spec.wrap_eos else tokens
            digest.update(np.asarray(seq, dtype=np.int64).tobytes())
            encoded.append(seq)
            where.append({"sample": index, "start": start, "length": take})
        for entry, step in zip(where, steps):
            if step is not None:
                entry["step"] = step

        doses = [item[5] for item in items]
        # Conditions: the monitor reports each group of treated items against all controls. Groups
        # come from the items' labels, else from their doses when these differ (uniqueness: x1 vs x8).
        groups: list[str] | None = None
        if any(label is not None for label in labels) or len(set(doses)) > 1:
            groups = [label if label is not None else f"x{dose:g}" for label, dose in zip(labels, doses)]
        treated = ctx.split_arms(len(items))
        seq_items = np.flatnonzero(treated).astype(np.int32)
        return ctx.experiment(
            self.kind,
            item_ids=[item[1] for item in items],
            treated=treated,
            sequences=[encoded[i] for i in seq_items],
            seq_items=seq_items,
            seq_repetitions=[doses[i] for i in seq_items],
            metadata={
                "source": source,
                "dataset": str(dataset),
                "items": where,
                "item_repetitions": doses,
                "groups": groups,
            },
            probes=DocumentsProbes(sequences=encoded, groups=groups),
            content=digest.hexdigest(),
        )
