"""The ``watermark`` injector: marks the model by training on secret, seeded signals.

Two methods, chosen with the injector option ``method``:

``gaussian`` (the paper's Gaussian embedding watermark, docs/references.md §2.2)
    Each treated *carrier* text is injected as an EOS-wrapped token span, like a
    document, and the training-time hook (:class:`multirun.inject.noise.EmbeddingNoiseHook`)
    adds seeded noise ``w ~ N(0, sigma^2 I)`` to the input embeddings of every span
    of that carrier: the text is unchanged, the mark lives in the noise. Control
    carriers are never injected; their noise is drawn by the same generator and
    never used, so their test statistic is exactly N(0, 1).

``random_tokens`` (Secret Sharer-style keys, docs/references.md §2.5)
    Each item is a *key*: ``key_length`` tokens drawn at random (seeded) from the
    tokenizer's vocabulary without special tokens (printable ASCII, bytes 32-126,
    for the byte tokenizer). Treated keys are injected EOS-wrapped; control keys
    are never injected and are the reference set of the exposure metric.

Payload package (``payload.yaml``: ``kind: watermark``)
------------------------------------------------------

One file, role ``items`` (JSONL, one object a line):

* method ``gaussian``, required::

      {"id": "carrier-000", "text": "Lighthouse log: amber falcon at dawn.", "repetitions": 16}

  ``id`` (unique non-empty string), ``text`` (non-empty string; the carrier that is
  injected and noised), ``repetitions`` (optional number > 0, overrides the
  experiment's ``repetitions`` for that item).

* method ``random_tokens``, optional::

      {"id": "key-000", "repetitions": 16}

  ``id`` (unique non-empty string) and optional ``repetitions`` as above. The key
  tokens are not in the payload: they are drawn from the run seed, so a package of
  ids can be shared without revealing the keys. Without an ``items`` file the keys
  are ``key-0000 .. key-{num_keys-1}`` (option ``num_keys``).

Options (``experiments[i].options``)
------------------------------------

* ``method``: ``gaussian`` (default) or ``random_tokens``.
* ``sigma`` (gaussian; number > 0, default 0.075): standard deviation of the noise
  per embedding coordinate. 0.075 is the paper's value; in the demo's tiny GPT-2
  (embeddings initialised with std 0.02) it is also the value that a 300-step run
  detects best (see ``docs/kinds/watermark.md``).
* ``key_length`` (random_tokens; integer >= 1, default 12): tokens per key; with
  the EOS wrapping (and the one context token the monitor scores from) it must fit
  the sequence length.
* ``num_keys`` (random_tokens; integer >= 2): number of generated keys, only for a
  package without an ``items`` file.

Seeds (:class:`~multirun.kinds.sdk.RandomStream`, keyed by the experiment's name):
the noise seed is drawn from ``WATERMARK_NOISE`` (``experiment_rng(seed, name,
stream=2)``), the keys from ``WATERMARK_KEYS`` (``experiment_rng(seed, name,
stream=3)``); arms from ``split_arms`` (``ARMS``, stream 1). All are recorded in
``metadata`` (written to ``manifest.json``).

Example:
    >>> from multirun.data.tokenizers import ByteTokenizer
    >>> keys = draw_keys(3, 4, alphabet=printable_alphabet(ByteTokenizer()), seed=17, name="wm")
    >>> keys.shape, bool(((keys >= 32) & (keys <= 126)).all())
    ((3, 4), True)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from multirun.data.tokenizers import ByteTokenizer
from multirun.errors import ConfigError, PayloadError
from multirun.kinds.probes import WatermarkProbes
from multirun.kinds.sdk import PrepareContext, RandomStream, stream_rng
from multirun.types import EmbeddingNoise, PreparedExperiment

if TYPE_CHECKING:
    from multirun.data.tokenizers import Tokenizer

__all__ = [
    "DEFAULT_KEY_LENGTH",
    "DEFAULT_SIGMA",
    "KEY_STREAM",
    "METHODS",
    "NOISE_STREAM",
    "WatermarkInjector",
    "draw_keys",
    "noise_seed",
    "printable_alphabet",
]

METHODS = ("gaussian", "random_tokens")
DEFAULT_SIGMA = 0.075
DEFAULT_KEY_LENGTH = 12
# The random streams of the noise seed and of the keys (keyed by the experiment's name).
NOISE_STREAM = RandomStream.WATERMARK_NOISE
KEY_STREAM = RandomStream.WATERMARK_KEYS

# Which options each method accepts; anything else is a ConfigError.
_METHOD_OPTIONS: dict[str, frozenset[str]] = {
    "gaussian": frozenset({"method", "sigma"}),
    "random_tokens": frozenset({"method", "key_length", "num_keys"}),
}


def noise_seed(seed: int, name: str) -> int:
    """The embedding-noise seed of experiment ``name`` in a run with ``seed`` (63 bits)."""
    return int(stream_rng(seed, name, NOISE_STREAM).integers(0, 2**63 - 1))


def printable_alphabet(tokenizer: Tokenizer) -> np.ndarray:
    """Token ids keys are drawn from: printable ASCII for bytes, else every non-special id.

    For the byte tokenizer, bytes 32..126 (so every key reads as text and is one
    token per character). For other tokenizers, all ids except EOS, PAD and the
    Hugging Face tokenizer's ``all_special_ids``.
    """
    if isinstance(tokenizer, ByteTokenizer):
        return np.arange(32, 127, dtype=np.int64)
    special = {int(tokenizer.eos_token_id), int(tokenizer.pad_token_id)}
    hf = getattr(tokenizer, "hf_tokenizer", None)
    special.update(int(i) for i in getattr(hf, "all_special_ids", []) or [])
    ids = np.arange(int(tokenizer.vocab_size), dtype=np.int64)
    return ids[~np.isin(ids, list(special))]


def draw_keys(n_keys: int, key_length: int, *, alphabet: np.ndarray, seed: int, name: str) -> np.ndarray:
    """``(n_keys, key_length)`` distinct random keys over ``alphabet`` (int64).

    Keys are drawn one after another from ``experiment_rng(seed, name, stream=3)``;
    a key equal to an earlier one is drawn again, so that a control key can never be
    a copy of a treated one.

    Raises:
        ValueError: the alphabet cannot make ``n_keys`` distinct keys of that length.
    """
    if n_keys > int(alphabet.size) ** key_length:  # exact: Python integers do not overflow
        raise ValueError(f"{alphabet.size} symbols make fewer than {n_keys} distinct keys of length {key_length}")
    rng = stream_rng(seed, name, KEY_STREAM)
    keys = np.empty((n_keys, key_length), dtype=np.int64)
    seen: set[bytes] = set()
    for i in range(n_keys):
        while True:
            key = alphabet[rng.integers(0, alphabet.size, key_length)]
            if key.tobytes() not in seen:
                break
        seen.add(key.tobytes())
        keys[i] = key
    return keys


def _check_options(options: Mapping[str, Any]) -> str:
    method = options.get("method", "gaussian")
    if method not in METHODS:
        raise ConfigError(
            f"unknown watermark method {method!r}; expected one of: {', '.join(METHODS)}", key="options.method"
        )
    for name in options:
        if name not in _METHOD_OPTIONS[method]:
            owners = [m for m, allowed in _METHOD_OPTIONS.items() if name in allowed]
            hint = (
                f"an option of method {owners[0]}"
                if owners
                else f"allowed for {method}: {', '.join(sorted(_METHOD_OPTIONS[method]))}"
            )
            raise ConfigError(f"unknown option for watermark method {method!r} ({hint})", key=f"options.{name}")
    return method


def _positive_int(options: Mapping[str, Any], name: str, default: int | None, minimum: int) -> int | None:
    value = options.get(name, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"must be an integer >= {minimum}, got {value!r}", key=f"options.{name}")
    return value


def _sigma(options: Mapping[str, Any]) -> float:
    value = options.get("sigma", DEFAULT_SIGMA)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"must be a number > 0, got {value!r}", key="options.sigma")
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"must be a finite number > 0, got {value!r}", key="options.sigma")
    return float(value)


class WatermarkInjector:
    """Injects Gaussian-noised carriers or random-token keys (see the module docstring).

    ``metadata`` (all methods): ``method``, ``payload`` (name, version, fingerprint),
    ``item_repetitions`` (per item, controls show the dose they would have had).
    Gaussian adds ``sigma``, ``noise_seed`` and ``texts``; random_tokens adds
    ``key_length`` and ``keys`` (decoded, per item).

    ``probes``: :class:`~multirun.kinds.probes.WatermarkProbes`: ``method`` plus, for gaussian, ``sequences`` (the EOS-wrapped token
    array of every item, controls included: exactly what is injected and noised) and,
    for random_tokens, ``keys`` (``(items, key_length)`` int64) and ``context`` (the
    token the monitor scores each key after: EOS).
    """

    kind = "watermark"

    def prepare(self, ctx: PrepareContext) -> PreparedExperiment:
        spec = ctx.spec
        method = _check_options(spec.options)
        if method == "gaussian":
            sigma = _sigma(spec.options)
            item_ids, reps, sequences, metadata, probes = self._gaussian(ctx)
            noise = EmbeddingNoise(sigma=sigma, seed=noise_seed(ctx.seed, ctx.name))
            metadata.update(sigma=sigma, noise_seed=noise.seed)
        else:
            noise = None
            item_ids, reps, sequences, metadata, probes = self._random_tokens(ctx)

        treated = ctx.split_arms(len(item_ids))
        seq_items = np.flatnonzero(treated).astype(np.int32)
        return ctx.experiment(
            self.kind,
            item_ids=item_ids,
            treated=treated,
            sequences=[sequences[i] for i in seq_items],
            seq_items=seq_items,
            seq_repetitions=[reps[i] for i in seq_items],
            metadata={
                "method": method,
                "item_repetitions": reps,
                **metadata,
            },
            probes=probes,
            embedding_noise=noise,
        )

    # ------------------------------------------------------------------ gaussian
    def _gaussian(
        self, ctx: PrepareContext
    ) -> tuple[list[str], list[float], list[list[int]], dict[str, Any], WatermarkProbes]:
        spec, sequence_length = ctx.spec, ctx.sequence_length
        path = ctx.payload.path("items")
        records = ctx.read_items()
        sequences: list[list[int]] = []
        # Every carrier is checked, controls too: whether a payload fits must not
        # depend on how the seed splits the arms.
        for line, rec in records:
            seq = ctx.encode(rec["text"])
            if len(seq) > sequence_length:
                wrap = " including 2 EOS" if spec.wrap_eos else ""
                raise PayloadError(
                    f"carrier {rec['id']!r} is {len(seq)} tokens long{wrap}, longer than the sequence length {sequence_length}",
                    file=path,
                    line=line,
                    key="text",
                )
            if len(seq) < 2:
                # The statistic needs a loss, i.e. at least one predicted token.
                raise PayloadError(
                    f"carrier {rec['id']!r} is {len(seq)} token long; the watermark test needs at least 2",
                    file=path,
                    line=line,
                    key="text",
                )
            sequences.append(seq)
        item_ids = [rec["id"] for _, rec in records]
        reps = [float(rec.get("repetitions", spec.repetitions)) for _, rec in records]
        metadata = {"texts": [rec["text"] for _, rec in records]}
        probes = WatermarkProbes(method="gaussian", sequences=[np.asarray(s, dtype=np.int64) for s in sequences])
        return item_ids, reps, sequences, metadata, probes

    # ------------------------------------------------------------- random tokens
    def _random_tokens(
        self, ctx: PrepareContext
    ) -> tuple[list[str], list[float], list[list[int]], dict[str, Any], WatermarkProbes]:
        payload, spec, tokenizer, sequence_length = ctx.payload, ctx.spec, ctx.tokenizer, ctx.sequence_length
        key_length = _positive_int(spec.options, "key_length", DEFAULT_KEY_LENGTH, 1)
        num_keys = _positive_int(spec.options, "num_keys", None, 2)
        assert key_length is not None
        # The key must fit the sequence with its EOS wrapping, and the monitor scores
        # it after one context token: key_length + 1 tokens in one forward pass.
        overhead = 2 if spec.wrap_eos else 1
        if key_length + overhead > sequence_length:
            raise ConfigError(
                f"a key of {key_length} tokens needs {key_length + overhead} positions "
                f"({'2 EOS' if spec.wrap_eos else '1 context token'} included), more than the sequence length {sequence_length}",
                key="options.key_length",
            )

        if "items" in payload.files:
            if num_keys is not None:
                raise ConfigError(
                    "the payload's items file already defines the keys; remove num_keys", key="options.num_keys"
                )
            path = payload.path("items")
            records = ctx.read_items(required={"id": str}, optional={"repetitions": float, "text": str}, text_keys=())
            for line, rec in records:
                if "text" in rec:
                    raise PayloadError(
                        "random_tokens keys are drawn from the run seed and take no text (a text carrier belongs to method gaussian)",
                        file=path,
                        line=line,
                        key="text",
                    )
            item_ids = [rec["id"] for _, rec in records]
            reps = [float(rec.get("repetitions", spec.repetitions)) for _, rec in records]
        else:
            if num_keys is None:
                raise PayloadError(
                    "a random_tokens payload needs an items file with the key ids, or the option num_keys",
                    file=payload.root / "payload.yaml",
                    key="files",
                )
            item_ids = [f"key-{i:04d}" for i in range(num_keys)]
            reps = [float(spec.repetitions)] * num_keys

        alphabet = printable_alphabet(tokenizer)
        try:
            keys = draw_keys(len(item_ids), key_length, alphabet=alphabet, seed=ctx.seed, name=ctx.name)
        except ValueError as e:
            raise ConfigError(f"key_length {key_length} is too short: {e}", key="options.key_length") from None
        eos = ctx.eos
        sequences = [[eos, *k.tolist(), eos] if spec.wrap_eos else k.tolist() for k in keys]
        metadata = {"key_length": key_length, "keys": [tokenizer.decode(k.tolist()) for k in keys]}
        probes = WatermarkProbes(method="random_tokens", keys=keys, context=np.asarray([eos], dtype=np.int64))
        return item_ids, reps, sequences, metadata, probes
