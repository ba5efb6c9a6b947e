"""The demo extended from 800 to 1000 steps: its plan keeps every span of the 800 steps."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from multirun.config import load_config
from multirun.data.tokenizers import ByteTokenizer
from multirun.plan.run_plan import build_run_plan
from multirun.types import BatchGeometry


def test_extending_the_demo_keeps_its_800_step_schedule() -> None:
    loaded = load_config(None, env={})  # the bundled demo, planned for 800 steps
    tokenizer = ByteTokenizer()
    demo = BatchGeometry(global_batch_size=16, sequence_length=128, num_steps=800)
    original = build_run_plan(loaded, tokenizer=tokenizer, geometry=demo)
    extended = build_run_plan(
        loaded, tokenizer=tokenizer, geometry=replace(demo, num_steps=1000), static_steps=800, durations=(800, 1000)
    )
    assert len(original.spans) > 0
    for column in ("step", "row", "offset", "length", "experiment", "sequence", "repetition"):
        np.testing.assert_array_equal(getattr(extended.spans, column), getattr(original.spans, column))
    assert extended.fingerprint == original.fingerprint
    assert extended.geometry.num_steps == 1000 and extended.manifest()["durations"] == [800, 1000]

    # Planned afresh for 1000 steps, the uniform experiments spread over the new length.
    fresh = build_run_plan(loaded, tokenizer=tokenizer, geometry=replace(demo, num_steps=1000))
    assert fresh.fingerprint != original.fingerprint
    assert int(fresh.spans.step.max()) >= 800
