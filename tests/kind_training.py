"""Plain-torch training the payload-kind tests share: a tiny GPT-2 built in code and
real background text (the standard library's source), without Composer, so that each
kind's direction test isolates its injector and monitor."""

from __future__ import annotations

import numpy as np
import torch

from multirun.data.mds import demo_corpus_sources
from multirun.data.tokenizers import ByteTokenizer
from multirun.run.model import build_gpt2

TOK = ByteTokenizer()


def tiny_gpt2(seed: int = 0, *, sequence_length: int, n_embd: int = 64) -> torch.nn.Module:
    """Two layers, two heads: the demo's model, seeded."""
    torch.manual_seed(seed)
    return build_gpt2(
        vocab_size=TOK.vocab_size,
        sequence_length=sequence_length,
        n_layer=2,
        n_head=2,
        n_embd=n_embd,
        eos_token_id=TOK.eos_token_id,
    ).model


def filler_rows(n_rows: int, length: int) -> torch.Tensor:
    """Real text cut into consecutive rows: the pretraining data."""
    need = n_rows * length
    data = bytearray()
    for path in demo_corpus_sources():
        data += path.read_bytes() + b"\n"
        if len(data) >= need:
            break
    return torch.tensor(list(data[:need]), dtype=torch.long).view(n_rows, length)


def filler_windows(length: int, count: int, seed: int) -> np.ndarray:
    """Windows of real text at random places, to mix in as background."""
    text = b"".join(p.read_bytes() for p in sorted(demo_corpus_sources())[:40])
    data = np.frombuffer(text, dtype=np.uint8).astype(np.int64)
    starts = np.random.default_rng(seed).integers(0, data.size - length, size=count)
    return np.stack([data[s : s + length] for s in starts])


def train_with_injections(
    sequences: list[list[int]],
    repetitions: int,
    *,
    sequence_length: int,
    steps: int = 150,
    batch: int = 8,
    seed: int = 0,
    background: torch.Tensor | None = None,
) -> torch.nn.Module:
    """Pretraining on filler rows, each sequence overwriting a random span ``repetitions`` times.

    ``background``: the rows to train on (``[n, sequence_length]``, cycled in order), e.g. the
    run's own training stream; default :func:`filler_rows`. A kind whose items come from a
    dataset (``replay``) needs that dataset's stream here: over other text, injecting the items
    also teaches their domain, and never-injected controls from the same documents gain with them.
    """
    rng = np.random.default_rng(seed)
    model = tiny_gpt2(seed, sequence_length=sequence_length)
    if background is None:
        rows = filler_rows(steps * batch, sequence_length)
    else:
        rows = background[torch.arange(steps * batch) % background.shape[0]]
    spans = rng.permutation(np.repeat(np.arange(len(sequences)), repetitions))
    step_of = np.sort(rng.integers(0, steps, size=spans.size))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    for step in range(steps):
        x = rows[step * batch : (step + 1) * batch].clone()
        for slot, span in enumerate(spans[step_of == step]):
            seq = sequences[span]
            offset = int(rng.integers(0, sequence_length - len(seq) + 1))
            x[(step + slot) % batch, offset : offset + len(seq)] = torch.tensor(seq)
        loss = model(input_ids=x, labels=x).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model
