"""The run's model (`model:`): GPT-2 or any Hugging Face causal LM, checked against the tokenizer, with its tokenizer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from transformers import LlamaConfig, LlamaForCausalLM

from multirun.config import load_config
from multirun.data.tokenizers import ByteTokenizer, byte_hf_tokenizer
from multirun.errors import ConfigError
from multirun.run.model import (
    build_run_model,
    check_model,
    load_init_weights,
    record_weights_source,
    weights_fingerprint,
)
from tests.helpers_payload import write_config

BYTES = ByteTokenizer()
HF_BYTES = byte_hf_tokenizer()
SEQUENCE_LENGTH = 64
LLAMA = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "max_position_embeddings": 64,
}


@settings(max_examples=300, deadline=None)
@given(st.text())
@example("<|endoftext|><|pad|>")  # the special tokens' names are text like any other
@example("héllo 中文 \x00\n\t  ")
def test_byte_hf_tokenizer_encodes_and_decodes_text_as_the_byte_tokenizer(text: str) -> None:
    ids = HF_BYTES.encode(text, add_special_tokens=False)
    assert ids == BYTES.encode(text)
    assert HF_BYTES.decode(ids, skip_special_tokens=True) == BYTES.decode(ids) == text


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 257), max_size=40))
def test_byte_hf_tokenizer_decodes_any_ids_as_the_byte_tokenizer(ids: list[int]) -> None:
    # Broken UTF-8 (spans cut mid-character) and EOS/PAD anywhere.
    assert HF_BYTES.decode(ids, skip_special_tokens=True) == BYTES.decode(ids)
    assert (HF_BYTES.eos_token_id, HF_BYTES.pad_token_id, len(HF_BYTES)) == (256, 257, BYTES.vocab_size)


def _loaded(tmp: Path, model: dict[str, Any]) -> Any:
    doc = {"run_name": "m", "data": {"sequence_length": SEQUENCE_LENGTH}, "model": model}
    return load_config(write_config(tmp / "run.yaml", doc), env={})


def _error(tmp: Path, model: dict[str, Any]) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        build_run_model(_loaded(tmp, model), BYTES, SEQUENCE_LENGTH)
    # `multirun check` finds the same problem without building weights.
    with pytest.raises(ConfigError) as checked:
        check_model(_loaded(tmp, model), BYTES, SEQUENCE_LENGTH)
    assert (checked.value.key, str(checked.value)) == (info.value.key, str(info.value))
    return info.value


def test_the_demo_model_is_gpt2_wrapped_with_the_byte_tokenizer() -> None:
    model = build_run_model(load_config(None, env={}), BYTES, 128)
    assert type(model.model).__name__ == "GPT2LMHeadModel"
    assert model.tokenizer is not None
    assert model.tokenizer.encode("é", add_special_tokens=False) == BYTES.encode("é")


def test_an_inline_llama_config_takes_the_tokenizers_ids(tmp_path: Path) -> None:
    model = build_run_model(_loaded(tmp_path, {"kind": "hf", "config": LLAMA}), BYTES, SEQUENCE_LENGTH)
    config = model.model.config
    assert isinstance(model.model, LlamaForCausalLM)
    # Llama's defaults (32000 tokens, EOS 2, no PAD) belong to another tokenizer.
    assert (config.vocab_size, config.eos_token_id, config.pad_token_id) == (258, 256, 257)
    assert (config.hidden_size, config.num_hidden_layers) == (64, 2)


def test_a_config_json_relative_to_the_config_file_gives_the_same_model(tmp_path: Path) -> None:
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps(LLAMA))
    inline = build_run_model(_loaded(tmp_path, {"kind": "hf", "config": LLAMA}), BYTES, SEQUENCE_LENGTH)
    for ref in ("llama/config.json", "llama"):
        from_file = build_run_model(_loaded(tmp_path, {"kind": "hf", "config": ref}), BYTES, SEQUENCE_LENGTH)
        source = {**from_file.model.config.to_dict(), "_name_or_path": ""}  # the file it was read from
        assert source == inline.model.config.to_dict()
        for (name, a), (_, b) in zip(from_file.state_dict().items(), inline.state_dict().items(), strict=True):
            assert torch.equal(a, b), name  # seeded by the run's seed: the same initial weights


@pytest.mark.parametrize(
    ("model", "key", "words"),
    [
        ({"kind": "hf", "config": {**LLAMA, "vocab_size": 200}}, "model.config.vocab_size", "smaller than"),
        (
            {"kind": "hf", "config": LLAMA, "config_overrides": {"max_position_embeddings": 32}},
            "model.config_overrides.max_position_embeddings",
            "shorter than data.sequence_length 64",
        ),
        ({"kind": "hf", "config": {**LLAMA, "eos_token_id": 2}}, "model.config.eos_token_id", "EOS 256"),
        ({"kind": "hf", "config": {**LLAMA, "pad_token_id": 0}}, "model.config.pad_token_id", "PAD 257"),
        ({"kind": "gpt2", "config_overrides": {"n_positions": 16}}, "model.config_overrides.n_positions", "shorter"),
    ],
)
def test_a_config_that_does_not_fit_the_tokenizer_or_the_sequence_length_names_its_key(
    tmp_path: Path, model: dict[str, Any], key: str, words: str
) -> None:
    error = _error(tmp_path, model)
    assert error.key == key
    assert words in str(error)


def test_a_config_json_that_does_not_fit_names_model_config(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({**LLAMA, "vocab_size": 100}))
    error = _error(tmp_path, {"kind": "hf", "config": "config.json"})
    assert error.key == "model.config" and "vocab_size 100" in str(error)


@pytest.mark.parametrize(
    ("model", "key", "words"),
    [
        ({"kind": "hf", "config": "missing/config.json"}, "model.config", "does not exist"),
        ({"kind": "gpt2", "init_from": "no-such-checkpoint.pt"}, "model.init_from", "does not exist"),
        ({"kind": "hf", "from_pretrained": "no-such-folder"}, "model.from_pretrained", "does not exist"),
        ({"kind": "hf"}, "model.config", "exactly one of config"),
        ({"kind": "hf", "config": {"hidden_size": 64}}, "model.config.model_type", "needs model_type"),
        ({"kind": "hf", "config": LLAMA, "n_layer": 2}, "model.n_layer", "kind gpt2 size"),
        ({"kind": "gpt2", "config": LLAMA}, "model.config", "needs kind: hf"),
    ],
)
def test_bad_model_keys_fail_when_the_config_loads(tmp_path: Path, model: dict[str, Any], key: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        _loaded(tmp_path, model)
    assert info.value.key == key
    assert words in str(info.value)


def test_from_pretrained_and_init_from_load_a_save_pretrained_folder(tmp_path: Path) -> None:
    torch.manual_seed(3)
    config = LlamaConfig(**{k: v for k, v in LLAMA.items() if k != "model_type"}, vocab_size=258, eos_token_id=256)
    source = LlamaForCausalLM(config)
    source.save_pretrained(tmp_path / "weights")
    expected = source.state_dict()

    pretrained = build_run_model(_loaded(tmp_path, {"kind": "hf", "from_pretrained": "weights"}), BYTES, 64)
    loaded = _loaded(tmp_path, {"kind": "hf", "config": LLAMA, "init_from": "weights"})
    continued = build_run_model(loaded, BYTES, 64)
    assert not torch.equal(continued.model.state_dict()["lm_head.weight"], expected["lm_head.weight"])
    load_init_weights(loaded, continued)
    for model in (pretrained, continued):
        for name, value in model.model.state_dict().items():
            assert torch.equal(value, expected[name]), name

    # Provenance: the source's fingerprint goes into the resolved config, and a pinned one must match.
    assert record_weights_source(loaded) == weights_fingerprint(tmp_path / "weights")
    assert loaded.config.model.init_fingerprint == weights_fingerprint(tmp_path / "weights")
    loaded.config.model.init_fingerprint = "0000000000000000"
    with pytest.raises(ConfigError) as info:
        record_weights_source(loaded)
    assert info.value.key == "model.init_fingerprint"


def test_init_from_weights_of_another_architecture_names_the_key(tmp_path: Path) -> None:
    config = LlamaConfig(**{k: v for k, v in LLAMA.items() if k != "model_type"}, vocab_size=258)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    loaded = _loaded(tmp_path, {"kind": "gpt2", "init_from": "llama"})
    with pytest.raises(ConfigError) as info:
        load_init_weights(loaded, build_run_model(loaded, BYTES, SEQUENCE_LENGTH))
    assert info.value.key == "model.init_from"
    assert "do not fit" in str(info.value)


def test_check_model_reads_no_weights_and_allocates_none(tmp_path: Path) -> None:
    # A 7B-parameter Llama is checked in a moment: on the meta device nothing is allocated.
    big = {**LLAMA, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32}
    check_model(_loaded(tmp_path, {"kind": "hf", "config": big}), BYTES, SEQUENCE_LENGTH)
    with pytest.raises(ConfigError) as info:
        check_model(_loaded(tmp_path, {"kind": "hf", "config": LLAMA, "init_from": "nowhere"}), BYTES, SEQUENCE_LENGTH)
    assert info.value.key == "model.init_from"


def test_weights_fingerprint_changes_with_any_byte(tmp_path: Path) -> None:
    folder = tmp_path / "w"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"\x00" * 1000)
    before = weights_fingerprint(folder)
    assert weights_fingerprint(folder) == before
    (folder / "model.safetensors").write_bytes(b"\x00" * 999 + b"\x01")
    assert weights_fingerprint(folder) != before
