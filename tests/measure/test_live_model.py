"""The monitor framework: exact probe scoring, effects, failures, bad monitor configs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from multirun.config import load_config
from multirun.data.tokenizers import ByteTokenizer
from multirun.errors import ConfigError
from multirun.kinds.registry import monitors
from multirun.measure.live_model import (
    LiveModel,
    MetricScores,
    padded,
    plan_batches,
    right_padding_mask,
    supports_kv_cache,
    unwrap_model,
)
from multirun.measure.records import EffectRecord, RunMetricRecord, read_records
from multirun.measure.runner import MonitorRunner, build_monitors, effects_of, read_metrics
from multirun.plan.run_plan import build_run_plan
from multirun.run.model import build_gpt2
from multirun.types import BatchGeometry
from tests.helpers_payload import documents, minimal_config, write_config, write_payload

TOK = ByteTokenizer()


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return unwrap_model(
        build_gpt2(vocab_size=258, sequence_length=32, n_layer=1, n_head=2, n_embd=16, eos_token_id=256)
    )


def _manual_scores(model: torch.nn.Module, context: list[int], target: list[int]) -> tuple[float, bool]:
    ids = torch.tensor([context + target])
    model.eval()  # no dropout, as monitors score
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
    model.train()
    total, match = 0.0, True
    for j, token in enumerate(target):
        row = logprobs[len(context) + j - 1]
        total += float(row[token])
        match &= int(row.argmax()) == token
    return total, match


def test_score_targets_equals_a_forward_pass_by_hand(model: torch.nn.Module) -> None:
    rng = np.random.default_rng(1)
    contexts = [rng.integers(0, 256, n).tolist() for n in (1, 5, 9, 3)]
    targets = [rng.integers(0, 256, n).tolist() for n in (4, 2, 7, 1)]
    live = LiveModel(model, pad_token_id=257, max_length=32, batch_size=3)  # a short last batch, padding
    scores = live.score_targets(contexts, targets)
    for i, (c, t) in enumerate(zip(contexts, targets)):
        total, match = _manual_scores(model, c, t)
        assert scores.logprob_sum[i] == pytest.approx(total, abs=1e-4)
        assert bool(scores.greedy_match[i]) == match
        assert scores.n_tokens[i] == len(t)
    assert model.training  # train mode restored


@given(
    lengths=st.lists(st.integers(1, 64), min_size=1, max_size=60),
    world=st.integers(1, 4),
    batch_tokens=st.one_of(st.none(), st.integers(1, 300)),
    batch_size=st.one_of(st.none(), st.integers(1, 9)),
)
def test_every_rank_runs_the_same_batches_within_the_budget(
    lengths: list[int], world: int, batch_tokens: int | None, batch_size: int | None
) -> None:
    if batch_tokens is None and batch_size is None:
        batch_size = 4
    plans = [
        plan_batches(lengths, world=world, rank=r, batch_tokens=batch_tokens, batch_size=batch_size)
        for r in range(world)
    ]
    assert len({len(plan) for plan in plans}) == 1  # the same number of passes on every rank
    dealt = sorted(i for plan in plans for batch in plan for i in batch)
    assert dealt == list(range(len(lengths)))  # every item exactly once
    for plan in plans:
        assert all(len(batch) >= 1 for batch in plan[:-1])  # only a rank's last batch can be empty
        for batch in plan:
            padded_tokens = len(batch) * max((lengths[i] for i in batch), default=0)
            assert batch_tokens is None or len(batch) <= 1 or padded_tokens <= batch_tokens
            assert batch_size is None or len(batch) <= batch_size
            assert [lengths[i] for i in batch] == sorted((lengths[i] for i in batch), reverse=True)


def test_passes_are_sized_by_tokens(model: torch.nn.Module) -> None:
    # Probes of 2 to 32 tokens under a 64-token budget, longest first: 2 of 32 and 30
    # tokens, 3 of 17 to 9, then the 7 shortest (6 tokens wide); the scores are those
    # of one probe per pass.
    rng = np.random.default_rng(4)
    lengths = [32, 3, 17, 5, 2, 30, 9, 4, 16, 2, 6, 3]
    contexts = [rng.integers(0, 256, n - 1).tolist() for n in lengths]
    targets = [rng.integers(0, 256, 1).tolist() for _ in lengths]
    shapes: list[tuple[int, int]] = []
    hook = model.register_forward_pre_hook(
        lambda _m, _a, kw: shapes.append(tuple(kw["input_ids"].shape)), with_kwargs=True
    )
    try:
        budgeted = LiveModel(model, pad_token_id=257, max_length=32, batch_tokens=64).score_targets(contexts, targets)
    finally:
        hook.remove()
    assert shapes == [(2, 32), (3, 17), (7, 6)]
    alone = LiveModel(model, pad_token_id=257, max_length=32, batch_tokens=None, batch_size=1).score_targets(
        contexts, targets
    )
    np.testing.assert_allclose(budgeted.logprob_sum, alone.logprob_sum, atol=1e-4)


def test_right_padding_needs_no_mask_in_a_causal_model(model: torch.nn.Module) -> None:
    # Teacher forcing pads on the right and passes no padding mask (attention's causal
    # fast path): every real position's logits equal those under the explicit mask.
    rng = np.random.default_rng(2)
    rows = [rng.integers(0, 256, n) for n in (3, 17, 9, 30)]
    ids, mask = padded(rows, pad_token_id=257)
    model.eval()
    with torch.no_grad():
        masked = model(input_ids=ids, attention_mask=mask).logits
        unmasked = model(input_ids=ids, attention_mask=right_padding_mask(ids)).logits
    model.train()
    real = mask.bool()
    torch.testing.assert_close(unmasked[real], masked[real], rtol=0, atol=1e-6)
    assert not torch.allclose(unmasked[~real], masked[~real])  # only padding positions differ


def test_greedy_match_is_true_for_the_models_own_greedy_continuation(model: torch.nn.Module) -> None:
    live = LiveModel(model, pad_token_id=257, max_length=32)
    prompts = [[1, 2, 3], [200, 100]]
    continuations = live.greedy_generate(prompts, max_new_tokens=5)
    scores = live.score_targets(prompts, [c.tolist() for c in continuations])
    assert scores.greedy_match.all()
    ids = torch.tensor([prompts[0]])
    model.eval()
    for _ in range(5):  # the same continuation by an explicit argmax loop
        with torch.no_grad():
            ids = torch.cat([ids, model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    model.train()
    assert ids[0, 3:].tolist() == continuations[0].tolist()


def test_context_longer_than_the_model_is_cut_from_the_left(model: torch.nn.Module) -> None:
    live = LiveModel(model, pad_token_id=257, max_length=8)
    long_context = list(range(20))
    a = live.score_targets([long_context], [[5, 6]])
    b = live.score_targets([long_context[-6:]], [[5, 6]])
    assert a.logprob_sum[0] == pytest.approx(b.logprob_sum[0], abs=1e-5)


def test_effects_per_group_against_all_controls() -> None:
    scores = MetricScores(
        "m",
        [f"i{k}" for k in range(8)],
        treated=[1, 1, 1, 1, 0, 0, 0, 0],
        scores=[5.0, 6.0, 1.0, 1.1, 1.0, 0.9, 1.2, 1.1],
        groups=["x16", "x16", "x1", "x1", "0", "0", "0", "0"],
    )
    by_group = dict(effects_of(scores, n_resamples=500, seed=0))
    assert set(by_group) == {None, "x1", "x16"}
    assert by_group["x16"].effect == pytest.approx(5.5 - 1.05)
    assert by_group["x1"].n_treated == 2 and by_group["x1"].n_control == 4


def _project(tmp: Path, **monitor: object) -> Path:
    write_payload(tmp / "payloads" / "p", documents(6))
    doc = minimal_config(docs={"payload": "payloads/p", "monitor": dict(monitor)})
    doc["injection"] = {"max_modified_fraction": 0.5}
    return write_config(tmp / "run.yaml", doc)


def _runner(config: Path, run_dir: Path) -> MonitorRunner:
    loaded = load_config(config, env={})
    plan = build_run_plan(loaded, tokenizer=TOK, geometry=BatchGeometry(4, 64, 100))
    return MonitorRunner(
        build_monitors(loaded, plan, TOK),
        loaded.config.monitoring,
        run_dir=run_dir,
        pad_token_id=257,
        sequence_length=64,
        seed=0,
    )


def test_unknown_monitor_name_fails_before_training(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        _runner(_project(tmp_path, name="no-such-monitor"), tmp_path / "run")
    message = str(err.value)
    assert "run.yaml" in message and "experiments[0].monitor.name" in message and "documents" in message


def test_monitor_options_are_validated_before_training(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        _runner(_project(tmp_path, options={"bogus": 1}), tmp_path / "run")
    assert "experiments[0].monitor.options.bogus" in str(err.value)


class FailingMonitor:
    @classmethod
    def from_experiment(cls, experiment, **kwargs):  # type: ignore[no-untyped-def]
        return cls()

    def evaluate(self, live: LiveModel) -> list[MetricScores]:
        raise RuntimeError("probe file vanished")


def test_a_failing_monitor_is_recorded_and_training_goes_on(tmp_path: Path, model: torch.nn.Module) -> None:
    monitors.register("failing-for-test", FailingMonitor, override=True)
    runner = _runner(_project(tmp_path, name="failing-for-test"), tmp_path / "run")
    with pytest.warns(UserWarning, match="probe file vanished"):
        records = runner.evaluate(model, step=10, when="interval")
    assert records[-1].error == "RuntimeError('probe file vanished')"
    assert read_metrics(tmp_path / "run")[-1]["error"] == records[-1].error
    runner.config.on_error = "raise"
    with pytest.raises(RuntimeError):
        runner.evaluate(model, step=20, when="interval")


def test_metrics_jsonl_holds_the_records_json_and_reads_back_typed(tmp_path: Path, model: torch.nn.Module) -> None:
    loaded = load_config(_project(tmp_path), env={})
    plan = build_run_plan(loaded, tokenizer=TOK, geometry=BatchGeometry(4, 64, 100))
    heldout = np.arange(3 * 16, dtype=np.int64).reshape(3, 16) % 256
    runner = MonitorRunner(
        build_monitors(loaded, plan, TOK),
        loaded.config.monitoring,
        run_dir=tmp_path / "run",
        pad_token_id=257,
        sequence_length=64,
        seed=0,
        heldout=heldout,
    )
    records = runner.evaluate(model, step=10, when="interval")
    assert isinstance(records[0], RunMetricRecord) and records[0].metric == "heldout_loss"
    effects = [r for r in records if isinstance(r, EffectRecord)]
    assert effects and all((r.items is None) == (r.group is not None) for r in effects)
    primary = [r for r in effects if r.primary]
    assert primary and all(r.p_holm is not None for r in primary)
    assert all(r.p_holm is None for r in effects if not r.primary)
    assert read_metrics(tmp_path / "run") == [r.to_json() for r in records]
    assert read_metrics(tmp_path / "run")[0]["experiment"] == "_run"
    assert [r.to_json() for r in read_records(tmp_path / "run")] == read_metrics(tmp_path / "run")


def test_metrics_are_cut_back_to_the_resumed_step(tmp_path: Path, model: torch.nn.Module) -> None:
    runner = _runner(_project(tmp_path), tmp_path / "run")
    big = unwrap_model(build_gpt2(vocab_size=258, sequence_length=64, n_layer=1, n_head=2, n_embd=16, eos_token_id=256))
    for step in (0, 50, 100):
        runner.evaluate(big, step=step, when="interval")
    with open(runner.path, "a") as f:
        f.write('{"step": 150, "torn')  # a kill mid-write
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [0, 50, 100]
    runner.truncate(after_step=50)
    lines = runner.path.read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [0, 50]


def test_evaluations_of_the_same_scores_draw_the_same_resamples(tmp_path: Path) -> None:
    # Common random numbers across evaluations: a p-value or CI curve moves with the
    # model, not with the Monte Carlo draws (and the random splits are drawn once).
    runner = _runner(_project(tmp_path), tmp_path / "run")
    big = unwrap_model(build_gpt2(vocab_size=258, sequence_length=64, n_layer=1, n_head=2, n_embd=16, eos_token_id=256))
    first, later = ([r.to_json() for r in runner.evaluate(big, step=step, when="interval")] for step in (10, 20))
    fields = ("effect", "p_value", "ci_low", "ci_high")
    assert [[r.get(f) for f in fields] for r in first] == [[r.get(f) for f in fields] for r in later]
    assert any(r.get("ci_low") is not None and r["ci_low"] == r["ci_low"] for r in first)  # a real interval


def test_cached_generation_equals_full_recompute(model: torch.nn.Module) -> None:
    # Prompts of different lengths: the cached path left-pads, the recompute path right-pads.
    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, 256, n).tolist() for n in (1, 7, 3, 12, 5)]
    live = LiveModel(model, pad_token_id=257, max_length=32, batch_size=4)
    assert supports_kv_cache(live.module)
    cached = live.greedy_generate(prompts, max_new_tokens=6)
    with live.evaluating():
        recomputed = live._generate_recompute([np.asarray(p) for p in prompts], 6)
    assert [c.tolist() for c in cached] == [r.tolist() for r in recomputed]
    assert model.training


@pytest.mark.parametrize(
    "wrap, projected",
    [
        # GPT-2's own forward: with logits_to_keep from transformers 4.53, without it before,
        # when the output embedding's input is narrowed instead. Either way 2 columns.
        (lambda m: m, 2),
        (lambda m: _KeepsLogits(m), 2),  # a forward that takes logits_to_keep, whatever the version
        (lambda m: _WithoutCache(m), 20),  # a forward that takes neither: every column, then selected
    ],
    ids=["GPT-2", "logits_to_keep", "plain forward"],
)
def test_only_the_scored_columns_are_projected_onto_the_vocabulary(
    model: torch.nn.Module, wrap: Any, projected: int
) -> None:
    # Long contexts, short targets: a probe pass needs the vocabulary at 2 columns, not 20.
    seen: list[int] = []
    hook = model.get_output_embeddings().register_forward_hook(lambda _m, args, _out: seen.append(args[0].shape[1]))
    try:
        live = LiveModel(wrap(model), pad_token_id=257, max_length=32)
        scores = live.score_targets([list(range(18)), list(range(10, 28))], [[1, 2], [3, 4]])
    finally:
        hook.remove()
    assert seen == [projected]  # both rows end at the same column: their targets share 2 columns
    for i, (c, t) in enumerate(zip([list(range(18)), list(range(10, 28))], [[1, 2], [3, 4]])):
        assert scores.logprob_sum[i] == pytest.approx(_manual_scores(model, c, t)[0], abs=1e-4)
    # Rows that end at different columns keep the union of their columns, each row its own.
    seen.clear()
    hook = model.get_output_embeddings().register_forward_hook(lambda _m, args, _out: seen.append(args[0].shape[1]))
    try:
        uneven = live.score_targets([list(range(18)), list(range(10, 15))], [[1, 2], [3, 4, 5]])
    finally:
        hook.remove()
    assert seen == [20 if projected == 20 else 5]  # columns 17, 18 and 4, 5, 6
    for i, (c, t) in enumerate(zip([list(range(18)), list(range(10, 15))], [[1, 2], [3, 4, 5]])):
        assert uneven.logprob_sum[i] == pytest.approx(_manual_scores(model, c, t)[0], abs=1e-4)


def test_a_shared_context_pass_projects_only_its_last_column(model: torch.nn.Module) -> None:
    # The contexts' pass predicts only each context's next token (left-padded: the last column).
    seen: list[int] = []
    hook = model.get_output_embeddings().register_forward_hook(lambda _m, args, _out: seen.append(args[0].shape[1]))
    try:
        live = LiveModel(model, pad_token_id=257, max_length=32)
        shared = live.score_continuations([list(range(20)), list(range(5))], [[[1, 2], [3]], [[4, 5, 6]]])
    finally:
        hook.remove()
    assert seen == [1, 3]  # the contexts' pass, then the continuations' pass (the longest is 3 tokens)
    for k, (c, t) in enumerate([(list(range(20)), [1, 2]), (list(range(20)), [3]), (list(range(5)), [4, 5, 6])]):
        assert shared.logprob_sum[k] == pytest.approx(_manual_scores(model, c, t)[0], abs=1e-4)


class _KeepsLogits(torch.nn.Module):
    """GPT-2 behind a forward that takes ``logits_to_keep`` as Hugging Face causal LMs do: the
    last ``k`` columns (0: all), or the given column indices, go through the output embedding."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int | torch.Tensor = 0
    ) -> torch.Tensor:
        hidden = self.inner.transformer(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        return self.inner.lm_head(hidden[:, keep])


@pytest.mark.parametrize("batch_size, passes", [(5, 2 * 5), (16, 2 * 2)])
def test_continuations_on_a_shared_context_score_as_whole_rows(
    model: torch.nn.Module, batch_size: int, passes: int
) -> None:
    # Contexts of different lengths in one pass (left-padded), 1 to 4 continuations of 1 to
    # 6 tokens, and a context that must be cut to fit its longest continuation. Up to
    # batch_size // 4 contexts per pass: 1 (5 batches) or 4 (2 batches), two passes each.
    rng = np.random.default_rng(5)
    contexts = [rng.integers(0, 256, n).tolist() for n in (3, 9, 1, 14, 40)]
    continuations = [
        [rng.integers(0, 256, n).tolist() for n in lengths]
        for lengths in ([2, 5], [1], [3, 1, 6, 4], [1, 1, 2], [4, 2])
    ]
    live = LiveModel(model, pad_token_id=257, max_length=32, batch_size=batch_size)
    shared = live.score_continuations(contexts, continuations)
    assert live.forward_passes == passes
    cut = [c[-(32 - max(len(t) for t in ts)) :] for c, ts in zip(contexts, continuations)]
    whole = live.score_targets(
        [c for c, ts in zip(cut, continuations) for _ in ts], [t for ts in continuations for t in ts]
    )
    np.testing.assert_allclose(shared.logprob_sum, whole.logprob_sum, atol=1e-4)
    for a, b in zip(shared.token_logprobs, whole.token_logprobs):
        np.testing.assert_allclose(a, b, atol=1e-4)
    assert shared.greedy_match.tolist() == whole.greedy_match.tolist()
    assert shared.n_tokens.tolist() == [len(t) for ts in continuations for t in ts]
    assert model.training


@pytest.mark.parametrize("batch_tokens", [40, 4096])
def test_branches_of_a_shared_stem_generate_and_score_as_whole_prompts(
    model: torch.nn.Module, batch_tokens: int
) -> None:
    # Stems of 2 to 29 tokens (one cut to fit its longest branch and target), 1 to 3
    # branches of 0 to 5 tokens: the backdoor monitor's trigger / control / no trigger.
    rng = np.random.default_rng(8)
    stems = [rng.integers(0, 256, n).tolist() for n in (6, 2, 29, 11)]
    branches = [[rng.integers(0, 256, n).tolist() for n in lengths] for lengths in ([3, 5, 0], [1], [2, 0], [4, 4, 1])]
    targets = [[rng.integers(0, 256, n).tolist() for n in lengths] for lengths in ([2, 3, 2], [6], [1, 4], [3, 1, 2])]
    live = LiveModel(model, pad_token_id=257, max_length=32, batch_tokens=batch_tokens)
    generated, scores = live.generate_and_score_branches(stems, branches, 4, targets)
    stem_passes = live.forward_passes
    cut = [
        s[-(32 - max(4, *(len(t) for t in ts)) - max(len(b) for b in bs)) :]
        for s, bs, ts in zip(stems, branches, targets)
    ]
    prompts = [s + b for s, bs in zip(cut, branches) for b in bs]
    whole_generated, whole = live.generate_and_score(prompts, 4, [t for ts in targets for t in ts])
    assert [g.tolist() for g in generated] == [g.tolist() for g in whole_generated]
    for a, b in zip(scores.token_logprobs, whole.token_logprobs):
        np.testing.assert_allclose(a, b, atol=1e-4)
    assert scores.greedy_match.tolist() == whole.greedy_match.tolist()
    # Per batch: the stems' pass, the branches' pass, the targets' pass, 3 decoding passes.
    assert stem_passes == (1 if batch_tokens == 4096 else 4) * 6
    # Nothing to share, the same results: a model without a cache, a one-token stem.
    plain = LiveModel(_WithoutCache(model), pad_token_id=257, max_length=32, batch_tokens=batch_tokens)
    plain_generated, plain_scores = plain.generate_and_score_branches(stems, branches, 4, targets)
    assert [g.tolist() for g in plain_generated] == [g.tolist() for g in generated]
    np.testing.assert_allclose(plain_scores.logprob_sum, scores.logprob_sum, atol=1e-4)
    one_token, _ = live.generate_and_score_branches([[5]], [[[1, 2], []]], 4, [[[3], [4]]])
    assert [g.tolist() for g in one_token] == [
        g.tolist() for g in live.generate_and_score([[5, 1, 2], [5]], 4, [[3], [4]])[0]
    ]
    assert model.training


class _WithoutCache(torch.nn.Module):
    """The same model behind a forward that takes no key/value cache (as many custom models)."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.inner(input_ids=input_ids, attention_mask=attention_mask).logits


@pytest.mark.parametrize("batch_size", [2, 16])
def test_generation_and_target_scores_from_one_prompt_pass(model: torch.nn.Module, batch_size: int) -> None:
    # Prompts of different lengths (left-padded together), targets of 1 to 7 tokens, and a
    # prompt that must be cut to fit its target; the backdoor monitor's pattern.
    rng = np.random.default_rng(7)
    prompts = [rng.integers(0, 256, n).tolist() for n in (4, 11, 1, 30, 6)]
    targets = [rng.integers(0, 256, n).tolist() for n in (3, 1, 7, 5, 2)]
    live = LiveModel(model, pad_token_id=257, max_length=32, batch_size=batch_size)
    generated, scores = live.generate_and_score(prompts, 4, targets)
    batches = -(-len(prompts) // batch_size)
    assert live.forward_passes == batches * (4 + 1)  # the prompt pass, the targets' pass, 3 decoding passes
    cut = [p[-(32 - max(4, len(t))) :] for p, t in zip(prompts, targets)]
    assert [g.tolist() for g in generated] == [g.tolist() for g in live.greedy_generate(cut, 4)]
    whole = live.score_targets(cut, targets)
    for a, b in zip(scores.token_logprobs, whole.token_logprobs):
        np.testing.assert_allclose(a, b, atol=1e-4)
    assert scores.greedy_match.tolist() == whole.greedy_match.tolist()
    # A model without a key/value cache gets the same from separate generation and scoring.
    plain = LiveModel(_WithoutCache(model), pad_token_id=257, max_length=32, batch_size=batch_size)
    plain_generated, plain_scores = plain.generate_and_score(prompts, 4, targets)
    assert [g.tolist() for g in plain_generated] == [g.tolist() for g in generated]
    np.testing.assert_allclose(plain_scores.logprob_sum, scores.logprob_sum, atol=1e-4)
    assert model.training


@pytest.mark.parametrize("legacy", [True, False], ids=["tuple cache", "DynamicCache"])
def test_selected_cache_rows_are_copies_or_the_cache_itself_when_every_row_is_kept(legacy: bool) -> None:
    from transformers import DynamicCache

    from multirun.measure.live_model import _select_rows

    # A contiguous layer and a transposed view (GPT-2's keys are views of its qkv projection).
    layers = (
        (torch.randn(3, 2, 5, 4), torch.randn(3, 5, 2, 4).transpose(1, 2)),
        (torch.randn(3, 2, 5, 4).transpose(2, 3).contiguous(), torch.randn(3, 2, 5, 4)),
    )
    cache: Any = layers if legacy else DynamicCache.from_legacy_cache(layers)
    owner = [0, 0, 2, 1, 2]
    picked = _select_rows(cache, owner, torch.tensor(owner))
    assert isinstance(picked, tuple) == legacy
    for (key, value), (k, v) in zip(layers, picked):
        assert torch.equal(k, key.index_select(0, torch.tensor(owner)))
        assert torch.equal(v, value.index_select(0, torch.tensor(owner)))
        assert k.data_ptr() != key.data_ptr()
    every = _select_rows(cache, range(3), torch.arange(3))
    for (key, value), (k, v) in zip(layers, every):
        assert k is key and v is value  # shared: a pass on it concatenates, the old cache stays as it was


def test_evaluating_switches_the_model_once_and_restores_it(
    model: torch.nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    switches: list[bool] = []
    original = model.train

    def counting(mode: bool = True) -> torch.nn.Module:
        switches.append(mode)
        return original(mode)

    live = LiveModel(model, pad_token_id=257, max_length=32)
    model.train()
    monkeypatch.setattr(model, "train", counting)  # eval() is train(False)
    with live.evaluating():
        assert not model.training and not torch.is_grad_enabled()
        live.score_targets([[1, 2, 3]], [[4]])  # nested: no switch of its own
        with live.evaluating():
            assert not model.training
        assert not model.training
    assert switches == [False, True]  # eval() once, train() once
    assert model.training and torch.is_grad_enabled()
