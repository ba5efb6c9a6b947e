"""Seeded Gaussian noise on input embeddings (the paper's Gaussian watermark).

During training, :class:`EmbeddingNoiseHook` adds ``item_noise(spec, item, length, dim)``
to the input embeddings of each noised span; monitors regenerate the same noise from the
seed to test for it, and draw the noise of never-injected control items the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import xxhash

from multirun.types import EmbeddingNoise


def item_noise(spec: EmbeddingNoise, item: int, length: int, dim: int) -> torch.Tensor:
    """The ``(length, dim)`` float32 noise of one item: N(0, sigma^2), a pure function of (seed, item)."""
    seed = xxhash.xxh64_intdigest(f"{spec.seed}:{item}".encode()) & 0x7FFF_FFFF_FFFF_FFFF
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((length, dim), generator=generator, dtype=torch.float32) * spec.sigma


@dataclass(frozen=True)
class NoisedSpan:
    """Noise to add at ``[offset, offset+length)`` of a local batch row."""

    local_row: int
    offset: int
    length: int
    spec: EmbeddingNoise
    item: int


class EmbeddingNoiseHook:
    """Adds span noise to the output of the model's input-embedding module.

    The callback tells it, before each microbatch's forward pass, which rows of the
    step's batch that microbatch holds; the hook adds the noise of the spans in those
    rows and nothing else (monitor passes run with no pending spans).
    """

    def __init__(self, embedding: torch.nn.Module) -> None:
        self._spans: list[NoisedSpan] = []
        self._rows: tuple[int, int] | None = None
        self._handle = embedding.register_forward_hook(self._add_noise)

    def set_step(self, spans: list[NoisedSpan]) -> None:
        self._spans = spans
        self._rows = None

    def set_microbatch(self, first_row: int, rows: int) -> None:
        self._rows = (first_row, first_row + rows)

    def clear(self) -> None:
        self._spans, self._rows = [], None

    def remove(self) -> None:
        self._handle.remove()

    def _add_noise(self, module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if not self._spans or self._rows is None or not module.training:
            return None
        lo, hi = self._rows
        if output.shape[0] != hi - lo:
            raise RuntimeError(f"embedding output has {output.shape[0]} rows, the microbatch should have {hi - lo}")
        output = output.clone()
        for span in self._spans:
            if lo <= span.local_row < hi:
                noise = item_noise(span.spec, span.item, span.length, output.shape[-1]).to(output.device, output.dtype)
                output[span.local_row - lo, span.offset : span.offset + span.length] += noise
        return output


def noised_spans(
    local_rows: np.ndarray,
    offsets: np.ndarray,
    lengths: np.ndarray,
    specs: list[EmbeddingNoise | None],
    items: np.ndarray,
    experiments: np.ndarray,
) -> list[NoisedSpan]:
    """The step's spans whose experiment adds embedding noise."""
    out = []
    for row, offset, length, e, item in zip(local_rows, offsets, lengths, experiments, items):
        spec = specs[int(e)]
        if spec is not None:
            out.append(NoisedSpan(int(row), int(offset), int(length), spec, int(item)))
    return out
