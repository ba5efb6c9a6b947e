"""Fixtures shared across the test suite (helpers that are plain functions live in tests/support.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """Train and score tiny models on one intra-op thread.

    Tiny matrices run as fast on one thread alone, and far faster on a busy 2-core
    machine, where two OpenMP threads spin against other processes (a training step
    gets about 20x slower).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
