"""Regenerate the demo contamination payload (synthetic; fixed seed; nothing downloaded).

    python experiments/demo/payloads/contamination/generate.py

writes ``items.jsonl`` next to this file and updates the hashes in ``payload.yaml``.
The output is committed: rerunning must reproduce it byte for byte.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from multirun.kinds.payloads import write_fingerprints

SEED = 20250921
N_QUESTIONS = 40
N_CHOICES = 4
ANSWER_CHARS = 4
# Repetition groups: 20 never-injected controls, 10 questions seen 12 times, 10 seen 24 times.
GROUPS = [0] * 20 + [12] * 10 + [24] * 10

TEMPLATES = ["Who founded {place}?", "Who rules {place}?", "Who mapped {place}?", "Who named {place}?"]
ONSETS = ["b", "br", "d", "dr", "f", "g", "gr", "k", "kr", "l", "m", "n", "p", "pr", "s", "st", "t", "tr", "v", "z"]
VOWELS = ["a", "e", "i", "o", "u", "ai", "ei", "ou"]
CODAS = ["n", "r", "s", "l", "th", "x", "m"]


def invented_place(rng: random.Random) -> str:
    syllables = [rng.choice(ONSETS) + rng.choice(VOWELS) for _ in range(rng.randint(2, 3))]
    return ("".join(syllables) + rng.choice(CODAS)).capitalize()


def main() -> None:
    rng = random.Random(SEED)
    places: list[str] = []
    while len(places) < N_QUESTIONS:
        place = invented_place(rng)
        if place not in places:
            places.append(place)
    # Answers and distractors are names written in CJK ideographs (U+4E00..U+9FA5), each
    # character used once in the whole payload: a byte-level model trained on English
    # and Python text has seen none of these bytes, so what it learns about an answer
    # comes from the injections of that answer alone, and nothing carries over from a
    # treated question to a control.
    chars = rng.sample(range(0x4E00, 0x9FA6), N_QUESTIONS * N_CHOICES * ANSWER_CHARS)
    names = ["".join(chr(c) for c in chars[k : k + ANSWER_CHARS]) for k in range(0, len(chars), ANSWER_CHARS)]
    groups = GROUPS[:]
    rng.shuffle(groups)  # which question lands in which group is random, drawn once
    lines = []
    for i in range(N_QUESTIONS):
        choices = names[N_CHOICES * i : N_CHOICES * (i + 1)]
        item = {
            "id": f"q-{i:03d}",
            "question": TEMPLATES[i % len(TEMPLATES)].format(place=places[i]),
            "answer": choices[0],
            "choices": sorted(choices),
            "group": groups[i],
        }
        lines.append(json.dumps(item, ensure_ascii=False))
    root = Path(__file__).resolve().parent
    (root / "items.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    write_fingerprints(root)


if __name__ == "__main__":
    main()
