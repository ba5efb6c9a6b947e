"""The memorization kind: verbatim sequences, bad payloads, exact likelihood / extraction / exposure, a detectable effect."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from injectors.memorization import MemorizationInjector
from monitors.memorization import MemorizationMonitor, MemorizationOptions, exposures, parse_monitor_options
from multirun.config import ExperimentConfig
from multirun.data.tokenizers import ByteTokenizer
from multirun.errors import ConfigError, InputError, PayloadError
from multirun.kinds.payloads import load_payload
from multirun.kinds.registry import injectors, monitors
from multirun.kinds.sdk import PrepareContext, split_arms
from multirun.measure.live_model import LiveModel
from multirun.measure.stats import compare_means
from multirun.types import Placement
from tests.helpers_payload import write_payload
from tests.kind_training import tiny_gpt2, train_with_injections

TOK = ByteTokenizer()
EOS = TOK.eos_token_id
SEQ = 128
UNIFORM = Placement("uniform", 0, 100)


def texts(n: int) -> list[dict[str, Any]]:
    return [
        {"id": f"m-{i:02d}", "text": f"The locker {i:02d} code is {i * 7919 % 10007:05d} and the word is zebra."}
        for i in range(n)
    ]


def prepare(root: Path, *, seq: int = SEQ, **spec: Any):
    payload = load_payload(str(root), base_dir=Path("/"))
    cfg = ExperimentConfig(name=str(spec.pop("name", "mem")), payload=str(root), **spec)
    return MemorizationInjector().prepare(
        PrepareContext(payload, cfg, tokenizer=TOK, sequence_length=seq, seed=17, placement=UNIFORM)
    )


# ------------------------------------------------------------------------ injector


def test_registered_by_name() -> None:
    assert injectors.get("memorization") is MemorizationInjector
    assert monitors.get("memorization") is MemorizationMonitor


def test_sequences_arms_and_probes(tmp_path: Path) -> None:
    items = texts(8)
    items[2]["repetitions"] = 4
    exp = prepare(write_payload(tmp_path / "m", items, kind="memorization"), repetitions=2, control_fraction=0.5)
    arms = split_arms(8, 0.5, seed=17, name="mem")
    np.testing.assert_array_equal(exp.treated, arms)
    np.testing.assert_array_equal(exp.seq_items, np.flatnonzero(arms))
    for seq, item in enumerate(exp.seq_items):
        assert exp.sequence_tokens(seq).tolist() == [EOS, *TOK.encode(items[item]["text"]), EOS]
    assert exp.seq_repetitions.tolist() == [4.0 if i == 2 else 2.0 for i in exp.seq_items]
    # Probes hold every item's text, controls too, with where it came from.
    assert [TOK.decode(t) for t in exp.probes.texts] == [i["text"] for i in items]
    assert exp.probes.lines == list(range(1, 9)) and Path(exp.probes.file).name == "items.jsonl"
    assert exp.probes.context == [EOS]
    assert exp.metadata["item_repetitions"] == [4.0 if i == 2 else 2.0 for i in range(8)]

    bare = prepare(write_payload(tmp_path / "b", items, kind="memorization"), control_fraction=0.5, wrap_eos=False)
    assert (
        bare.sequence_tokens(0).tolist() == TOK.encode(items[int(bare.seq_items[0])]["text"])
        and bare.probes.context == []
    )


def _error(tmp_path: Path, items: Sequence[Any], *, seq: int = SEQ, **spec: Any) -> InputError:
    root = write_payload(tmp_path / "bad", items, kind="memorization")
    with pytest.raises(InputError) as info:
        prepare(root, seq=seq, **spec)
    return info.value


GOOD = texts(3)
SHORT = {"id": "s", "text": "too short for k=16"}  # 18 bytes < 2k = 32


@pytest.mark.parametrize(
    ("case", "items", "kwargs", "error", "line", "key", "words"),
    [
        ("missing text", [GOOD[0], {"id": "x"}], {}, PayloadError, 2, "text", "missing"),
        ("text not a string", [GOOD[0], {"id": "x", "text": ["a"]}], {}, PayloadError, 2, "text", "string"),
        ("empty text", [GOOD[0], GOOD[1], {"id": "x", "text": ""}], {}, PayloadError, 3, "text", "non-empty"),
        ("no items", [], {}, PayloadError, None, None, "no items"),
        ("duplicate id", [GOOD[0], GOOD[0]], {}, PayloadError, 2, "id", "duplicate id"),
        (
            "duplicate text",
            [GOOD[0], GOOD[1], {"id": "x", "text": GOOD[0]["text"]}],
            {},
            PayloadError,
            3,
            "text",
            "first on line 1",
        ),
        (
            "too long",
            [GOOD[0], {"id": "x", "text": "y" * 60}],
            {"seq": 60},
            PayloadError,
            2,
            "text",
            "longer than the sequence",
        ),
        ("shorter than 2k", [*GOOD, SHORT], {}, PayloadError, 4, "text", "2k = 32"),
        (
            "shorter than 2k for k=20",
            [GOOD[0], {"id": "x", "text": "y" * 39}],
            {"monitor": {"options": {"k": 20}}},
            PayloadError,
            2,
            "text",
            "2k = 40",
        ),
        ("injector options", GOOD, {"options": {"k": 4}}, ConfigError, None, "options.k", "no options"),
        (
            "2k beyond the sequence",
            GOOD,
            {"seq": 64, "monitor": {"options": {"k": 32}}},
            ConfigError,
            None,
            "monitor.options.k",
            "more than a sequence holds",
        ),
        ("bad k", GOOD, {"monitor": {"options": {"k": 0}}}, ConfigError, None, "monitor.options.k", ">= 1"),
        (
            "k not an integer",
            GOOD,
            {"monitor": {"options": {"k": 8.0}}},
            ConfigError,
            None,
            "monitor.options.k",
            ">= 1",
        ),
        (
            "bad anchor",
            GOOD,
            {"monitor": {"options": {"anchor": "middle"}}},
            ConfigError,
            None,
            "monitor.options.anchor",
            "'end' or 'start'",
        ),
        (
            "bad flag",
            GOOD,
            {"monitor": {"options": {"exposure": "yes"}}},
            ConfigError,
            None,
            "monitor.options.exposure",
            "true or false",
        ),
        (
            "unknown monitor option",
            GOOD,
            {"monitor": {"options": {"kk": 3}}},
            ConfigError,
            None,
            "monitor.options.kk",
            "unknown",
        ),
    ],
)
def test_bad_payloads_are_rejected(
    tmp_path: Path,
    case: str,
    items: list[Any],
    kwargs: dict[str, Any],
    error: type,
    line: int | None,
    key: str | None,
    words: str,
) -> None:
    err = _error(tmp_path, items, **kwargs)
    assert type(err) is error, case
    if error is PayloadError:
        assert err.file is not None and Path(err.file).name == "items.jsonl", case
    assert err.line == line and err.key == key, (case, str(err))
    assert words in str(err), (case, str(err))


def test_short_texts_are_fine_without_exact_match(tmp_path: Path) -> None:
    root = write_payload(tmp_path / "m", [*GOOD, SHORT], kind="memorization")
    assert len(prepare(root, monitor={"options": {"exact_match": False}}).item_ids) == 4
    # Another monitor's options are not checked here; a disabled monitor needs nothing.
    assert len(prepare(root, monitor={"name": "documents", "options": {"k": 0}}).item_ids) == 4
    exp = prepare(root, monitor={"enabled": False})
    # Building the monitor later with exact match on still names the file and line.
    with pytest.raises(PayloadError) as info:
        MemorizationMonitor.from_experiment(exp, tokenizer=TOK, options={}, sequence_length=SEQ)
    assert Path(info.value.file).name == "items.jsonl" and info.value.line == 4 and info.value.key == "text"
    with pytest.raises(ConfigError) as cfg:
        MemorizationMonitor.from_experiment(exp, tokenizer=TOK, options={"anchor": 1}, sequence_length=SEQ)
    assert cfg.value.key == "monitor.options.anchor"


def test_option_defaults() -> None:
    assert parse_monitor_options({}) == MemorizationOptions(k=16, exact_match=True, anchor="end", exposure=True)


# ------------------------------------------------------------------------- exposure


def reference_exposure(scores: Sequence[float], treated: Sequence[bool]) -> list[float]:
    """The documented definition, spelt out with perplexities and explicit reference sets."""
    ppl = [math.exp(-s) for s in scores]
    controls = [i for i, t in enumerate(treated) if not t]
    n_c = len(controls)

    def exposure(i: int, references: list[int]) -> float:
        rank = 1 + sum(1.0 if ppl[r] < ppl[i] else 0.5 if ppl[r] == ppl[i] else 0.0 for r in references)
        return math.log2(len(references) + 1) - math.log2(rank)

    out = []
    for i, t in enumerate(treated):
        if t:  # averaged over the n_c ways of leaving one control out
            out.append(sum(exposure(i, [c for c in controls if c != j]) for j in controls) / n_c)
        else:  # leave-one-out against the other controls
            out.append(exposure(i, [c for c in controls if c != i]))
    return out


def test_exposure_matches_the_definition() -> None:
    rng = np.random.default_rng(0)
    scores = rng.normal(size=12).round(1)  # rounding makes ties
    treated = rng.permutation(np.arange(12) < 5)
    np.testing.assert_allclose(
        exposures(scores, treated), reference_exposure(scores.tolist(), treated.tolist()), atol=1e-12
    )
    # Hand-checked: 3 controls (-1, -2, -3), candidate sets of 3 -> log2 3 is the maximum.
    got = exposures([0.0, -2.5, -1.0, -2.0, -3.0], [True, True, False, False, False])
    l3 = math.log2(3)
    np.testing.assert_allclose(got, [l3, (2 * (l3 - 1) + (l3 - l3)) / 3, l3, l3 - 1, 0.0])
    assert np.isnan(exposures([1.0, 2.0], [True, True])).all()


def test_exposure_has_equal_means_under_the_null() -> None:
    # Exchangeable items: over every choice of which 2 of 6 are treated, treated items and
    # controls have the same mean exposure (the reason for leave-one-out on both arms).
    scores = np.array([-1.0, -2.0, -2.0, -3.5, -4.0, -7.0])
    treated_means, control_means = [], []
    for chosen in itertools.combinations(range(6), 2):
        mask = np.isin(np.arange(6), chosen)
        e = exposures(scores, mask)
        treated_means.append(e[mask].mean())
        control_means.append(e[~mask].mean())
    assert abs(np.mean(treated_means) - np.mean(control_means)) < 1e-12


# ------------------------------------------------------------------------- monitor


def tiny_model(seed: int = 0) -> torch.nn.Module:
    return tiny_gpt2(seed, sequence_length=SEQ)


def manual_logprobs(model: torch.nn.Module, context: list[int], target: list[int]) -> list[float]:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([context + target])).logits[0].double()
    logp = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
    return [float(logp[len(context) - 1 + i, t]) for i, t in enumerate(target)]


def manual_greedy(model: torch.nn.Module, context: list[int], n: int) -> list[int]:
    ids = list(context)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(context) :]


@pytest.mark.parametrize("anchor", ["end", "start"])
def test_scores_equal_an_independent_computation(anchor: str, one_torch_thread: None) -> None:
    k = 4
    model = tiny_model(seed=1)
    model.eval()
    rng = np.random.default_rng(2)
    # Token texts built around the random model's own greedy continuations, so that some
    # items are greedily extractable (exact match 1) and the others are not.
    token_texts: list[list[int]] = []
    for i in range(12):
        body = rng.integers(0, 256, size=int(rng.integers(2 * k, 30))).tolist()
        if i % 3 == 0:
            if anchor == "end":
                body = body[:-k] + manual_greedy(model, body[:-k][-k:], k)
            else:
                body = body[:k] + manual_greedy(model, [EOS, *body[:k]], k) + body[2 * k :]
        token_texts.append(body)
    treated = np.arange(12) % 2 == 0
    monitor = MemorizationMonitor(
        [f"i{i}" for i in range(12)], treated, token_texts, [EOS], MemorizationOptions(k=k, anchor=anchor)
    )
    model.train()
    results = {
        r.metric: r
        for r in monitor.evaluate(LiveModel(model, pad_token_id=TOK.pad_token_id, max_length=SEQ, batch_size=5))
    }
    assert model.training
    model.eval()

    logprob = results["text_logprob"]
    assert logprob.primary and logprob.test == "means" and logprob.alternative == "greater"
    want = [float(np.mean(manual_logprobs(model, [EOS], t))) for t in token_texts]
    np.testing.assert_allclose(logprob.scores, want, rtol=0, atol=2e-5)

    match = results["exact_match"]
    assert not match.primary and match.test == "rates" and match.alternative == "greater"
    if anchor == "end":
        reference = [manual_greedy(model, t[-2 * k : -k], k) == t[-k:] for t in token_texts]
    else:
        reference = [manual_greedy(model, [EOS, *t[:k]], k) == t[k : 2 * k] for t in token_texts]
    np.testing.assert_array_equal(match.scores, np.array(reference, dtype=float))
    assert match.scores[::3].all() and 0 < match.scores.sum() < 12

    exposure = results["exposure"]
    assert not exposure.primary and exposure.test == "means"
    np.testing.assert_allclose(exposure.scores, reference_exposure(want, treated.tolist()), atol=1e-6)


def test_without_eos_the_first_token_is_the_context(one_torch_thread: None) -> None:
    model = tiny_model(seed=4)
    text = TOK.encode("abcdefgh")
    monitor = MemorizationMonitor(
        ["a", "b"],
        np.array([True, False]),
        [text, text[::-1]],
        [],
        MemorizationOptions(k=2, exposure=False, membership=False),
    )
    results = monitor.evaluate(LiveModel(model, pad_token_id=TOK.pad_token_id, max_length=SEQ))
    assert [r.metric for r in results] == ["text_logprob", "exact_match"]
    model.eval()
    np.testing.assert_allclose(results[0].scores[0], np.mean(manual_logprobs(model, text[:1], text[1:])), atol=2e-5)


# ------------------------------------------------------------------------ direction


def test_demo_canaries_are_memorised_and_detected(one_torch_thread: None) -> None:
    payload = load_payload("pkg:demo/memorization", base_dir=Path("."))
    spec = ExperimentConfig(name="memorization", payload="pkg:demo/memorization", repetitions=8, control_fraction=0.5)
    exp = MemorizationInjector().prepare(
        PrepareContext(payload, spec, tokenizer=TOK, sequence_length=SEQ, seed=17, placement=UNIFORM)
    )
    assert len(exp.item_ids) == 40 and int(exp.treated.sum()) == 20 and int(exp.seq_lengths.max()) <= 100
    model = train_with_injections(
        [exp.sequence_tokens(i).tolist() for i in range(len(exp.seq_items))], 8, sequence_length=SEQ
    )

    monitor = MemorizationMonitor.from_experiment(exp, tokenizer=TOK, options={}, sequence_length=SEQ)
    results = {
        r.metric: r
        for r in monitor.evaluate(LiveModel(model, pad_token_id=TOK.pad_token_id, max_length=SEQ, batch_size=32))
    }
    logprob, exposure = results["text_logprob"], results["exposure"]
    # The framework's test for the primary metric: permutation test, treated > never-injected.
    primary = compare_means(logprob.scores[logprob.treated], logprob.scores[~logprob.treated], metric="text_logprob")
    secondary = compare_means(exposure.scores[exposure.treated], exposure.scores[~exposure.treated], metric="exposure")
    print(
        f"memorisation: text_logprob effect {primary.effect:.3f} nats/token, p={primary.p_value:.2g}; "
        f"exposure {secondary.treated_mean:.2f} vs {secondary.control_mean:.2f} bits, p={secondary.p_value:.2g}; "
        f"exact match {results['exact_match'].scores[logprob.treated].mean():.2f} vs {results['exact_match'].scores[~logprob.treated].mean():.2f}"
    )
    assert primary.effect > 0 and primary.p_value < 0.01
    assert secondary.effect > 0 and secondary.p_value < 0.01
