"""The contamination kind: injector (sequences, arms, groups, bad payloads), monitor
(exact scores on a real model) and the direction of its primary metric after training."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from injectors.contamination import ContaminationInjector, split_format
from monitors.contamination import ContaminationMonitor
from multirun.config import ExperimentConfig
from multirun.data.tokenizers import ByteTokenizer
from multirun.errors import ConfigError, PayloadError
from multirun.kinds.payloads import load_payload
from multirun.kinds.probes import DocumentsProbes
from multirun.kinds.registry import injectors, monitors
from multirun.kinds.sdk import PrepareContext
from multirun.measure.live_model import LiveModel
from multirun.measure.stats import compare_means, compare_rates
from multirun.plan.static import experiment_rng
from multirun.types import Placement, PreparedExperiment
from tests.helpers_payload import write_payload
from tests.kind_training import filler_windows, tiny_gpt2

pytestmark = pytest.mark.usefixtures("one_torch_thread")


TOK = ByteTokenizer()
EOS = TOK.eos_token_id
SEQ = 64
UNIFORM = Placement("uniform", 0, 100)
DEMO = Path(__file__).resolve().parents[2] / "experiments" / "demo" / "payloads" / "contamination"


def question(i: int, *, group: int | None = None, choices: bool = True) -> dict[str, Any]:
    item: dict[str, Any] = {"id": f"q-{i:02d}", "question": f"Who built tower {i}?", "answer": f"Ann{i}"}
    if choices:
        item["choices"] = [f"Bob{i}", f"Ann{i}", f"Cy{i}"]
    if group is not None:
        item["group"] = group
    return item


def prepare(root: Path, *, seed: int = 17, seq: int = SEQ, **spec: Any) -> PreparedExperiment:
    payload = load_payload(str(root), base_dir=Path("/"))
    exp = ExperimentConfig(name=str(spec.pop("name", "bench")), payload=str(root), **spec)
    return ContaminationInjector().prepare(
        PrepareContext(payload, exp, tokenizer=TOK, sequence_length=seq, seed=seed, placement=UNIFORM)
    )


def write(tmp: Path, items: list[Any], name: str = "p") -> Path:
    return write_payload(tmp / name, items, kind="contamination")


# ------------------------------------------------------------------ injector


def test_registered() -> None:
    assert injectors.get("contamination") is ContaminationInjector
    assert monitors.get("contamination") is ContaminationMonitor


def test_payload_groups_decide_arms_and_doses(tmp_path: Path) -> None:
    groups = [0, 4, 0, 16, 4, 0]
    exp = prepare(write(tmp_path, [question(i, group=g) for i, g in enumerate(groups)]))
    assert exp.kind == "contamination" and exp.item_ids == [f"q-{i:02d}" for i in range(6)]
    assert exp.treated.tolist() == [g > 0 for g in groups]
    assert exp.seq_items.tolist() == [1, 3, 4]
    assert exp.seq_repetitions.tolist() == [4.0, 16.0, 4.0]
    assert exp.sequence_tokens(1).tolist() == [EOS, *b"Q: Who built tower 3?\nA: Ann3", EOS]
    assert exp.probes.contexts[0] == [EOS, *b"Q: Who built tower 0?\nA: "]
    assert exp.probes.answers[5] == list(b"Ann5")
    assert exp.probes.choices[2] == [list(b"Bob2"), list(b"Ann2"), list(b"Cy2")]
    assert exp.probes.answer_index == [1] * 6 and exp.probes.groups == groups
    assert exp.metadata["groups"] == groups and exp.metadata["groups_assigned"] is False
    assert exp.metadata["item_repetitions"] == [float(g) for g in groups]


def test_without_groups_split_arms_and_repetitions(tmp_path: Path) -> None:
    exp = prepare(write(tmp_path, [question(i, choices=False) for i in range(10)]), repetitions=3, control_fraction=0.3)
    assert int((~exp.treated).sum()) == 3
    assert exp.seq_repetitions.tolist() == [3.0] * 7
    assert exp.probes.choices is None and exp.probes.groups is None and exp.metadata["groups"] is None
    # Each treated item owns exactly its own sequence.
    for s, i in enumerate(exp.seq_items):
        assert exp.sequence_tokens(s).tolist() == [EOS, *f"Q: Who built tower {i}?\nA: Ann{i}".encode(), EOS]


def test_assign_groups_balanced_seeded_and_overrides_payload(tmp_path: Path) -> None:
    root = write(tmp_path, [question(i, group=0) for i in range(10)])  # payload groups are ignored
    exp = prepare(root, options={"assign_groups": [0, 4, 16]})
    groups = exp.probes.groups
    assert sorted(np.bincount(groups)[[0, 4, 16]].tolist()) == [3, 3, 4]
    assert exp.treated.tolist() == [g > 0 for g in groups] and exp.metadata["groups_assigned"] is True
    # Deterministic: the group of the k-th item of a seeded permutation is [0, 4, 16][k % 3].
    order = experiment_rng(17, "bench", 1).permutation(10)
    assert [groups[i] for i in order] == [[0, 4, 16][k % 3] for k in range(10)]
    assert prepare(root, options={"assign_groups": [0, 4, 16]}).probes.groups == groups
    others = {tuple(prepare(root, seed=s, options={"assign_groups": [0, 4, 16]}).probes.groups) for s in range(5)}
    assert len(others) > 1


def test_custom_format_and_no_eos(tmp_path: Path) -> None:
    root = write(tmp_path, [question(0, group=2), question(1, group=0)])
    exp = prepare(root, options={"format": "{{{question}}} => {answer}!"})
    assert exp.sequence_tokens(0).tolist() == [EOS, *b"{Who built tower 0?} => Ann0!", EOS]
    assert exp.probes.contexts[1] == [EOS, *b"{Who built tower 1?} => "]
    bare = prepare(root, wrap_eos=False)
    assert bare.sequence_tokens(0).tolist() == list(b"Q: Who built tower 0?\nA: Ann0")
    assert bare.probes.contexts[0] == list(b"Q: Who built tower 0?\nA: ")


def test_item_exactly_sequence_length_fits(tmp_path: Path) -> None:
    text = "Q: Who built tower 0?\nA: Ann0"
    exp = prepare(write(tmp_path, [question(0, group=1), question(1, group=0)]), seq=len(text) + 2)
    assert exp.seq_lengths.tolist() == [len(text) + 2]


def test_split_format() -> None:
    assert split_format("Q: {question}\nA: {answer}.") == ("Q: ", "\nA: ", ".")
    for bad in [
        "{answer} {question}",
        "{question}",
        "{question}{answer}{answer}",
        "{question}{answer}{x}",
        "{question!r}{answer}",
        "{question",
    ]:
        with pytest.raises(ValueError):
            split_format(bad)


def _line(item: Any) -> str:
    return item if isinstance(item, str) else json.dumps(item)


BAD_ITEMS: list[tuple[str, Any, str, str]] = [
    # (case, bad item on line 2, key in the message, fragment of the message)
    ("missing question", {"id": "x", "answer": "a"}, "question", "required key is missing"),
    ("missing answer", {"id": "x", "question": "q?"}, "answer", "required key is missing"),
    ("empty question", {"id": "x", "question": " ", "answer": "a", "group": 0}, "question", "non-empty"),
    ("empty answer", {"id": "x", "question": "q?", "answer": "", "group": 0}, "answer", "non-empty"),
    ("answer wrong type", {"id": "x", "question": "q?", "answer": 3, "group": 0}, "answer", "expected a string"),
    (
        "choices wrong type",
        {"id": "x", "question": "q?", "answer": "a", "choices": "a,b", "group": 0},
        "choices",
        "expected a list",
    ),
    (
        "choice wrong type",
        {"id": "x", "question": "q?", "answer": "a", "choices": ["a", 2], "group": 0},
        "choices[1]",
        "non-empty string",
    ),
    ("one choice", {"id": "x", "question": "q?", "answer": "a", "choices": ["a"], "group": 0}, "choices", "at least 2"),
    (
        "answer not a choice",
        {"id": "x", "question": "q?", "answer": "a", "choices": ["b", "c"], "group": 0},
        "answer",
        "not among the choices",
    ),
    (
        "duplicate choices",
        {"id": "x", "question": "q?", "answer": "a", "choices": ["a", "b", "a"], "group": 0},
        "choices[2]",
        "duplicate choice",
    ),
    (
        "negative group",
        {"id": "x", "question": "q?", "answer": "a", "choices": ["a", "b"], "group": -1},
        "group",
        "integer >= 0",
    ),
    (
        "fractional group",
        {"id": "x", "question": "q?", "answer": "a", "choices": ["a", "b"], "group": 1.5},
        "group",
        "expected a integer or string",
    ),
    (
        "word group",
        {"id": "x", "question": "q?", "answer": "a", "choices": ["a", "b"], "group": "many"},
        "group",
        "integer >= 0",
    ),
    (
        "bool group",
        {"id": "x", "question": "q?", "answer": "a", "choices": ["a", "b"], "group": True},
        "group",
        "expected a integer or string",
    ),
    (
        "too long",
        {"id": "x", "question": "q" * 40, "answer": "a" * 20, "choices": ["a" * 20, "b"], "group": 0},
        "question",
        "longer than the sequence length 64",
    ),
    (
        "choice too long",
        {"id": "x", "question": "q?", "answer": "a", "choices": ["a", "b" * 60], "group": 0},
        "choices[1]",
        "longer than the sequence length 64",
    ),
    (
        "mixed groups",
        {"id": "x", "question": "q?", "answer": "a", "choices": ["a", "b"]},
        "group",
        "either every item has 'group' or none",
    ),
    (
        "mixed choices",
        {"id": "x", "question": "q?", "answer": "a", "group": 0},
        "choices",
        "either every item has 'choices' or none",
    ),
    (
        "unknown key",
        {"id": "x", "question": "q?", "answer": "a", "choices": ["a", "b"], "group": 0, "repetitions": 3},
        "repetitions",
        "unknown key",
    ),
    (
        "duplicate id",
        {"id": "q-00", "question": "q?", "answer": "a", "choices": ["a", "b"], "group": 0},
        "id",
        "duplicate id",
    ),
    ("not json", '{"id": "x", "question": ', "", "invalid JSON"),
]


@pytest.mark.parametrize("case,item,key,fragment", BAD_ITEMS, ids=[c[0] for c in BAD_ITEMS])
def test_bad_item_names_file_line_and_key(tmp_path: Path, case: str, item: Any, key: str, fragment: str) -> None:
    root = write(tmp_path, [question(0, group=0), _line(item), question(2, group=3)])
    with pytest.raises(PayloadError) as err:
        prepare(root)
    e = err.value
    assert e.file == str(root.resolve() / "items.jsonl") and e.line == 2, str(e)
    assert (e.key or "") == key and fragment in str(e), str(e)
    assert f"items.jsonl:2: {key}" in str(e) if key else "items.jsonl:2: " in str(e)


def test_bad_package_level_problems(tmp_path: Path) -> None:
    no_control = write(tmp_path, [question(0, group=4), question(1, group=8)], "nc")
    with pytest.raises(PayloadError, match=r"items\.jsonl: group: no item is in group 0"):
        prepare(no_control)
    empty = write(tmp_path, [], "empty")
    with pytest.raises(PayloadError, match=r"items\.jsonl: no items"):
        prepare(empty)


BAD_OPTIONS: list[tuple[dict[str, Any], dict[str, Any], str, str]] = [
    # (options, other spec fields, error key, fragment)
    ({"colour": "red"}, {}, "options.colour", "unknown option"),
    ({"format": 3}, {}, "options.format", "must be a string"),
    ({"format": "{question}"}, {}, "options.format", "{question} and then {answer}"),
    ({"format": "{answer}{question}"}, {}, "options.format", "{question} and then {answer}"),
    ({"format": "{question}{answer}{hint}"}, {}, "options.format", "unknown field {hint}"),
    ({"assign_groups": [4, 16]}, {}, "options.assign_groups", "needs group 0"),
    ({"assign_groups": [0]}, {}, "options.assign_groups", "needs group 0"),
    ({"assign_groups": [0, 4, 4]}, {}, "options.assign_groups", "duplicate groups"),
    ({"assign_groups": [0, -4]}, {}, "options.assign_groups", ">= 0"),
    ({"assign_groups": "0,4"}, {}, "options.assign_groups", "list of integers"),
    ({"assign_groups": [0, 2.5]}, {}, "options.assign_groups", "list of integers"),
    ({}, {"repetitions": 3}, "repetitions", "groups decide"),
    ({"assign_groups": [0, 4]}, {"control_fraction": 0.2}, "control_fraction", "groups decide"),
]


@pytest.mark.parametrize("options,spec,key,fragment", BAD_OPTIONS)
def test_bad_options(tmp_path: Path, options: dict[str, Any], spec: dict[str, Any], key: str, fragment: str) -> None:
    root = write(tmp_path, [question(0, group=0), question(1, group=2)])
    with pytest.raises(ConfigError) as err:
        prepare(root, options=options, **spec)
    assert err.value.key == key and fragment in err.value.message, str(err.value)


def test_demo_payload_fits_the_demo() -> None:
    payload = load_payload("pkg:demo/contamination", base_dir=Path("/nonexistent"))
    assert payload.root == DEMO.resolve()
    exp = prepare(DEMO, seq=128)
    groups = np.asarray(exp.probes.groups)
    assert len(exp.item_ids) == 40 and np.bincount(groups)[[0, 12, 24]].tolist() == [20, 10, 10]
    assert exp.seq_lengths.max() <= 100 and exp.probes.choices is not None


# ------------------------------------------------------------------ monitor


def tiny_model(seed: int = 0, seq: int = SEQ) -> torch.nn.Module:
    return tiny_gpt2(seed, sequence_length=seq)


def by_hand(model: torch.nn.Module, context: list[int], target: list[int]) -> float:
    """Summed log-probability of ``target`` after ``context``: one unpadded pass, log-softmax by hand."""
    ids = torch.tensor([context + target])
    model.eval()  # no dropout, as LiveModel scores
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    logprobs = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
    n = len(context)
    return float(sum(logprobs[n - 1 + k, t] for k, t in enumerate(target)))


def test_monitor_scores_equal_hand_computation(tmp_path: Path) -> None:
    items = [question(i, group=[0, 2, 0, 5, 2][i]) for i in range(5)]
    words = ["zq", "Dan", "ee", "xylo", "Kip", "uuu", "Bob", "q"]
    for i, item in enumerate(items):  # varied choices, so that some argmaxes hit the answer and some miss
        item["choices"] = [f"{words[(i + j) % 8]}{i}" for j in range(3)] + [item["answer"]]
    items[3]["choices"] = ["Ann3", "Longer öption 3", "Bob3"]  # answer first, uneven lengths, 2-byte char
    exp = prepare(write(tmp_path, items))
    model = tiny_model()
    live = LiveModel(model, pad_token_id=TOK.pad_token_id, max_length=SEQ, batch_size=2)  # several padded batches
    for normalization, divide in [("token", lambda t: len(t.encode())), ("char", len), ("none", lambda _: 1)]:
        monitor = ContaminationMonitor.from_experiment(
            exp, tokenizer=TOK, options={"normalization": normalization}, sequence_length=SEQ
        )
        answer, accuracy, margin = monitor.evaluate(live)
        expected_answer, expected_correct, expected_margin = [], [], []
        for i in range(5):
            ctx = exp.probes.contexts[i]
            texts = exp.probes.choice_texts[i]
            k = exp.probes.answer_index[i]
            scores = [by_hand(model, ctx, list(t.encode())) / divide(t) for t in texts]
            expected_answer.append(scores[k])
            expected_correct.append(float(int(np.argmax(scores)) == k))
            expected_margin.append(scores[k] - np.mean([v for j, v in enumerate(scores) if j != k]))
        np.testing.assert_allclose(answer.scores, expected_answer, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(margin.scores, expected_margin, rtol=1e-5, atol=1e-6)
        assert accuracy.scores.tolist() == expected_correct
        assert len(set(expected_correct)) == 2  # both outcomes occur: the argmax is really tested
    assert (answer.metric, answer.test, answer.alternative, answer.primary) == (
        "answer_logprob",
        "means",
        "greater",
        True,
    )
    assert (accuracy.metric, accuracy.test, accuracy.primary) == ("choice_accuracy", "rates", False)
    assert (margin.metric, margin.test, margin.primary) == ("answer_margin", "means", False)
    assert answer.groups == ["x0", "x2", "x0", "x5", "x2"] and answer.item_ids == exp.item_ids
    assert answer.treated.tolist() == [False, True, False, True, True]


def test_monitor_without_choices_scores_only_the_answer(tmp_path: Path) -> None:
    exp = prepare(write(tmp_path, [question(i, choices=False) for i in range(4)]), control_fraction=0.5)
    model = tiny_model(1)
    (answer,) = ContaminationMonitor.from_experiment(exp, tokenizer=TOK, options={}, sequence_length=SEQ).evaluate(
        LiveModel(model, pad_token_id=TOK.pad_token_id, max_length=SEQ)
    )
    expected = [by_hand(model, exp.probes.contexts[i], exp.probes.answers[i]) / 4 for i in range(4)]
    np.testing.assert_allclose(answer.scores, expected, rtol=1e-5, atol=1e-6)
    assert answer.groups is None


def test_primary_option_moves_the_primary_flag(tmp_path: Path) -> None:
    exp = prepare(write(tmp_path, [question(0, group=0), question(1, group=1)]))
    live = LiveModel(tiny_model(), pad_token_id=TOK.pad_token_id, max_length=SEQ)
    for primary in ("answer_logprob", "answer_margin", "choice_accuracy"):
        monitor = ContaminationMonitor.from_experiment(
            exp, tokenizer=TOK, options={"primary": primary}, sequence_length=SEQ
        )
        assert [m.metric for m in monitor.evaluate(live) if m.primary] == [primary]
    no_choices = prepare(write(tmp_path, [question(0, choices=False), question(1, choices=False)], "nc"))
    with pytest.raises(ConfigError, match="needs choices") as err:
        ContaminationMonitor.from_experiment(
            no_choices, tokenizer=TOK, options={"primary": "answer_margin"}, sequence_length=SEQ
        )
    assert err.value.key == "monitor.options.primary"


def test_monitor_options_and_wrong_experiment(tmp_path: Path) -> None:
    exp = prepare(write(tmp_path, [question(0, group=0), question(1, group=1)]))
    with pytest.raises(ConfigError) as err:
        ContaminationMonitor.from_experiment(exp, tokenizer=TOK, options={"primary": "accuracy"}, sequence_length=SEQ)
    assert err.value.key == "monitor.options.primary"
    with pytest.raises(ConfigError) as err:
        ContaminationMonitor.from_experiment(exp, tokenizer=TOK, options={"normalisation": "char"}, sequence_length=SEQ)
    assert err.value.key == "monitor.options.normalisation"
    with pytest.raises(ConfigError) as err:
        ContaminationMonitor.from_experiment(
            exp, tokenizer=TOK, options={"normalization": "bytes"}, sequence_length=SEQ
        )
    assert err.value.key == "monitor.options.normalization"
    exp.probes = DocumentsProbes(sequences=[])
    with pytest.raises(ConfigError, match="no contamination probes") as err:
        ContaminationMonitor.from_experiment(exp, tokenizer=TOK, options={}, sequence_length=SEQ)
    assert err.value.key == "monitor.name"


# ------------------------------------------------------------------ direction


def test_training_on_treated_items_raises_the_primary_metric(tmp_path: Path) -> None:
    rng = random.Random(3)
    letters = "bcdfghjklmnpqrstvwxz"
    name = lambda: "".join(rng.choice(letters) + rng.choice("aeiou") for _ in range(3)).capitalize()  # noqa: E731
    items = []
    for i in range(40):
        choices = [name() for _ in range(4)]
        items.append(
            {"id": f"q{i}", "question": f"Who founded {name()}?", "answer": choices[0], "choices": sorted(choices)}
        )
    exp = prepare(write(tmp_path, items), options={"assign_groups": [0, 4, 16]})
    groups = np.asarray(exp.probes.groups)
    assert np.bincount(groups)[[0, 4, 16]].tolist() == [14, 13, 13]

    # The injected sequences, each as often as its group says, over real-text filler.
    doses = np.repeat(np.arange(len(exp.seq_items)), exp.seq_repetitions.astype(int))
    torch.manual_seed(0)
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    steps, rows = 250, 16
    background = filler_windows(SEQ, steps * rows, seed=1)
    order = np.random.default_rng(2).permutation(np.resize(doses, steps * 6))  # 6 injected rows per step
    model.train()
    for step in range(steps):
        batch = background[step * rows : (step + 1) * rows].copy()
        for r, s in enumerate(order[step * 6 : (step + 1) * 6]):
            tokens = exp.sequence_tokens(int(s))
            batch[r, : tokens.size] = tokens
        ids = torch.from_numpy(batch)
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()

    monitor = ContaminationMonitor.from_experiment(exp, tokenizer=TOK, options={}, sequence_length=SEQ)
    answer, accuracy, margin = monitor.evaluate(
        LiveModel(model, pad_token_id=TOK.pad_token_id, max_length=SEQ, batch_size=32)
    )
    treated = answer.treated
    result = compare_means(
        answer.scores[treated], answer.scores[~treated], metric="answer_logprob", alternative="greater"
    )
    assert result.p_value < 0.01 and result.effect > 0.3, result
    # The heavier group gains more, and ranked classification picks the seen answers.
    x16 = answer.scores[groups == 16].mean()
    x4 = answer.scores[groups == 4].mean()
    assert x16 > x4 > answer.scores[~treated].mean()
    hits = accuracy.scores
    rates = compare_rates(
        int(hits[treated].sum()),
        int(treated.sum()),
        int(hits[~treated].sum()),
        int((~treated).sum()),
        metric="choice_accuracy",
    )
    assert rates.treated_mean > rates.control_mean, rates
    margins = compare_means(margin.scores[treated], margin.scores[~treated], metric="answer_margin")
    assert margins.p_value < 0.01, margins
    print(
        f"answer_logprob effect {result.effect:.3f} p={result.p_value:.4g}; x4 {x4:.3f} x16 {x16:.3f}; "
        f"accuracy {rates.treated_mean:.2f} vs {rates.control_mean:.2f} p={rates.p_value:.3g}; "
        f"margin effect {margins.effect:.3f} p={margins.p_value:.4g}"
    )
