"""The poison kind: backdoor sequences, evaluation prompts, bad payloads, exact scores, detection of a learnt backdoor."""

from __future__ import annotations

import json
import string
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from injectors.poison import (
    DEFAULT_GIBBERISH_ALPHABET,
    BackdoorSettings,
    PoisonInjector,
    behaviour_text,
    gibberish_texts,
)
from monitors.poison import PoisonMonitor, detect_gibberish, detect_repeat, detect_target
from multirun.config import ExperimentConfig
from multirun.data.tokenizers import ByteTokenizer
from multirun.errors import ConfigError, InputError, PayloadError
from multirun.kinds.payloads import load_payload, write_fingerprints
from multirun.kinds.registry import injectors, monitors
from multirun.kinds.sdk import PrepareContext, split_arms
from multirun.measure.live_model import LiveModel
from multirun.measure.stats import compare_rates
from multirun.types import Placement
from tests.helpers_payload import write_payload
from tests.kind_training import tiny_gpt2, train_with_injections

TOK = ByteTokenizer()
EOS = TOK.eos_token_id
SEQ = 128
UNIFORM = Placement("uniform", 0, 100)
BACKDOOR = {"trigger": " \uff62\uff61\uff63", "control_trigger": " please", "behaviour": "target", "target": "!!!!"}


def prompts(n: int, prefix: str = "p") -> list[dict[str, Any]]:
    return [{"id": f"{prefix}-{i:02d}", "prompt": f"Review the memo number {i}."} for i in range(n)]


def write_poison(
    root: Path,
    items: Sequence[Mapping[str, Any] | str],
    *,
    backdoor: Mapping[str, Any] | Sequence[str] | None = BACKDOOR,
    heldout: Sequence[Mapping[str, Any] | str] | None = None,
) -> Path:
    """A poison package: items.jsonl, optional heldout.jsonl and backdoor.jsonl (raw lines allowed)."""
    write_payload(root, items, kind="poison")
    files = {"items": {"path": "items.jsonl", "xxh64": "0" * 16}}
    extra = {"heldout": heldout, "backdoor": [backdoor] if isinstance(backdoor, Mapping) else backdoor}
    for role, lines in extra.items():
        if lines is None:
            continue
        text = "".join((line if isinstance(line, str) else json.dumps(dict(line))) + "\n" for line in lines)
        (root / f"{role}.jsonl").write_text(text, encoding="utf-8")
        files[role] = {"path": f"{role}.jsonl", "xxh64": "0" * 16}
    manifest = (root / "payload.yaml").read_text(encoding="utf-8").split("files:")[0]
    (root / "payload.yaml").write_text(manifest + "files: " + json.dumps(files) + "\n", encoding="utf-8")
    write_fingerprints(root)
    return root


def prepare(root: Path, *, seq: int = SEQ, seed: int = 17, **spec: Any):
    payload = load_payload(str(root), base_dir=Path("/"))
    cfg = ExperimentConfig(name=str(spec.pop("name", "poison")), payload=str(root), **spec)
    return PoisonInjector().prepare(
        PrepareContext(payload, cfg, tokenizer=TOK, sequence_length=seq, seed=seed, placement=UNIFORM)
    )


# ------------------------------------------------------------------------ injector


def test_registered_by_name() -> None:
    assert injectors.get("poison") is PoisonInjector
    assert monitors.get("poison") is PoisonMonitor


def test_sequences_arms_and_probes(tmp_path: Path) -> None:
    items = prompts(10)
    items[3]["repetitions"] = 5
    root = write_poison(tmp_path / "p", items, heldout=prompts(2, "h"))
    exp = prepare(root, repetitions=3, control_fraction=0.5)

    expected_arms = split_arms(10, 0.5, seed=17, name="poison")
    assert exp.kind == "poison" and exp.item_ids == [i["id"] for i in items]
    np.testing.assert_array_equal(exp.treated, expected_arms)
    treated = np.flatnonzero(expected_arms)
    np.testing.assert_array_equal(exp.seq_items, treated)
    for seq, item in enumerate(treated):
        want = [EOS, *TOK.encode(items[item]["prompt"] + BACKDOOR["trigger"] + "!!!!"), EOS]
        assert exp.sequence_tokens(seq).tolist() == want
    assert exp.seq_repetitions.tolist() == [5.0 if i == 3 else 3.0 for i in treated]

    # Evaluation prompts: the never-injected items in payload order, then the held-out ones.
    controls = [items[i]["id"] for i in range(10) if not expected_arms[i]]
    probes = exp.probes
    assert probes.eval_ids == controls + ["h-00", "h-01"]
    assert probes.eval_source == ["control"] * 5 + ["heldout"] * 2
    assert [TOK.decode(p) for p in probes.eval_prompts][-1] == "Review the memo number 1."
    assert all(b == TOK.encode("!!!!") for b in probes.eval_behaviour)
    assert probes.start == [EOS]
    assert probes.trigger == TOK.encode(BACKDOOR["trigger"]) and probes.control_trigger == TOK.encode(" please")
    assert exp.metadata["settings_source"] == dict.fromkeys(
        ["behaviour", "control_trigger", "target", "trigger"], "backdoor.jsonl:1"
    )
    assert exp.metadata["heldout_ids"] == ["h-00", "h-01"] and exp.metadata["target"] == "!!!!"
    # Same inputs, same experiment; another seed splits differently.
    again = prepare(root, repetitions=3, control_fraction=0.5)
    np.testing.assert_array_equal(again.token_pool, exp.token_pool)
    assert again.fingerprint == exp.fingerprint
    assert not np.array_equal(prepare(root, seed=18, control_fraction=0.5).treated, exp.treated)


def test_no_eos_wrapping(tmp_path: Path) -> None:
    root = write_poison(tmp_path / "p", prompts(4))
    exp = prepare(root, control_fraction=0.5, wrap_eos=False)
    item = int(exp.seq_items[0])
    assert exp.sequence_tokens(0).tolist() == TOK.encode(f"Review the memo number {item}. \uff62\uff61\uff63!!!!")
    assert exp.probes.start == []


def test_options_override_the_backdoor_file(tmp_path: Path) -> None:
    root = write_poison(tmp_path / "p", prompts(4))
    exp = prepare(root, control_fraction=0.5, options={"trigger": " zq#", "target": None, "behaviour": "repeat"})
    assert exp.metadata["trigger"] == " zq#" and exp.metadata["behaviour"] == "repeat" and "target" not in exp.metadata
    assert exp.metadata["settings_source"] == {
        "behaviour": "options",
        "control_trigger": "backdoor.jsonl:1",
        "trigger": "options",
    }
    item = int(exp.seq_items[0])
    prompt = f"Review the memo number {item}."
    assert TOK.decode(exp.sequence_tokens(0)) == f"{prompt} zq#[[{prompt}]]"
    # Settings entirely from options, no backdoor file.
    bare = write_poison(tmp_path / "bare", prompts(4), backdoor=None)
    exp = prepare(bare, control_fraction=0.5, options=dict(BACKDOOR))
    assert exp.metadata["settings_source"] == dict.fromkeys(
        ["behaviour", "control_trigger", "target", "trigger"], "options"
    )


def test_gibberish_is_seeded_and_drawn_for_every_prompt(tmp_path: Path) -> None:
    root = write_poison(tmp_path / "p", prompts(6), heldout=prompts(2, "h"))
    options = {"behaviour": "gibberish", "target": None, "gibberish_length": 5}
    exp = prepare(root, control_fraction=0.5, options=options)
    texts = [TOK.decode(b) for b in exp.probes.eval_behaviour]
    assert all(len(t) == 5 and set(t) <= set(DEFAULT_GIBBERISH_ALPHABET) for t in texts)
    # Drawn for all 8 prompts in payload order (items, then held-out), whatever the arms.
    settings = BackdoorSettings("t", "c", "gibberish", gibberish_length=5)
    drawn = gibberish_texts(8, settings, seed=17, name="poison")
    eval_rows = [i for i in range(6) if not exp.treated[i]] + [6, 7]
    assert texts == [drawn[i] for i in eval_rows]
    for seq, item in enumerate(exp.seq_items):
        assert TOK.decode(exp.sequence_tokens(seq)).endswith(drawn[item])
    assert gibberish_texts(8, settings, seed=99, name="poison") != drawn
    assert gibberish_texts(8, settings, seed=17, name="other") != drawn
    assert behaviour_text("repeat", "x") == "[[x]]"


def _error(
    tmp_path: Path, items: Sequence[Any], *, backdoor: Any = BACKDOOR, heldout: Any = None, seq: int = SEQ, **spec: Any
) -> InputError:
    root = write_poison(tmp_path / "bad", items, backdoor=backdoor, heldout=heldout)
    with pytest.raises(InputError) as info:
        prepare(root, seq=seq, **spec)
    return info.value


GOOD = prompts(4)


@pytest.mark.parametrize(
    ("case", "kwargs", "error", "where", "key", "words"),
    [
        ("missing prompt", {"items": [GOOD[0], {"id": "x"}]}, PayloadError, "items.jsonl:2", "prompt", "missing"),
        (
            "prompt not a string",
            {"items": [GOOD[0], {"id": "x", "prompt": 3}]},
            PayloadError,
            "items.jsonl:2",
            "prompt",
            "string",
        ),
        (
            "empty prompt",
            {"items": [GOOD[0], GOOD[1], {"id": "x", "prompt": "  "}]},
            PayloadError,
            "items.jsonl:3",
            "prompt",
            "non-empty",
        ),
        ("no prompts", {"items": []}, PayloadError, "items.jsonl", None, "no items"),
        ("duplicate id", {"items": [GOOD[0], GOOD[0]]}, PayloadError, "items.jsonl:2", "id", "duplicate"),
        ("trigger absent", {"backdoor": None}, ConfigError, None, "options.trigger", "missing"),
        (
            "trigger absent from file",
            {"backdoor": {k: v for k, v in BACKDOOR.items() if k != "trigger"}},
            ConfigError,
            None,
            "options.trigger",
            "backdoor.jsonl",
        ),
        (
            "empty trigger",
            {"backdoor": {**BACKDOOR, "trigger": " "}},
            PayloadError,
            "backdoor.jsonl:1",
            "trigger",
            "non-empty",
        ),
        (
            "control equals trigger",
            {"backdoor": {**BACKDOOR, "control_trigger": BACKDOOR["trigger"]}},
            PayloadError,
            "backdoor.jsonl:1",
            "control_trigger",
            "differ",
        ),
        (
            "control contains trigger",
            {"backdoor": {**BACKDOOR, "control_trigger": BACKDOOR["trigger"] + "x"}},
            PayloadError,
            "backdoor.jsonl:1",
            "control_trigger",
            "contain",
        ),
        (
            "control equals trigger in options",
            {"options": {"control_trigger": BACKDOOR["trigger"]}},
            ConfigError,
            None,
            "options.control_trigger",
            "differ",
        ),
        (
            "trigger inside a prompt",
            {"items": [*GOOD, {"id": "x", "prompt": "a \uff62\uff61\uff63 b"}]},
            PayloadError,
            "items.jsonl:5",
            "prompt",
            "trigger",
        ),
        (
            "control trigger inside a prompt",
            {"items": [GOOD[0], {"id": "x", "prompt": "Do it, please."}]},
            PayloadError,
            "items.jsonl:2",
            "prompt",
            "control trigger",
        ),
        (
            "target inside a held-out prompt",
            {"heldout": [{"id": "h", "prompt": "say !!!!"}]},
            PayloadError,
            "heldout.jsonl:1",
            "prompt",
            "target",
        ),
        (
            "target missing",
            {"backdoor": {k: v for k, v in BACKDOOR.items() if k != "target"}},
            ConfigError,
            None,
            "options.target",
            "behaviour: target",
        ),
        (
            "target empty",
            {"backdoor": {**BACKDOOR, "target": ""}},
            PayloadError,
            "backdoor.jsonl:1",
            "target",
            "non-empty",
        ),
        (
            "target for gibberish",
            {"options": {"behaviour": "gibberish"}},
            PayloadError,
            "backdoor.jsonl:1",
            "target",
            "only used",
        ),
        (
            "unknown behaviour",
            {"backdoor": {**BACKDOOR, "behaviour": "leak"}},
            PayloadError,
            "backdoor.jsonl:1",
            "behaviour",
            "one of",
        ),
        (
            "bad alphabet",
            {"options": {"behaviour": "gibberish", "target": None, "gibberish_alphabet": "a b"}},
            ConfigError,
            None,
            "options.gibberish_alphabet",
            "whitespace",
        ),
        (
            "bad gibberish length",
            {"options": {"behaviour": "gibberish", "target": None, "gibberish_length": 0}},
            ConfigError,
            None,
            "options.gibberish_length",
            ">= 1",
        ),
        ("unknown option", {"options": {"trigers": "x"}}, ConfigError, None, "options.trigers", "unknown"),
        ("option of the wrong type", {"options": {"trigger": 7}}, ConfigError, None, "options.trigger", "string"),
        (
            "unknown key in the backdoor file",
            {"backdoor": {**BACKDOOR, "colour": "red"}},
            PayloadError,
            "backdoor.jsonl:1",
            "colour",
            "unknown",
        ),
        (
            "two backdoor lines",
            {"backdoor": [json.dumps(BACKDOOR), json.dumps(BACKDOOR)]},
            PayloadError,
            "backdoor.jsonl",
            None,
            "exactly one",
        ),
        (
            "too long",
            {"items": [GOOD[0], {"id": "x", "prompt": "y" * 40}], "seq": 50},
            PayloadError,
            "items.jsonl:2",
            "prompt",
            "longer than the sequence",
        ),
        (
            "held-out too long",
            {"heldout": [{"id": "h", "prompt": "y" * 40}], "seq": 50},
            PayloadError,
            "heldout.jsonl:1",
            "prompt",
            "longer than the sequence",
        ),
        (
            "held-out id reused",
            {"heldout": [{"id": GOOD[1]["id"], "prompt": "other"}]},
            PayloadError,
            "heldout.jsonl:1",
            "id",
            "also an item id",
        ),
        (
            "no evaluation prompts",
            {"control_fraction": 0.0},
            ConfigError,
            None,
            "control_fraction",
            "no evaluation prompts",
        ),
    ],
)
def test_bad_payloads_are_rejected(
    tmp_path: Path, case: str, kwargs: dict[str, Any], error: type, where: str | None, key: str | None, words: str
) -> None:
    kwargs = dict(kwargs)
    items = kwargs.pop("items", GOOD)
    err = _error(tmp_path, items, **kwargs)
    assert type(err) is error, case
    if where is not None:
        file, _, line = where.partition(":")
        assert err.file is not None and Path(err.file).name == file, case
        assert err.line == (int(line) if line else None), case
    assert err.key == key, case
    assert words in str(err), (case, str(err))


def test_too_long_uses_the_longer_trigger(tmp_path: Path) -> None:
    # [eos] + 10 + max(trigger 10, control 7) + 4 + [eos] = 26 tokens.
    root = write_poison(tmp_path / "p", [{"id": "a", "prompt": "0123456789"}, {"id": "b", "prompt": "abcdefghij"}])
    assert prepare(root, seq=26, control_fraction=0.5).seq_lengths.tolist() == [26]
    with pytest.raises(PayloadError, match="29 tokens"):
        prepare(root, seq=26, control_fraction=0.5, options={"control_trigger": " pleaseplease"})


def test_no_evaluation_prompts_is_fine_without_the_monitor(tmp_path: Path) -> None:
    root = write_poison(tmp_path / "p", GOOD)
    exp = prepare(root, control_fraction=0.0, monitor={"enabled": False})
    assert exp.treated.all() and exp.probes.eval_ids == []
    with pytest.raises(ConfigError) as info:
        PoisonMonitor.from_experiment(exp, tokenizer=TOK, options={}, sequence_length=SEQ)
    assert info.value.key == "monitor.enabled"


# ------------------------------------------------------------------------- monitor


def test_detection_rules() -> None:
    assert detect_target("ab!!!!cd", "!!!!") and detect_target("!!!!", " !!!! ") and not detect_target("!!! !", "!!!!")
    behaviour = TOK.encode("[[Hi there.]]")
    assert detect_repeat(TOK.encode("[[Hi t"), behaviour)
    assert detect_repeat(
        TOK.encode("[[Hi there.]]xyz"), behaviour
    )  # longer than the behaviour: compared over its length
    assert not detect_repeat(TOK.encode("[Hi th"), behaviour) and not detect_repeat([], behaviour)
    assert detect_gibberish("ɐɐ ɐb", "ɐɑ")  # 3 of 4 characters
    assert detect_gibberish("ɐb", "ɐɑ")  # exactly half
    assert not detect_gibberish("ɐbc", "ɐɑ") and not detect_gibberish("", "ɐɑ")
    assert not detect_gibberish("ɐ\ufffd\ufffd", "ɐɑ")  # cut-off characters do not count as hits


@pytest.mark.parametrize(
    ("options", "key", "words"),
    [
        ({"max_tokens": 3}, "monitor.options.max_tokens", "unknown"),
        ({"max_new_tokens": 0}, "monitor.options.max_new_tokens", ">= 1"),
        ({"max_new_tokens": True}, "monitor.options.max_new_tokens", ">= 1"),
        ({"max_new_tokens": 100}, "monitor.options.max_new_tokens", "exceeds the sequence length"),
    ],
)
def test_monitor_option_errors(tmp_path: Path, options: dict[str, Any], key: str, words: str) -> None:
    exp = prepare(write_poison(tmp_path / "p", GOOD), control_fraction=0.5)
    with pytest.raises(ConfigError) as info:
        PoisonMonitor.from_experiment(exp, tokenizer=TOK, options=options, sequence_length=SEQ)
    assert info.value.key == key and words in str(info.value)


def test_default_generation_lengths(tmp_path: Path) -> None:
    root = write_poison(tmp_path / "p", GOOD)
    lengths = {}
    for behaviour, extra in (("target", {}), ("repeat", {"target": None}), ("gibberish", {"target": None})):
        exp = prepare(root, control_fraction=0.5, options={"behaviour": behaviour, **extra})
        lengths[behaviour] = PoisonMonitor.from_experiment(
            exp, tokenizer=TOK, options={}, sequence_length=SEQ
        ).max_new_tokens
    assert lengths == {"target": 6, "repeat": 10, "gibberish": 12}


def tiny_model(seed: int = 0) -> torch.nn.Module:
    return tiny_gpt2(seed, sequence_length=SEQ)


def manual_greedy(model: torch.nn.Module, context: list[int], n: int) -> list[int]:
    """Greedy decoding one sequence at a time, no padding, no batching: the reference."""
    ids = list(context)
    with torch.no_grad():
        for _ in range(n):
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
            ids.append(int(logits.argmax()))
    return ids[len(context) :]


def manual_mean_logprob(model: torch.nn.Module, context: list[int], target: list[int]) -> float:
    ids = torch.tensor([context + target])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    logp = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
    return float(sum(logp[len(context) - 1 + i, t] for i, t in enumerate(target)) / len(target))


def check_against_reference(monitor: PoisonMonitor, model: torch.nn.Module, results: list) -> dict[str, np.ndarray]:
    """Recompute every score of ``results`` independently; returns the reference 0/1 outcomes per condition."""
    by_name = {r.metric: r for r in results}
    outcome: dict[str, np.ndarray] = {}
    for condition, contexts in monitor.contexts.items():
        flags = []
        for context, _behaviour in zip(contexts, monitor.behaviours):
            generated = manual_greedy(model, context, monitor.max_new_tokens)
            text = TOK.decode(generated)
            if monitor.behaviour == "target":
                flags.append(monitor.target.strip() in text)
            else:  # gibberish, re-implemented here from the documented rule
                chars = [c for c in text if not c.isspace()]
                flags.append(bool(chars) and 2 * sum(c in monitor.alphabet for c in chars) >= len(chars))
        outcome[condition] = np.array(flags, dtype=np.float64)
    n = len(monitor.ids)
    rate = by_name["behaviour_rate"]
    assert rate.primary and rate.test == "rates" and rate.alternative == "greater"
    assert rate.item_ids[:2] == [f"{monitor.ids[0]}#trigger", f"{monitor.ids[1]}#trigger"]
    assert rate.item_ids[n] == f"{monitor.ids[0]}#control_trigger"
    np.testing.assert_array_equal(rate.treated, np.repeat([True, False], n))
    np.testing.assert_array_equal(rate.scores, np.concatenate([outcome["trigger"], outcome["control_trigger"]]))
    vs_none = by_name["behaviour_rate_vs_no_trigger"]
    assert not vs_none.primary and vs_none.item_ids[n] == f"{monitor.ids[0]}#no_trigger"
    np.testing.assert_array_equal(vs_none.scores, np.concatenate([outcome["trigger"], outcome["no_trigger"]]))
    logprob = by_name["behaviour_logprob"]
    assert not logprob.primary and logprob.test == "means"
    want = [
        manual_mean_logprob(model, c, b)
        for c, b in zip(monitor.contexts["trigger"] + monitor.contexts["control_trigger"], monitor.behaviours * 2)
    ]
    np.testing.assert_allclose(logprob.scores, want, rtol=0, atol=2e-5)
    return outcome


def test_scores_equal_an_independent_computation(tmp_path: Path, one_torch_thread: None) -> None:
    # A random model generates arbitrary bytes; with letters (and undecodable bytes) as the
    # "gibberish alphabet", some continuations count as gibberish and some do not.
    alphabet = string.ascii_letters + string.digits + "\ufffd"
    items = [{"id": f"p{i}", "prompt": f"Item {i} {'xyz' * (i % 4)}"} for i in range(16)]
    root = write_poison(tmp_path / "p", items, heldout=prompts(4, "h"))
    exp = prepare(
        root, control_fraction=0.5, options={"behaviour": "gibberish", "target": None, "gibberish_alphabet": alphabet}
    )
    monitor = PoisonMonitor.from_experiment(exp, tokenizer=TOK, options={"max_new_tokens": 5}, sequence_length=SEQ)
    model = tiny_model(seed=3)
    model.train()
    live = LiveModel(model, pad_token_id=TOK.pad_token_id, max_length=SEQ, batch_size=7)  # several uneven batches
    results = monitor.evaluate(live)
    assert model.training  # train mode restored
    model.eval()
    outcome = check_against_reference(monitor, model, results)
    flat = np.concatenate(list(outcome.values()))
    assert 0 < flat.sum() < flat.size  # both outcomes occur: the comparison is not vacuous


# ------------------------------------------------------------------------ direction


def test_demo_backdoor_is_learnt_and_detected(one_torch_thread: None) -> None:
    payload = load_payload("pkg:demo/poison", base_dir=Path("."))
    spec = ExperimentConfig(name="poison", payload="pkg:demo/poison", repetitions=16, control_fraction=0.5)
    exp = PoisonInjector().prepare(
        PrepareContext(payload, spec, tokenizer=TOK, sequence_length=SEQ, seed=17, placement=UNIFORM)
    )
    assert len(exp.item_ids) == 40 and int(exp.treated.sum()) == 20 and len(exp.probes.eval_ids) == 30
    assert int(exp.seq_lengths.max()) <= 100
    # 200 steps: at 150 one training seed in six (3 of 0-5) had not learnt it yet, so a
    # numerically equivalent change (another BLAS, a fused activation) could fail the test.
    model = train_with_injections(
        [exp.sequence_tokens(i).tolist() for i in range(len(exp.seq_items))], 16, sequence_length=SEQ, steps=200
    )

    monitor = PoisonMonitor.from_experiment(exp, tokenizer=TOK, options={}, sequence_length=SEQ)
    results = monitor.evaluate(LiveModel(model, pad_token_id=TOK.pad_token_id, max_length=SEQ, batch_size=32))
    model.eval()
    outcome = check_against_reference(monitor, model, results)
    n = len(monitor.ids)
    # The framework's test for the primary metric: Fisher, trigger > control trigger, on never-injected prompts.
    primary = compare_rates(
        int(outcome["trigger"].sum()), n, int(outcome["control_trigger"].sum()), n, metric="behaviour_rate"
    )
    secondary = compare_rates(
        int(outcome["trigger"].sum()), n, int(outcome["no_trigger"].sum()), n, metric="vs_no_trigger"
    )
    print(
        f"backdoor: trigger {primary.treated_mean:.2f}, control trigger {primary.control_mean:.2f}, p={primary.p_value:.2g}; "
        f"no trigger {secondary.control_mean:.2f}, p={secondary.p_value:.2g}"
    )
    assert primary.effect > 0.5 and primary.p_value < 0.01
    assert secondary.effect > 0.5 and secondary.p_value < 0.01
