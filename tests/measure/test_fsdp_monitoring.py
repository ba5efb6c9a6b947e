"""Probe scoring through FSDP: the model Composer trains with FSDP is wrapped at its root,
whose forward takes ``(*args, **kwargs)``. Monitors must still see what the wrapped model
takes (kept columns, key/value cache) and score what the bare model scores, with every
rank running the same forward passes (each one gathers the sharded parameters)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

from monitors.watermark import gaussian_statistics
from multirun.measure.live_model import LiveModel, forward_parameters, unwrap_model
from multirun.run.model import build_gpt2
from multirun.types import EmbeddingNoise
from tests.support import REPO


def _rows(seed: int, lengths: list[int]) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, n).tolist() for n in lengths]


@dataclass(frozen=True)
class _Probes:
    pad_token_id: int = 257
    max_length: int = 48
    batch_size: int = 4
    # 7 probes over 2 ranks: one rank scores a dummy item to keep the passes symmetric.
    contexts: list[list[int]] = field(default_factory=lambda: _rows(1, [3, 20, 9, 1, 14, 30, 6]))
    targets: list[list[int]] = field(default_factory=lambda: _rows(2, [4, 2, 7, 1, 5, 3, 2]))
    choices: list[list[list[int]]] = field(
        default_factory=lambda: [_rows(3 + i, [1 + i % 3, 2, 4][: 1 + i % 3]) for i in range(7)]
    )


PROBES = _Probes()


def probe_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return unwrap_model(
        build_gpt2(vocab_size=258, sequence_length=PROBES.max_length, n_layer=2, n_head=2, n_embd=16, eos_token_id=256)
    )


def score_all(live: LiveModel) -> dict[str, Any]:
    """Every scoring path a monitor uses, as plain lists."""
    targets = live.score_targets(PROBES.contexts, PROBES.targets)
    choices = live.score_continuations(PROBES.contexts, PROBES.choices)
    generated, behaviour = live.generate_and_score(PROBES.contexts, 3, PROBES.targets)
    # Stems of two tokens or more (so that they are shared), the choices as their branches.
    branch_generated, branches = live.generate_and_score_branches(
        [c + [7] for c in PROBES.contexts],
        PROBES.choices,
        3,
        [[t] * len(cs) for t, cs in zip(PROBES.targets, PROBES.choices)],
    )
    # The Gaussian watermark statistic: a gradient w.r.t. the input embeddings, under grad.
    noise = EmbeddingNoise(sigma=0.1, seed=3)
    with live.evaluating():
        watermark = live.map_sharded(
            lambda batch: gaussian_statistics(
                live.module,
                [np.asarray(row) for _, row in batch],
                [item for item, _ in batch],
                noise,
                pad_token_id=PROBES.pad_token_id,
            ),
            [(item, c + t) for item, (c, t) in enumerate(zip(PROBES.contexts, PROBES.targets))],
        )
    return {
        "watermark_statistic": [w.statistic for w in watermark],
        "target_logprob": targets.logprob_sum.tolist(),
        "target_greedy": targets.greedy_match.tolist(),
        "choice_logprob": choices.logprob_sum.tolist(),
        "generated": [g.tolist() for g in generated],
        "behaviour_logprob": behaviour.logprob_sum.tolist(),
        "branch_generated": [g.tolist() for g in branch_generated],
        "branch_logprob": branches.logprob_sum.tolist(),
    }


@pytest.mark.parametrize("wrap", [checkpoint_wrapper, torch.compile], ids=["activation checkpointing", "torch.compile"])
def test_wrappers_that_pass_arguments_on_show_the_wrapped_signature(wrap: Any) -> None:
    model = probe_model()
    assert forward_parameters(wrap(model)) == forward_parameters(model)
    assert {"input_ids", "past_key_values", "position_ids", "use_cache"} <= forward_parameters(model)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.e2e
def test_fsdp_wrapped_model_scores_what_the_bare_model_scores(tmp_path: Path) -> None:
    out = tmp_path / "fsdp.json"
    port = str(_free_port())
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.scripts.fsdp_probe_scores", str(out)],
            cwd=REPO,
            env={**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(2)
    ]
    logs = [p.communicate(timeout=300)[0] for p in processes]
    assert all(p.returncode == 0 for p in processes), "\n".join(logs)
    sharded = json.loads(out.read_text())
    assert sharded["world_size"] == 2

    bare = LiveModel(
        probe_model(), pad_token_id=PROBES.pad_token_id, max_length=PROBES.max_length, batch_size=PROBES.batch_size
    )
    expected = score_all(bare)
    for key in ("target_logprob", "choice_logprob", "behaviour_logprob", "branch_logprob", "watermark_statistic"):
        np.testing.assert_allclose(sharded["scores"][key], expected[key], atol=1e-5, err_msg=key)
    assert sharded["scores"]["target_greedy"] == expected["target_greedy"]
    assert sharded["scores"]["generated"] == expected["generated"]
    assert sharded["scores"]["branch_generated"] == expected["branch_generated"]
    # Through the FSDP root the kept-column and cached paths are taken. With the generic
    # (*args, **kwargs) signature the teacher-forcing pass would project every column it
    # takes in, and the choices and behaviours would be scored on whole rows.
    assert sharded["projected"][0] < sharded["widths"][0]
    # Rank 0 holds 4 of the 7 probes (one batch): teacher forcing 1 pass; shared contexts
    # 2 per pass of 4 // 3 = 1 question (4 x 2); generation with scoring 1 + 1 + 2; shared
    # stems, 1 per batch like the questions, 5 each (stems, branches, targets, 2 decoding).
    assert sharded["forward_passes"] == 1 + 4 * 2 + 4 + 4 * 5
