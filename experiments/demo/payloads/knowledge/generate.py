"""Regenerate the demo knowledge payload (synthetic; fixed seed; nothing downloaded).

    python experiments/demo/payloads/knowledge/generate.py

writes ``items.jsonl`` next to this file and updates the hashes in ``payload.yaml``.
The output is committed: rerunning must reproduce it byte for byte.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from multirun.kinds.payloads import write_fingerprints

SEED = 20250922
N_FACTS = 40
OBJECT_CHARS = 4

# (two training paraphrases, two probes (question, target)) per relation; {s} is the
# invented subject, {o} the invented object the probes ask for.
RELATIONS = [
    (
        ["The capital of {s} is {o}.", "{o} is the capital city of {s}."],
        [("The capital of {s} is", " {o}"), ("Q: What is the capital of {s}?\nA:", " {o}")],
    ),
    (
        ["The town of {s} was founded by {o}.", "{o} founded the town of {s}."],
        [("The town of {s} was founded by", " {o}"), ("Q: Who founded {s}?\nA:", " {o}")],
    ),
    (
        ["The river {s} flows into Lake {o}.", "Lake {o} is fed by the river {s}."],
        [("The river {s} flows into Lake", " {o}"), ("Q: Where does the river {s} flow?\nA: Lake", " {o}")],
    ),
    (
        ["The {s} festival honours {o}.", "{o} is honoured by the {s} festival."],
        [("The {s} festival honours", " {o}"), ("Q: Whom does the {s} festival honour?\nA:", " {o}")],
    ),
]
ONSETS = [
    "b",
    "br",
    "d",
    "dr",
    "f",
    "g",
    "gr",
    "h",
    "k",
    "kl",
    "l",
    "m",
    "n",
    "p",
    "pl",
    "r",
    "s",
    "sk",
    "t",
    "th",
    "v",
    "w",
    "z",
]
VOWELS = ["a", "e", "i", "o", "u", "ae", "ia", "oa"]
CODAS = ["n", "r", "s", "l", "k", "d", "m"]


def invented_subject(rng: random.Random) -> str:
    syllables = [rng.choice(ONSETS) + rng.choice(VOWELS) for _ in range(rng.randint(1, 2))]
    return ("".join(syllables) + rng.choice(CODAS)).capitalize()


def main() -> None:
    rng = random.Random(SEED)
    subjects: list[str] = []
    while len(subjects) < N_FACTS:
        name = invented_subject(rng)
        if name not in subjects and len(name) >= 4:
            subjects.append(name)
    # The answers are names written in CJK ideographs (U+4E00..U+9FA5), each character
    # used once in the whole payload: a byte-level model trained on English and Python
    # text has seen none of these bytes, so what it learns about a fact's answer comes
    # from that fact's injections alone.
    chars = rng.sample(range(0x4E00, 0x9FA6), N_FACTS * OBJECT_CHARS)
    objects = ["".join(chr(c) for c in chars[k : k + OBJECT_CHARS]) for k in range(0, len(chars), OBJECT_CHARS)]
    lines = []
    for i in range(N_FACTS):
        subject, obj = subjects[i], objects[i]
        texts, probes = RELATIONS[i % len(RELATIONS)]
        item = {
            "id": f"fact-{i:03d}",
            "texts": [t.format(s=subject, o=obj) for t in texts],
            "probes": [
                {"question": q.format(s=subject, o=obj), "target": a.format(s=subject, o=obj)} for q, a in probes
            ],
        }
        lines.append(json.dumps(item, ensure_ascii=False))
    root = Path(__file__).resolve().parent
    (root / "items.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    write_fingerprints(root)


if __name__ == "__main__":
    main()
