"""The muse kind: conditions dealt from the arm stream, whole and split sequences, bad payloads
naming file and line, ROUGE-L against a reference implementation, and the verbatim, QA and
membership effects of a tiny model trained on the treated documents (none without them)."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from injectors.muse import MuseInjector, condition_labels, split_tokens
from monitors.muse import MuseMonitor, lcs_length, rouge_l_f1
from multirun.config import ExperimentConfig
from multirun.data.tokenizers import ByteTokenizer
from multirun.errors import ConfigError, InputError, PayloadError
from multirun.kinds.payloads import load_payload
from multirun.kinds.probes import MuseProbes
from multirun.kinds.registry import injectors, monitors
from multirun.kinds.sdk import PrepareContext
from multirun.measure.live_model import LiveModel, MetricScores
from multirun.measure.runner import effects_of
from multirun.types import Placement, PreparedExperiment
from tests.helpers_payload import write_payload
from tests.kind_training import tiny_gpt2

TOK = ByteTokenizer()
EOS = TOK.eos_token_id
SEQ = 128
UNIFORM = Placement("uniform", 0, 100)
SMALL = {"k": 16, "length": 16}  # monitor options of the tests: short probes, fast generation


def docs(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` paragraphs of invented words: nothing in one tells another's continuation or answer."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        words = [
            "".join(rng.choice(list("bdfgklmnprstvz")) + rng.choice(list("aeiou")) for _ in range(3)) for _ in range(12)
        ]
        out.append(
            {
                "id": f"d-{i:02d}",
                "text": " ".join(words) + ".",
                "qa": [{"question": " ".join(words[:5]), "answer": " " + words[5]}],
            }
        )
    return out


def prepare(root: Path, *, seq: int = SEQ, options: dict[str, Any] | None = None, **spec: Any) -> PreparedExperiment:
    payload = load_payload(str(root), base_dir=Path("/"))
    spec.setdefault("monitor", {"options": SMALL})
    cfg = ExperimentConfig(name=str(spec.pop("name", "muse")), payload=str(root), options=options or {}, **spec)
    return MuseInjector().prepare(
        PrepareContext(payload, cfg, tokenizer=TOK, sequence_length=seq, seed=17, placement=UNIFORM)
    )


def test_registered_by_name() -> None:
    assert injectors.get("muse") is MuseInjector
    assert monitors.get("muse") is MuseMonitor


def test_conditions_and_sequences(tmp_path: Path) -> None:
    items = docs(14)
    exp = prepare(write_payload(tmp_path / "m", items, kind="muse"), options={"duplicates": [0, 2, 5], "chunks": 3})
    labels = exp.metadata["conditions"]
    # 5 conditions dealt round-robin from a permutation: sizes differ by at most one.
    counts = {label: labels.count(label) for _, _, label in condition_labels([0, 2, 5], ["whole", "split"])}
    assert sum(counts.values()) == 14 and max(counts.values()) - min(counts.values()) <= 1
    assert exp.treated.tolist() == [label != "x0" for label in labels]
    for i, label in enumerate(labels):
        mine = np.flatnonzero(exp.seq_items == i)
        text = TOK.encode(items[i]["text"])
        pieces = [exp.sequence_tokens(int(j)).tolist() for j in mine]
        assert all(p[0] == EOS and p[-1] == EOS for p in pieces)
        if label == "x0":
            assert not len(mine)
        elif label.endswith("/whole"):
            assert pieces == [[EOS, *text, EOS]]
        else:  # split: 3 consecutive pieces that are the whole document again
            assert len(pieces) == 3 and list(itertools.chain(*(p[1:-1] for p in pieces))) == text
        assert exp.seq_repetitions[mine].tolist() == [float(label[1:].split("/")[0])] * len(mine)
    probes = exp.probes
    assert isinstance(probes, MuseProbes)
    assert probes.conditions == labels and probes.qa_items == list(range(14))
    # Same seed, same deal; the deal is the experiment's own (its arm stream), not the run's.
    again = prepare(write_payload(tmp_path / "m2", items, kind="muse"), options={"duplicates": [0, 2, 5], "chunks": 3})
    assert again.metadata["conditions"] == labels
    assert split_tokens([1, 2, 3, 4, 5, 6, 7], 3) == [[1, 2, 3], [4, 5], [6, 7]]


LONG = "x" * 200
GOOD = docs(3)


@pytest.mark.parametrize(
    ("case", "items", "kwargs", "error", "line", "key", "words"),
    [
        ("no text", [*GOOD, {"id": "z"}], {}, PayloadError, 4, "text", "missing"),
        ("duplicate text", [*GOOD, {**GOOD[0], "id": "z"}], {}, PayloadError, 4, "text", "duplicate text"),
        ("qa not a list", [*GOOD, {"id": "z", "text": "y" * 40, "qa": "who?"}], {}, PayloadError, 4, "qa", "list"),
        (
            "qa without answer",
            [*GOOD, {"id": "z", "text": "y" * 40, "qa": [{"question": "who?"}]}],
            {},
            PayloadError,
            4,
            "qa[0].answer",
            "missing",
        ),
        (
            "qa with an odd key",
            [GOOD[0], {"id": "z", "text": "y" * 40, "qa": [{"question": "q", "answer": "a", "hint": "h"}]}, GOOD[1]],
            {},
            PayloadError,
            2,
            "qa[0]",
            "hint",
        ),
        ("too long", [*GOOD, {"id": "z", "text": LONG}], {}, PayloadError, 4, "text", "longer than the sequence"),
        (
            "shorter than the verbatim probe",
            [{"id": "z", "text": "tiny text"}, *GOOD],
            {},
            PayloadError,
            1,
            "text",
            "k + 1",
        ),
        (
            "fewer tokens than pieces",
            [*GOOD, {"id": "z", "text": "y" * 20}],
            {"options": {"chunks": 30}, "monitor": {"options": {"k": 4, "length": 4}}},
            PayloadError,
            4,
            "text",
            "fewer than options.chunks",
        ),
        ("no control level", GOOD, {"options": {"duplicates": [1, 10]}}, ConfigError, None, "options.duplicates", "0"),
        ("bad form", GOOD, {"options": {"forms": ["halved"]}}, ConfigError, None, "options.forms", "whole"),
        ("chunks 1", GOOD, {"options": {"chunks": 1}}, ConfigError, None, "options.chunks", ">= 2"),
        ("repetitions set", GOOD, {"repetitions": 4}, ConfigError, None, "repetitions", "ignored"),
        (
            "bad monitor option",
            GOOD,
            {"monitor": {"options": {"fpr": 2}}},
            ConfigError,
            None,
            "monitor.options.fpr",
            "(0, 1)",
        ),
        (
            "doses beyond the run",
            GOOD,
            {"options": {"duplicates": [0, 10**9]}},
            None,
            None,
            None,
            "",
        ),
    ],
)
def test_bad_payloads_name_file_line_and_key(
    tmp_path: Path,
    case: str,
    items: list[Any],
    kwargs: dict[str, Any],
    error: type | None,
    line: int | None,
    key: str | None,
    words: str,
) -> None:
    root = write_payload(tmp_path / "m", items, kind="muse")
    if error is None:
        # Without a geometry nothing bounds the doses; the planner's checks do that (not a payload error).
        assert prepare(root, **kwargs).seq_repetitions.max() == 10**9
        return
    with pytest.raises(InputError) as info:
        prepare(root, **kwargs)
    err = info.value
    assert type(err) is error, (case, repr(err))
    if error is PayloadError:
        assert err.file is not None and Path(err.file).name == "items.jsonl", case
    assert err.line == line and err.key == key, (case, str(err))
    assert words in str(err), (case, str(err))


def _reference_lcs(a: list[int], b: list[int]) -> int:
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
    return table[-1][-1]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 4), max_size=12), st.lists(st.integers(0, 4), max_size=12))
def test_lcs_and_rouge_l_match_the_textbook_recurrence(a: list[int], b: list[int]) -> None:
    lcs = _reference_lcs(a, b)
    assert lcs_length(a, b) == lcs
    f1 = rouge_l_f1(a, b)
    assert 0.0 <= f1 <= 1.0 and (f1 == 0.0) == (lcs == 0)
    if a and b and lcs:
        assert f1 == pytest.approx(2 * lcs / (len(a) + len(b)))
    assert rouge_l_f1(b, a) == pytest.approx(f1)


# ------------------------------------------------------------------------ direction

DOSE = 48
STEPS = 150


def train_on(sequences: list[list[int]], *, seed: int = 0) -> torch.nn.Module:
    """The tiny GPT-2 trained on rows packed with ``sequences`` only (drawn at random, seeded).

    The documents alone, not mixed into background text: the 2 x 64 byte model must learn
    them within a CPU test's 150 steps for the membership scores to separate.
    """
    rng = np.random.default_rng(seed)
    model = tiny_gpt2(seed, sequence_length=SEQ)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    for _ in range(STEPS):
        rows = []
        for _ in range(8):
            stream: list[int] = []
            while len(stream) < SEQ:
                stream += sequences[int(rng.integers(len(sequences)))]
            rows.append(stream[:SEQ])
        x = torch.tensor(rows)
        loss = model(input_ids=x, labels=x).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model


def _effects(exp: PreparedExperiment, model: Any) -> dict[str, dict[str | None, Any]]:
    monitor = MuseMonitor.from_experiment(exp, tokenizer=TOK, options=SMALL, sequence_length=SEQ)
    results: list[MetricScores] = monitor.evaluate(
        LiveModel(model, pad_token_id=TOK.pad_token_id, max_length=SEQ, batch_size=32)
    )
    # The runner's own comparison: every metric over all treated documents and per condition.
    return {r.metric: dict(effects_of(r, n_resamples=2000, seed=0)) for r in results}


@pytest.fixture(scope="module")
def experiment(tmp_path_factory: pytest.TempPathFactory) -> PreparedExperiment:
    root = write_payload(tmp_path_factory.mktemp("muse") / "p", docs(12, seed=1), kind="muse")
    return prepare(root, options={"duplicates": [0, DOSE]})


def test_trained_documents_are_detected_against_controls(
    experiment: PreparedExperiment, one_torch_thread: None
) -> None:
    sequences = [experiment.sequence_tokens(i).tolist() for i in range(len(experiment.seq_items))]
    effects = _effects(experiment, train_on(sequences))
    print({m: {g: (round(e.effect, 3), f"{e.p_value:.2g}") for g, e in by.items()} for m, by in effects.items()})
    assert list(effects) == ["rouge_l", "verbatim_exact", "qa_logprob", "qa_exact", "mia_auc", "mia_tpr"]
    assert all(set(by) == {None, f"x{DOSE}/whole", f"x{DOSE}/split"} for by in effects.values())
    auc = effects["mia_auc"]
    assert auc[None].effect > 0.8 and auc[None].p_value < 0.01 and auc[None].ci_low > 0.5
    assert auc[f"x{DOSE}/whole"].effect > 0.8 and auc[f"x{DOSE}/split"].effect > 0.8
    assert effects["mia_tpr"][None].effect > 0.5 and effects["mia_tpr"][None].p_value < 0.05


def test_negative_control_training_on_other_documents_shows_nothing(
    experiment: PreparedExperiment, one_torch_thread: None
) -> None:
    probes = experiment.probes
    assert isinstance(probes, MuseProbes)
    other = write_payload(Path(probes.file).parent.parent / "other", docs(12, seed=2), kind="muse")
    unrelated = prepare(other, options={"duplicates": [0, DOSE]}, name="other")
    sequences = [unrelated.sequence_tokens(i).tolist() for i in range(len(unrelated.seq_items))]
    effects = _effects(experiment, train_on(sequences))  # the same training, none of the experiment's documents
    for metric in ("rouge_l", "qa_logprob", "mia_auc", "mia_tpr"):
        assert effects[metric][None].p_value > 0.01, (metric, effects[metric][None])
