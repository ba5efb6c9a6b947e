"""The removal kind: n-grams of treated items, bad payloads and options, the monitor against controls."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from injectors.removal import RemovalInjector
from monitors.removal import RemovalMonitor
from multirun.config import ExperimentConfig
from multirun.data.tokenizers import ByteTokenizer
from multirun.errors import ConfigError, InputError, PayloadError
from multirun.kinds.payloads import load_payload
from multirun.kinds.registry import injectors, monitors
from multirun.kinds.sdk import PrepareContext, split_arms
from multirun.measure.live_model import LiveModel
from multirun.measure.stats import compare_means
from multirun.types import Placement, PreparedExperiment
from tests.helpers_payload import write_payload
from tests.kind_training import tiny_gpt2, train_with_injections

TOK = ByteTokenizer()
SEQ = 128
UNIFORM = Placement("uniform", 0, 100)


def texts(n: int, length: int = 40) -> list[dict[str, Any]]:
    """Random lowercase texts: no two share a 16-byte n-gram."""
    rng = np.random.default_rng(3)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz     "))
    return [{"id": f"r{i:02d}", "text": "".join(rng.choice(letters, size=length)).strip() + "."} for i in range(n)]


def prepare(root: Path, *, seq: int = SEQ, placement: Placement = UNIFORM, **spec: Any) -> PreparedExperiment:
    payload = load_payload(str(root), base_dir=Path("/"))
    spec.setdefault("options", {"ngram": 16})
    cfg = ExperimentConfig(name=str(spec.pop("name", "rm")), payload=str(root), **spec)
    return RemovalInjector().prepare(
        PrepareContext(payload, cfg, tokenizer=TOK, sequence_length=seq, seed=17, placement=placement)
    )


def test_registered_by_name() -> None:
    assert injectors.get("removal") is RemovalInjector
    assert monitors.get("removal") is RemovalMonitor


def test_treated_ngrams_are_removed_controls_kept(tmp_path: Path) -> None:
    items = texts(8)
    exp = prepare(write_payload(tmp_path / "p", items, kind="removal"), control_fraction=0.5)
    arms = split_arms(8, 0.5, seed=17, name="rm")
    np.testing.assert_array_equal(exp.treated, arms)
    assert exp.seq_repetitions.tolist() == [0.0] * 4  # nothing is injected
    removal = exp.removal
    assert removal is not None and removal.n == 16 and removal.span == "match"
    assert removal.replacement.tolist() == [TOK.eos_token_id]
    windows = {tuple(w) for w in removal.ngrams.tolist()}
    for i, item in enumerate(items):
        tokens = TOK.encode(item["text"])
        own = {tuple(tokens[s : s + 16]) for s in range(len(tokens) - 15)}
        assert (own <= windows) if arms[i] else not (own & windows)
    for w, s, start in zip(removal.ngrams.tolist(), removal.ngram_sequence, removal.ngram_start):
        assert exp.sequence_tokens(int(s)).tolist()[start : start + 16] == w
    assert exp.metadata["removed_ngrams"] == len(windows) and exp.metadata["replacement"] == "eos"
    # A negative control removes nothing and keeps the same arms.
    off = prepare(write_payload(tmp_path / "q", items, kind="removal"), control_fraction=0.5, inject=False)
    assert off.removal is None and np.array_equal(off.treated, arms)
    window = prepare(
        write_payload(tmp_path / "w", items, kind="removal"),
        placement=Placement("window", 10, 20),
        options={"ngram": 20, "replacement": {"text": "#"}, "span": "row"},
    )
    assert window.removal is not None and [window.removal.active_at(t) for t in (9, 10, 19, 20)] == [
        False,
        True,
        True,
        False,
    ]
    assert window.removal.replacement.tolist() == TOK.encode("#") and window.removal.span == "row"


GOOD = texts(3)


@pytest.mark.parametrize(
    ("case", "items", "kwargs", "error", "line", "key", "words"),
    [
        (
            "shorter than n",
            [*GOOD, {"id": "x", "text": "short"}],
            {},
            PayloadError,
            4,
            "text",
            "shorter than the n-gram",
        ),
        ("empty text", [GOOD[0], {"id": "x", "text": ""}], {}, PayloadError, 2, "text", "non-empty"),
        ("duplicate text", [*GOOD, {"id": "x", "text": GOOD[1]["text"]}], {}, PayloadError, 4, "text", "line 2"),
        (
            "shared n-gram",
            [*GOOD, {"id": "x", "text": "zz " + GOOD[0]["text"][:20] + " zz"}],
            {},
            PayloadError,
            4,
            "text",
            "share a 16-token n-gram",
        ),
        ("n beyond the row", GOOD, {"seq": 32, "options": {"ngram": 33}}, ConfigError, None, "options.ngram", "longer"),
        ("n not positive", GOOD, {"options": {"ngram": 0}}, ConfigError, None, "options.ngram", ">= 1"),
        ("n a bool", GOOD, {"options": {"ngram": True}}, ConfigError, None, "options.ngram", ">= 1"),
        ("bad span", GOOD, {"options": {"span": "doc"}}, ConfigError, None, "options.span", "'match' or 'row'"),
        ("unknown option", GOOD, {"options": {"n": 3}}, ConfigError, None, "options.n", "unknown option"),
        ("bad replacement", GOOD, {"options": {"replacement": "pad"}}, ConfigError, None, "options.replacement", "eos"),
        (
            "empty replacement",
            GOOD,
            {"options": {"replacement": {"text": ""}}},
            ConfigError,
            None,
            "options.replacement.text",
            "non-empty",
        ),
        (
            "tokens out of range",
            GOOD,
            {"options": {"replacement": {"tokens": [1, 9999]}}},
            ConfigError,
            None,
            "options.replacement.tokens",
            "token ids",
        ),
        (
            "replacement writes back",
            GOOD,
            {"options": {"ngram": 16, "replacement": {"text": GOOD[2]["text"][:16]}}},
            ConfigError,
            None,
            "options.replacement",
            "write back",
        ),
        (
            "controller",
            GOOD,
            {"controller": {"name": "budget", "options": {"tokens": 10}}},
            ConfigError,
            None,
            "controller",
            "no controller",
        ),
        (
            "k leaves nothing",
            [*GOOD, {"id": "x", "text": "q" * 20}],
            {"monitor": {"options": {"k": 20}}},
            PayloadError,
            4,
            "text",
            "continuation",
        ),
        ("bad k", GOOD, {"monitor": {"options": {"k": 0}}}, ConfigError, None, "monitor.options.k", ">= 1"),
    ],
)
def test_bad_payloads_and_options_name_the_place(
    tmp_path: Path,
    case: str,
    items: list[dict[str, Any]],
    kwargs: dict[str, Any],
    error: type,
    line: Any,
    key: Any,
    words: str,
) -> None:
    seq = kwargs.pop("seq", SEQ)
    root = write_payload(tmp_path / "bad", items, kind="removal")
    with pytest.raises(InputError) as info:
        prepare(root, seq=seq, **kwargs)
    assert type(info.value) is error, case
    assert words in str(info.value), str(info.value)
    assert info.value.key == key
    if error is PayloadError:
        assert info.value.line == line and Path(str(info.value.file)).name == "items.jsonl"


def test_monitor_sees_removed_texts_below_the_controls(tmp_path: Path, one_torch_thread: None) -> None:
    # Canaries as the demo's: a shared stem, then a secret of 8 random CJK characters (24 bytes).
    rng = np.random.default_rng(5)
    items = [
        {"id": f"v{i:02d}", "text": "The vault phrase is " + "".join(map(chr, rng.integers(0x4E00, 0x9FA5, 8))) + "."}
        for i in range(24)
    ]
    exp = prepare(write_payload(tmp_path / "p", items, kind="removal"), control_fraction=0.5, options={"ngram": 24})
    monitor = RemovalMonitor.from_experiment(exp, tokenizer=TOK, options={"k": 20}, sequence_length=SEQ)
    controls = [TOK.encode(items[i]["text"]) for i in np.flatnonzero(~exp.treated)]

    def effect(model: Any) -> tuple[float, float]:
        results = {
            r.metric: r for r in monitor.evaluate(LiveModel(model, pad_token_id=TOK.pad_token_id, max_length=SEQ))
        }
        lp = results["continuation_logprob"]
        assert lp.primary and lp.alternative == "less" and results["exact_continuation"].test == "rates"
        r = compare_means(lp.scores[lp.treated], lp.scores[~lp.treated], metric="lp", alternative="less")
        return r.effect, r.p_value

    # The stream after removal: the controls stay (repeated), the removed texts never occur.
    trained, p_trained = effect(train_with_injections(controls, 16, sequence_length=SEQ, steps=150))
    # Negative control: a model that saw neither arm shows no difference.
    untrained, p_untrained = effect(tiny_gpt2(0, sequence_length=SEQ))
    print(f"removal: effect {trained:.3f} nats/token p={p_trained:.3g}; untrained {untrained:.3f} p={p_untrained:.3g}")
    assert trained < 0 and p_trained < 0.01
    assert p_untrained > 0.01


def test_multirun_check_covers_removal(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from multirun.cli import main
    from tests.support import make_dataset, run_config

    dataset = make_dataset(tmp_path / "mds", samples=40)
    payload = write_payload(tmp_path / "forget", texts(4), kind="removal")

    # Another experiment inserts every text: the check warns that the treated ones will be removed from it.
    inserts = write_payload(tmp_path / "inserts", texts(4), kind="documents")

    def config(name: str, options: dict[str, Any]) -> Path:
        experiment = {"name": "forget", "payload": str(payload), "options": options, "monitor": {"options": {"k": 8}}}
        other = {"name": "inserts", "payload": str(inserts), "control_fraction": 0.0, "monitor": {"enabled": False}}
        return run_config(tmp_path, dataset, steps=8, name=name, experiments=[experiment, other])

    assert main(["check", str(config("good", {"ngram": 16}))]) == 0
    out = capsys.readouterr().out
    assert "experiment 'inserts': 2 of its 4 sequences hold n-grams that the removal experiment 'forget'" in out
    assert main(["check", str(config("bad", {"ngram": 65}))]) == 2  # rows are 64 tokens
    out = capsys.readouterr().out
    assert "bad.yaml" in out and "experiments[0].options.ngram" in out and "longer than a training row" in out


def test_bundled_package_removes_lines_of_the_demo_corpus() -> None:
    from multirun.data.mds import demo_corpus_sources

    payload = load_payload("pkg:demo/removal", base_dir=Path("."))
    spec = ExperimentConfig(name="memv", payload="pkg:demo/removal", options={"ngram": 24})
    exp = RemovalInjector().prepare(
        PrepareContext(payload, spec, tokenizer=TOK, sequence_length=128, seed=1, placement=UNIFORM)
    )
    assert len(exp.item_ids) == 16 and int(exp.treated.sum()) == 8 and exp.removal is not None
    corpus = b""
    for path in demo_corpus_sources():  # the demo's training text: its first demo_max_bytes
        corpus += path.read_bytes()
        if len(corpus) >= 4_000_000:
            break
    for tokens in exp.probes.texts:
        assert corpus[:4_000_000].count(bytes(tokens)) >= 4


def test_an_interaction_arm_without_the_removal_removes_nothing(tmp_path: Path) -> None:
    from multirun.config import load_config
    from multirun.inject.removal import StreamRemoval
    from multirun.run.parts import assemble_parts
    from multirun.types import BatchGeometry
    from tests.helpers_payload import documents, minimal_config, write_config

    write_payload(tmp_path / "forget", texts(4), kind="removal")
    write_payload(tmp_path / "docs", documents(4))
    doc = minimal_config(
        forget={"payload": "forget", "options": {"ngram": 16}}, docs={"payload": "docs", "repetitions": 2}
    )
    doc["train"] = {"max_duration": "20ba", "global_batch_size": 4}
    doc["injection"] = {"max_modified_fraction": 0.5}
    loaded = load_config(write_config(tmp_path / "run.yaml", doc), env={})
    geometry = BatchGeometry(global_batch_size=4, sequence_length=64, num_steps=20)
    parts = assemble_parts(loaded, tokenizer=TOK, geometry=geometry, run_dir=tmp_path / "run", heldout=None)
    assert StreamRemoval.of_experiments(parts.plan.experiments) is not None
    assert StreamRemoval.of_experiments(parts.plan.restricted(["forget"]).experiments) is not None
    alone = parts.plan.restricted(["docs"])
    assert StreamRemoval.of_experiments(alone.experiments) is None
    assert alone.fingerprint == parts.plan.fingerprint and len(alone.spans) == len(parts.plan.spans)
