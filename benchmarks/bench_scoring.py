"""Probe scoring at a real model's shape: what kept columns and shared contexts save.

Scores multiple-choice questions (a long prompt, four short choices) on a randomly
initialised GPT-2 small (124M parameters, 50,257-token vocabulary) three ways:

* ``whole rows, all columns``: every (question, choice) pair as its own row, the model
  projecting every column onto the vocabulary (a model without ``logits_to_keep``);
* ``whole rows``: :meth:`LiveModel.score_targets`, only the scored columns projected;
* ``shared context``: :meth:`LiveModel.score_continuations`, each prompt run once and
  its choices on its key/value cache (what the contamination monitor does).

and prints seconds per evaluation, their ratios, and the size of the largest logits
tensor each way builds. All three must agree on the scores.

    python benchmarks/bench_scoring.py [--questions 8] [--prompt-tokens 96] [--repeats 3] [--device cpu]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import cast

import numpy as np
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from multirun.measure.live_model import LiveModel, TargetScores


class FullLogits(torch.nn.Module):
    """The same model behind a forward that takes no ``logits_to_keep`` and no cache."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=8)
    parser.add_argument("--choices", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=96)
    parser.add_argument("--choice-tokens", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    torch.manual_seed(0)
    # GPT-2 small; a wider initialisation than GPT-2's makes the predictions far from
    # uniform, so that the scores differ between rows and the agreement check means something.
    config = GPT2Config(n_positions=512, initializer_range=0.2)
    # A cast: to mypy, transformers 4.51's PreTrainedModel is not an nn.Module (it has no .to).
    model = cast(torch.nn.Module, GPT2LMHeadModel(config)).to(args.device).eval()
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, config.vocab_size, args.prompt_tokens).tolist() for _ in range(args.questions)]
    choices = [
        [rng.integers(0, config.vocab_size, args.choice_tokens).tolist() for _ in range(args.choices)] for _ in prompts
    ]
    rows = [p for p, cs in zip(prompts, choices) for _ in cs]
    targets = [c for cs in choices for c in cs]

    def live(module: torch.nn.Module) -> LiveModel:
        # Batches of --batch-size rows each way (no token budget), so that the three compare pass for pass.
        return LiveModel(
            module, pad_token_id=0, max_length=config.n_positions, batch_tokens=None, batch_size=args.batch_size
        )

    models = {
        name: live(FullLogits(model) if name.endswith("all columns") else model)
        for name in ("whole rows, all columns", "whole rows", "shared context")
    }
    ways: dict[str, Callable[[], TargetScores]] = {
        "whole rows, all columns": lambda: models["whole rows, all columns"].score_targets(rows, targets),
        "whole rows": lambda: models["whole rows"].score_targets(rows, targets),
        "shared context": lambda: models["shared context"].score_continuations(prompts, choices),
    }
    width = args.prompt_tokens + args.choice_tokens
    per_batch = min(args.batch_size, len(rows))
    logits_bytes = {
        "whole rows, all columns": per_batch * width * config.vocab_size * 4,
        "whole rows": per_batch * args.choice_tokens * config.vocab_size * 4,
        "shared context": per_batch * args.choice_tokens * config.vocab_size * 4,
    }
    print(
        f"GPT-2 small on {args.device}: {args.questions} questions x {args.choices} choices, "
        f"prompts of {args.prompt_tokens} tokens, choices of {args.choice_tokens}"
    )
    seconds: dict[str, float] = {}
    scores: dict[str, TargetScores] = {}
    for name, score in ways.items():
        scores[name] = score()  # warm-up
        timings = []
        for _ in range(args.repeats):
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            started = time.perf_counter()
            score()
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            timings.append(time.perf_counter() - started)
        seconds[name] = sorted(timings)[len(timings) // 2]
    base = seconds["whole rows, all columns"]
    for name in ways:
        passes = models[name].forward_passes // (args.repeats + 1)
        print(
            f"  {name:<26}{seconds[name]:8.3f} s  ({base / seconds[name]:4.2f}x)  {passes:3d} passes   "
            f"largest logits {logits_bytes[name] / 2**20:7.1f} MiB (fp32)"
        )
    reference = scores["whole rows, all columns"].logprob_sum
    print(f"  scores range from {reference.min():.2f} to {reference.max():.2f} nats")
    for name in ways:
        gap = float(np.abs(scores[name].logprob_sum - reference).max())
        print(f"  largest score difference, {name:<26}{gap:.2e} nats")


if __name__ == "__main__":
    main()
