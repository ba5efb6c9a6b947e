"""Scoring saved weights with a run's monitors, as the in-training evaluation scores the live model.

``multirun evaluate`` (:func:`multirun.run.reload.evaluate_checkpoint`) rebuilds a run's
parts and hands the weights to :func:`score_weights`, which calls the run's own
:meth:`~multirun.measure.runner.MonitorRunner.evaluate`, the code path of the callback:
the same monitors on the same probes, batched the same way, the same held-out rows, the
same statistics seed (the run's seed: every evaluation of a run draws the same splits
and resamples), Holm over the primary metrics of the evaluation, in eval mode, on a
Composer device (which sets what the Trainer sets, e.g. TF32 matmuls on GPUs) under the
run's precision context. So an intermediate checkpoint's evaluation equals the
in-training evaluation of that step field by field, when the run was trained in one
process and every experiment was evaluated at that step (the run-wide cadence); with
several processes the probe batches differ, and the scores agree to rounding.

An evaluation is written to ``RUN_DIR/evaluations/<name>/``, never into the run's own
files: ``metrics.jsonl`` (the records, per-item scores included, as in the run's
``metrics.jsonl``) and ``summary.json`` (where the weights came from, their step and
fingerprint, the held-out loss and the effects without per-item scores), each written
atomically; ``summary.json`` is written last and marks a complete evaluation.

Example::

    records = score_weights(parts.monitors, weights.model, step=10, device="cpu", precision="fp32")
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import xxhash

from multirun.data.tokenizers import Tokenizer
from multirun.errors import InputError
from multirun.measure.records import EffectRecord, EvaluationRecord, FailureRecord, RunMetricRecord
from multirun.measure.runner import MonitorRunner
from multirun.run_dir import plain, write_json_atomic, write_text_atomic

#: The ``when`` of an evaluation's records (the callback's are ``fit_start``, ``interval``, ``fit_end``).
WHEN = "evaluate"
#: The ``step`` of an evaluation's records when the weights' training step is not known.
UNKNOWN_STEP = -1
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=-]*$")


def evaluation_name(source: str | Path) -> str:
    """The default name of an evaluation: the checkpoint's file stem or the folder's name.

    A link (Composer's ``latest-rank0.pt``) is followed, so the name says which checkpoint it was.

    Example:
        >>> evaluation_name("runs/demo/checkpoints/ep0-ba10-rank0.pt"), evaluation_name("exports/hf/")
        ('ep0-ba10-rank0', 'hf')
    """
    path = Path(source)
    if path.is_symlink():
        path = path.resolve()
    return path.stem if path.suffix in (".pt", ".pth", ".ckpt") else path.name


def check_name(name: str) -> str:
    """``name`` if it can name a folder under ``evaluations/`` (letters, digits, ``._+=-``), else an InputError."""
    if not _NAME.match(name):
        raise InputError(
            f"{name!r} cannot name an evaluation: use letters, digits and . _ + = - (not first)", key="--name"
        )
    return name


def check_vocabulary(model: Any, tokenizer: Tokenizer, *, saved_tokenizer: Any, source: Path) -> None:
    """Refuse weights that cannot read the run's token ids, or that came with another vocabulary.

    Raises:
        InputError: naming ``source``: the input embedding has fewer rows than the run's
            tokenizer has ids, or the tokenizer saved with the weights maps tokens to
            other ids than the run's.
    """
    rows = int(model.get_input_embeddings().num_embeddings)
    if rows < tokenizer.vocab_size:
        raise InputError(
            f"the weights embed {rows} token ids, but the run's tokenizer ({tokenizer.name}) has {tokenizer.vocab_size}: "
            "these weights were not trained with this run's tokenizer",
            file=source,
        )
    if saved_tokenizer is None:
        return
    run_hf = getattr(tokenizer, "hf_tokenizer", None)
    if run_hf is None or dict(run_hf.get_vocab()) != dict(saved_tokenizer.get_vocab()):
        raise InputError(
            f"the tokenizer saved with the weights ({len(saved_tokenizer)} tokens) is not the run's "
            f"({tokenizer.name}, {tokenizer.vocab_size} tokens): their vocabularies differ",
            file=source,
        )


def weights_fingerprint(model: torch.nn.Module) -> str:
    """xxh64 over the model's state dict: names, dtypes, shapes and bytes, in name order.

    Equal weights give equal fingerprints whether they came from a Composer checkpoint
    or a ``save_pretrained`` folder (tied weights are stored once in either, and counted
    under every name here).

    Example:
        >>> a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
        >>> _ = b.load_state_dict(a.state_dict())
        >>> weights_fingerprint(a) == weights_fingerprint(b)
        True
    """
    h = xxhash.xxh64()
    for name, tensor in sorted(model.state_dict().items()):
        value = tensor.detach().cpu().contiguous()
        h.update(f"{name}\0{value.dtype}\0{tuple(value.shape)}\0".encode())
        h.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def score_weights(
    monitors: MonitorRunner,
    model: torch.nn.Module,
    *,
    step: int | None,
    device: str,
    precision: str,
) -> list[EvaluationRecord]:
    """Every experiment's monitor and the held-out loss on ``model``, as the callback scores the live model.

    Args:
        monitors: the run's monitors (:class:`~multirun.run.parts.RunParts`'s), whose
            ``metrics.jsonl`` gets the records as the run's does: give them a scratch run
            directory and write the evaluation with :func:`write_evaluation`.
        model: the Hugging Face causal LM (moved to ``device``).
        step: the weights' training step (None: unknown, recorded as ``UNKNOWN_STEP``).
        device: ``cpu`` or ``gpu`` (Composer's device, as the Trainer sets it up).
        precision: the run's Composer precision (``fp32``, ``amp_bf16``, ``amp_fp16``).
    """
    from composer.core.precision import Precision, get_precision_context
    from composer.devices import DeviceCPU, DeviceGPU

    composer_device = DeviceGPU() if device == "gpu" else DeviceCPU()
    module = composer_device.module_to_device(model)
    chosen = Precision(precision)
    # Every experiment and the held-out loss: Holm's family is the whole run's, as at an
    # interval where every experiment is due and at fit end.
    return monitors.evaluate(
        module,
        step=UNKNOWN_STEP if step is None else step,
        when=WHEN,
        precision_context=lambda: get_precision_context(chosen),
        experiments=None,
        heldout=True,
    )


def evaluation_summary(records: Sequence[EvaluationRecord], **facts: Any) -> dict[str, Any]:
    """``summary.json`` of an evaluation: ``facts`` (source, step, fingerprint, ...), the held-out
    loss and the effects and failures without per-item scores (as the run's ``summary.json``)."""
    heldout = [r.value for r in records if isinstance(r, RunMetricRecord) and r.metric == "heldout_loss"]
    return {
        **facts,
        "heldout_loss": heldout[0] if heldout else None,
        "effects": [
            {k: v for k, v in r.to_json().items() if k != "items"}
            for r in records
            if isinstance(r, (EffectRecord, FailureRecord))
        ],
    }


def write_evaluation(folder: Path, records: Sequence[EvaluationRecord], summary: dict[str, Any]) -> None:
    """Write ``metrics.jsonl`` and then ``summary.json`` into ``folder``, each atomically."""
    import json

    lines = "".join(json.dumps(r.to_json(), allow_nan=False, default=plain) + "\n" for r in records)
    write_text_atomic(folder / METRICS_FILE, lines)
    write_json_atomic(folder / SUMMARY_FILE, summary)
