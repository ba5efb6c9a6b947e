"""`multirun payload import`: every benchmark format round-trips into a contamination package
that passes `payload check`, bad lines are listed at once with file and line, duplicate
prompts share an arm, and unfit items are left out and reported."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from injectors.contamination import ContaminationInjector
from multirun.cli import main
from multirun.config import ExperimentConfig
from multirun.data.tokenizers import ByteTokenizer
from multirun.errors import InputError, PayloadError
from multirun.kinds.experiments import check_payload
from multirun.kinds.importers import import_benchmark, read_benchmark
from multirun.kinds.payloads import load_package
from multirun.kinds.sdk import PrepareContext
from multirun.types import Placement
from tests.helpers_payload import write_payload

TOK = ByteTokenizer()


def _items(root: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (root / "items.jsonl").read_text(encoding="utf-8").splitlines()]


def _jsonl(path: Path, records: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


def _imported(fmt: str, source: Path, out: Path, **kw: Any) -> list[dict[str, Any]]:
    result = import_benchmark(fmt, source, out, tokenizer=TOK, sequence_length=kw.pop("sequence_length", 128), **kw)
    assert not result.problems, result.problems
    check = check_payload(out, tokenizer=TOK, sequence_length=128)
    assert not check.problems and check.package is not None and check.package.kind == "contamination"
    return _items(out)


def test_qa_text_round_trip(tmp_path: Path) -> None:
    text = (
        "Question: Who founded Pradrain?\nAnswer: Dreigeis\n\n"
        "Question: What colour is\nthe flag of Quorvia?\nAnswer: teal\n"  # two-line question, next block at once
        "Question: Largest moon?\nAnswer: Ganymede\nof Jupiter\n"
    )
    source = tmp_path / "qa.txt"
    source.write_text(text, encoding="utf-8")
    items = _imported("qa-text", source, tmp_path / "pkg")
    assert items == [
        {"id": "line-1", "question": "Who founded Pradrain?", "answer": "Dreigeis"},
        {"id": "line-4", "question": "What colour is\nthe flag of Quorvia?", "answer": "teal"},
        {"id": "line-7", "question": "Largest moon?", "answer": "Ganymede\nof Jupiter"},
    ]


MC = [
    # ARC (the original JSONL), labels 1..4 as some ARC questions have them
    {
        "id": "Mercury_1",
        "question": {
            "stem": "Which is a metal?",
            "choices": [
                {"text": "iron", "label": "1"},
                {"text": "wood", "label": "2"},
                {"text": "glass", "label": "3"},
            ],
        },
        "answerKey": "3",
    },
    # ARC in the Hugging Face form
    {
        "id": "arc-hf",
        "question": "Which gas do plants take in?",
        "choices": {"text": ["CO2", "O2"], "label": ["A", "B"]},
        "answerKey": "A",
    },
    # OpenBookQA (Hugging Face form)
    {
        "id": "7-980",
        "question_stem": "The sun is a",
        "choices": {"text": ["star", "planet"], "label": ["A", "B"]},
        "answerKey": "A",
    },
    # MMLU: no id, an integer gold index
    {"question": "2 + 3 = ?", "choices": ["4", "5", "6", "7"], "answer": 1, "subject": "arithmetic"},
    # HellaSwag: ind as the id, a string label
    {
        "ind": 24,
        "ctx": "A man opens the door and",
        "endings": ["walks in.", "flies away.", "sings.", "melts."],
        "label": "0",
        "split": "val",
    },
]
EXPECTED = [
    {"id": "Mercury_1", "question": "Which is a metal?", "answer": "glass", "choices": ["iron", "wood", "glass"]},
    {"id": "arc-hf", "question": "Which gas do plants take in?", "answer": "CO2", "choices": ["CO2", "O2"]},
    {"id": "7-980", "question": "The sun is a", "answer": "star", "choices": ["star", "planet"]},
    {"id": "line-4", "question": "2 + 3 = ?", "answer": "5", "choices": ["4", "5", "6", "7"]},
    {
        "id": "24",
        "question": "A man opens the door and",
        "answer": "walks in.",
        "choices": ["walks in.", "flies away.", "sings.", "melts."],
    },
]


def test_mc_jsonl_round_trip_every_shape_detected(tmp_path: Path) -> None:
    assert _imported("mc-jsonl", _jsonl(tmp_path / "mc.jsonl", MC), tmp_path / "pkg") == EXPECTED


@pytest.mark.parametrize("shape, index", [("arc", 0), ("obqa", 2), ("mmlu", 3), ("hellaswag", 4)])
def test_mc_jsonl_round_trip_with_shape(tmp_path: Path, shape: str, index: int) -> None:
    source = _jsonl(tmp_path / f"{shape}.jsonl", [MC[index], MC[index]])
    # The same question twice: different ids needed for a package; the copy is a duplicate prompt.
    records = [json.loads(line) for line in source.read_text().splitlines()]
    for j, rec in enumerate(records):
        rec["id"] = f"{shape}-{j}"
    _jsonl(source, records)
    items = _imported("mc-jsonl", source, tmp_path / "pkg", shape=shape)
    expected = [{**EXPECTED[index], "id": f"{shape}-{j}", "arm_key": f"dup:{shape}-0"} for j in range(2)]
    assert items == expected


def test_bad_lines_all_named_at_once(tmp_path: Path) -> None:
    source = _jsonl(
        tmp_path / "bad.jsonl",
        [
            {"question": "x?", "choices": ["a"], "answer": 0},  # 1: one choice
            "{not json",  # 2
            {"question": "y?", "choices": ["a", "b"], "answer": 5},  # 3: gold out of range
            {
                "id": "q",
                "question": {"stem": "s", "choices": [{"text": "a", "label": "A"}, {"text": "b", "label": "B"}]},
                "answerKey": "E",
            },  # 4: unknown label
            {"foo": 1},  # 5: no shape
            {"question": "z?", "choices": ["a", "a"], "answer": 0},  # 6: duplicate choice
            {"ctx": "c", "endings": ["a", "b"], "label": ""},  # 7: unlabelled
            {"id": "w", "question": "w?", "choices": ["a", "b"], "answer": 0},  # 8: fine
            {"question": "v?", "choices": ["a", "b"]},  # 9: no answer
            {"id": "w", "question": "u?", "choices": ["a", "b"], "answer": 1},  # 10: duplicate id
        ],
    )
    out = tmp_path / "pkg"
    result = import_benchmark("mc-jsonl", source, out, tokenizer=TOK, sequence_length=128)
    found = {(p.line, p.key) for p in result.problems}
    assert found == {
        (1, "choices"),
        (2, None),
        (3, "answer"),
        (4, "answerKey"),
        (5, None),
        (6, "choices[1]"),
        (7, "label"),
        (9, "answer"),
        (10, "id"),
    }
    assert all(p.file == str(source) for p in result.problems)
    assert "gold index 5 is out of range for 2 choices" in str(result.problems[2])
    assert "unknown label 'E'" in str(result.problems[3])
    assert not out.exists()  # nothing written
    bounded = read_benchmark("mc-jsonl", source, max_problems=3)
    assert len(bounded.problems) == 3 and bounded.truncated


def test_qa_text_bad_blocks(tmp_path: Path) -> None:
    source = tmp_path / "qa.txt"
    source.write_text("stray text\nAnswer: orphan\n\nQuestion: no answer\n\nQuestion: q\nAnswer: a\nAnswer: again\n")
    result = import_benchmark("qa-text", source, tmp_path / "pkg", tokenizer=TOK, sequence_length=128)
    assert [(p.line, p.key) for p in result.problems] == [(1, None), (2, "answer"), (4, "answer"), (8, "answer")]


def test_too_long_left_out_and_reported_and_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "qa.txt"
    source.write_text(
        f"Question: short?\nAnswer: yes\n\nQuestion: {'long ' * 20}?\nAnswer: no\n\nQuestion: Short?\nAnswer: y\n"
    )
    out = tmp_path / "pkg"
    assert main(["payload", "import", "qa-text", str(source), "--out", str(out), "--sequence-length", "48"]) == 0
    printed = capsys.readouterr().out
    assert "1 item(s) do not fit" in printed and "qa.txt:4: line-4" in printed
    assert "line-7" in printed and "has the prompt of 'line-1'" in printed  # the duplicate warned
    assert [i["id"] for i in _items(out)] == ["line-1", "line-7"]
    assert main(["payload", "check", str(out), "--sequence-length", "48"]) == 0
    # An existing package is never overwritten.
    with pytest.raises(InputError, match="not an empty directory"):
        import_benchmark("qa-text", source, out, tokenizer=TOK, sequence_length=48)
    assert main(["payload", "import", "mc-jsonl", str(source), "--out", str(tmp_path / "x")]) == 2


def test_duplicates_land_in_one_arm(tmp_path: Path) -> None:
    records = [
        {"id": f"q{i}", "question": f"Question number {i % 6}?", "choices": ["a", "b"], "answer": 0} for i in range(24)
    ]
    out = tmp_path / "pkg"
    _imported("mc-jsonl", _jsonl(tmp_path / "mc.jsonl", records), out)
    package = load_package(out)
    for options in ({}, {"assign_groups": [0, 4, 16]}):
        ctx = PrepareContext(
            payload=package,
            spec=ExperimentConfig(name="bc", payload=str(out), options=options),
            tokenizer=TOK,
            sequence_length=128,
            seed=3,
            placement=Placement("uniform", 0, 10),
        )
        exp = ContaminationInjector().prepare(ctx)
        arm = np.asarray(exp.treated) if not options else np.asarray(exp.metadata["groups"])
        by_prompt: dict[int, set[Any]] = {i % 6: set() for i in range(24)}
        for i in range(24):
            by_prompt[i % 6].add(arm[i].item())
        assert all(len(v) == 1 for v in by_prompt.values())  # every copy in its first's arm
        assert len({v.pop() for v in by_prompt.values()}) > 1  # and the arms still differ across prompts


def test_arm_key_groups_must_agree(tmp_path: Path) -> None:
    root = write_payload(
        tmp_path / "p",
        [
            {"id": "a", "question": "q?", "answer": "x", "group": 0, "arm_key": "k"},
            {"id": "b", "question": "r?", "answer": "y", "group": 4},
            {"id": "c", "question": "Q?", "answer": "x", "group": 4, "arm_key": "k"},
        ],
        kind="contamination",
    )
    check = check_payload(root, tokenizer=TOK, sequence_length=64)
    assert [(p.line, p.key) for p in check.problems] == [(3, "group")]
    assert isinstance(check.problems[0], PayloadError) and "same arm_key 'k'" in check.problems[0].message


def test_bundled_arc_sample_is_the_import_of_its_source(tmp_path: Path) -> None:
    """experiments/demo/payloads/arc-sample is exactly what its README's command writes."""
    demo = Path(__file__).resolve().parents[2] / "experiments" / "demo"
    result = import_benchmark(
        "mc-jsonl",
        demo / "sources" / "arc-sample.jsonl",
        tmp_path / "arc",
        tokenizer=TOK,
        sequence_length=128,
        name="demo-arc-sample",
        license="CC0-1.0",
    )
    assert not result.too_long
    bundled = demo / "payloads" / "arc-sample"
    for name in ("items.jsonl", "payload.yaml"):
        assert (tmp_path / "arc" / name).read_text() == (bundled / name).read_text(), name
    items = _items(bundled)
    assert len(items) == 30 and items[29]["arm_key"] == items[3]["arm_key"] == "dup:fict-003"
    assert not check_payload(bundled, tokenizer=TOK, sequence_length=128).problems
