"""Trained weights from where runs leave them: a Composer checkpoint or a Hugging Face folder.

``multirun evaluate``, ``multirun export`` and continual pretraining (``model.init_from``)
all read weights through :func:`load_weights`, so a checkpoint is understood the same
way everywhere: the Hugging Face model class and config that Composer's
``HuggingFaceModel`` recorded in the checkpoint, with the checkpoint's weights loaded
into it (Composer's own ``hf_from_composer_checkpoint`` builds the class but leaves the
weights random).

Example::

    weights = load_weights("runs/demo/checkpoints/ep0-ba200-rank0.pt")
    weights.model(torch.tensor([[1, 2, 3]])).logits
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from multirun.errors import ResumeError


@dataclass
class LoadedWeights:
    """A Hugging Face causal LM with trained weights, and where they came from.

    Attributes:
        model: the ``transformers`` model, on CPU, in eval mode.
        tokenizer: the Hugging Face tokenizer saved with the weights, if any.
        source: the checkpoint file or folder read.
        step: the training step of a Composer checkpoint (None for a Hugging Face folder).
    """

    model: Any
    tokenizer: Any | None
    source: Path
    step: int | None


def load_weights(path: str | os.PathLike[str]) -> LoadedWeights:
    """Load a Composer checkpoint (``*.pt`` written by a HuggingFaceModel) or a ``save_pretrained`` folder.

    Raises:
        ResumeError: the path does not exist, or is not a checkpoint or model folder
            multirun can read; the message names the file.
    """
    source = Path(path).expanduser()
    if source.is_dir():
        return _from_pretrained(source)
    if source.is_file():
        return _from_composer_checkpoint(source.resolve())
    raise ResumeError("no such checkpoint file or Hugging Face model folder", file=source)


def _from_pretrained(folder: Path) -> LoadedWeights:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (folder / "config.json").is_file():
        raise ResumeError("not a Hugging Face model folder (no config.json)", file=folder)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ResumeError(f"could not load a causal LM from this folder: {exc}", file=folder) from exc
    tokenizer = None
    if any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return LoadedWeights(model.eval(), tokenizer, folder, None)


def _from_composer_checkpoint(path: Path) -> LoadedWeights:
    import torch
    from composer.models import HuggingFaceModel

    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch raises many types for a file that is not a checkpoint
        raise ResumeError(f"not a readable Composer checkpoint ({type(exc).__name__}: {exc})", file=path) from exc
    state = checkpoint.get("state", {}) if isinstance(checkpoint, dict) else {}
    hf_state = state.get("integrations", {}).get("huggingface")
    if hf_state is None or "model" not in state:
        raise ResumeError("not a Composer checkpoint of a Hugging Face model (no integrations.huggingface)", file=path)
    # The saved config says its attention implementation was already chosen, which would
    # leave the class default (eager); let transformers choose as it did when the trained
    # model was built (sdpa where available), so the weights compute what they computed.
    overrides = {"_attn_implementation_autoset": False}
    recorded = hf_state.get("model", {}).get("config", {}).get("class", "?")
    model: Any
    try:
        model = HuggingFaceModel.load_huggingface_model_from_saved_state(hf_state, checkpoint, None, overrides)
    except Exception:  # Composer rebuilds the config with AutoConfig, which some model classes reject
        model = _with_own_config_class(hf_state, overrides, recorded, path)
    # Composer writes the saved tokenizer's files to a folder before loading them, by default
    # one it leaves in the current directory.
    with tempfile.TemporaryDirectory(prefix="multirun-tokenizer-") as folder:
        tokenizer = HuggingFaceModel.load_huggingface_tokenizer_from_saved_state(hf_state, tokenizer_save_dir=folder)
    # HuggingFaceModel keeps the transformers model under ``model.``.
    weights = {key.removeprefix("model."): value for key, value in state["model"].items()}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    # Tied output embeddings are stored once; anything else missing is a real mismatch.
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    if unexpected or set(missing) - tied:
        raise ResumeError(
            f"the checkpoint's weights do not fit its recorded model (missing {sorted(set(missing) - tied)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]})",
            file=path,
        )
    timestamp = state.get("timestamp", {})
    step = int(timestamp.get("Timestamp", timestamp).get("batch", 0)) if timestamp else None
    return LoadedWeights(model.eval(), tokenizer, path, step)


def _with_own_config_class(hf_state: dict[str, Any], overrides: dict[str, Any], recorded: str, path: Path) -> Any:
    """The recorded model class built with its own config class.

    Composer rebuilds a checkpoint's config with ``AutoConfig.for_model(model_type=...)``,
    which for llm-foundry's MPT gives transformers' ``MptConfig``, not the ``MPTConfig``
    that llm-foundry's ``MPTForCausalLM`` takes; the class's ``config_class`` is the right one.
    """
    import importlib

    module_name, _, class_name = recorded.rpartition(".")
    try:
        model_class = getattr(importlib.import_module(module_name), class_name)
        content = dict(hf_state["model"]["config"]["content"])
        config = model_class.config_class(**{**content, **overrides})
        return model_class(config)
    except Exception as exc:  # any failure here means the class cannot be rebuilt
        raise ResumeError(
            f"cannot rebuild the checkpoint's model {recorded} from its recorded config ({type(exc).__name__}: "
            f"{exc}); pass a Hugging Face folder of the weights instead",
            file=path,
        ) from exc
