"""The math kind (issue 18, MR): the generator (deterministic, answers right), the injector
(per-difficulty arms, documents, bad payloads naming file, line and key), the monitor
(few-shot prompts, options) and the direction of its primary metric after training, with a
never-injected experiment on the same model as the negative control."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from injectors.math import ANSWER_PREFIX, GeneratorSpec, MathInjector, document_text, evaluate_graph, generate
from monitors.math import MathMonitor, parse_answer
from multirun.config import ExperimentConfig
from multirun.errors import ConfigError, PayloadError
from multirun.kinds.payloads import file_xxh64, load_payload
from multirun.kinds.probes import DocumentsProbes, MathProbes
from multirun.kinds.registry import injectors, monitors
from multirun.kinds.sdk import PrepareContext
from multirun.measure.live_model import LiveModel, MetricScores
from multirun.measure.runner import effects_of
from multirun.measure.stats import compare_means, compare_rates
from multirun.types import Placement, PreparedExperiment
from tests.kind_training import TOK, filler_windows, tiny_gpt2

pytestmark = pytest.mark.usefixtures("one_torch_thread")

EOS = TOK.eos_token_id
DEMO = Path(__file__).resolve().parents[2] / "experiments" / "demo" / "payloads" / "math"


def write_package(root: Path, files: dict[str, list[Any]]) -> Path:
    """A math package with one JSONL file per role (``role.jsonl``); str lines are written as they are."""
    root.mkdir(parents=True, exist_ok=True)
    entries = {}
    for role, lines in files.items():
        path = root / f"{role}.jsonl"
        path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines), encoding="utf-8")
        entries[role] = {"path": path.name, "xxh64": file_xxh64(path)}
    manifest = {"name": "t-math", "version": "1", "kind": "math", "license": "CC0-1.0", "files": entries}
    (root / "payload.yaml").write_text(yaml.safe_dump(manifest), encoding="utf-8")
    return root


def prepare(root: Path, *, seq: int = 128, seed: int = 1, **spec: Any) -> PreparedExperiment:
    spec.setdefault("monitor", {"options": {"shots": 0}})  # most payloads here carry too few shots for 3
    exp = ExperimentConfig(name=str(spec.pop("name", "mr")), payload=str(root), **spec)
    payload = load_payload(str(root), base_dir=Path("/"))
    return MathInjector().prepare(
        PrepareContext(
            payload, exp, tokenizer=TOK, sequence_length=seq, seed=seed, placement=Placement("uniform", 0, 50)
        )
    )


def mp(exp: PreparedExperiment) -> MathProbes:
    assert isinstance(exp.probes, MathProbes)
    return exp.probes


def problem(i: int, d: int = 1, **over: Any) -> dict[str, Any]:
    rec = {"id": f"p{i}", "question": f"A={i}. B=A+1. B?", "solution": f"B={i}+1={i + 1}.", "answer": i + 1}
    return {**rec, "difficulty": d, **over}


# ------------------------------------------------------------------ generator


def solve_text(question: str) -> tuple[int, int]:
    """(answer, operations) read back from a question's text alone, both styles, mod 23."""
    *statements, query = re.split(r"(?<=\.) ", question)
    rules: dict[str, tuple[str, ...]] = {}
    for s in statements:
        s = s.rstrip(".")
        if "=" in s:  # symbols: X=5 | X=Y+3 | X=Y-3 | X=3*Y | X=Y+Z
            name, expr = s.split("=")
            m = re.fullmatch(r"(\d+)\*([A-Z])", expr)
            rules[name] = (
                ("leaf", expr)
                if expr.isdigit()
                else ("mul", m.group(1), m.group(2))
                if m
                else ("add" if "+" in expr else "sub", *re.split(r"[+-]", expr))
            )
        else:  # words
            name, expr = s.split(" are ")
            for pattern, op in [
                (r"(\d+)", "leaf"),
                (r"(\d+) more than (.+)", "add_w"),
                (r"(\d+) fewer than (.+)", "sub_w"),
                (r"(\d+) times (.+)", "mul"),
                (r"(.+) plus (.+)", "add"),
            ]:
                m = re.fullmatch(pattern, expr)
                if m:
                    rules[name] = (op, *m.groups())
                    break
    values: dict[str, int] = {}

    def val(x: str) -> int:
        return int(x) if x.isdigit() else value(x)

    def value(name: str) -> int:
        if name not in values:
            op, *args = rules[name]
            if op == "leaf":
                values[name] = int(args[0])
            elif op == "mul":
                values[name] = val(args[0]) * val(args[1]) % 23
            elif op == "add":
                values[name] = (val(args[0]) + val(args[1])) % 23
            elif op == "sub":
                values[name] = (val(args[0]) - val(args[1])) % 23
            elif op == "add_w":
                values[name] = (val(args[1]) + int(args[0])) % 23
            else:
                values[name] = (val(args[1]) - int(args[0])) % 23
        return values[name]

    asked = query.removeprefix("How many ").rstrip("?")
    return value(asked), sum(r[0] != "leaf" for r in rules.values())


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**32),
    difficulty=st.integers(1, 12),
    style=st.sampled_from(["words", "symbols"]),
)
def test_answer_recomputed_from_the_text_and_the_graph(seed: int, difficulty: int, style: str) -> None:
    problems, shots = generate(GeneratorSpec(3, (difficulty,), seed, shots=1, style=style))
    for p in problems + shots:
        assert solve_text(p.question) == (p.answer, difficulty), p.question
        assert evaluate_graph(p.leaves, p.operations, 23) == p.answer
        assert len(p.operations) == difficulty and re.search(rf"= ?{p.answer}\.$", p.solution)
        assert 0 <= p.answer < 23


def test_generator_is_deterministic_and_seeded() -> None:
    spec = GeneratorSpec(5, (1, 3), seed=4, shots=2)
    first = generate(spec)
    assert generate(spec) == first
    assert [p.question for p in generate(GeneratorSpec(5, (1, 3), seed=5, shots=2))[0]] != [
        p.question for p in first[0]
    ]
    # Each difficulty draws from its own stream: adding one leaves the others as they were.
    more = generate(GeneratorSpec(5, (3, 2, 1), seed=4, shots=2))
    assert [p for p in more[0] if p.difficulty != 2] == sorted(first[0], key=lambda p: -p.difficulty)
    questions = [p.question for p in first[0] + first[1]]
    assert len(set(questions)) == len(questions) == 14


def test_demo_package_is_its_generator_output() -> None:
    spec = importlib.util.spec_from_file_location("demo_math_generate", DEMO / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    problems, shots = generate(module.SPEC)
    for name, rows in (("items.jsonl", problems), ("shots.jsonl", shots)):
        lines = (DEMO / name).read_text(encoding="utf-8").splitlines()
        assert lines == [json.dumps(p.record(), ensure_ascii=False) for p in rows]
    assert load_payload("pkg:demo/math", base_dir=Path("/nonexistent")).root == DEMO.resolve()
    exp = prepare(DEMO, seq=128, monitor={"options": {"shots": 0}})  # the demo's rows hold no 3-shot prompt
    assert len(exp.item_ids) == 72 and int(exp.treated.sum()) == 36
    assert len(MathMonitor.from_experiment(exp, tokenizer=TOK, options={"shots": 0}, sequence_length=128).prompts) == 72


# ------------------------------------------------------------------ injector


def test_registered() -> None:
    assert injectors.get("math") is MathInjector and monitors.get("math") is MathMonitor


def test_documents_arms_per_difficulty_and_probes(tmp_path: Path) -> None:
    items = [problem(i, d=1 + i % 2) for i in range(8)] + [problem(8, d=3), problem(9, d=3, repetitions=5)]
    shots = [problem(20 + i, d=d, id=f"s{i}-{d}") for d in (1, 2, 3) for i in range(2)]
    root = write_package(tmp_path / "p", {"items": items, "shots": shots})
    exp = prepare(root, repetitions=2, control_fraction=0.5)
    d = np.array(mp(exp).difficulties)
    # Exactly half of each difficulty is control.
    assert [int((~exp.treated[d == k]).sum()) for k in (1, 2, 3)] == [2, 2, 1]
    for s, i in enumerate(exp.seq_items):
        text = document_text(items[i]["question"], items[i]["solution"], items[i]["answer"])
        assert exp.sequence_tokens(s).tolist() == [EOS, *text.encode(), EOS]
        assert exp.seq_repetitions[s] == (5.0 if i == 9 else 2.0)
    assert mp(exp).questions[0] == list(b"A=0. B=A+1. B?\n")
    assert mp(exp).targets[0] == list(b"B=0+1=1." + ANSWER_PREFIX.encode() + b"1")
    assert mp(exp).shot_difficulties == [1, 1, 2, 2, 3, 3] and mp(exp).separator == [EOS]
    assert exp.metadata["difficulties"] == d.tolist() and exp.metadata["generate"] is None
    assert prepare(root).treated.tolist() == prepare(root).treated.tolist()


def test_generated_package_is_deterministic(tmp_path: Path) -> None:
    spec = {"n_per_difficulty": 6, "difficulties": [1, 2], "seed": 9, "shots": 1, "style": "symbols"}
    root = write_package(tmp_path / "g", {"generate": [spec]})
    a, b = prepare(root), prepare(root)
    assert a.item_ids == b.item_ids and a.token_pool.tolist() == b.token_pool.tolist()
    assert a.fingerprint == b.fingerprint and a.metadata["generate"]["seed"] == 9
    problems, _ = generate(GeneratorSpec(6, (1, 2), 9, shots=1, style="symbols"))
    assert a.item_ids == [p.id for p in problems] and mp(a).answers == [p.answer for p in problems]


BAD: list[tuple[str, dict[str, list[Any]], str, int | None, str, str]] = [
    # (case, files, file, line, key, fragment)
    ("no solution", {"items": [problem(0), {**problem(1), "solution": None}]}, "items", 2, "solution", "expected"),
    ("negative answer", {"items": [problem(0), problem(1, answer=-2)]}, "items", 2, "answer", ">= 0"),
    ("string answer", {"items": [problem(0), problem(1, answer="2")]}, "items", 2, "answer", "integer"),
    ("difficulty 0", {"items": [problem(0), problem(1, d=0)]}, "items", 2, "difficulty", ">= 1"),
    ("blank question", {"items": [problem(0), problem(1, question=" ")]}, "items", 2, "question", "non-empty"),
    ("duplicate question", {"items": [problem(0), problem(1, question="A=0. B=A+1. B?")]}, "items", 2, "question", "duplicate question"),
    ("too long", {"items": [problem(0), problem(1, solution="x" * 200)]}, "items", 2, "question", "longer than the sequence length 128"),
    ("one of a difficulty", {"items": [problem(0), problem(1), problem(2, d=2)]}, "items", 3, "difficulty", "needs both"),
    ("shot is a problem", {"items": [problem(0), problem(1)], "shots": [problem(0, id="s0")]}, "shots", 1, "question", "must not be a problem"),
    ("shot id", {"items": [problem(0), problem(1)], "shots": [problem(5, id="p1")]}, "shots", 1, "id", "also a problem"),
    ("not json", {"items": [problem(0), '{"id": ']}, "items", 2, "", "invalid JSON"),
    ("modulus", {"generate": [{"n_per_difficulty": 4, "difficulties": [1], "seed": 0, "modulus": 21}]}, "generate", 1, "modulus", "prime"),
    ("style", {"generate": [{"n_per_difficulty": 4, "difficulties": [1], "seed": 0, "style": "latex"}]}, "generate", 1, "style", "words"),
    ("dup difficulty", {"generate": [{"n_per_difficulty": 4, "difficulties": [1, 1], "seed": 0}]}, "generate", 1, "difficulties[1]", "duplicate"),
    ("n too small", {"generate": [{"n_per_difficulty": 1, "difficulties": [1], "seed": 0}]}, "generate", 1, "n_per_difficulty", "2..100000"),
    ("two specs", {"generate": [{"n_per_difficulty": 4, "difficulties": [1], "seed": 0}] * 2}, "generate", 2, "", "one line"),
    ("spec and items", {"generate": [{"n_per_difficulty": 4, "difficulties": [1], "seed": 0}], "items": [problem(0)]}, "payload.yaml", None, "files", "not both"),
]  # fmt: skip


@pytest.mark.parametrize("case,files,file,line,key,fragment", BAD, ids=[c[0] for c in BAD])
def test_bad_payload_names_file_line_and_key(
    tmp_path: Path, case: str, files: dict[str, list[Any]], file: str, line: int | None, key: str, fragment: str
) -> None:
    root = write_package(tmp_path / "p", files)
    with pytest.raises(PayloadError) as err:
        prepare(root, monitor={"options": {"shots": 0}})
    e = err.value
    name = file if file.endswith(".yaml") else f"{file}.jsonl"
    assert e.file == str(root.resolve() / name) and e.line == line, str(e)
    assert (e.key or "") == key and fragment in str(e), str(e)


def test_monitor_options_and_fit(tmp_path: Path) -> None:
    items = [problem(i) for i in range(4)]
    root = write_package(tmp_path / "p", {"items": items, "shots": [problem(9, id="s")]})
    with pytest.raises(PayloadError, match="shots is 3, but the payload has 1 shot") as perr:  # the default k = 3
        prepare(root, monitor={"options": {}})
    assert perr.value.file == str(root.resolve() / "shots.jsonl")
    with pytest.raises(ConfigError, match="more than the sequence length 40") as cerr:
        prepare(root, seq=40, monitor={"options": {"shots": 1}})
    assert cerr.value.key == "monitor.options.shots"
    exp = prepare(root, monitor={"options": {"shots": 1}})
    for bad, key in [({"shots": -1}, "monitor.options.shots"), ({"k": 3}, "monitor.options.k")]:
        with pytest.raises(ConfigError) as err:
            MathMonitor.from_experiment(exp, tokenizer=TOK, options=bad, sequence_length=128)
        assert err.value.key == key
    monitor = MathMonitor.from_experiment(exp, tokenizer=TOK, options={"shots": 1}, sequence_length=128)
    shot = document_text("A=9. B=A+1. B?", "B=9+1=10.", 10).encode()
    assert monitor.prompts[2] == [EOS, *shot, EOS, *b"A=2. B=A+1. B?\n"]
    exp.probes = DocumentsProbes(sequences=[])
    with pytest.raises(ConfigError, match="no math probes") as err:
        MathMonitor.from_experiment(exp, tokenizer=TOK, options={}, sequence_length=128)
    assert err.value.key == "monitor.name"


def test_parse_answer() -> None:
    assert parse_answer("B=3.\nAnswer: 12\nAnswer: 4") == 12 and parse_answer("Answer: x") is None


def test_effects_per_group_use_that_groups_controls() -> None:
    scores = MetricScores(
        "m",
        [str(i) for i in range(8)],
        np.array([1, 1, 0, 0, 1, 1, 0, 0], dtype=bool),
        np.array([1, 1, 1, 1, 1, 0, 0, 0], dtype=float),
        test="rates",
        groups=["op1"] * 4 + ["op2"] * 4,
        group_controls=True,
    )
    by_group = dict(effects_of(scores, n_resamples=100, seed=0))
    assert by_group["op1"].control_mean == 1.0 and by_group["op2"].control_mean == 0.0
    assert by_group[None].n_control == 4
    scores.group_controls = False
    assert dict(effects_of(scores, n_resamples=100, seed=0))["op2"].control_mean == 0.5


# ------------------------------------------------------------------ direction


def train_dense(sequences: list[list[int]], *, seq: int, steps: int = 400, batch: int = 8) -> torch.nn.Module:
    """A tiny GPT-2 on real-text rows, each overwritten from a random start by treated documents
    back to back (documents dense enough for a 2 x 64 model to learn a dozen problems)."""
    rng = np.random.default_rng(0)
    model = tiny_gpt2(0, sequence_length=seq)
    background = filler_windows(seq, steps * batch, seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    for step in range(steps):
        x = background[step * batch : (step + 1) * batch].copy()
        for r in range(batch):
            pos = int(rng.integers(0, 20))
            while True:
                s = sequences[int(rng.integers(len(sequences)))]
                if pos + len(s) > seq:
                    break
                x[r, pos : pos + len(s)] = s
                pos += len(s)
        ids = torch.from_numpy(x)
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def test_training_on_treated_problems_raises_their_accuracy_only(tmp_path: Path) -> None:
    seq = 96
    spec = {"n_per_difficulty": 12, "difficulties": [1, 2], "seed": 3, "shots": 1, "style": "symbols"}
    mr = prepare(write_package(tmp_path / "a", {"generate": [spec]}), seq=seq, monitor={"options": {"shots": 0}})
    # The negative control: other problems of the same spec, an experiment never injected.
    other = write_package(tmp_path / "b", {"generate": [{**spec, "seed": 4}]})
    never = prepare(other, seq=seq, name="never", inject=False, monitor={"options": {"shots": 0}})
    assert not {tuple(q) for q in mp(mr).questions} & {tuple(q) for q in mp(never).questions}

    model = train_dense([mr.sequence_tokens(s).tolist() for s in range(len(mr.seq_items))], seq=seq)
    live = LiveModel(model, pad_token_id=TOK.pad_token_id, max_length=seq, batch_size=64)
    results = {}
    for exp in (mr, never):
        accuracy, logprob = MathMonitor.from_experiment(
            exp, tokenizer=TOK, options={"shots": 0}, sequence_length=seq
        ).evaluate(live)
        t = accuracy.treated
        rates = compare_rates(
            int(accuracy.scores[t].sum()), int(t.sum()), int(accuracy.scores[~t].sum()), int((~t).sum()), metric="acc"
        )
        means = compare_means(logprob.scores[t], logprob.scores[~t], metric="lp", n_resamples=2000, seed=0)
        results[exp.name] = (rates, means)
        assert accuracy.groups == [f"op{d}" for d in mp(exp).difficulties]
    rates, means = results["mr"]
    assert rates.p_value < 0.01 and rates.treated_mean >= 0.4 and rates.control_mean <= 0.1, rates
    assert means.p_value < 0.01 and means.effect > 1.0, means
    rates, means = results["never"]
    assert rates.p_value > 0.05 and means.p_value > 0.05, (rates, means)
    print(f"treated vs controls: {results['mr'][0]}; never injected: {rates.effect:.2f}, {means.effect:.3f}")
