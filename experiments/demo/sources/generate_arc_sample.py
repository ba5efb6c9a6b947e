"""Writes ``arc-sample.jsonl``: 30 fictional multiple-choice questions in ARC's shape
(``{"id", "question": {"stem", "choices": [{"text", "label"}]}, "answerKey"}``), seeded.

The bundled package ``experiments/demo/payloads/arc-sample`` is imported from it (see its
README.md); nothing here is from a real benchmark.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

STEMS = (
    "Which mineral do the cliff-weavers of {place} chew to harden their shells?",
    "What do farmers in {place} feed the drift-goats before the frost?",
    "Which instrument measures the hum of the {place} salt lakes?",
    "What colour does the lantern-moss of {place} turn at dusk?",
    "Which river carries the copper sand of {place} to the sea?",
    "What do the glassmakers of {place} add to cool their furnaces?",
)


def word(rng: random.Random) -> str:
    return "".join(rng.choice("bcdfghklmnprstvz") + rng.choice("aeiou") for _ in range(3)).capitalize()


def main() -> None:
    rng = random.Random(20251203)
    lines = []
    for i in range(29):
        stem = STEMS[i % len(STEMS)].format(place=word(rng))
        texts = sorted({word(rng) for _ in range(4)})
        while len(texts) < 4:
            texts = sorted({*texts, word(rng)})
        labels = "ABCD"
        key = labels[rng.randrange(4)]
        choices = [{"text": t, "label": label} for t, label in zip(texts, labels)]
        lines.append({"id": f"fict-{i:03d}", "question": {"stem": stem, "choices": choices}, "answerKey": key})
    # One question asked twice under another id: the importer warns and keeps both in one arm.
    lines.append({**lines[3], "id": "fict-029"})
    path = Path(__file__).resolve().parent / "arc-sample.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")


if __name__ == "__main__":
    main()
