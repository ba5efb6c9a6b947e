"""Benchmark importers: the formats benchmarks ship in, turned into ``contamination`` payload packages.

``multirun payload import FORMAT INPUT --out DIR`` (:func:`import_benchmark`) reads

* ``qa-text``: plain ``Question: ...`` / ``Answer: ...`` blocks (the reference
  implementation's format); a block ends at a blank line or at the next ``Question:``,
  and a question or answer may run over several lines;
* ``mc-jsonl``: multiple-choice JSONL, one question a line, in the shapes benchmarks ship
  (:data:`SHAPES`): ARC (``{"id", "question": {"stem", "choices": [{"text", "label"}]},
  "answerKey"}``, or the Hugging Face form with ``question`` a string and ``choices``
  ``{"text": [...], "label": [...]}``), OpenBookQA (the same with ``question_stem``), MMLU
  (``{"question", "choices": [...], "answer": 0}``) and HellaSwag (``{"ctx", "endings":
  [...], "label"}``), detected per line or fixed by ``shape``;

and writes a package (``payload.yaml`` + ``items.jsonl``) that the ``contamination`` kind
reads: ``id`` (kept from the input, else ``line-N`` from the line the question starts on),
``question``, ``answer`` (the gold choice's text), ``choices`` (multiple choice) and, on
questions whose normalised prompts are duplicates, an ``arm_key`` shared by the copies so
the injector puts them in one arm. Every bad line is a problem naming the input file and
line (all of them at once, up to ``max_problems``); then the written package goes through
the kind's own validation (:func:`~multirun.kinds.experiments.check_payload`) with the
given tokenizer and sequence length: the items it finds too long for the sequence are
left out of the package and listed, so the package that is written passes
``multirun payload check``.

Example:
    >>> normalize_prompt("  What  is\\tthe capital of FRANCE? ")
    'what is the capital of france?'
"""

from __future__ import annotations

import json
import re
import shutil
import unicodedata
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from multirun.data.tokenizers import Tokenizer
from multirun.errors import InputError, PayloadError
from multirun.kinds.experiments import check_payload
from multirun.kinds.payloads import PAYLOAD_YAML, file_xxh64
from multirun.kinds.sdk import is_blank

__all__ = [
    "FORMATS",
    "SHAPES",
    "ImportResult",
    "ImportedItem",
    "import_benchmark",
    "normalize_prompt",
    "read_benchmark",
]

FORMATS = ("qa-text", "mc-jsonl")
SHAPES = ("arc", "obqa", "mmlu", "hellaswag")
KINDS = ("contamination",)
ITEMS_FILE = "items.jsonl"
# How the kind's validation words an item that does not fit (injectors/contamination.py).
_TOO_LONG = "longer than the sequence length"


@dataclass
class ImportedItem:
    """One question read from the input: where it starts, and what the package holds for it."""

    id: str
    question: str
    answer: str
    line: int
    choices: list[str] | None = None
    arm_key: str | None = None

    def record(self) -> dict[str, Any]:
        """The item's line of ``items.jsonl``."""
        rec: dict[str, Any] = {"id": self.id, "question": self.question, "answer": self.answer}
        if self.choices is not None:
            rec["choices"] = self.choices
        if self.arm_key is not None:
            rec["arm_key"] = self.arm_key
        return rec


@dataclass
class ImportResult:
    """What :func:`import_benchmark` did.

    Attributes:
        source: the input file.
        out: the package written (None when the input had problems: nothing is written).
        items: the items in the package, in input order.
        problems: every bad line of the input (file, line, key), up to the bound.
        truncated: reading stopped at the bound on problems.
        duplicates: ``(item, first item with the same normalised prompt)`` for each later copy.
        too_long: ``(item, the kind's reason)`` of each item left out because it does not fit.
        checked_with: the tokenizer and sequence length the package was checked with.
    """

    source: Path
    out: Path | None = None
    items: list[ImportedItem] = field(default_factory=list)
    problems: list[InputError] = field(default_factory=list)
    truncated: bool = False
    duplicates: list[tuple[ImportedItem, ImportedItem]] = field(default_factory=list)
    too_long: list[tuple[ImportedItem, str]] = field(default_factory=list)
    checked_with: str = ""


def normalize_prompt(text: str) -> str:
    """The prompt as duplicates are compared: NFKC, case-folded, runs of whitespace made one space."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


class _Problems:
    """The bounded list of problems of one input file."""

    def __init__(self, source: Path, limit: int) -> None:
        self.source, self.limit = source, limit
        self.errors: list[InputError] = []

    @property
    def full(self) -> bool:
        return len(self.errors) >= self.limit

    def add(self, message: str, line: int | None, key: str | None = None) -> None:
        if not self.full:
            self.errors.append(PayloadError(message, file=self.source, line=line, key=key))


class _BadLine(Exception):
    """A line's first problem: ``key`` and message."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.message, self.key = message, key


def _lines(path: Path, problems: _Problems) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of a UTF-8 file, read a line at a time (bounded memory)."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                yield number, raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                problems.add(f"not valid UTF-8 (byte {e.start} of the line)", number)


# --------------------------------------------------------------------------- qa-text

_QUESTION, _ANSWER = "Question:", "Answer:"


def _read_qa_text(path: Path, problems: _Problems) -> list[ImportedItem]:
    items: list[ImportedItem] = []
    block: dict[str, Any] | None = None  # {"line", "question": [...], "answer": [...] or None}

    def close() -> None:
        nonlocal block
        if block is None:
            return
        start, question, answer = block["line"], "\n".join(block["question"]).strip(), block["answer"]
        block = None
        if answer is None:
            problems.add(f"a {_QUESTION} block without an {_ANSWER} line", start, "answer")
        elif is_blank(question):
            problems.add("the question is empty", start, "question")
        elif is_blank("\n".join(answer)):
            problems.add("the answer is empty", start, "answer")
        else:
            items.append(ImportedItem(f"line-{start}", question, "\n".join(answer).strip(), start))

    for number, text in _lines(path, problems):
        if problems.full:
            break
        if text.startswith(_QUESTION):
            close()
            block = {"line": number, "question": [text[len(_QUESTION) :]], "answer": None}
        elif text.startswith(_ANSWER):
            if block is None:
                problems.add(f"an {_ANSWER} line without a {_QUESTION} before it", number, "answer")
            elif block["answer"] is not None:
                problems.add(f"a second {_ANSWER} line in the block of line {block['line']}", number, "answer")
            else:
                block["answer"] = [text[len(_ANSWER) :]]
        elif not text.strip():
            close()
        elif block is None:
            problems.add(f"text outside a {_QUESTION} / {_ANSWER} block: {text[:40]!r}", number)
        else:
            block["question" if block["answer"] is None else "answer"].append(text)
    close()
    return items


# --------------------------------------------------------------------------- mc-jsonl


def detect_shape(rec: Mapping[str, Any]) -> str:
    """The benchmark shape of one multiple-choice record (:data:`SHAPES`).

    Example:
        >>> detect_shape({"question": "2+2?", "choices": ["3", "4"], "answer": 1})
        'mmlu'
        >>> detect_shape({"ctx": "He", "endings": ["a", "b"], "label": 0})
        'hellaswag'
    """
    if "ctx" in rec and "endings" in rec:
        return "hellaswag"
    if "question_stem" in rec:
        return "obqa"
    if isinstance(rec.get("question"), dict) or "answerKey" in rec:
        return "arc"
    if "question" in rec and "choices" in rec:
        return "mmlu"
    raise _BadLine(
        "unknown multiple-choice shape: expected ARC/OpenBookQA (question.stem or question_stem, choices, "
        "answerKey), MMLU (question, choices, answer) or HellaSwag (ctx, endings, label); or pass --shape"
    )


def _get(rec: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str | None = None) -> Any:
    name = where or key
    if key not in rec:
        raise _BadLine("required key is missing", name)
    value = rec[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise _BadLine(f"expected {getattr(kind, '__name__', 'another type')}, got {type(value).__name__}", name)
    if isinstance(value, str) and is_blank(value):
        raise _BadLine("must be a non-empty string", name)
    return value


def _labelled_choices(rec: Mapping[str, Any], container: Mapping[str, Any], where: str) -> tuple[list[str], list[str]]:
    """``(texts, labels)`` of ARC/OBQA choices: a list of ``{text, label}`` or ``{text: [...], label: [...]}``."""
    choices = container.get("choices")
    if isinstance(choices, dict):
        texts, labels = choices.get("text"), choices.get("label")
        if not isinstance(texts, list) or not isinstance(labels, list) or len(texts) != len(labels):
            raise _BadLine("choices must hold lists 'text' and 'label' of one length", where)
        return texts, [str(x) for x in labels]
    if not isinstance(choices, list):
        raise _BadLine(
            "required: a list of {text, label}" if choices is None else "must be a list of {text, label}", where
        )
    texts, labels = [], []
    for j, c in enumerate(choices):
        if not isinstance(c, dict) or "text" not in c or "label" not in c:
            raise _BadLine("must be an object with 'text' and 'label'", f"{where}[{j}]")
        texts.append(c["text"])
        labels.append(str(c["label"]))
    return texts, labels


def _gold_from_label(label: Any, labels: list[str], key: str) -> int:
    if not isinstance(label, (str, int)) or isinstance(label, bool) or str(label) not in labels:
        raise _BadLine(f"unknown label {label!r}: the choices' labels are {labels}", key)
    return labels.index(str(label))


def _gold_index(value: Any, n: int, key: str) -> int:
    """A gold index: an int, a string of digits, or a letter ``A``.. (MMLU dumps use both)."""
    if isinstance(value, str) and len(value.strip()) == 1 and value.strip().isascii() and value.strip().isalpha():
        index = ord(value.strip().upper()) - ord("A")
    elif isinstance(value, str) and value.strip().isascii() and value.strip().isdigit():
        index = int(value.strip())
    elif isinstance(value, int) and not isinstance(value, bool):
        index = value
    else:
        raise _BadLine(f"must be the gold choice's index (an integer or a letter), got {value!r}", key)
    if not 0 <= index < n:
        raise _BadLine(f"gold index {value!r} is out of range for {n} choices", key)
    return index


def _mc_item(rec: Mapping[str, Any], shape: str, line: int) -> ImportedItem:
    if shape in ("arc", "obqa"):
        if shape == "obqa" and "question_stem" in rec:
            question, container, where = _get(rec, "question_stem", str), rec, "choices"
        elif isinstance(rec.get("question"), dict):
            question, container, where = (
                _get(rec["question"], "stem", str, "question.stem"),
                rec["question"],
                "question.choices",
            )
        else:
            question, container, where = _get(rec, "question", str), rec, "choices"
        texts, labels = _labelled_choices(rec, container, where)
        gold = _gold_from_label(_get(rec, "answerKey", (str, int)), labels, "answerKey")
        ident: Any = rec.get("id")
    elif shape == "mmlu":
        question, where = _get(rec, "question", str), "choices"
        texts = _get(rec, "choices", list)
        gold = _gold_index(_get(rec, "answer", (int, str)), len(texts), "answer")
        ident = rec.get("id")
    else:  # hellaswag
        question, where = _get(rec, "ctx", str), "endings"
        texts = _get(rec, "endings", list)
        label = rec.get("label")
        if label is None or label == "":
            raise _BadLine(
                "required key is missing (the gold ending's index; unlabelled test splits cannot be imported)", "label"
            )
        gold = _gold_index(label, len(texts), "label")
        ident = rec.get("id", rec.get("ind"))
    if len(texts) < 2:
        raise _BadLine(f"needs at least 2 choices, got {len(texts)}", where)
    seen: dict[str, int] = {}
    for j, text in enumerate(texts):
        if not isinstance(text, str) or is_blank(text):
            raise _BadLine(f"must be a non-empty string, got {text!r}", f"{where}[{j}]")
        if text in seen:
            raise _BadLine(f"duplicate choice {text!r} (also {where}[{seen[text]}])", f"{where}[{j}]")
        seen[text] = j
    if isinstance(ident, bool) or not isinstance(ident, (str, int)) or is_blank(str(ident)):
        ident = f"line-{line}"
    return ImportedItem(str(ident), question, texts[gold], line, choices=list(texts))


def _read_mc_jsonl(path: Path, problems: _Problems, shape: str | None) -> list[ImportedItem]:
    items: list[ImportedItem] = []
    for number, text in _lines(path, problems):
        if problems.full:
            break
        if not text.strip():
            continue
        try:
            try:
                rec = json.loads(text)
            except json.JSONDecodeError as e:
                raise _BadLine(f"invalid JSON: {e.msg} (column {e.colno})") from None
            if not isinstance(rec, dict):
                raise _BadLine(f"each line must be a JSON object, got {type(rec).__name__}")
            items.append(_mc_item(rec, shape or detect_shape(rec), number))
        except _BadLine as bad:
            problems.add(bad.message, number, bad.key)
    return items


# --------------------------------------------------------------------------- the package


def read_benchmark(fmt: str, source: str | Path, *, shape: str | None = None, max_problems: int = 200) -> ImportResult:
    """Read ``source`` in ``fmt`` (:data:`FORMATS`); every bad line is a problem of the result.

    Duplicate ids are problems; duplicate prompts (:func:`normalize_prompt`) are not: they
    are listed in ``duplicates`` and their copies share an ``arm_key``.
    """
    path = Path(source)
    if fmt not in FORMATS:
        raise InputError(f"unknown format {fmt!r} (known: {', '.join(FORMATS)})", key="FORMAT")
    if shape is not None and (fmt != "mc-jsonl" or shape not in SHAPES):
        raise InputError(f"--shape is one of {', '.join(SHAPES)}, for mc-jsonl only; got {shape!r}", key="--shape")
    if not path.is_file():
        raise InputError("input file not found", file=path)
    problems = _Problems(path, max_problems)
    items = _read_qa_text(path, problems) if fmt == "qa-text" else _read_mc_jsonl(path, problems, shape)
    result = ImportResult(source=path, items=items, problems=problems.errors, truncated=problems.full)
    first_id: dict[str, ImportedItem] = {}
    first_prompt: dict[str, ImportedItem] = {}
    for item in items:
        if item.id in first_id:
            problems.add(f"duplicate id {item.id!r} (first on line {first_id[item.id].line})", item.line, "id")
        first_id.setdefault(item.id, item)
        first = first_prompt.setdefault(normalize_prompt(item.question), item)
        if first is not item:
            result.duplicates.append((item, first))
            first.arm_key = item.arm_key = f"dup:{first.id}"
    result.truncated = problems.full
    if not items and not result.problems:
        problems.add(f"no items: no {'Question: block' if fmt == 'qa-text' else 'JSON line'} in the file", None)
    return result


def _write_package(out: Path, items: list[ImportedItem], *, name: str, license: str, description: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ITEMS_FILE, "w", encoding="utf-8") as f:
        for item in items:
            f.write(json.dumps(item.record(), ensure_ascii=False) + "\n")
    manifest = {
        "name": name,
        "version": "1.0.0",
        "kind": "contamination",
        "description": description,
        "license": license,
        "files": {"items": {"path": ITEMS_FILE, "xxh64": file_xxh64(out / ITEMS_FILE)}},
    }
    (out / PAYLOAD_YAML).write_text(yaml.safe_dump(manifest, sort_keys=False, allow_unicode=True), encoding="utf-8")


def import_benchmark(
    fmt: str,
    source: str | Path,
    out: str | Path,
    *,
    tokenizer: Tokenizer,
    sequence_length: int,
    kind: str = "contamination",
    shape: str | None = None,
    name: str | None = None,
    license: str = "unspecified: see the source benchmark's license",
    options: Mapping[str, Any] | None = None,
    max_problems: int = 200,
) -> ImportResult:
    """Convert a benchmark file into a payload package at ``out`` (see the module docstring).

    Nothing is written when the input has problems. The package is checked as an
    experiment with default settings plus ``options`` (e.g. a ``format``) at
    ``sequence_length`` with ``tokenizer``; items that do not fit are left out and listed
    in ``too_long``; any other problem the kind finds is reported at the input's line.

    Raises:
        InputError: an unknown format, shape or kind, a missing input, or an ``out`` that
            exists and is not empty.
    """
    if kind not in KINDS:
        raise InputError(f"importers write {', '.join(KINDS)} packages, not {kind!r}", key="--kind")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError("exists and is not an empty directory: pick a new one", file=out, key="--out")
    result = read_benchmark(fmt, source, shape=shape, max_problems=max_problems)
    if result.problems:
        return result
    source_path = result.source
    pkg_name = name or re.sub(r"[^A-Za-z0-9._-]+", "-", source_path.stem).strip("-") or "benchmark"
    description = f"imported from {source_path.name} ({fmt}) by `multirun payload import`"
    result.checked_with = f"tokenizer {tokenizer.name}, sequence length {sequence_length}"
    items = list(result.items)
    # The kind's own validation decides what fits (its format, EOS and choices included);
    # one pass finds every unfit item, the next confirms the package without them (each
    # pass that does not end the import drops at least one item, so this ends).
    while True:
        _write_package(out, items, name=pkg_name, license=license, description=description)
        check = check_payload(out, tokenizer=tokenizer, sequence_length=sequence_length, options=options)
        if not check.problems:
            break
        items_file = (out / ITEMS_FILE).resolve()
        drop: set[int] = set()
        for problem in check.problems:
            in_items = problem.file is not None and Path(problem.file).resolve() == items_file and problem.line
            if in_items and _TOO_LONG in problem.message:
                drop.add(int(problem.line or 0) - 1)
                result.too_long.append((items[int(problem.line or 0) - 1], problem.message))
            elif in_items:
                item = items[int(problem.line or 0) - 1]
                result.problems.append(PayloadError(problem.message, file=source_path, line=item.line, key=problem.key))
            else:
                result.problems.append(problem)
        items = [item for j, item in enumerate(items) if j not in drop]
        if result.problems or not items:
            if not items and not result.problems:
                result.problems.append(
                    PayloadError(f"no item fits the sequence length {sequence_length}", file=source_path)
                )
            shutil.rmtree(out)
            return result
    result.items = items
    result.out = out
    return result
