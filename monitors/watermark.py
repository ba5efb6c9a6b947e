"""Monitor of the ``watermark`` kind: is the secret mark detectable in the live model?

The method comes from the experiment's ``metadata["method"]`` (set by the injector).

``gaussian``: per carrier, the gradient-alignment statistic of docs/references.md §2.2::

    x = -<grad_e loss(e), w> / (sigma * ||grad_e loss(e)||)

at the **clean** input embeddings ``e`` of the carrier (the exact EOS-wrapped tokens
that were injected), ``loss`` = cross-entropy averaged over the carrier's predicted
tokens, gradient and noise ``w = item_noise(spec, item, length, d_model)`` flattened
over ``length x d_model``. Under H0 (the model never trained on ``w``) ``x ~ N(0, 1)``
exactly, because ``w`` is independent of the model and ``<g, w> ~ N(0, sigma^2 ||g||^2)``.

*Sign.* Training on ``e + w`` lowers the loss at ``e + w``, so after training the
gradient at ``e`` points against ``w`` and the raw alignment ``<g, w>`` is
**negative** (first order: the update ``-lr * d2L/dtheta de * w`` changes ``<g, w>`` by
``-lr * |d2L/dtheta de * w|^2 <= 0``; confirmed by this package's direction test).
The reported statistic is negated so that "trained" is positive and the test is
one-sided ``greater``; the paper's N(0.14..0.45, 1) fits have the same orientation.

Metrics: ``watermark_z`` (primary, ``test="z"``: treated mean against the exact
N(0, 1) null; controls, scored with fresh noise of the same generator, are reported
beside it) and ``carrier_logprob`` (secondary, ``means``: mean per-token log-prob of
the carrier, from the same forward pass).

``random_tokens``: every key is scored by teacher forcing after one EOS token. Its
log-perplexity is ``-mean log p(key token)``; the Secret Sharer exposure
(docs/references.md §2.5) is ``log2 |R| - log2 rank`` with the never-injected control keys
as references (rank 1 = lowest perplexity, ties count 1/2), defined exactly as the
``memorization`` kind's exposure so that the two read the same:

- a control is ranked leave-one-out: itself among the other ``n_c - 1`` controls;
- a treated key is ranked among ``n_c - 1`` controls too, averaged over the ``n_c``
  ways of leaving one control out.

Both arms thus have ``|R| = n_c`` candidates and the same expected exposure when
nothing was learned; the maximum is ``log2 n_c``. Metrics: ``exposure`` (primary,
``means``, greater) and ``key_logprob`` (secondary, ``means``, greater).

Neither method takes monitor options.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from multirun.errors import ConfigError
from multirun.inject.noise import item_noise
from multirun.kinds.probes import WatermarkProbes
from multirun.measure.live_model import LiveModel, MetricScores, forward_parameters, padded, right_padding_mask
from multirun.measure.stats import exposures
from multirun.types import EmbeddingNoise, PreparedExperiment

if TYPE_CHECKING:
    from multirun.data.tokenizers import Tokenizer

__all__ = ["GaussianScore", "WatermarkMonitor", "exposures", "gaussian_statistics"]


@dataclass(frozen=True)
class GaussianScore:
    """One carrier's ``watermark_z`` statistic (sign-corrected: positive = trained on
    its noise) and its mean per-token log-prob."""

    statistic: float
    mean_logprob: float


def gaussian_statistics(
    module: torch.nn.Module,
    sequences: list[np.ndarray],
    items: list[int],
    spec: EmbeddingNoise,
    *,
    pad_token_id: int,
) -> list[GaussianScore]:
    """The sign-corrected statistic and mean log-prob of each sequence, in one batched pass.

    ``items[i]`` is the item index whose noise ``sequences[i]`` carried. Rows are
    right-padded; causal attention and per-row losses keep them independent, so the
    gradient of the summed per-row losses w.r.t. row ``i``'s embeddings is exactly the
    gradient of row ``i``'s own loss. The clean embeddings are taken from the model's
    own input-embedding module (a forward hook makes its output the differentiation
    leaf), so the forward pass is the model's ordinary one; only that tensor gets a
    gradient, parameters' ``.grad`` are left untouched. Call it in eval mode.
    """
    ids, mask = padded(sequences, pad_token_id)
    device = next(module.parameters()).device
    ids, mask = ids.to(device), mask.to(device)

    captured: list[torch.Tensor] = []

    def capture(_module: torch.nn.Module, _inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        leaf = output.detach().requires_grad_(True)
        captured.append(leaf)
        return leaf

    model: Any = module  # a Hugging Face model: its input embeddings come from a method
    handle = model.get_input_embeddings().register_forward_hook(capture)
    try:
        with torch.enable_grad():
            # No key/value cache: under grad it would hold every layer's keys and values for nothing.
            kwargs = {"use_cache": False} if "use_cache" in forward_parameters(module) else {}
            out = module(input_ids=ids, attention_mask=right_padding_mask(ids), **kwargs)
            logits = (out if isinstance(out, torch.Tensor) else out.logits).float()
            logprobs = torch.log_softmax(logits[:, :-1], dim=-1)
            token_lp = logprobs.gather(2, ids[:, 1:, None]).squeeze(-1) * mask[:, 1:]
            n_predicted = (mask.sum(1) - 1).clamp(min=1)
            row_loss = -token_lp.sum(1) / n_predicted  # mean CE over each carrier
            (grad,) = torch.autograd.grad(row_loss.sum(), captured[0])
    finally:
        handle.remove()

    grad = grad.detach().double().cpu()
    # One copy to the host, not one per carrier (each a device synchronisation).
    row_losses = row_loss.detach().cpu()
    scores = []
    for r, (seq, item) in enumerate(zip(sequences, items)):
        g = grad[r, : seq.size]
        w = item_noise(spec, item, seq.size, g.shape[-1]).double()
        norm = float(g.norm())
        raw = float((g * w).sum()) / (spec.sigma * norm) if norm > 0 else 0.0
        scores.append(GaussianScore(statistic=-raw, mean_logprob=-float(row_losses[r])))
    return scores


class WatermarkMonitor:
    """Scores watermark probes (:class:`~multirun.kinds.probes.WatermarkProbes`, both
    methods; see the module docstring).

    Example (inside the framework)::

        monitor = WatermarkMonitor.from_experiment(exp, tokenizer=tok, options={}, sequence_length=128)
        [z, logprob] = monitor.evaluate(live)
    """

    #: Per-item metrics it reports (controllers validate their metric against these).
    metrics = ("watermark_z", "carrier_logprob", "exposure", "key_logprob")

    def __init__(self, experiment: PreparedExperiment, method: str, probes: WatermarkProbes) -> None:
        self.experiment = experiment
        self.method = method
        self.probes = probes
        self.item_ids = list(experiment.item_ids)
        self.treated = np.asarray(experiment.treated, dtype=bool)

    @classmethod
    def from_experiment(
        cls,
        experiment: PreparedExperiment,
        *,
        tokenizer: Tokenizer,
        options: Mapping[str, Any],
        sequence_length: int,
    ) -> WatermarkMonitor:
        """Build the monitor; the watermark monitor takes no options.

        Raises:
            ConfigError: an option is given (key ``monitor.options.NAME``), or the
                experiment was not prepared by the watermark injector.
        """
        for name in options:
            raise ConfigError("the watermark monitor takes no options", key=f"monitor.options.{name}")
        method = experiment.metadata.get("method")
        probes = experiment.probes
        if not isinstance(probes, WatermarkProbes):
            raise ConfigError(
                f"experiment {experiment.name!r} (kind {experiment.kind!r}) was not prepared by the watermark injector",
                key="monitor.name",
            )
        if method == "gaussian":
            if experiment.embedding_noise is None or probes.sequences is None:
                raise ConfigError(
                    f"experiment {experiment.name!r} has no embedding noise or carrier probes to test",
                    key="monitor.name",
                )
        elif method == "random_tokens":
            if probes.keys is None:
                raise ConfigError(f"experiment {experiment.name!r} has no key probes to score", key="monitor.name")
        else:
            raise ConfigError(
                f"experiment {experiment.name!r} (kind {experiment.kind!r}) has no watermark method in its metadata; "
                "the watermark monitor needs an experiment prepared by the watermark injector",
                key="monitor.name",
            )
        return cls(experiment, method, probes)

    def evaluate(self, live: LiveModel) -> list[MetricScores]:
        """Per-item scores of the experiment's metrics (same LiveModel calls on every rank)."""
        if self.method == "gaussian":
            return self._evaluate_gaussian(live)
        return self._evaluate_random_tokens(live)

    def _evaluate_gaussian(self, live: LiveModel) -> list[MetricScores]:
        spec = self.experiment.embedding_noise
        assert spec is not None
        assert self.probes.sequences is not None  # checked in from_experiment
        requests = list(enumerate(self.probes.sequences))

        def score(batch: list[tuple[int, np.ndarray]]) -> list[tuple[float, float]]:
            live.forward_passes += 1
            results = gaussian_statistics(
                live.module, [s for _, s in batch], [i for i, _ in batch], spec, pad_token_id=live.pad_token_id
            )
            return [(r.statistic, r.mean_logprob) for r in results]

        # evaluating(): eval mode (no dropout: rows independent, noise hook idle) and the
        # run's precision; gaussian_statistics re-enables grad for its one tensor.
        with live.evaluating():
            results = live.map_sharded(score, requests, length=lambda r: len(r[1]))
        z = np.array([r[0] for r in results], dtype=np.float64)
        logprob = np.array([r[1] for r in results], dtype=np.float64)
        return [
            MetricScores(
                "watermark_z",
                self.item_ids,
                self.treated,
                z,
                test="z",
                alternative="greater",
                extra={"sigma": spec.sigma, "sign": "negated <grad, w>: positive = trained on the noise"},
            ),
            MetricScores(
                "carrier_logprob",
                self.item_ids,
                self.treated,
                logprob,
                test="means",
                alternative="greater",
                primary=False,
            ),
        ]

    def _evaluate_random_tokens(self, live: LiveModel) -> list[MetricScores]:
        keys = np.asarray(self.probes.keys)
        context = np.asarray(self.probes.context)
        scores = live.score_targets([context] * len(keys), list(keys))
        logprob = scores.mean_logprob
        exposure = exposures(logprob, self.treated)
        return [
            MetricScores(
                "exposure",
                self.item_ids,
                self.treated,
                exposure,
                test="means",
                alternative="greater",
                extra={"reference_keys": int((~self.treated).sum())},
            ),
            MetricScores(
                "key_logprob", self.item_ids, self.treated, logprob, test="means", alternative="greater", primary=False
            ),
        ]
