"""Models built from configs in code (nothing is downloaded)."""

from __future__ import annotations

from typing import Any

from composer.models import HuggingFaceModel
from transformers import GPT2Config, GPT2LMHeadModel

from multirun.errors import ConfigError


def build_gpt2(
    *,
    vocab_size: int,
    sequence_length: int,
    n_layer: int,
    n_head: int,
    n_embd: int,
    eos_token_id: int,
    overrides: dict[str, Any] | None = None,
) -> HuggingFaceModel:
    """A randomly initialised GPT-2 wrapped for Composer.

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
    return HuggingFaceModel(GPT2LMHeadModel(config), tokenizer=None, use_logits=True, metrics=[], eval_metrics=[])
