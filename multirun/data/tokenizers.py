"""Tokenizer adapters: one small protocol over a built-in byte tokenizer and Hugging Face.

Everything that turns text into token ids (data preparation, injectors, monitors)
goes through :class:`Tokenizer`, so a run records exactly one tokenizer identity:
its ``name`` for people and its ``fingerprint`` for machines.

Example:
    >>> tok = load_tokenizer("bytes")
    >>> tok.encode("hé")
    [104, 195, 169]
    >>> tok.decode([104, 195, 169, tok.eos_token_id])
    'hé'
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import xxhash

from multirun.errors import InputError

TokenizerKind = Literal["bytes", "huggingface"]

# Files that define a Hugging Face tokenizer's vocabulary and behaviour. Only these are
# hashed: a tokenizer directory is often a whole model directory, and hashing gigabytes
# of weights to identify a vocabulary would make every run start slowly.
_HF_TOKENIZER_FILES = frozenset(
    {
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "chat_template.jinja",
        "chat_template.json",
        "vocab.json",
        "vocab.txt",
        "merges.txt",
        "spiece.model",
        "tokenizer.model",
        "sentencepiece.bpe.model",
    }
)


@runtime_checkable
class Tokenizer(Protocol):
    """What multirun needs from a tokenizer.

    ``encode`` never adds special tokens: callers decide where EOS goes (after each
    document, around each injected span).
    """

    name: str
    vocab_size: int
    eos_token_id: int
    pad_token_id: int

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without special tokens."""
        ...

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; special tokens are dropped."""
        ...

    def fingerprint(self) -> str:
        """Stable hex string identifying the vocabulary and the encoding behaviour."""
        ...


class ByteTokenizer:
    """UTF-8 bytes as tokens: ids 0..255 are bytes, 256 is EOS, 257 is PAD.

    Needs no files, so the demo and the tests run anywhere.

    Example:
        >>> ByteTokenizer().encode("ab")
        [97, 98]
    """

    name = "bytes"
    vocab_size = 258
    eos_token_id = 256
    pad_token_id = 257

    def encode(self, text: str) -> list[int]:
        """The UTF-8 bytes of ``text`` (no EOS appended)."""
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        """Bytes back to text; EOS/PAD are dropped and broken UTF-8 becomes U+FFFD.

        Raises:
            ValueError: an id is outside ``0 .. vocab_size-1``.
        """
        out = bytearray()
        for raw in ids:
            i = int(raw)
            if 0 <= i < 256:
                out.append(i)
            elif i not in (self.eos_token_id, self.pad_token_id):
                raise ValueError(f"token id {i} is outside the byte tokenizer's vocabulary (0..{self.vocab_size - 1})")
        # "replace" because a span cut at an arbitrary token boundary may split a character.
        return out.decode("utf-8", errors="replace")

    @property
    def hf_tokenizer(self) -> Any:
        """The same tokenizer as a ``transformers.PreTrainedTokenizerFast`` (see :func:`byte_hf_tokenizer`).

        Composer saves it in every checkpoint, so a checkpoint or an exported model
        decodes its own ids without multirun.
        """
        return byte_hf_tokenizer()

    def fingerprint(self) -> str:
        """Constant: the byte tokenizer's behaviour is fixed by its definition."""
        spec = f"multirun.ByteTokenizer/v1/utf-8/eos={self.eos_token_id}/pad={self.pad_token_id}"
        return xxhash.xxh64(spec.encode()).hexdigest()

    def __repr__(self) -> str:
        return "ByteTokenizer()"


def byte_hf_tokenizer() -> Any:
    """:class:`ByteTokenizer` as a Hugging Face fast tokenizer: the same ids for every text.

    A byte-level BPE without merges whose vocabulary maps GPT-2's printable stand-in
    for byte ``b`` to id ``b``; no regex split and no prefix space, so the pre-tokenizer
    only maps bytes to stand-ins; EOS ``<|endoftext|>`` is 256 and PAD ``<|pad|>`` 257.
    ``split_special_tokens`` makes a literal ``<|endoftext|>`` in a text encode as its
    bytes, as :class:`ByteTokenizer` does.

    Example:
        >>> tok = byte_hf_tokenizer()
        >>> tok.encode("hé", add_special_tokens=False), tok.eos_token_id, tok.pad_token_id
        ([104, 195, 169], 256, 257)
    """
    import tokenizers  # type: ignore[import-untyped]
    from transformers import PreTrainedTokenizerFast
    from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode

    stand_in = bytes_to_unicode()
    vocab = {stand_in[byte]: byte for byte in range(256)}
    rust = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[]))
    rust.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    rust.decoder = tokenizers.decoders.ByteLevel()
    # Added in this order, the special tokens take ids 256 (EOS) and 257 (PAD).
    return PreTrainedTokenizerFast(
        tokenizer_object=rust,
        eos_token="<|endoftext|>",
        pad_token="<|pad|>",
        split_special_tokens=True,
        clean_up_tokenization_spaces=False,
    )


def hf_tokenizer_of(tokenizer: Tokenizer) -> Any | None:
    """The ``transformers`` tokenizer behind ``tokenizer`` (None for a tokenizer without one)."""
    return getattr(tokenizer, "hf_tokenizer", None)


class HFTokenizer:
    """A Hugging Face tokenizer loaded from local files only (never the network).

    Args:
        path: a directory written by ``save_pretrained`` (or a model directory that
            holds tokenizer files), or the id of a Hub repository already in the
            local Hugging Face cache.

    Raises:
        InputError: the path is missing, holds no loadable tokenizer, or the
            tokenizer has no EOS token (key ``tokenizer.path``).

    Example::

        tok = HFTokenizer("/models/gpt2")
        tok.encode("hello"), tok.eos_token_id   # ([31373], 50256)
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        # Imported here: transformers takes seconds to import and the byte tokenizer
        # (demo, most tests) never needs it.
        from transformers import AutoTokenizer

        path_str = os.fspath(path)
        try:
            tok = AutoTokenizer.from_pretrained(path_str, local_files_only=True)
        except Exception as err:  # transformers raises OSError, ValueError, KeyError, ...
            raise InputError(
                f"could not load a Hugging Face tokenizer from local files ({type(err).__name__}: {err})",
                file=path_str,
                key="tokenizer.path",
            ) from err
        if tok.eos_token_id is None:
            raise InputError(
                "the tokenizer defines no EOS token; multirun needs one to separate documents and wrap spans "
                "(set eos_token in tokenizer_config.json / special_tokens_map.json)",
                file=path_str,
                key="tokenizer.path",
            )
        self._tok: Any = tok
        self._dir = _tokenizer_dir(path_str)
        self.name = f"hf:{path_str}"
        # len() counts added tokens too; ``tok.vocab_size`` is only the base vocabulary.
        self.vocab_size = len(tok)
        self.eos_token_id = int(tok.eos_token_id)
        # Many causal LM tokenizers (GPT-2, Llama) have no PAD; padding is always masked out,
        # so reusing EOS is safe.
        self.pad_token_id = int(tok.pad_token_id) if tok.pad_token_id is not None else self.eos_token_id
        self._fingerprint: str | None = None

    @property
    def hf_tokenizer(self) -> Any:
        """The wrapped ``transformers`` tokenizer (for model-side code that needs it)."""
        return self._tok

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without BOS/EOS or other special tokens."""
        # verbose=False: documents are longer than model_max_length by design (they are
        # cut into rows afterwards), so transformers' length warning would be noise.
        return list(self._tok.encode(text, add_special_tokens=False, verbose=False))

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` with special tokens dropped and spacing left as encoded."""
        return str(
            self._tok.decode([int(i) for i in ids], skip_special_tokens=True, clean_up_tokenization_spaces=False)
        )

    def fingerprint(self) -> str:
        """xxh64 over the tokenizer files (names and bytes, in sorted name order)."""
        if self._fingerprint is None:
            self._fingerprint = _hash_tokenizer_files(self._dir)
        return self._fingerprint

    def __repr__(self) -> str:
        return f"HFTokenizer({self.name[3:]!r})"


def _tokenizer_dir(path: str) -> Path:
    """The directory holding the tokenizer files of ``path`` (a directory or a cached Hub id)."""
    p = Path(path)
    if p.is_dir():
        return p
    # A Hub id served from the local cache: its files live in a snapshot directory.
    from transformers.utils import cached_file

    resolved = cached_file(
        path, "tokenizer_config.json", local_files_only=True, _raise_exceptions_for_missing_entries=False
    )
    if resolved is None:
        raise InputError("cannot locate the tokenizer files to fingerprint", file=path, key="tokenizer.path")
    return Path(resolved).parent


def _hash_tokenizer_files(directory: Path) -> str:
    names = sorted(f.name for f in directory.iterdir() if f.name in _HF_TOKENIZER_FILES and f.is_file())
    if not names:
        raise InputError("no tokenizer files found to fingerprint", file=directory, key="tokenizer.path")
    h = xxhash.xxh64()
    for name in names:
        data = (directory / name).read_bytes()
        # Length-prefix each part so that (name, bytes) boundaries cannot be shifted.
        h.update(f"{name}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()


def load_tokenizer(kind: TokenizerKind | str, path: str | os.PathLike[str] | None = None) -> Tokenizer:
    """Build the tokenizer a config names.

    Args:
        kind: ``"bytes"`` (built-in, no path) or ``"huggingface"`` (needs ``path``).
        path: the tokenizer directory (or cached Hub id) for ``"huggingface"``.

    Raises:
        InputError: unknown kind (key ``tokenizer.kind``); path missing, not found,
            given where none is used, or not a loadable tokenizer (key ``tokenizer.path``).

    Example:
        >>> load_tokenizer("bytes").vocab_size
        258
    """
    if kind == "bytes":
        if path is not None:
            raise InputError(
                "the byte tokenizer takes no path; remove it or use kind 'huggingface'", key="tokenizer.path"
            )
        return ByteTokenizer()
    if kind == "huggingface":
        if path is None or os.fspath(path).strip() == "":
            raise InputError("required for kind 'huggingface': a tokenizer directory", key="tokenizer.path")
        path_str = os.fspath(path)
        p = Path(path_str).expanduser()
        if not p.exists() and _looks_like_path(path_str):
            raise InputError("tokenizer directory does not exist", file=path_str, key="tokenizer.path")
        if p.exists() and not p.is_dir():
            raise InputError("expected a tokenizer directory, found a file", file=path_str, key="tokenizer.path")
        return HFTokenizer(p if p.exists() else path_str)
    raise InputError(f"unknown tokenizer kind {kind!r}; expected 'bytes' or 'huggingface'", key="tokenizer.kind")


def _looks_like_path(path: str) -> bool:
    """True unless ``path`` could be a Hub id (``name`` or ``org/name``) served from the cache."""
    return path.startswith((".", "/", "~")) or path.count("/") > 1 or (os.sep != "/" and os.sep in path)
