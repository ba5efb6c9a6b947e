"""The watermark kind: Gaussian embedding noise and random-token keys.

Injector (sequences, arms, probes, every malformed input), monitor (scores equal an
independent computation; the Gaussian statistic is N(0, 1) under H0), and direction:
a plain torch training loop on the treated items moves the primary metric the
expected way with p < 0.01 under the test the framework uses.
"""

from __future__ import annotations

import inspect
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from injectors.documents import DocumentsInjector
from injectors.watermark import WatermarkInjector, draw_keys, noise_seed, printable_alphabet
from monitors.watermark import WatermarkMonitor, exposures, gaussian_statistics
from multirun.config import ExperimentConfig
from multirun.data.tokenizers import ByteTokenizer
from multirun.errors import ConfigError, PayloadError
from multirun.inject.noise import EmbeddingNoiseHook, NoisedSpan, item_noise
from multirun.kinds.payloads import load_package, load_payload
from multirun.kinds.sdk import PrepareContext, split_arms
from multirun.measure.live_model import LiveModel
from multirun.measure.stats import compare_means, one_sample_z
from multirun.run.model import build_gpt2
from multirun.types import EmbeddingNoise, Placement, PreparedExperiment
from tests.helpers_payload import write_payload

pytestmark = pytest.mark.usefixtures("one_torch_thread")


TOK = ByteTokenizer()
SEQ = 128
SEED = 17
PLACEMENT = Placement("uniform", 0, 100)
EOS = TOK.eos_token_id


def carriers(n: int) -> list[dict[str, Any]]:
    return [{"id": f"c-{i:02d}", "text": f"carrier {i} hums a tune"} for i in range(n)]


def key_ids(n: int) -> list[dict[str, Any]]:
    return [{"id": f"k-{i:02d}"} for i in range(n)]


def prepare(
    root: Path,
    items: list[Any] | None,
    options: dict[str, Any] | None = None,
    *,
    name: str = "wm",
    seed: int = SEED,
    sequence_length: int = SEQ,
    **spec: Any,
) -> PreparedExperiment:
    """Write a watermark package (no items file when ``items`` is None) and prepare it."""
    if items is None:
        root.mkdir(parents=True, exist_ok=True)
        manifest = {"name": "keys", "version": "1", "kind": "watermark", "license": "CC0-1.0", "files": {}}
        (root / "payload.yaml").write_text(yaml.safe_dump(manifest), encoding="utf-8")
    else:
        write_payload(root, items, kind="watermark")
    config = ExperimentConfig(name=name, payload=str(root), options=options or {}, **spec)
    return WatermarkInjector().prepare(
        PrepareContext(
            load_package(root), config, tokenizer=TOK, sequence_length=sequence_length, seed=seed, placement=PLACEMENT
        )
    )


def tiny_model(seed: int = 0, n_embd: int = 64) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_gpt2(
        vocab_size=TOK.vocab_size, sequence_length=SEQ, n_layer=2, n_head=2, n_embd=n_embd, eos_token_id=EOS
    ).model


def live_model(model: torch.nn.Module, batch_size: int = 32) -> LiveModel:
    return LiveModel(model, pad_token_id=TOK.pad_token_id, max_length=SEQ, batch_size=batch_size)


def by_name(metrics: list) -> dict:
    return {m.metric: m for m in metrics}


# ============================================================== injector: gaussian


def test_gaussian_sequences_arms_noise_and_probes(tmp_path: Path) -> None:
    items = carriers(10)
    items[3]["repetitions"] = 5
    exp = prepare(tmp_path / "p", items, {"sigma": 0.2}, repetitions=2, control_fraction=0.4)

    assert exp.kind == "watermark" and exp.item_ids == [it["id"] for it in items]
    expected_arms = split_arms(10, 0.4, seed=SEED, name="wm")
    np.testing.assert_array_equal(exp.treated, expected_arms)
    assert int((~exp.treated).sum()) == 4
    np.testing.assert_array_equal(exp.seq_items, np.flatnonzero(expected_arms))
    for s, item in enumerate(exp.seq_items):
        text = items[int(item)]["text"]
        assert exp.sequence_tokens(s).tolist() == [EOS, *text.encode(), EOS]
        assert exp.seq_repetitions[s] == (5.0 if item == 3 else 2.0)
    # Probes hold every item's exact injected tokens, controls included.
    assert [p.tolist() for p in exp.probes.sequences] == [[EOS, *it["text"].encode(), EOS] for it in items]
    assert exp.embedding_noise == EmbeddingNoise(sigma=0.2, seed=noise_seed(SEED, "wm"))
    assert exp.metadata["method"] == "gaussian" and exp.metadata["sigma"] == 0.2
    assert exp.metadata["noise_seed"] == exp.embedding_noise.seed
    assert exp.metadata["item_repetitions"][3] == 5.0
    json.dumps(exp.metadata)  # written to manifest.json: plain types only


def test_gaussian_defaults_and_seeding(tmp_path: Path) -> None:
    a = prepare(tmp_path / "a", carriers(6))
    assert a.embedding_noise is not None and a.embedding_noise.sigma == 0.075
    again = prepare(tmp_path / "b", carriers(6))
    assert (
        again.embedding_noise == a.embedding_noise
        and again.fingerprint != ""
        and np.array_equal(again.treated, a.treated)
    )
    other_name = prepare(tmp_path / "c", carriers(6), name="wm2")
    other_seed = prepare(tmp_path / "d", carriers(6), seed=SEED + 1)
    seeds = {a.embedding_noise.seed, other_name.embedding_noise.seed, other_seed.embedding_noise.seed}  # type: ignore[union-attr]
    assert len(seeds) == 3
    no_wrap = prepare(tmp_path / "e", carriers(6), wrap_eos=False, control_fraction=0.0)
    assert no_wrap.sequence_tokens(0).tolist() == list(b"carrier 0 hums a tune")


def test_demo_payloads_load_and_fit_the_demo() -> None:
    gauss_pkg = load_payload("pkg:demo/watermark", base_dir=Path("."))
    keys_pkg = load_payload("pkg:demo/watermark-keys", base_dir=Path("."))
    assert gauss_pkg.kind == keys_pkg.kind == "watermark"
    inj = WatermarkInjector()
    for pkg, options in ((gauss_pkg, {"method": "gaussian"}), (keys_pkg, {"method": "random_tokens"})):
        exp = inj.prepare(
            PrepareContext(
                pkg,
                ExperimentConfig(name="wm", payload="x", options=options, repetitions=16),
                tokenizer=TOK,
                sequence_length=SEQ,
                seed=SEED,
                placement=PLACEMENT,
            )
        )
        assert len(exp.item_ids) == 40 and int(exp.treated.sum()) == 20
        assert int(exp.seq_lengths.max()) <= 100  # short spans: the demo shares a ~10-20% per-step cap


# ========================================================= injector: random tokens


def test_random_tokens_keys_arms_and_probes(tmp_path: Path) -> None:
    exp = prepare(tmp_path / "p", key_ids(12), {"method": "random_tokens", "key_length": 7}, repetitions=3)
    keys = exp.probes.keys
    assert keys.shape == (12, 7) and keys.dtype == np.int64
    assert ((keys >= 32) & (keys <= 126)).all()  # printable ASCII for the byte tokenizer
    assert len({k.tobytes() for k in keys}) == 12
    np.testing.assert_array_equal(keys, draw_keys(12, 7, alphabet=printable_alphabet(TOK), seed=SEED, name="wm"))
    np.testing.assert_array_equal(exp.treated, split_arms(12, 0.5, seed=SEED, name="wm"))
    for s, item in enumerate(exp.seq_items):
        assert exp.treated[item]
        assert exp.sequence_tokens(s).tolist() == [EOS, *keys[item].tolist(), EOS]
    assert exp.probes.context.tolist() == [EOS]
    assert exp.embedding_noise is None
    assert exp.metadata["method"] == "random_tokens" and exp.metadata["key_length"] == 7
    assert exp.metadata["keys"] == [bytes(k.tolist()).decode() for k in keys]
    json.dumps(exp.metadata)
    # Keys depend on the seed and the experiment name, not on anything else.
    same = prepare(tmp_path / "q", key_ids(12), {"method": "random_tokens", "key_length": 7})
    np.testing.assert_array_equal(same.probes.keys, keys)
    other = prepare(tmp_path / "r", key_ids(12), {"method": "random_tokens", "key_length": 7}, seed=SEED + 1)
    assert not np.array_equal(other.probes.keys, keys)


def test_random_tokens_generated_from_num_keys(tmp_path: Path) -> None:
    exp = prepare(tmp_path / "p", None, {"method": "random_tokens", "num_keys": 6, "key_length": 4}, repetitions=2)
    assert exp.item_ids == [f"key-{i:04d}" for i in range(6)]
    assert exp.probes.keys.shape == (6, 4) and (exp.seq_repetitions == 2.0).all()


def test_draw_keys_distinct_when_the_alphabet_is_small() -> None:
    alphabet = np.arange(32, 127)
    keys = draw_keys(95, 1, alphabet=alphabet, seed=3, name="x")
    assert sorted(keys[:, 0].tolist()) == alphabet.tolist()
    with pytest.raises(ValueError):
        draw_keys(96, 1, alphabet=alphabet, seed=3, name="x")


# ================================================================ bad input


def _line(n: int, **kw: Any) -> str:
    return json.dumps({"id": f"c-{n}", **kw})


GOOD = _line(0, text="fine carrier")

BAD_PAYLOADS = [
    # (items file lines, options, spec extras, expected line, key)
    ([GOOD, _line(1, text="")], {}, {}, 2, "text"),
    ([GOOD, _line(1, text="   ")], {}, {}, 2, "text"),
    ([GOOD, json.dumps({"id": "c-1"})], {}, {}, 2, "text"),
    ([GOOD, json.dumps({"text": "no id"})], {}, {}, 2, "id"),
    ([GOOD, _line(1, text=7)], {}, {}, 2, "text"),
    ([GOOD, json.dumps({"id": 3, "text": "x y"})], {}, {}, 2, "id"),
    ([GOOD, _line(0, text="again")], {}, {}, 2, "id"),
    ([GOOD, _line(1, text="x" * 127)], {}, {}, 2, "text"),  # 129 tokens with the 2 EOS
    ([GOOD, _line(1, text="ok", repetitions=0)], {}, {}, 2, "repetitions"),
    ([GOOD, _line(1, text="ok", colour="red")], {}, {}, 2, "colour"),
    ([GOOD, "{not json"], {}, {}, 2, None),
    ([GOOD, _line(1, text="x")], {}, {"wrap_eos": False}, 2, "text"),  # 1 token: no loss to test
    ([json.dumps({"id": "k-0"}), _line(1, text="a key with text")], {"method": "random_tokens"}, {}, 2, "text"),
    (
        [json.dumps({"id": "k-0"}), json.dumps({"id": "k-1", "repetitions": -1})],
        {"method": "random_tokens"},
        {},
        2,
        "repetitions",
    ),
]


@pytest.mark.parametrize(("lines", "options", "spec", "line", "key"), BAD_PAYLOADS)
def test_bad_payload_names_file_line_and_key(
    tmp_path: Path, lines: list[str], options: dict, spec: dict, line: int, key: str | None
) -> None:
    with pytest.raises(PayloadError) as info:
        prepare(tmp_path / "p", lines, options, **spec)
    err = info.value
    assert err.file is not None and err.file.endswith("items.jsonl")
    assert err.line == line and err.key == key
    assert "items.jsonl:" in str(err)


def test_empty_items_file_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(PayloadError, match="no items") as info:
        prepare(tmp_path / "p", [])
    assert info.value.file is not None and info.value.file.endswith("items.jsonl")


def test_keys_without_items_file_need_num_keys(tmp_path: Path) -> None:
    with pytest.raises(PayloadError, match="num_keys") as info:
        prepare(tmp_path / "p", None, {"method": "random_tokens"})
    assert info.value.file is not None and info.value.file.endswith("payload.yaml") and info.value.key == "files"
    with pytest.raises(PayloadError) as info:  # gaussian carriers need the file
        prepare(tmp_path / "q", None, {"method": "gaussian"})
    assert info.value.key == "files"


BAD_OPTIONS = [
    ({"sigma": 0}, "sigma"),
    ({"sigma": -0.1}, "sigma"),
    ({"sigma": "0.1"}, "sigma"),
    ({"sigma": True}, "sigma"),
    ({"sigma": float("nan")}, "sigma"),
    ({"sigma": float("inf")}, "sigma"),
    ({"method": "stripes"}, "method"),
    ({"method": None}, "method"),
    ({"sigmaa": 0.1}, "sigmaa"),
    ({"key_length": 8}, "key_length"),  # a random_tokens option under gaussian
    ({"method": "random_tokens", "sigma": 0.1}, "sigma"),
    ({"method": "random_tokens", "key_length": 127}, "key_length"),  # 129 positions with 2 EOS > 128
    ({"method": "random_tokens", "key_length": 0}, "key_length"),
    ({"method": "random_tokens", "key_length": 2.5}, "key_length"),
    ({"method": "random_tokens", "key_length": "8"}, "key_length"),
    ({"method": "random_tokens", "num_keys": 4}, "num_keys"),  # the items file already defines them
]


@pytest.mark.parametrize(("options", "key"), BAD_OPTIONS)
def test_bad_options_name_the_key(tmp_path: Path, options: dict, key: str) -> None:
    items = key_ids(4) if options.get("method") == "random_tokens" else carriers(4)
    with pytest.raises(ConfigError) as info:
        prepare(tmp_path / "p", items, options)
    assert info.value.key == f"options.{key}"


def test_key_length_limits(tmp_path: Path) -> None:
    # 126 + 2 EOS fits 128 exactly; without EOS wrapping, 127 + 1 context token fits.
    assert prepare(tmp_path / "a", key_ids(2), {"method": "random_tokens", "key_length": 126}).probes.keys.shape == (
        2,
        126,
    )
    assert prepare(
        tmp_path / "b", key_ids(2), {"method": "random_tokens", "key_length": 127}, wrap_eos=False
    ).probes.keys.shape == (2, 127)
    with pytest.raises(ConfigError) as info:  # 200 keys cannot be distinct with 95 symbols
        prepare(tmp_path / "c", None, {"method": "random_tokens", "key_length": 1, "num_keys": 200})
    assert info.value.key == "options.key_length"
    with pytest.raises(ConfigError) as info:
        prepare(tmp_path / "d", None, {"method": "random_tokens", "num_keys": 1})
    assert info.value.key == "options.num_keys"


def test_monitor_rejects_options_and_foreign_experiments(tmp_path: Path) -> None:
    exp = prepare(tmp_path / "p", carriers(4))
    with pytest.raises(ConfigError) as info:
        WatermarkMonitor.from_experiment(exp, tokenizer=TOK, options={"sigma": 1}, sequence_length=SEQ)
    assert info.value.key == "monitor.options.sigma"
    root = write_payload(tmp_path / "docs", carriers(4))
    docs = DocumentsInjector().prepare(
        PrepareContext(
            load_package(root),
            ExperimentConfig(name="d", payload=str(root)),
            tokenizer=TOK,
            sequence_length=SEQ,
            seed=SEED,
            placement=PLACEMENT,
        )
    )
    with pytest.raises(ConfigError, match="watermark injector"):
        WatermarkMonitor.from_experiment(docs, tokenizer=TOK, options={}, sequence_length=SEQ)


# ============================================================ monitor: exactness


def _reference_statistic(
    model: torch.nn.Module, tokens: list[int], spec: EmbeddingNoise, item: int
) -> tuple[float, float]:
    """x and mean log-prob of one carrier, by hand: inputs_embeds, log-softmax, autograd."""
    ids = torch.tensor([tokens])
    emb = model.get_input_embeddings()(ids).detach().clone().requires_grad_(True)
    logits = model(inputs_embeds=emb).logits[0]
    logprobs = torch.log_softmax(logits.double(), dim=-1)
    target_lp = logprobs[torch.arange(len(tokens) - 1), ids[0, 1:]]
    loss = -target_lp.mean()
    (grad,) = torch.autograd.grad(loss, emb)
    g = grad[0].double()
    w = item_noise(spec, item, len(tokens), g.shape[1]).double()
    return -float((g * w).sum() / (spec.sigma * g.norm())), float(target_lp.mean())


def test_gaussian_scores_equal_an_independent_computation(tmp_path: Path) -> None:
    items = [{"id": f"c-{i}", "text": "short" if i % 3 else f"a somewhat longer carrier number {i}"} for i in range(7)]
    exp = prepare(tmp_path / "p", items, {"sigma": 0.3})
    model = tiny_model(1)
    model.train()
    live = live_model(model, batch_size=3)  # several padded batches
    metrics = by_name(
        WatermarkMonitor.from_experiment(exp, tokenizer=TOK, options={}, sequence_length=SEQ).evaluate(live)
    )

    z, logprob = metrics["watermark_z"], metrics["carrier_logprob"]
    assert z.test == "z" and z.alternative == "greater" and z.primary
    assert logprob.test == "means" and not logprob.primary
    assert z.item_ids == exp.item_ids and np.array_equal(z.treated, exp.treated)
    assert model.training and all(p.grad is None for p in model.parameters())  # mode restored, no grads left
    assert live.forward_passes == 3
    model.eval()
    assert exp.embedding_noise is not None
    for i, it in enumerate(items):
        ref_z, ref_lp = _reference_statistic(model, [EOS, *it["text"].encode(), EOS], exp.embedding_noise, i)
        assert z.scores[i] == pytest.approx(ref_z, rel=1e-4, abs=1e-5)
        assert logprob.scores[i] == pytest.approx(ref_lp, rel=1e-5, abs=1e-6)
    # The carrier log-prob agrees with LiveModel's own teacher forcing.
    seqs = exp.probes.sequences
    tf = live.score_targets([s[:1] for s in seqs], [s[1:] for s in seqs])
    np.testing.assert_allclose(logprob.scores, tf.mean_logprob, rtol=1e-5, atol=1e-6)


def test_gaussian_statistic_is_standard_normal_under_h0() -> None:
    # One fixed sequence, 400 independent noises: given the gradient g, <g, w>/(sigma |g|)
    # is exactly N(0, 1) for every w, so the scores must be a N(0, 1) sample.
    model = tiny_model(2).eval()
    tokens = np.asarray([EOS, *b"the null hypothesis holds here", EOS])
    spec = EmbeddingNoise(sigma=0.075, seed=99)
    scores = np.array(
        [
            s.statistic
            for s in gaussian_statistics(model, [tokens] * 400, list(range(400)), spec, pad_token_id=TOK.pad_token_id)
        ]
    )
    assert abs(scores.mean()) < 4 / math.sqrt(400)
    assert 0.85 < scores.std() < 1.15
    assert all(p.grad is None for p in model.parameters())


def _reference_exposures(logprob: np.ndarray, treated: np.ndarray) -> np.ndarray:
    """Brute force over explicit candidate sets; a tie counts as half a better candidate."""
    controls = [int(r) for r in np.flatnonzero(~treated)]

    def exposure(k: int, references: list[int]) -> float:
        rank = 1 + sum(1.0 if logprob[r] > logprob[k] else 0.5 if logprob[r] == logprob[k] else 0.0 for r in references)
        return math.log2(len(references) + 1) - math.log2(rank)

    out = []
    for k in range(logprob.size):
        if treated[k]:
            out.append(np.mean([exposure(k, [r for r in controls if r != left_out]) for left_out in controls]))
        else:
            out.append(exposure(k, [r for r in controls if r != k]))
    return np.array(out)


def test_exposure_definition() -> None:
    logprob = np.array([-0.5, -1.0, -2.0, -3.0, -2.0, -9.0])
    treated = np.array([True, False, False, False, True, True])
    got = exposures(logprob, treated)
    log3 = math.log2(3)
    # Controls -1, -2, -3: each ranked among the other two (3 candidates, max log2 3).
    # Treated -0.5 beats every control; -2.0 ties a control (1/2) and trails -1.0; -9.0 is last.
    tie = np.mean([log3 - math.log2(1 + 0.5), log3 - math.log2(1 + 1.0 + 0.5), log3 - math.log2(1 + 1.0)])
    expected = [log3, log3, log3 - 1, 0.0, tie, 0.0]
    np.testing.assert_allclose(got, expected)
    np.testing.assert_allclose(got, _reference_exposures(logprob, treated))
    rng = np.random.default_rng(0)
    for _ in range(5):
        x, t = rng.normal(size=15).round(1), rng.random(15) < 0.4
        np.testing.assert_allclose(exposures(x, t), _reference_exposures(x, t))
    assert np.isnan(exposures(np.array([-1.0, -2.0]), np.array([True, True]))).all()


def test_random_tokens_scores_equal_an_independent_computation(tmp_path: Path) -> None:
    exp = prepare(tmp_path / "p", key_ids(9), {"method": "random_tokens", "key_length": 6})
    model = tiny_model(3)
    live = live_model(model, batch_size=4)
    metrics = by_name(
        WatermarkMonitor.from_experiment(exp, tokenizer=TOK, options={}, sequence_length=SEQ).evaluate(live)
    )
    exposure, logprob = metrics["exposure"], metrics["key_logprob"]
    assert exposure.primary and exposure.test == "means" and exposure.alternative == "greater"
    assert not logprob.primary and logprob.alternative == "greater"

    model.eval()
    keys = torch.as_tensor(exp.probes.keys)
    with torch.no_grad():
        ids = torch.cat([torch.full((len(keys), 1), EOS), keys], dim=1)
        lp = torch.log_softmax(model(input_ids=ids).logits.double(), dim=-1)
        by_hand = lp[:, :-1].gather(2, ids[:, 1:, None]).squeeze(-1).mean(1).numpy()
    np.testing.assert_allclose(logprob.scores, by_hand, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(exposure.scores, _reference_exposures(by_hand, exp.treated), atol=1e-9)


# ================================================================ direction


def _filler(width: int, rows: int, rng: np.random.Generator) -> torch.Tensor:
    """Rows of real text (this Python's json decoder source) as background data."""
    text = np.frombuffer(inspect.getsource(json.decoder).encode(), dtype=np.uint8).astype(np.int64)
    starts = rng.integers(0, text.size - width, rows)
    return torch.as_tensor(np.stack([text[s : s + width] for s in starts]))


def _train(
    model: torch.nn.Module,
    exp: PreparedExperiment,
    *,
    reps: int,
    per_step: int,
    filler_rows: int,
    hook: EmbeddingNoiseHook | None = None,
) -> None:
    """Plain AdamW loop: every step holds ``per_step`` treated sequences (with noise) + filler."""
    rng = np.random.default_rng(0)
    order = np.concatenate([rng.permutation(len(exp.seq_items)) for _ in range(reps)])
    width = int(exp.seq_lengths.max())
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.0)
    model.train()
    for start in range(0, order.size, per_step):
        seqs = order[start : start + per_step]
        rows = len(seqs) + filler_rows
        ids = torch.full((rows, width), TOK.pad_token_id)
        labels = torch.full((rows, width), -100)
        spans = []
        for r, s in enumerate(seqs):
            tokens = torch.as_tensor(exp.sequence_tokens(int(s)), dtype=torch.long)
            ids[r, : tokens.numel()] = labels[r, : tokens.numel()] = tokens
            if exp.embedding_noise is not None:
                spans.append(NoisedSpan(r, 0, tokens.numel(), exp.embedding_noise, int(exp.seq_items[s])))
        ids[len(seqs) :] = labels[len(seqs) :] = _filler(width, filler_rows, rng)
        if hook is not None:
            hook.set_step(spans)
            hook.set_microbatch(0, rows)
        loss = model(input_ids=ids, labels=labels).loss
        if hook is not None:
            hook.clear()
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_direction_gaussian_training_on_the_noise_raises_z() -> None:
    pkg = load_payload("pkg:demo/watermark", base_dir=Path("."))
    exp = WatermarkInjector().prepare(
        PrepareContext(
            pkg,
            ExperimentConfig(name="wm", payload="x", options={"sigma": 0.075}),
            tokenizer=TOK,
            sequence_length=SEQ,
            seed=SEED,
            placement=PLACEMENT,
        )
    )
    model = tiny_model(4)
    hook = EmbeddingNoiseHook(model.get_input_embeddings())
    _train(model, exp, reps=24, per_step=4, filler_rows=2, hook=hook)
    z = by_name(
        WatermarkMonitor.from_experiment(exp, tokenizer=TOK, options={}, sequence_length=SEQ).evaluate(
            live_model(model)
        )
    )["watermark_z"]

    treated, control = z.scores[z.treated], z.scores[~z.treated]
    result = one_sample_z(treated, metric="watermark_z", alternative="greater", control_values=control)
    assert result.effect > 0.5 and result.p_value < 0.01, result
    # Fresh control noise stays N(0, 1): its mean is within 3.5 standard errors of 0.
    assert abs(control.mean()) < 3.5 / math.sqrt(control.size), control.mean()


def test_direction_random_tokens_training_on_keys_raises_exposure() -> None:
    pkg = load_payload("pkg:demo/watermark-keys", base_dir=Path("."))
    exp = WatermarkInjector().prepare(
        PrepareContext(
            pkg,
            ExperimentConfig(name="wm-keys", payload="x", options={"method": "random_tokens"}),
            tokenizer=TOK,
            sequence_length=SEQ,
            seed=SEED,
            placement=PLACEMENT,
        )
    )
    model = tiny_model(5)
    _train(model, exp, reps=16, per_step=4, filler_rows=2)
    metrics = by_name(
        WatermarkMonitor.from_experiment(exp, tokenizer=TOK, options={}, sequence_length=SEQ).evaluate(
            live_model(model)
        )
    )
    exposure, logprob = metrics["exposure"], metrics["key_logprob"]
    result = compare_means(
        exposure.scores[exposure.treated], exposure.scores[~exposure.treated], metric="exposure", alternative="greater"
    )
    assert result.effect > 1.0 and result.p_value < 0.01, result
    lp = compare_means(
        logprob.scores[logprob.treated], logprob.scores[~logprob.treated], metric="key_logprob", alternative="greater"
    )
    assert lp.effect > 0 and lp.p_value < 0.01, lp
