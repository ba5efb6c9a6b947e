"""Tokenizer adapters: the byte tokenizer, Hugging Face tokenizers built locally, load errors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from tokenizers import Tokenizer as RawTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from multirun.data.tokenizers import ByteTokenizer, HFTokenizer, Tokenizer, load_tokenizer
from multirun.errors import InputError

CORPUS = ["hello world", "the quick brown fox jumps", "hello there, world", "größer als"] * 5


def _save_tokenizer(
    path: Path,
    *,
    eos: str | None = "<eos>",
    pad: str | None = "<pad>",
    corpus: list[str] = CORPUS,
    post_eos: bool = False,
) -> Path:
    """Train a tiny byte-level BPE on ``corpus`` and save it as a transformers tokenizer dir."""
    raw = RawTokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<unk>", "<eos>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    raw.train_from_iterator(corpus, trainer)
    if post_eos:
        # A post-processor that appends EOS: encode() must still add no special tokens.
        raw.post_processor = processors.TemplateProcessing(
            single="$A <eos>", special_tokens=[("<eos>", raw.token_to_id("<eos>"))]
        )
    kwargs = {k: v for k, v in {"eos_token": eos, "pad_token": pad}.items() if v is not None}
    PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", **kwargs).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save_tokenizer(tmp_path_factory.mktemp("hf_tok"), post_eos=True)


# --------------------------------------------------------------------------- bytes


def test_byte_tokenizer_round_trip_and_specials() -> None:
    tok = ByteTokenizer()
    assert isinstance(tok, Tokenizer)
    assert (tok.vocab_size, tok.eos_token_id, tok.pad_token_id, tok.name) == (258, 256, 257, "bytes")
    text = "naïve café — 東京\n"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert all(0 <= i < 256 for i in ids)
    # Specials are dropped wherever they are.
    assert tok.decode([tok.pad_token_id, *ids[:3], tok.eos_token_id, *ids[3:], tok.pad_token_id]) == text
    assert tok.encode("") == []


def test_byte_tokenizer_decode_replaces_split_characters_and_rejects_unknown_ids() -> None:
    tok = ByteTokenizer()
    ids = tok.encode("é")  # two bytes
    assert tok.decode(ids[:1]) == "\ufffd"
    with pytest.raises(ValueError, match="258"):
        tok.decode([65, 258])
    with pytest.raises(ValueError):
        tok.decode([-1])


def test_byte_tokenizer_fingerprint_is_stable_hex() -> None:
    fp = ByteTokenizer().fingerprint()
    assert re.fullmatch(r"[0-9a-f]{16}", fp)
    assert fp == ByteTokenizer().fingerprint()


# --------------------------------------------------------------------------- huggingface


def test_hf_tokenizer_loads_local_dir(hf_dir: Path) -> None:
    tok = load_tokenizer("huggingface", hf_dir)
    assert isinstance(tok, HFTokenizer) and isinstance(tok, Tokenizer)
    assert tok.name == f"hf:{hf_dir}"
    hf = tok.hf_tokenizer
    assert tok.eos_token_id == hf.convert_tokens_to_ids("<eos>")
    assert tok.pad_token_id == hf.convert_tokens_to_ids("<pad>")
    assert tok.pad_token_id != tok.eos_token_id
    assert tok.vocab_size == len(hf)
    text = "hello world, größer"
    ids = tok.encode(text)
    assert ids and all(isinstance(i, int) and 0 <= i < tok.vocab_size for i in ids)
    # The saved post-processor appends EOS; encode() must not.
    assert tok.eos_token_id not in ids
    assert hf.encode(text)[-1] == tok.eos_token_id
    assert tok.decode(ids) == text
    assert tok.decode([*ids, tok.eos_token_id]) == text


def test_hf_fingerprint_stable_and_sensitive_to_vocabulary(hf_dir: Path, tmp_path: Path) -> None:
    a = HFTokenizer(hf_dir).fingerprint()
    assert re.fullmatch(r"[0-9a-f]{16}", a)
    assert a == HFTokenizer(hf_dir).fingerprint()
    other = _save_tokenizer(tmp_path / "other", corpus=["completely different words here"] * 5, post_eos=True)
    assert HFTokenizer(other).fingerprint() != a
    # Non-tokenizer files (model weights, notes) do not enter the fingerprint.
    copy = _save_tokenizer(tmp_path / "copy", post_eos=True)
    (copy / "model.safetensors").write_bytes(b"\0" * 1000)
    assert HFTokenizer(copy).fingerprint() == a


def test_hf_pad_falls_back_to_eos(tmp_path: Path) -> None:
    tok = HFTokenizer(_save_tokenizer(tmp_path / "nopad", pad=None))
    assert tok.pad_token_id == tok.eos_token_id


def test_hf_without_eos_is_rejected(tmp_path: Path) -> None:
    d = _save_tokenizer(tmp_path / "noeos", eos=None)
    with pytest.raises(InputError, match="EOS") as err:
        load_tokenizer("huggingface", d)
    assert err.value.file == str(d)
    assert err.value.key == "tokenizer.path"


# --------------------------------------------------------------------------- load errors


def test_load_tokenizer_bytes() -> None:
    assert isinstance(load_tokenizer("bytes"), ByteTokenizer)
    with pytest.raises(InputError) as err:
        load_tokenizer("bytes", "/some/dir")
    assert err.value.key == "tokenizer.path"


def test_load_tokenizer_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError) as err:
        load_tokenizer("sentencepiece")  # type: ignore[arg-type]
    assert err.value.key == "tokenizer.kind"

    with pytest.raises(InputError, match="required") as err:
        load_tokenizer("huggingface")
    assert err.value.key == "tokenizer.path"

    missing = tmp_path / "nope"
    with pytest.raises(InputError, match="does not exist") as err:
        load_tokenizer("huggingface", missing)
    assert err.value.key == "tokenizer.path" and err.value.file == str(missing)
    assert str(missing) in str(err.value)

    a_file = tmp_path / "tokenizer.json"
    a_file.write_text("{}")
    with pytest.raises(InputError, match="found a file") as err:
        load_tokenizer("huggingface", a_file)
    assert err.value.file == str(a_file)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="could not load") as err:
        load_tokenizer("huggingface", empty)
    assert err.value.file == str(empty) and err.value.key == "tokenizer.path"
