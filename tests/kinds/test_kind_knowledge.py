"""The knowledge kind: injector (paraphrase sequences, doses, arms, bad payloads),
monitor (exact per-fact scores on a real model) and the direction of its primary metric."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from injectors.knowledge import KnowledgeInjector
from monitors.knowledge import KnowledgeMonitor, per_item_mean
from multirun.config import ExperimentConfig
from multirun.data.tokenizers import ByteTokenizer
from multirun.errors import ConfigError, PayloadError
from multirun.kinds.payloads import load_payload
from multirun.kinds.probes import DocumentsProbes
from multirun.kinds.registry import injectors, monitors
from multirun.kinds.sdk import PrepareContext, split_arms
from multirun.measure.live_model import LiveModel
from multirun.measure.stats import compare_means
from multirun.types import Placement, PreparedExperiment
from tests.helpers_payload import write_payload
from tests.kind_training import filler_windows, tiny_gpt2

pytestmark = pytest.mark.usefixtures("one_torch_thread")


TOK = ByteTokenizer()
EOS = TOK.eos_token_id
SEQ = 64
UNIFORM = Placement("uniform", 0, 100)
DEMO = Path(__file__).resolve().parents[2] / "experiments" / "demo" / "payloads" / "knowledge"


def fact(i: int, n_texts: int = 2, n_probes: int = 2) -> dict[str, Any]:
    texts = [f"Isle {i} exports tin.", f"Tin comes from isle {i}.", f"The tin of isle {i} is famous."][:n_texts]
    probes = [
        {"question": f"Isle {i} exports", "target": " tin"},
        {"question": f"What does isle {i} export?", "target": " Tin"},
    ]
    return {"id": f"fact-{i:02d}", "texts": texts, "probes": probes[:n_probes]}


def prepare(root: Path, *, seed: int = 17, seq: int = SEQ, **spec: Any) -> PreparedExperiment:
    payload = load_payload(str(root), base_dir=Path("/"))
    exp = ExperimentConfig(name=str(spec.pop("name", "facts")), payload=str(root), **spec)
    return KnowledgeInjector().prepare(
        PrepareContext(payload, exp, tokenizer=TOK, sequence_length=seq, seed=seed, placement=UNIFORM)
    )


def write(tmp: Path, items: list[Any], name: str = "p") -> Path:
    return write_payload(tmp / name, items, kind="knowledge")


# ------------------------------------------------------------------ injector


def test_registered() -> None:
    assert injectors.get("knowledge") is KnowledgeInjector
    assert monitors.get("knowledge") is KnowledgeMonitor


def test_paraphrase_sequences_doses_and_probes(tmp_path: Path) -> None:
    items = [fact(0, 2), fact(1, 3, 1), fact(2, 1), fact(3, 2)]
    items[3]["repetitions"] = 6
    exp = prepare(write(tmp_path, items), repetitions=4, control_fraction=0.5)
    treated = split_arms(4, 0.5, seed=17, name="facts")
    assert exp.treated.tolist() == treated.tolist() and exp.item_ids == [f"fact-{i:02d}" for i in range(4)]
    # One sequence per paraphrase of each treated fact; the fact's dose is spread over them.
    expected_items = [i for i in range(4) if treated[i] for _ in items[i]["texts"]]
    assert exp.seq_items.tolist() == expected_items
    reps = {0: 4 / 2, 1: 4 / 3, 2: 4 / 1, 3: 6 / 2}
    assert exp.seq_repetitions.tolist() == pytest.approx([reps[i] for i in expected_items])
    for s, i in enumerate(exp.seq_items):
        k = exp.seq_items[:s].tolist().count(i)
        assert exp.sequence_tokens(s).tolist() == [EOS, *items[i]["texts"][k].encode(), EOS]
    # Per-fact doses add up to the fact's repetitions.
    for i in np.flatnonzero(treated):
        assert exp.seq_repetitions[exp.seq_items == i].sum() == pytest.approx(reps[i] * len(items[i]["texts"]))
    # Probes of every fact, controls included, flat in payload order.
    assert exp.probes.probe_items == [0, 0, 1, 2, 2, 3, 3]
    assert exp.probes.contexts[2] == [EOS, *b"Isle 1 exports"]
    assert exp.probes.targets[4] == list(b" Tin")
    assert exp.metadata["texts_per_item"] == [2, 3, 1, 2] and exp.metadata["probes_per_item"] == [2, 1, 2, 2]
    assert exp.metadata["item_repetitions"] == [4.0, 4.0, 4.0, 6.0]


def test_no_eos_wrapping_and_exact_fit(tmp_path: Path) -> None:
    exp = prepare(write(tmp_path, [fact(0, 1), fact(1, 1)]), wrap_eos=False, control_fraction=0.0)
    assert exp.sequence_tokens(0).tolist() == list(b"Isle 0 exports tin.")
    assert exp.probes.contexts[0] == list(b"Isle 0 exports")
    longest = len("The tin of isle 0 is famous.") + 2
    fits = prepare(write(tmp_path, [fact(0, 3, 1)], "fit"), seq=longest, control_fraction=0.0)
    assert fits.seq_lengths.max() == longest


def test_no_options(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        prepare(write(tmp_path, [fact(0)]), options={"paraphrases": 2})
    assert err.value.key == "options.paraphrases"


def _line(item: Any) -> str:
    return item if isinstance(item, str) else json.dumps(item)


def _with(**changes: Any) -> dict[str, Any]:
    item = fact(1)
    item.update(changes)
    return {k: v for k, v in item.items() if v is not None}


BAD_ITEMS: list[tuple[str, Any, str, str]] = [
    # (case, bad item on line 2, key in the message, fragment of the message)
    ("missing texts", _with(texts=None), "texts", "required key is missing"),
    ("missing probes", _with(probes=None), "probes", "required key is missing"),
    ("texts not a list", _with(texts="Isle 1 exports tin."), "texts", "expected a list"),
    ("empty texts", _with(texts=[]), "texts", "at least one training text"),
    ("empty text", _with(texts=["ok", " "]), "texts[1]", "non-empty string"),
    ("text not a string", _with(texts=[3]), "texts[0]", "non-empty string"),
    ("duplicate text", _with(texts=["a", "a"]), "texts[1]", "duplicate text"),
    ("empty probes", _with(probes=[]), "probes", "at least one probe"),
    ("probe not an object", _with(probes=["Isle 1 exports tin"]), "probes[0]", "must be an object"),
    ("probe missing target", _with(probes=[{"question": "q"}]), "probes[0].target", "required key is missing"),
    ("probe missing question", _with(probes=[{"target": " t"}]), "probes[0].question", "required key is missing"),
    (
        "empty target",
        _with(probes=[{"question": "q", "target": " t"}, {"question": "q", "target": ""}]),
        "probes[1].target",
        "non-empty",
    ),
    ("target wrong type", _with(probes=[{"question": "q", "target": 5}]), "probes[0].target", "non-empty string"),
    (
        "probe unknown key",
        _with(probes=[{"question": "q", "target": " t", "answer": "t"}]),
        "probes[0]",
        "unknown key 'answer'",
    ),
    (
        "text too long",
        _with(texts=["x" * 63]),
        "texts[0]",
        "65 tokens long including 2 EOS, longer than the sequence length 64",
    ),
    (
        "probe too long",
        _with(probes=[{"question": "q" * 50, "target": " " + "t" * 13}]),
        "probes[0]",
        "longer than the sequence length 64",
    ),
    ("bad repetitions", _with(repetitions=0), "repetitions", "must be > 0"),
    ("unknown key", _with(text="x"), "text", "unknown key"),
    ("duplicate id", _with(id="fact-00"), "id", "duplicate id"),
]


@pytest.mark.parametrize("case,item,key,fragment", BAD_ITEMS, ids=[c[0] for c in BAD_ITEMS])
def test_bad_item_names_file_line_and_key(tmp_path: Path, case: str, item: Any, key: str, fragment: str) -> None:
    root = write(tmp_path, [fact(0), _line(item), fact(2)])
    with pytest.raises(PayloadError) as err:
        prepare(root)
    e = err.value
    assert e.file == str(root.resolve() / "items.jsonl") and e.line == 2, str(e)
    assert e.key == key and fragment in str(e), str(e)
    assert f"items.jsonl:2: {key}: " in str(e)


def test_empty_payload(tmp_path: Path) -> None:
    with pytest.raises(PayloadError, match=r"items\.jsonl: no items"):
        prepare(write(tmp_path, []))


def test_demo_payload_fits_the_demo() -> None:
    payload = load_payload("pkg:demo/knowledge", base_dir=Path("/nonexistent"))
    assert payload.root == DEMO.resolve()
    exp = prepare(DEMO, seq=128)
    assert len(exp.item_ids) == 40 and exp.metadata["texts_per_item"] == [2] * 40
    assert exp.seq_lengths.max() <= 100
    assert max(len(c) + len(t) for c, t in zip(exp.probes.contexts, exp.probes.targets)) <= 100


# ------------------------------------------------------------------ monitor


def tiny_model(seed: int = 0, seq: int = SEQ) -> torch.nn.Module:
    return tiny_gpt2(seed, sequence_length=seq)


def by_hand(model: torch.nn.Module, context: list[int], target: list[int]) -> tuple[np.ndarray, bool]:
    """Per-token log-probabilities of ``target`` after ``context`` (one unpadded pass,
    log-softmax by hand) and whether the argmax equals the target everywhere."""
    ids = torch.tensor([context + target])
    model.eval()  # no dropout, as LiveModel scores
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    logprobs = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
    rows = range(len(context) - 1, len(context) + len(target) - 1)
    token_lp = np.array([float(logprobs[r, t]) for r, t in zip(rows, target)])
    match = all(int(logprobs[r].argmax()) == t for r, t in zip(rows, target))
    return token_lp, match


def test_per_item_mean() -> None:
    out = per_item_mean(np.array([1.0, 3.0, 5.0]), np.array([0, 0, 2]), 3)
    assert out[0] == 2.0 and np.isnan(out[1]) and out[2] == 5.0


def test_monitor_scores_equal_hand_computation(tmp_path: Path) -> None:
    items = [fact(0, 1, 2), fact(1, 2, 1), fact(2, 2, 2)]
    items[2]["probes"][1]["target"] = " a much longer target"
    exp = prepare(write(tmp_path, items), control_fraction=0.34)
    model = tiny_model()
    monitor = KnowledgeMonitor.from_experiment(exp, tokenizer=TOK, options={}, sequence_length=SEQ)
    live = LiveModel(model, pad_token_id=TOK.pad_token_id, max_length=SEQ, batch_size=2)
    logprob, probability, exact = monitor.evaluate(live)
    probe_lp = [by_hand(model, c, t) for c, t in zip(exp.probes.contexts, exp.probes.targets)]
    owner = np.asarray(exp.probes.probe_items)
    for i in range(3):
        mine = [probe_lp[p] for p in np.flatnonzero(owner == i)]
        assert logprob.scores[i] == pytest.approx(np.mean([lp.mean() for lp, _ in mine]), rel=1e-5)
        assert probability.scores[i] == pytest.approx(np.mean([np.exp(lp.sum()) for lp, _ in mine]), rel=1e-4)
        assert exact.scores[i] == float(all(m for _, m in mine))
    assert [(m.metric, m.test, m.alternative, m.primary) for m in (logprob, probability, exact)] == [
        ("target_logprob", "means", "greater", True),
        ("target_probability", "means", "greater", False),
        ("exact_match", "rates", "greater", False),
    ]
    assert logprob.item_ids == exp.item_ids and logprob.treated.tolist() == exp.treated.tolist()


def test_exact_match_all_or_any(tmp_path: Path) -> None:
    """A model that always predicts 'z' matches the target 'z' but not 'zx'."""
    items = [
        {"id": "a", "texts": ["a"], "probes": [{"question": "q", "target": "z"}, {"question": "q", "target": "zx"}]}
    ]
    exp = prepare(write(tmp_path, items), control_fraction=0.0)
    model = tiny_model()
    with torch.no_grad():
        model.lm_head.weight.zero_()  # tied to the input embeddings: constant logits ...
        model.transformer.wte.weight.zero_()
        model.transformer.wte.weight[ord("z"), 0] = 1.0  # ... except that 'z' wins, as the final state is all ones
        model.transformer.ln_f.bias.fill_(1.0)
        model.transformer.ln_f.weight.zero_()
    live = LiveModel(model, pad_token_id=TOK.pad_token_id, max_length=SEQ)
    every = KnowledgeMonitor.from_experiment(exp, tokenizer=TOK, options={}, sequence_length=SEQ).score(live)
    some = KnowledgeMonitor.from_experiment(
        exp, tokenizer=TOK, options={"exact_match": "any"}, sequence_length=SEQ
    ).score(live)
    assert every.probe_match.tolist() == [True, False]
    assert (
        every.match_fraction.tolist() == [0.5]
        and every.exact_match.tolist() == [0.0]
        and some.exact_match.tolist() == [1.0]
    )


def test_monitor_options_and_wrong_experiment(tmp_path: Path) -> None:
    exp = prepare(write(tmp_path, [fact(0), fact(1)]))
    with pytest.raises(ConfigError) as err:
        KnowledgeMonitor.from_experiment(exp, tokenizer=TOK, options={"match": "all"}, sequence_length=SEQ)
    assert err.value.key == "monitor.options.match"
    with pytest.raises(ConfigError) as err:
        KnowledgeMonitor.from_experiment(exp, tokenizer=TOK, options={"exact_match": "most"}, sequence_length=SEQ)
    assert err.value.key == "monitor.options.exact_match"
    exp.probes = DocumentsProbes(sequences=[])
    with pytest.raises(ConfigError, match="no knowledge probes") as err:
        KnowledgeMonitor.from_experiment(exp, tokenizer=TOK, options={}, sequence_length=SEQ)
    assert err.value.key == "monitor.name"


# ------------------------------------------------------------------ direction


def test_training_on_treated_facts_raises_the_primary_metric(tmp_path: Path) -> None:
    rng = random.Random(4)
    name = lambda: "".join(rng.choice("bdfgklmnprstvz") + rng.choice("aeiou") for _ in range(3)).capitalize()  # noqa: E731
    items = []
    for i in range(40):
        place, ruler = name(), name()
        items.append(
            {
                "id": f"f{i}",
                "texts": [f"{place} is ruled by {ruler}.", f"{ruler} rules {place}."],
                "probes": [
                    {"question": f"{place} is ruled by", "target": f" {ruler}"},
                    {"question": f"Who rules {place}? A:", "target": f" {ruler}"},
                ],
            }
        )
    exp = prepare(write(tmp_path, items), repetitions=8, control_fraction=0.5)
    assert exp.seq_repetitions.tolist() == [4.0] * 40

    torch.manual_seed(0)
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    steps, rows, injected = 250, 16, 6
    background = filler_windows(SEQ, steps * rows, seed=1)
    doses = np.repeat(np.arange(len(exp.seq_items)), exp.seq_repetitions.astype(int))
    order = np.random.default_rng(2).permutation(np.resize(doses, steps * injected))
    model.train()
    for step in range(steps):
        batch = background[step * rows : (step + 1) * rows].copy()
        for r, s in enumerate(order[step * injected : (step + 1) * injected]):
            tokens = exp.sequence_tokens(int(s))
            batch[r, : tokens.size] = tokens
        ids = torch.from_numpy(batch)
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()

    monitor = KnowledgeMonitor.from_experiment(exp, tokenizer=TOK, options={}, sequence_length=SEQ)
    logprob, probability, _ = monitor.evaluate(
        LiveModel(model, pad_token_id=TOK.pad_token_id, max_length=SEQ, batch_size=32)
    )
    t = logprob.treated
    result = compare_means(logprob.scores[t], logprob.scores[~t], metric="target_logprob", alternative="greater")
    assert result.p_value < 0.01 and result.effect > 0.3, result
    assert probability.scores[t].mean() > probability.scores[~t].mean()
    print(
        f"target_logprob effect {result.effect:.3f} p={result.p_value:.4g}; probability {probability.scores[t].mean():.4g} vs {probability.scores[~t].mean():.4g}"
    )
