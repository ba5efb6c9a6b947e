"""The run's model: a tiny GPT-2 or any Hugging Face causal LM, wrapped for Composer with its tokenizer.

Nothing is downloaded: configs and weights come from local files or from the run
config itself. The model is wrapped in Composer's ``HuggingFaceModel`` together with
the run's tokenizer as a ``transformers`` tokenizer, so every checkpoint holds the
model class, its config and the tokenizer (``state.integrations.huggingface``) and can
be read without the run config (:mod:`multirun.run.weights`).

A config built here (``kind: gpt2``, or ``kind: hf`` with ``config``) takes the
vocabulary size and the EOS, BOS and PAD ids from the tokenizer where it leaves them
unset; whatever is set, there or in a pretrained folder, is checked against the
tokenizer and the sequence length, and a mismatch is a :class:`ConfigError` naming
the key that set it.

Example:
    >>> from multirun.config import load_config
    >>> from multirun.data.tokenizers import ByteTokenizer
    >>> model = build_run_model(load_config(None, env={}), ByteTokenizer(), 128)
    >>> type(model.model).__name__, model.tokenizer.eos_token_id
    ('GPT2LMHeadModel', 256)
"""

from __future__ import annotations

import json
import os
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import xxhash
from composer.models import HuggingFaceModel
from composer.utils import reproducibility
from transformers import GPT2Config, GPT2LMHeadModel

from multirun.config import LoadedConfig, ModelConfig, resolve_path
from multirun.data.tokenizers import Tokenizer, hf_tokenizer_of
from multirun.errors import ConfigError, ResumeError

# Names under which configs give their longest input; GPT-2's n_positions is read as
# max_position_embeddings through its attribute map.
_MAX_POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length")


def build_gpt2(
    *,
    vocab_size: int,
    sequence_length: int,
    n_layer: int,
    n_head: int,
    n_embd: int,
    eos_token_id: int,
    overrides: dict[str, Any] | None = None,
    tokenizer: Any | None = None,
    check: Callable[[GPT2Config], None] | None = None,
) -> HuggingFaceModel:
    """A randomly initialised GPT-2 wrapped for Composer (``tokenizer``: a ``transformers`` tokenizer to save with it).

    ``check`` sees the config before any weight is made (it raises on a config that does
    not fit the run; Composer's wrapper would raise a bare ValueError on a vocabulary
    smaller than the tokenizer's).

    Example:
        >>> model = build_gpt2(vocab_size=258, sequence_length=128, n_layer=2, n_head=2, n_embd=64, eos_token_id=256)
        >>> sum(p.numel() for p in model.parameters()) > 0
        True
    """
    if n_embd % n_head:
        raise ConfigError(f"n_embd ({n_embd}) must be divisible by n_head ({n_head})", key="model.n_embd")
    kwargs: dict[str, Any] = dict(
        vocab_size=vocab_size,
        n_positions=sequence_length,
        n_layer=n_layer,
        n_head=n_head,
        n_embd=n_embd,
        bos_token_id=eos_token_id,
        eos_token_id=eos_token_id,
        # GPT-2's tanh-approximated GELU in one fused kernel. The default "gelu_new" is the
        # same function in seven element-wise steps, which at the demo's width cost about
        # as much as a probe pass's matrix products.
        activation_function="gelu_pytorch_tanh",
    )
    kwargs.update(overrides or {})
    try:
        config = GPT2Config(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"invalid GPT-2 config: {exc}", key="model.config_overrides") from exc
    if check is not None:
        check(config)
    return _wrap(_construct(lambda: GPT2LMHeadModel(config), key="model"), tokenizer)


def _construct(build: Callable[[], Any], *, key: str, file: Path | None = None) -> Any:
    """Build a model; sizes too large to allocate (or to count) are a ConfigError, not a raw RuntimeError."""
    try:
        return build()
    except (
        RuntimeError,
        OverflowError,
        MemoryError,
        TypeError,
        ValueError,
    ) as exc:  # torch: "can't allocate", "size ... overflowed", a size of the wrong type
        raise ConfigError(f"the model cannot be built at these sizes: {exc}", file=file, key=key) from exc


def build_run_model(
    loaded: LoadedConfig, tokenizer: Tokenizer, sequence_length: int, *, read_weights: bool = True
) -> HuggingFaceModel:
    """The model of ``loaded``'s ``model`` section, with the same initial weights on every rank and in every repeat.

    ``model.init_from`` is not applied here (see :func:`load_init_weights`): interaction
    arms build the model only to load a checkpoint into it. ``read_weights=False``:
    a ``from_pretrained`` folder gives its config only (:func:`check_model`).

    Raises:
        ConfigError: a config or folder that cannot be read, or that does not fit the
            tokenizer or the sequence length; the key named is the one that set the value.
    """
    model = loaded.config.model
    reproducibility.seed_all(loaded.config.seed)
    if model.kind == "gpt2":
        assert model.n_layer is not None and model.n_head is not None and model.n_embd is not None  # filled in

        def check(config: GPT2Config) -> None:
            _check_config(
                config,
                tokenizer,
                sequence_length,
                key_of=lambda name: f"model.config_overrides.{name}" if name in model.config_overrides else "model",
                file=loaded.source,
                check_pad=True,
            )

        try:
            return build_gpt2(
                vocab_size=tokenizer.vocab_size,
                sequence_length=sequence_length,
                n_layer=model.n_layer,
                n_head=model.n_head,
                n_embd=model.n_embd,
                eos_token_id=tokenizer.eos_token_id,
                overrides=dict(model.config_overrides),
                tokenizer=hf_tokenizer_of(tokenizer),
                check=check,
            )
        except ConfigError as exc:
            # build_gpt2 and the checks know the key: add the file, and the line when the file has the key.
            key = exc.key or "model"
            line = loaded.line_of(key) if loaded.lines else None
            raise ConfigError(exc.message, file=loaded.source, key=key, line=line) from exc.__cause__
    return _build_hf(loaded, model, tokenizer, sequence_length, read_weights=read_weights)


def check_model(loaded: LoadedConfig, tokenizer: Tokenizer, sequence_length: int) -> None:
    """Every check :func:`build_run_model` makes, for ``multirun check``: on PyTorch's meta
    device, so no weight is allocated or read whatever the model's size; and that
    ``model.init_from`` exists (its weights are read, and fitted to the model, by ``train``).

    Raises:
        ConfigError: as :func:`build_run_model`, or ``model.init_from`` names nothing.
    """
    with torch.device("meta"):
        build_run_model(loaded, tokenizer, sequence_length, read_weights=False)
    init_from = loaded.config.model.init_from
    if init_from is not None and not resolve_path(loaded.base_dir, init_from).exists():
        raise ConfigError(
            f"no checkpoint file or model folder at {resolve_path(loaded.base_dir, init_from)}",
            file=loaded.source,
            key="model.init_from",
        )


def _build_hf(
    loaded: LoadedConfig, model: ModelConfig, tokenizer: Tokenizer, sequence_length: int, *, read_weights: bool = True
) -> HuggingFaceModel:
    from transformers import AutoConfig, AutoModelForCausalLM

    file = loaded.source
    overrides = dict(model.config_overrides)

    def key_of(given: Mapping[str, Any], where: str) -> Callable[[str], str]:
        def key(name: str) -> str:
            if name in overrides:
                return f"model.config_overrides.{name}"
            return f"{where}.{name}" if isinstance(model.config, dict) and name in given else where

        return key

    if model.from_pretrained is not None:
        folder = resolve_path(loaded.base_dir, model.from_pretrained)
        try:
            config = AutoConfig.from_pretrained(folder, local_files_only=True, **overrides)
        except (OSError, ValueError, KeyError) as exc:
            raise ConfigError(
                f"no readable config.json in {folder}: {exc}", file=file, key="model.from_pretrained"
            ) from exc
        # A pretrained model keeps its own padding convention: only what the data needs is checked.
        _check_config(
            config, tokenizer, sequence_length, key_of=key_of({}, "model.from_pretrained"), file=file, check_pad=False
        )
        if not read_weights:
            built = _construct(lambda: AutoModelForCausalLM.from_config(config), key="model.from_pretrained", file=file)
            return _wrap(built, hf_tokenizer_of(tokenizer))
        try:
            hf_model = AutoModelForCausalLM.from_pretrained(folder, config=config, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"could not load a causal LM from {folder}: {exc}", file=file, key="model.from_pretrained"
            ) from exc
        return _wrap(hf_model, hf_tokenizer_of(tokenizer))

    given, where, config = _hf_config(loaded, model, overrides)
    explicit = set(given) | set(overrides)
    # The tokenizer's ids where the config leaves them unset (a Llama config's defaults,
    # 32000 tokens and EOS 2, belong to another tokenizer).
    defaults = {
        "vocab_size": tokenizer.vocab_size,
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    for name, value in defaults.items():
        if name not in explicit:
            setattr(config, name, value)
    _check_config(config, tokenizer, sequence_length, key_of=key_of(given, where), file=file, check_pad=True)
    try:
        hf_model = _construct(lambda: AutoModelForCausalLM.from_config(config), key=where, file=file)
    except (TypeError, ValueError, KeyError) as exc:
        raise ConfigError(f"cannot build a causal LM from this config: {exc}", file=file, key=where) from exc
    return _wrap(hf_model, hf_tokenizer_of(tokenizer))


def _hf_config(loaded: LoadedConfig, model: ModelConfig, overrides: dict[str, Any]) -> tuple[dict[str, Any], str, Any]:
    """The config of ``model.config`` with the overrides, the fields it gave, and the key that names it."""
    from transformers import AutoConfig

    file = loaded.source
    if isinstance(model.config, dict):
        fields = dict(model.config)
        model_type = str(fields.pop("model_type"))
        try:
            return fields, "model.config", AutoConfig.for_model(model_type, **{**fields, **overrides})
        except (TypeError, ValueError, KeyError) as exc:
            raise ConfigError(f"invalid {model_type} config: {exc}", file=file, key="model.config") from exc
    assert model.config is not None  # validated: kind hf has config or from_pretrained
    path = resolve_path(loaded.base_dir, model.config)
    json_file = path / "config.json" if path.is_dir() else path
    try:
        given = json.loads(json_file.read_text(encoding="utf-8"))
        config = AutoConfig.from_pretrained(json_file, local_files_only=True, **overrides)
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(
            f"not a readable Hugging Face config ({json_file}): {exc}", file=file, key="model.config"
        ) from exc
    if not isinstance(given, dict):
        raise ConfigError(f"{json_file} does not hold a JSON object", file=file, key="model.config")
    return given, "model.config", config


def _check_config(
    config: Any,
    tokenizer: Tokenizer,
    sequence_length: int,
    *,
    key_of: Callable[[str], str],
    file: Path | None,
    check_pad: bool,
) -> None:
    vocab_size = getattr(config, "vocab_size", None)
    if vocab_size is not None and vocab_size < tokenizer.vocab_size:
        raise ConfigError(
            f"vocab_size {vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size} tokens "
            f"({tokenizer.name}): ids beyond the embedding would fail",
            file=file,
            key=key_of("vocab_size"),
        )
    eos = getattr(config, "eos_token_id", None)
    eos_ids = eos if isinstance(eos, list) else [eos]
    if eos is not None and tokenizer.eos_token_id not in eos_ids:
        raise ConfigError(
            f"eos_token_id {eos} is not the tokenizer's EOS {tokenizer.eos_token_id} ({tokenizer.name}), which "
            "separates documents and ends injected spans",
            file=file,
            key=key_of("eos_token_id"),
        )
    pad = getattr(config, "pad_token_id", None)
    if check_pad and pad is not None and pad != tokenizer.pad_token_id:
        raise ConfigError(
            f"pad_token_id {pad} is not the tokenizer's PAD {tokenizer.pad_token_id} ({tokenizer.name}); many models "
            "never train the PAD row of the embedding",
            file=file,
            key=key_of("pad_token_id"),
        )
    aliases = getattr(config, "attribute_map", {})
    for alias in _MAX_POSITION_KEYS:
        name = aliases.get(alias, alias)  # the name the config stores it under (GPT-2: n_positions)
        positions = getattr(config, name, None)
        if isinstance(positions, int):
            if positions < sequence_length:
                raise ConfigError(
                    f"{name} {positions} is shorter than data.sequence_length {sequence_length}",
                    file=file,
                    key=key_of(name),
                )
            break


def _wrap(model: Any, tokenizer: Any | None) -> HuggingFaceModel:
    return HuggingFaceModel(model, tokenizer=tokenizer, use_logits=True, metrics=[], eval_metrics=[])


def load_init_weights(loaded: LoadedConfig, model: HuggingFaceModel) -> None:
    """Overwrite ``model``'s weights with those of ``model.init_from`` (nothing without one).

    The source is read by :func:`multirun.run.weights.load_weights`: a Composer
    checkpoint of another run or a ``save_pretrained`` folder. Every weight of the model
    must be in the source with the same shape.

    Raises:
        ConfigError: the source cannot be read or does not fit the model (key ``model.init_from``).
    """
    from multirun.run.weights import load_weights

    init_from = loaded.config.model.init_from
    if init_from is None:
        return
    path = resolve_path(loaded.base_dir, init_from)
    key = "model.init_from"
    try:
        source = load_weights(path).model
    except ResumeError as exc:
        raise ConfigError(str(exc), file=loaded.source, key=key) from exc
    target = typing.cast(torch.nn.Module, model.model)  # transformers' stubs hide that it is a Module
    try:
        missing, unexpected = target.load_state_dict(source.state_dict(), strict=False)
    except RuntimeError as exc:  # shapes differ
        raise ConfigError(f"the weights of {path} do not fit the model: {exc}", file=loaded.source, key=key) from exc
    if missing or unexpected:
        raise ConfigError(
            f"the weights of {path} ({type(source).__name__}) do not fit the model ({type(model.model).__name__}): "
            f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}",
            file=loaded.source,
            key=key,
        )


def record_weights_source(loaded: LoadedConfig) -> str | None:
    """Set ``model.init_fingerprint`` to the fingerprint of the initial weights' source (None: random weights).

    Called before ``resolved_config.yaml`` is written, so the run records where its
    weights came from. A fingerprint already in the config (a pinned source) must match.

    Raises:
        ConfigError: the source changed since the fingerprint was pinned (key ``model.init_fingerprint``).
    """
    model = loaded.config.model
    source = model.weights_source
    if source is None:
        return None
    fingerprint = weights_fingerprint(resolve_path(loaded.base_dir, source[1]))
    if model.init_fingerprint is not None and model.init_fingerprint != fingerprint:
        raise ConfigError(
            f"model.{source[0]} {source[1]} has fingerprint {fingerprint}, the config pins {model.init_fingerprint}: "
            "the weights changed since",
            file=loaded.source,
            key="model.init_fingerprint",
        )
    model.init_fingerprint = fingerprint
    return fingerprint


# Files up to this size are hashed whole; larger ones (weights of real models) by their
# size and first and last mebibyte, so the fingerprint costs milliseconds, not minutes.
_WHOLE_FILE_BYTES = 64 << 20
_EDGE_BYTES = 1 << 20


def weights_fingerprint(path: str | os.PathLike[str]) -> str:
    """Cheap xxh64 identity of a checkpoint file or a model folder (every file's relative name, size and bytes).

    Files over 64 MiB contribute their size and first and last MiB instead of every byte.

    Example::

        weights_fingerprint("runs/a/checkpoints/ep0-ba6-rank0.pt")   # '5c0e9d0e2f6a1b77'
    """
    root = Path(path)
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    digest = xxhash.xxh64()
    for file in files:
        size = file.stat().st_size
        name = file.name if file == root else file.relative_to(root).as_posix()
        digest.update(f"{name}\0{size}\0".encode())
        with file.open("rb") as handle:
            if size <= _WHOLE_FILE_BYTES:
                for chunk in iter(lambda: handle.read(8 << 20), b""):
                    digest.update(chunk)
            else:
                digest.update(handle.read(_EDGE_BYTES))
                handle.seek(size - _EDGE_BYTES)
                digest.update(handle.read(_EDGE_BYTES))
    return digest.hexdigest()
