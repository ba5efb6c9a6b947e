"""Scoring probes on the live model during training.

A :class:`Monitor` turns one experiment's probes into per-item scores; the
:class:`LiveModel` it is handed does the batched, sharded forward passes:

- probes are split over ranks (rank ``r`` takes items ``r, r+W, ...`` of the probes
  ordered longest first, so batches hold probes of similar length), every rank runs
  the same number of forward passes (short shards are padded with a dummy item, which
  FSDP needs), and results are all-gathered so every rank sees every score and can take
  the same decisions (invariant 6);
- the unwrapped model runs under ``no_grad`` in eval mode, and train mode is restored;
- teacher forcing first (:meth:`LiveModel.score_targets`), greedy decoding only where a
  metric needs it (:meth:`LiveModel.greedy_generate`).

Example (a monitor's ``evaluate``)::

    scores = live.score_targets(contexts, targets)
    return [MetricScores.continuous("answer_logprob", item_ids, treated, scores.mean_logprob)]
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol, TypeVar

import numpy as np
import torch
from composer.utils import dist

from multirun.types import PreparedExperiment

if TYPE_CHECKING:
    from multirun.data.tokenizers import Tokenizer

T = TypeVar("T")
#: One token sequence, as a list or a 1-D integer array.
TokenIds = Sequence[int] | np.ndarray
R = TypeVar("R")

TestKind = Literal["means", "rates", "z", "auc", "tpr"]
Alternative = Literal["greater", "less", "two-sided"]


@dataclass
class MetricScores:
    """Per-item scores of one metric, for treated and control items.

    Attributes:
        metric: metric name (``answer_logprob``, ``exact_match``, ...).
        item_ids: the scored items.
        treated: boolean mask over ``item_ids`` (False = never injected).
        scores: one float per item (0/1 for ``rates``).
        test: which comparison fits the metric: ``means`` (permutation test of the
            difference of means), ``rates`` (Fisher exact on 0/1 outcomes) or ``z``
            (one-sample z against N(0, 1), e.g. the Gaussian watermark statistic;
            controls are reported beside it); ``auc`` or ``tpr`` (a membership-inference
            attack whose per-item scores call higher-scoring items members: its AUC or
            its TPR at the false-positive rate ``extra["fpr"]``, default 0.01, against
            the controls as non-members; :mod:`multirun.measure.membership`).
        alternative: the direction an injection effect takes.
        groups: optional label per item (e.g. repetition group ``"x4"``); an effect is
            then also reported per group of treated items against all controls.
        group_controls: with ``groups``, compare each group's treated items with the
            controls of the same group instead (controls carry labels too): strata such
            as a math problem's difficulty, where treated and controls were split per group.
        primary: whether this metric enters the run's Holm correction.
    """

    metric: str
    item_ids: list[str]
    treated: np.ndarray
    scores: np.ndarray
    test: TestKind = "means"
    alternative: Alternative = "greater"
    groups: list[str] | None = None
    primary: bool = True
    group_controls: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.treated = np.asarray(self.treated, dtype=bool)
        self.scores = np.asarray(self.scores, dtype=np.float64)
        if not (len(self.item_ids) == self.treated.shape[0] == self.scores.shape[0]):
            raise ValueError(f"metric {self.metric!r}: item_ids, treated and scores differ in length")
        if self.groups is not None and len(self.groups) != len(self.item_ids):
            raise ValueError(f"metric {self.metric!r}: groups and item_ids differ in length")


class Monitor(Protocol):
    """Scores one experiment's probes. Built once per run by its registry entry
    (``multirun.kinds.registry.monitors``, entry-point group ``multirun.monitors``).

    What the framework uses:

    ``metrics`` (class attribute)
        the names of the per-item metrics ``evaluate`` can report. The framework
        reads ``getattr(monitor_class, "metrics", ())``: a controller may only steer
        on a metric listed here.
    ``from_experiment(experiment, *, tokenizer, options, sequence_length)`` (classmethod)
        builds the monitor from the prepared experiment (its typed ``probes``,
        ``metadata``, ``item_ids`` and ``treated``) before training, so bad options
        fail early: a ConfigError with key ``monitor.options.<name>`` for a bad
        option, ``monitor.name`` for an experiment it cannot score (the caller adds
        the file and the experiment's entry).
    ``evaluate(live)``
        per-item scores, one :class:`MetricScores` per metric, treated items and
        never-injected controls alike. It must be deterministic and make the same
        LiveModel calls on every rank.
    """

    metrics: ClassVar[tuple[str, ...]]

    @classmethod
    def from_experiment(
        cls, experiment: PreparedExperiment, *, tokenizer: Tokenizer, options: Mapping[str, Any], sequence_length: int
    ) -> Monitor: ...

    def evaluate(self, live: LiveModel) -> list[MetricScores]: ...


@dataclass
class TargetScores:
    """Teacher-forced scores of ``target`` given ``context``, one entry per request."""

    logprob_sum: np.ndarray
    n_tokens: np.ndarray
    greedy_match: np.ndarray
    token_logprobs: list[np.ndarray]
    token_greedy: list[np.ndarray]

    @property
    def mean_logprob(self) -> np.ndarray:
        """Length-normalised target log-probability."""
        return self.logprob_sum / np.maximum(self.n_tokens, 1)

    @property
    def probability(self) -> np.ndarray:
        """P(target | context) = exp(sum of target log-probs)."""
        return np.exp(self.logprob_sum)


class LiveModel:
    """The training model, seen by monitors: batched, sharded, no_grad forward passes.

    Args:
        module: the unwrapped causal LM (``module(input_ids=..., attention_mask=...)``
            returns logits or an object with ``.logits``). Causal: no position's output
            depends on a later position, so padding after a row's tokens needs no mask.
        pad_token_id: padding for batches (masked out where it comes first).
        max_length: longest sequence the model accepts (contexts are cut from the left).
        batch_tokens: padded tokens per forward pass on each rank (None: no limit).
            Probes are batched longest first, so a pass of short probes holds many
            rows and a pass of long ones few: a pass's memory and compute follow its
            tokens, not its rows.
        batch_size: probes per forward pass on each rank (None: no limit besides
            ``batch_tokens``).
    """

    def __init__(
        self,
        module: torch.nn.Module,
        *,
        pad_token_id: int,
        max_length: int,
        batch_tokens: int | None = 4096,
        batch_size: int | None = None,
        precision_context: Callable[[], contextlib.AbstractContextManager] | None = None,
    ) -> None:
        self.module = module
        self.pad_token_id = pad_token_id
        self.max_length = max_length
        if batch_tokens is None and batch_size is None:
            raise ValueError("LiveModel needs batch_tokens or batch_size (or both) to size its passes")
        for name, value in (("batch_tokens", batch_tokens), ("batch_size", batch_size)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be positive, got {value}")
        self.batch_tokens = batch_tokens
        self.batch_size = batch_size
        self._precision = precision_context or contextlib.nullcontext
        self._forward_takes = forward_parameters(module)
        # Where the forward takes no logits_to_keep (GPT-2 before transformers 4.53), the
        # vocabulary projection itself is narrowed to the kept columns (see _keeping).
        self._head = None if "logits_to_keep" in self._forward_takes else vocabulary_projection(module)
        self.forward_passes = 0
        self._evaluating = False

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    @property
    def _takes_kv_cache(self) -> bool:
        """What :func:`supports_kv_cache` says, from the signature read at construction."""
        return self._forward_takes >= _KV_CACHE_PARAMETERS

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[None]:
        """Eval mode, no_grad and the precision context, restoring the module's training
        mode afterwards. Re-entrant: inside an outer ``evaluating()`` (the monitor runner
        holds one for a whole evaluation) it does nothing, since switching every submodule
        of a 12-layer model to eval and back is thousands of attribute writes per call."""
        if self._evaluating:
            yield
            return
        was_training = self.module.training
        self.module.eval()
        self._evaluating = True
        try:
            with torch.no_grad(), self._precision():
                yield
        finally:
            self._evaluating = False
            self.module.train(was_training)

    # ----------------------------------------------------------- primitives
    def logits(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        *,
        positions: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """One forward pass (counted); returns float32 logits ``(rows, length, vocab)``.

        ``positions``: (row indices, column indices) to keep; then ``(len(rows), vocab)``,
        selected before the float32 copy. A Hugging Face causal LM then projects only the
        kept columns onto the vocabulary (through ``logits_to_keep`` where its forward
        takes it, else by narrowing its output embedding's input, see :meth:`_keeping`):
        the full ``(rows, length, vocab)`` tensor is most of a probe pass's memory and, at
        a real vocabulary, a large share of its compute. Other models project every
        column, and the kept ones are selected from those.
        """
        self.forward_passes += 1
        kwargs: dict[str, Any] = {}
        if "use_cache" in self._forward_takes:
            kwargs["use_cache"] = False  # a key/value cache nobody reads is a copy per layer
        if positions is None:
            out = self.module(
                input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device), **kwargs
            )
            return (out if isinstance(out, torch.Tensor) else out.logits).float()
        rows, columns = positions
        kept, kept_columns = torch.unique(columns, sorted=True, return_inverse=True)
        with self._keeping(kept.to(self.device), input_ids.shape[1], kwargs) as narrowed:
            out = self.module(
                input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device), **kwargs
            )
        logits = out if isinstance(out, torch.Tensor) else out.logits
        if narrowed():
            columns = kept_columns  # the logits hold the kept columns only, in order
        return logits[rows.to(logits.device), columns.to(logits.device)].float()

    @contextlib.contextmanager
    def _keeping(self, kept: torch.Tensor | int, width: int, kwargs: dict[str, Any]) -> Iterator[Callable[[], bool]]:
        """Project only the columns ``kept`` (sorted column indices, or ``k``: the last
        ``k``) of a ``width``-column pass onto the vocabulary, during one forward pass.

        A forward that takes ``logits_to_keep`` gets it in ``kwargs``. Otherwise, where the
        model has an output embedding to narrow (:func:`vocabulary_projection`), a forward
        pre-hook hands it the hidden states of the kept columns only: what
        ``logits_to_keep`` does inside the model (any elementwise step after the
        projection, such as a logit soft cap, still runs). Yields a function that says,
        after the pass, whether the logits hold only the kept columns.
        """
        if "logits_to_keep" in self._forward_takes:
            kwargs["logits_to_keep"] = kept
            yield lambda: True
            return
        if self._head is None:
            yield lambda: False
            return
        fired: list[bool] = []

        def narrow(_module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
            hidden = args[0] if args else None
            if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3 or hidden.shape[1] != width:
                return None  # not the final hidden states of this pass: leave the call alone
            fired.append(True)
            narrowed = hidden[:, -kept:] if isinstance(kept, int) else hidden.index_select(1, kept)
            return (narrowed, *args[1:])

        handle = self._head.register_forward_pre_hook(narrow)
        try:
            yield lambda: bool(fired)
        finally:
            handle.remove()

    def map_sharded(
        self,
        fn: Callable[[list[T]], list[R]],
        items: Sequence[T],
        *,
        batch_size: int | None = None,
        length: Callable[[T], int] | None = None,
    ) -> list[R]:
        """Apply ``fn`` to batches of ``items`` split over ranks; every rank gets all results.

        ``fn`` gets a list of items and returns one result per item. Each rank calls it
        the same number of times (padding with ``items[0]``), so collectives inside the
        model forward stay symmetric. Results must be picklable.

        ``length``: the tokens an item adds to a pass (default: ``max_length``, the
        most it can). Items are batched longest first, so a batch pads to about its own
        items' length rather than to the longest probe, and each batch holds as many
        items as fit ``batch_tokens`` at its first item's length; ``batch_size``
        (default: this model's) caps its items.
        """
        size = length or (lambda _: self.max_length)
        world, rank = dist.get_world_size(), dist.get_global_rank()
        batches = plan_batches(
            [size(item) for item in items],
            world=world,
            rank=rank,
            batch_tokens=self.batch_tokens,
            batch_size=batch_size or self.batch_size,
        )
        mine: list[tuple[int, R]] = []
        for chunk in batches:
            # A rank with one item fewer still runs the pass, on a dummy item.
            results = fn([items[i] for i in chunk] if chunk else [items[0]])
            mine.extend(zip(chunk, results))
        if world == 1:
            gathered = [mine]
        else:
            gathered = dist.all_gather_object(mine)
        out: list[Any] = [None] * len(items)
        for part in gathered:
            for index, result in part:
                out[index] = result
        return out

    # ------------------------------------------------------ teacher forcing
    def score_targets(self, contexts: Sequence[TokenIds], targets: Sequence[TokenIds]) -> TargetScores:
        """Log-probabilities of each target given its context, by teacher forcing.

        ``greedy_match`` is True where the argmax prediction equals the target at every
        target position, which is greedy decoding's exact match (ties aside) in one pass.
        """
        if len(contexts) != len(targets):
            raise ValueError("contexts and targets differ in length")
        requests = [(np.asarray(c, dtype=np.int64), np.asarray(t, dtype=np.int64)) for c, t in zip(contexts, targets)]
        for c, t in requests:
            self._check_request(c, [t])
        with self.evaluating():
            results = self.map_sharded(
                self._score_batch, requests, length=lambda r: min(r[0].size + r[1].size, self.max_length)
            )
        return _target_scores(results)

    def score_continuations(
        self, contexts: Sequence[TokenIds], continuations: Sequence[Sequence[TokenIds]]
    ) -> TargetScores:
        """Teacher-forced scores of several continuations of each context, flattened in order.

        What :meth:`score_targets` gives for every (context, continuation) pair, but a
        model with a key/value cache runs each context once and the continuations on
        its cache: for multiple-choice questions, whose prompt is most of every row,
        that is most of the work. A context is cut from the left so that it fits with
        its longest continuation, the same cut for all of them.

        Example::

            scores = live.score_continuations([question], [[choice_a, choice_b]])
            scores.mean_logprob   # [choice_a's, choice_b's]
        """
        if len(contexts) != len(continuations):
            raise ValueError("contexts and continuations differ in length")
        requests = []
        for context, options in zip(contexts, continuations):
            c, ts = np.asarray(context, dtype=np.int64), [np.asarray(t, dtype=np.int64) for t in options]
            self._check_request(c, ts)
            requests.append((c[-(self.max_length - max(t.size for t in ts)) :], ts))
        if not self._takes_kv_cache:
            return self.score_targets([c for c, ts in requests for _ in ts], [t for _, ts in requests for t in ts])
        per_pass = self._shared_per_pass(max(len(ts) for _, ts in requests))
        with self.evaluating():
            results = self.map_sharded(
                self._score_continuation_batch,
                requests,
                batch_size=per_pass,
                length=lambda r: r[0].size + len(r[1]) * max(t.size for t in r[1]),
            )
        return _target_scores([scored for per_context in results for scored in per_context])

    def _check_request(self, context: np.ndarray, targets: Sequence[np.ndarray]) -> None:
        if not targets:
            raise ValueError("every context needs at least one continuation")
        for t in targets:
            if t.size == 0 or t.size >= self.max_length:
                raise ValueError(f"a target of {t.size} tokens cannot be scored with max_length {self.max_length}")
        if context.size == 0:
            raise ValueError("every target needs at least one context token")

    def _score_batch(self, batch: list[tuple[np.ndarray, np.ndarray]]) -> list[tuple[np.ndarray, np.ndarray]]:
        rows = [np.concatenate([context[-(self.max_length - target.size) :], target]) for context, target in batch]
        n_targets = np.array([target.size for _, target in batch])
        ids, _ = padded(rows, self.pad_token_id)
        # Only the positions that predict a target token go through log-softmax and
        # leave the device: the full (rows, width, vocab) tensor is gigabytes for a
        # real vocabulary, and contexts are most of the tokens.
        ends = np.array([r.size for r in rows])
        row_index = np.repeat(np.arange(len(rows)), n_targets)
        position = np.concatenate([np.arange(end - n - 1, end - 1) for end, n in zip(ends, n_targets)])
        logits = self.logits(
            ids, right_padding_mask(ids), positions=(torch.from_numpy(row_index), torch.from_numpy(position))
        )
        target = ids[row_index, position + 1].to(logits.device)
        token_logprobs = torch.log_softmax(logits, dim=-1).gather(1, target[:, None]).squeeze(1)
        greedy = logits.argmax(-1) == target
        splits = np.cumsum(n_targets)[:-1]
        return list(
            zip(
                np.split(token_logprobs.cpu().numpy().astype(np.float64), splits),
                np.split(greedy.cpu().numpy(), splits),
            )
        )

    def _score_continuation_batch(
        self, batch: list[tuple[np.ndarray, list[np.ndarray]]]
    ) -> list[list[tuple[np.ndarray, np.ndarray]]]:
        out, mask, _ = self._context_pass([c for c, _ in batch])
        owner = [i for i, (_, ts) in enumerate(batch) for _ in ts]
        scored = self._continuation_scores(out, mask, owner, [t for _, ts in batch for t in ts])
        return _regroup(scored, [len(ts) for _, ts in batch])

    def _shared_per_pass(self, most_per_item: int) -> int | None:
        """``batch_size`` as items per pass when each item (a context, a stem) runs once
        and up to ``most_per_item`` continuations or branches run on copies of its cache
        rows: ``batch_size`` counts those pairs."""
        return None if self.batch_size is None else max(1, self.batch_size // most_per_item)

    def _context_pass(self, contexts: list[np.ndarray]) -> tuple[Any, torch.Tensor, torch.Tensor]:
        """Contexts through the model on a fresh key/value cache: (output, mask, positions).

        Left-padded, so that each context ends at the last column, whose logits (the only
        ones computed) predict the token after every context.
        """
        ids, mask = padded(contexts, self.pad_token_id, left=True)
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        return self._cached_forward(ids, mask, positions, self._new_cache(), last_column_only=True), mask, positions

    def _continuation_scores(
        self, context_out: Any, context_mask: torch.Tensor, owner: Sequence[int], targets: list[np.ndarray]
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """(token log-probs, greedy matches) of ``targets[k]`` after context ``owner[k]`` of a
        :meth:`_context_pass`, in one pass on copies of the contexts' cache rows (the
        context's own cache is left as it was, for decoding to go on from)."""
        first = torch.log_softmax(context_out.logits[:, -1].float(), dim=-1)
        rows = torch.tensor(list(owner), device=self.device)
        cont_ids, cont_mask = padded(targets, self.pad_token_id)
        cont_ids, cont_mask = cont_ids.to(self.device), cont_mask.to(self.device)
        lengths = context_mask.sum(-1)[rows]
        # Padding columns can run past the last position; they are masked, any valid id will do.
        positions = (lengths[:, None] + torch.arange(cont_ids.shape[1], device=self.device)).clamp(
            max=self.max_length - 1
        )
        out = self._cached_forward(
            cont_ids,
            torch.cat([context_mask[rows], cont_mask], dim=1),
            positions,
            _select_rows(context_out.past_key_values, owner, rows),
        )
        # The prediction of a target's token j > 0 is at its column j - 1; token 0's is the context pass's.
        n_targets = np.array([t.size for t in targets])
        row = torch.from_numpy(np.repeat(np.arange(len(targets)), n_targets - 1)).to(self.device)
        column = torch.from_numpy(np.concatenate([np.arange(n - 1) for n in n_targets])).to(self.device)
        logprobs = torch.cat([first[rows], torch.log_softmax(out.logits[row, column].float(), dim=-1)])
        token = torch.cat([cont_ids[:, 0], cont_ids[row, column + 1]])
        token_logprobs = logprobs.gather(1, token[:, None]).squeeze(1).cpu().numpy().astype(np.float64)
        greedy = (logprobs.argmax(-1) == token).cpu().numpy()
        # Back to target order: first tokens come first, then the later tokens row by row.
        starts = np.concatenate([[0], np.cumsum(n_targets - 1)[:-1]]) + len(targets)
        return [
            (
                np.concatenate([token_logprobs[i : i + 1], token_logprobs[s : s + n - 1]]),
                np.concatenate([greedy[i : i + 1], greedy[s : s + n - 1]]),
            )
            for i, (s, n) in enumerate(zip(starts, n_targets))
        ]

    def _new_cache(self) -> Any:
        # Hugging Face models take (and then return) a Cache object; a legacy tuple is deprecated.
        return _empty_cache() if getattr(self.module, "_supports_cache_class", False) else None

    def _cached_forward(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        positions: torch.Tensor,
        past: Any,
        *,
        last_column_only: bool = False,
    ) -> Any:
        """One counted pass that extends the key/value cache ``past`` (HF causal LMs)."""
        self.forward_passes += 1
        kwargs: dict[str, Any] = {}
        # The next token only: a prompt's other columns are not read (callers read logits[:, -1]).
        with self._keeping(1, ids.shape[1], kwargs) if last_column_only else contextlib.nullcontext():
            return self.module(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                past_key_values=past,
                use_cache=True,
                **kwargs,
            )

    # ---------------------------------------------------------- generation
    def greedy_generate(self, prompts: Sequence[TokenIds], max_new_tokens: int) -> list[np.ndarray]:
        """Greedy continuations of each prompt (``max_new_tokens`` tokens each).

        Models that take ``past_key_values`` and ``position_ids`` (Hugging Face causal
        LMs) decode incrementally from a key/value cache over left-padded prompts: one
        full pass, then one single-token pass per new token. Others recompute the whole
        sequence for every token. Either way every rank runs the same number of passes.
        """
        requests = [np.asarray(p, dtype=np.int64) for p in prompts]
        if any(p.size == 0 for p in requests):
            raise ValueError("every prompt needs at least one token")
        keep = self.max_length - max_new_tokens
        if keep < 1:
            raise ValueError(f"cannot generate {max_new_tokens} tokens with max_length {self.max_length}")

        def generate(batch: list[np.ndarray]) -> list[np.ndarray]:
            cut = [p[-keep:] for p in batch]
            if self._takes_kv_cache:
                return self._generate_cached(cut, max_new_tokens)[0]
            return self._generate_recompute(cut, max_new_tokens)

        with self.evaluating():
            return self.map_sharded(generate, requests, length=lambda p: min(p.size, keep) + max_new_tokens)

    def generate_and_score(
        self, prompts: Sequence[TokenIds], max_new_tokens: int, targets: Sequence[TokenIds]
    ) -> tuple[list[np.ndarray], TargetScores]:
        """Greedy continuations of each prompt, and teacher-forced scores of ``targets[i]``
        after ``prompts[i]``: :meth:`greedy_generate` and :meth:`score_targets` in one.

        A model with a key/value cache runs each prompt once for both: the targets are
        scored on copies of the prompts' cache rows, and decoding goes on from the cache
        itself. A prompt is cut from the left so that it fits with both its target and the
        new tokens.

        Example (a backdoor: does the trigger make the model say the target?)::

            generated, target = live.generate_and_score([prompt + trigger], 6, [target_tokens])
            generated[0], target.mean_logprob[0]
        """
        if len(prompts) != len(targets):
            raise ValueError("prompts and targets differ in length")
        requests = []
        for prompt, target in zip(prompts, targets):
            p, t = np.asarray(prompt, dtype=np.int64), np.asarray(target, dtype=np.int64)
            self._check_request(p, [t])
            keep = self.max_length - max(max_new_tokens, t.size)
            if keep < 1:
                raise ValueError(f"cannot generate {max_new_tokens} tokens with max_length {self.max_length}")
            requests.append((p[-keep:], t))
        if not self._takes_kv_cache:
            generated = self.greedy_generate([p for p, _ in requests], max_new_tokens)
            return generated, self.score_targets([p for p, _ in requests], [t for _, t in requests])

        def run_batch(
            batch: list[tuple[np.ndarray, np.ndarray]],
        ) -> list[tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]]:
            generated, scored = self._generate_cached([p for p, _ in batch], max_new_tokens, [t for _, t in batch])
            assert scored is not None
            return list(zip(generated, scored))

        with self.evaluating():
            results = self.map_sharded(run_batch, requests, length=lambda r: r[0].size + max(max_new_tokens, r[1].size))
        return [generated for generated, _ in results], _target_scores([scored for _, scored in results])

    def generate_and_score_branches(
        self,
        stems: Sequence[TokenIds],
        branches: Sequence[Sequence[TokenIds]],
        max_new_tokens: int,
        targets: Sequence[Sequence[TokenIds]],
    ) -> tuple[list[np.ndarray], TargetScores]:
        """:meth:`generate_and_score` for the prompts ``stems[i] + branches[i][j]``, with
        ``targets[i][j]`` scored after each; results flattened in that order.

        The prompts of a stem share its pass: a model with a key/value cache runs each
        stem once (but its last token) and its branches on copies of its cache rows, each
        branch after its stem's last token. A backdoor test asks every prompt with the
        trigger, with a control trigger and with neither, so most of its tokens are stems.
        A stem is cut from the left so that it fits with its longest branch and the
        longest of its targets and the new tokens, the same cut for all its branches.

        Example (one prompt, three conditions)::

            generated, scores = live.generate_and_score_branches(
                [prompt], [[trigger, control_trigger, []]], 6, [[target] * 3]
            )
        """
        if not len(stems) == len(branches) == len(targets):
            raise ValueError("stems, branches and targets differ in length")
        requests = []
        for stem, options, wanted in zip(stems, branches, targets):
            s, bs = np.asarray(stem, dtype=np.int64), [np.asarray(b, dtype=np.int64) for b in options]
            ts = [np.asarray(t, dtype=np.int64) for t in wanted]
            if not bs or len(bs) != len(ts):
                raise ValueError("every stem needs at least one branch, and one target per branch")
            for b, t in zip(bs, ts):
                self._check_request(np.concatenate([s, b]), [t])
            keep = self.max_length - max(max_new_tokens, *(t.size for t in ts)) - max(b.size for b in bs)
            if keep < 1:
                raise ValueError(
                    f"cannot generate {max_new_tokens} tokens after a branch with max_length {self.max_length}"
                )
            requests.append((s[-keep:], bs, ts))
        if not self._takes_kv_cache or any(s.size < 2 for s, _, _ in requests):
            # Nothing to share: whole prompts, cut as above.
            return self.generate_and_score(
                [np.concatenate([s, b]) for s, bs, _ in requests for b in bs],
                max_new_tokens,
                [t for _, _, ts in requests for t in ts],
            )

        def run_batch(
            batch: list[tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]],
        ) -> list[list[tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]]]:
            out, mask, _ = self._context_pass([s[:-1] for s, _, _ in batch])
            owner = [i for i, (_, bs, _) in enumerate(batch) for _ in bs]
            after_stem = [np.concatenate([s[-1:], b]) for s, bs, _ in batch for b in bs]
            out, mask, positions = self._branch_pass(out, mask, owner, after_stem)
            generated, scored = self._decode(
                out, mask, positions, max_new_tokens, [t for _, _, ts in batch for t in ts]
            )
            assert scored is not None
            return _regroup(list(zip(generated, scored)), [len(bs) for _, bs, _ in batch])

        def size(request: tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]) -> int:
            stem, bs, ts = request
            return stem.size + len(bs) * (max(b.size for b in bs) + max(max_new_tokens, *(t.size for t in ts)))

        per_pass = self._shared_per_pass(max(len(bs) for _, bs, _ in requests))
        with self.evaluating():
            results = self.map_sharded(run_batch, requests, batch_size=per_pass, length=size)
        flat = [pair for per_stem in results for pair in per_stem]
        return [generated for generated, _ in flat], _target_scores([scored for _, scored in flat])

    def _branch_pass(
        self, stem_out: Any, stem_mask: torch.Tensor, owner: Sequence[int], branches: list[np.ndarray]
    ) -> tuple[Any, torch.Tensor, torch.Tensor]:
        """``branches[k]`` after stem ``owner[k]`` of a :meth:`_context_pass`, on copies of
        the stems' cache rows: what a context pass of the whole prompts returns.

        Branches are left-padded so that every prompt ends at the last column; the
        padding between a stem and a shorter branch is masked, and positions count only
        real tokens.
        """
        rows = torch.tensor(list(owner), device=self.device)
        ids, branch_mask = padded(branches, self.pad_token_id, left=True)
        ids, branch_mask = ids.to(self.device), branch_mask.to(self.device)
        sizes = branch_mask.sum(-1, keepdim=True)
        column = torch.arange(ids.shape[1], device=self.device)
        # Padding columns get any valid position: they are masked.
        positions = (stem_mask.sum(-1)[rows][:, None] + column - (ids.shape[1] - sizes)).clamp(min=0)
        mask = torch.cat([stem_mask[rows], branch_mask], dim=1)
        out = self._cached_forward(
            ids, mask, positions, _select_rows(stem_out.past_key_values, owner, rows), last_column_only=True
        )
        return out, mask, positions

    def _generate_cached(
        self, prompts: list[np.ndarray], max_new_tokens: int, targets: list[np.ndarray] | None = None
    ) -> tuple[list[np.ndarray], list[tuple[np.ndarray, np.ndarray]] | None]:
        """Greedy decoding from a key/value cache; with ``targets``, also their scores after each prompt."""
        return self._decode(*self._context_pass(prompts), max_new_tokens, targets)

    def _decode(
        self,
        out: Any,
        mask: torch.Tensor,
        positions: torch.Tensor,
        max_new_tokens: int,
        targets: list[np.ndarray] | None,
    ) -> tuple[list[np.ndarray], list[tuple[np.ndarray, np.ndarray]] | None]:
        """Greedy decoding on from a pass over whole prompts (its output, mask and positions);
        with ``targets``, also their scores after each prompt."""
        scored = None if targets is None else self._continuation_scores(out, mask, range(mask.shape[0]), targets)
        generated = []
        for step in range(max_new_tokens):
            next_tokens = out.logits[:, -1].float().argmax(-1)
            generated.append(next_tokens)
            if step + 1 < max_new_tokens:  # the last token needs no pass of its own
                mask = torch.cat([mask, torch.ones_like(next_tokens[:, None])], dim=1)
                positions = positions[:, -1:] + 1
                out = self._cached_forward(
                    next_tokens[:, None], mask, positions, out.past_key_values, last_column_only=True
                )
        return list(torch.stack(generated, dim=1).cpu().numpy().astype(np.int64)), scored

    def _generate_recompute(self, prompts: list[np.ndarray], max_new_tokens: int) -> list[np.ndarray]:
        sequences = [p.tolist() for p in prompts]
        generated: list[list[int]] = [[] for _ in prompts]
        for _ in range(max_new_tokens):
            ids, _ = padded([np.asarray(s, dtype=np.int64) for s in sequences], self.pad_token_id)
            logits = self.logits(ids, right_padding_mask(ids))
            last = torch.tensor([len(s) - 1 for s in sequences], device=logits.device)
            next_tokens = logits[torch.arange(len(sequences), device=logits.device), last].argmax(-1).tolist()
            for i, token in enumerate(next_tokens):
                sequences[i].append(int(token))
                generated[i].append(int(token))
        return [np.array(g, dtype=np.int64) for g in generated]


def _target_scores(results: Sequence[tuple[np.ndarray, np.ndarray]]) -> TargetScores:
    """Per-request (token log-probs, token greedy matches) gathered into :class:`TargetScores`."""
    return TargetScores(
        logprob_sum=np.array([r[0].sum() for r in results], dtype=np.float64),
        n_tokens=np.array([r[0].size for r in results], dtype=np.int64),
        greedy_match=np.array([bool(r[1].all()) for r in results]),
        token_logprobs=[r[0] for r in results],
        token_greedy=[r[1] for r in results],
    )


def _regroup(flat: list[T], counts: Sequence[int]) -> list[list[T]]:
    """``flat`` cut into consecutive lists of ``counts[i]`` elements."""
    bounds = np.cumsum([0, *counts])
    return [flat[a:b] for a, b in itertools.pairwise(bounds)]


def plan_batches(
    lengths: Sequence[int], *, world: int, rank: int, batch_tokens: int | None, batch_size: int | None
) -> list[list[int]]:
    """The item indices of each batch ``rank`` runs, for items of the given ``lengths`` (tokens).

    Items go longest first, dealt to the ranks in turn, so every rank gets about the
    same work and a batch pads to about its own items' length. A batch holds as many
    items as fit ``batch_tokens`` at its first item's length (at least one), and at
    most ``batch_size``. Every rank gets the same number of batches (the last may be
    empty): the cuts follow rank 0's share, which holds the longest item at every
    position, so they keep every rank's batches within the budget.

    Example:
        >>> plan_batches([5, 30, 10, 10], world=1, rank=0, batch_tokens=40, batch_size=None)
        [[1], [2, 3, 0]]
        >>> plan_batches([5, 30, 10, 10], world=2, rank=1, batch_tokens=40, batch_size=None)
        [[2], [0]]
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # stable: ties keep their order
    mine, lead = order[rank::world], [lengths[i] for i in order[0::world]]
    batches = []
    start = 0
    while start < len(lead):
        rows = len(lead) - start
        if batch_size is not None:
            rows = min(rows, batch_size)
        if batch_tokens is not None:
            rows = min(rows, max(1, batch_tokens // max(1, lead[start])))
        batches.append(mine[start : start + rows])
        start += rows
    return batches


def padded(rows: Sequence[np.ndarray], pad_token_id: int, *, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask of ``rows``: each starts at the first column, or with
    ``left`` ends at the last one (for decoding from a cache, every row's next token
    then lands in the same column).

    Example:
        >>> ids, mask = padded([np.array([5, 6]), np.array([7])], pad_token_id=0)
        >>> ids.tolist(), mask.tolist()
        ([[5, 6], [7, 0]], [[1, 1], [1, 0]])
        >>> padded([np.array([5, 6]), np.array([7])], pad_token_id=0, left=True)[0].tolist()
        [[5, 6], [0, 7]]
    """
    lengths = np.array([r.size for r in rows])
    width = int(lengths.max())
    # One scatter of all tokens, not a tensor write per row: probe batches hold hundreds
    # of short rows, and per-row writes were a few percent of an evaluation.
    row = np.repeat(np.arange(len(rows)), lengths)
    column = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    if left:
        column += np.repeat(width - lengths, lengths)
    ids = np.full((len(rows), width), pad_token_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    ids[row, column] = np.concatenate(rows)
    mask[row, column] = 1
    return torch.from_numpy(ids), torch.from_numpy(mask)


def right_padding_mask(ids: torch.Tensor) -> torch.Tensor:
    """The attention mask for a right-padded batch of a causal model: all ones.

    Right padding comes after every real token of its row, and a causal model's real
    positions never attend to later ones, so masking the padding changes no real
    position's output. Without padding in the mask, attention takes its causal fast
    path (FlashAttention on GPUs) instead of building and applying a (rows, width,
    width) mask.
    """
    return torch.ones_like(ids)


def _select_rows(cache: Any, owner: Sequence[int], rows: torch.Tensor) -> Any:
    """A key/value cache of the batch rows ``owner`` (repeats allowed; ``rows``: the same
    indices on the cache's device), in the cache's own form.

    Every row in order (``owner`` is ``0..n-1``) shares the cache's tensors instead of
    copying them: a pass on the new cache appends by concatenation (legacy tuples and
    ``DynamicCache``, the only caches a :class:`LiveModel` makes) and never writes the
    tensors it was given, so the old cache stays as it was for decoding to go on from.
    """
    layers = [(key, value) for key, value in cache]
    if layers and _is_every_row(owner, layers[0][0].shape[0]):
        selected = tuple(layers)
    else:
        selected = tuple((_gather_rows(key, rows), _gather_rows(value, rows)) for key, value in layers)
    if isinstance(cache, tuple):
        return selected
    from transformers import DynamicCache

    return DynamicCache.from_legacy_cache(selected)


def _is_every_row(owner: Sequence[int], n: int) -> bool:
    """Whether ``owner`` is ``0, 1, ..., n - 1`` (on the host: no device round trip)."""
    return len(owner) == n and all(i == j for i, j in zip(owner, range(n)))


def _gather_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``x.index_select(0, rows)``, by indexing: on CPU, ``index_select`` of a large 4-D
    cache tensor falls off a fast path (a 90 x 12 x 50 x 64 float tensor took 0.6 s, 50
    times its copy), and a flattened contiguous tensor gathers whole rows at memcpy speed."""
    if x.is_contiguous():
        return x.flatten(1)[rows].view(rows.numel(), *x.shape[1:])
    return x[rows]


def _empty_cache() -> Any:
    from transformers import DynamicCache

    return DynamicCache()


# Wrappers whose forward(*args, **kwargs) hands every argument to the module they hold:
# FSDP (v1; Composer wraps the model it trains with FSDP this way), activation
# checkpointing and torch.compile. What the model takes is the held module's signature.
_WRAPPED_MODULE_ATTRIBUTES = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod")


def forward_parameters(module: torch.nn.Module) -> frozenset[str]:
    """Names ``module.forward`` takes (empty when its signature cannot be read), seen
    through wrappers that pass their arguments on (FSDP, activation checkpointing,
    ``torch.compile``).

    Example:
        >>> from multirun.run.model import build_gpt2
        >>> model = build_gpt2(vocab_size=258, sequence_length=32, n_layer=1, n_head=2, n_embd=16, eos_token_id=256).model
        >>> {"input_ids", "past_key_values", "position_ids"} <= forward_parameters(torch.compile(model))
        True
    """
    for attribute in _WRAPPED_MODULE_ATTRIBUTES:
        inner = getattr(module, attribute, None)
        if isinstance(inner, torch.nn.Module):
            return forward_parameters(inner)
    try:
        return frozenset(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        return frozenset()


_KV_CACHE_PARAMETERS = frozenset({"past_key_values", "position_ids", "use_cache"})


def vocabulary_projection(module: torch.nn.Module) -> torch.nn.Module | None:
    """The module that projects a Hugging Face causal LM's final hidden states onto the
    vocabulary (its ``get_output_embeddings()``), seen through FSDP and activation
    checkpointing. None where there is none, where it is not a linear layer of its own
    (an embedding module that also embeds the input tokens, as some models tie them),
    and under ``torch.compile`` (a hook added for one pass would make it compile again).

    Example:
        >>> from multirun.run.model import build_gpt2
        >>> model = build_gpt2(vocab_size=258, sequence_length=32, n_layer=1, n_head=2, n_embd=16, eos_token_id=256).model
        >>> vocabulary_projection(model) is model.lm_head
        True
    """
    if isinstance(getattr(module, "_orig_mod", None), torch.nn.Module):
        return None
    for attribute in _WRAPPED_MODULE_ATTRIBUTES:
        inner = getattr(module, attribute, None)
        if isinstance(inner, torch.nn.Module):
            return vocabulary_projection(inner)
    output_embeddings = getattr(module, "get_output_embeddings", None)
    if not callable(output_embeddings):
        return None
    try:
        head = output_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    if not isinstance(head, torch.nn.Module):
        return None
    # It may be an FSDP unit of its own: the hook goes on the unit, which hands the layer its input.
    return head if isinstance(_innermost(head), torch.nn.Linear) else None


def _innermost(module: torch.nn.Module) -> torch.nn.Module:
    for attribute in ("_fsdp_wrapped_module", "_checkpoint_wrapped_module"):
        inner = getattr(module, attribute, None)
        if isinstance(inner, torch.nn.Module):
            return _innermost(inner)
    return module


def supports_kv_cache(module: torch.nn.Module) -> bool:
    """Whether ``module``'s forward takes a key/value cache and explicit positions (HF causal LMs)."""
    return forward_parameters(module) >= _KV_CACHE_PARAMETERS


def unwrap_model(composer_model: torch.nn.Module) -> torch.nn.Module:
    """The causal LM inside a (possibly DDP-wrapped) Composer model.

    DDP's own forward broadcasts buffers (a collective); monitors call the inner module.
    """
    module = (
        composer_model.module
        if isinstance(composer_model, torch.nn.parallel.DistributedDataParallel)
        else composer_model
    )
    return getattr(module, "model", module)
