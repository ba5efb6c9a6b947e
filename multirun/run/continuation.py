"""How a launch continues what its run directory already holds: resume, extend, or refuse.

The rule for a longer ``max_duration`` (an *extension*): the static schedule stays the one
planned for the run's first duration, its *static horizon*, so every span of every step
keeps its place, the steps already trained and the ones still ahead of the checkpoint
alike; the added steps get no static spans (each experiment's repetitions were all
placed within the horizon). Controllers keep deciding over the whole new duration, and
monitors keep their cadence. The plan's fingerprint covers the horizon, not the
duration, so the checkpoint's multirun state still matches; ``manifest.json`` records
``static_steps`` and every duration the run was launched with (``durations``).

What is refused before any training, with a message saying what to do instead:

- a ``max_duration`` equal to the steps a finished run trained (nothing to train);
- a ``max_duration`` shorter than the duration the run was planned for (the plan's spans
  of the dropped steps would silently never be trained).

Example:
    >>> from multirun.types import BatchGeometry
    >>> continuation_of("no-such-run", BatchGeometry(8, 64, 100), autoresume=True, overwrite=False)
    Continuation(static_steps=100, durations=(100,), resume_step=0)
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from composer.utils import dist

from multirun.errors import ResumeError
from multirun.run_dir import RunDir
from multirun.types import BatchGeometry


@dataclass(frozen=True)
class Continuation:
    """What a launch inherits from its run directory.

    Attributes:
        static_steps: the horizon of the static schedule (the run's first duration).
        durations: every duration the run was launched with, this launch's last.
        resume_step: the step of the checkpoint autoresume will load (0: a fresh start).
    """

    static_steps: int
    durations: tuple[int, ...]
    resume_step: int

    @property
    def extended(self) -> bool:
        return self.durations[-1] > self.static_steps


def continuation_of(
    run_dir: str | os.PathLike[str],
    geometry: BatchGeometry,
    *,
    autoresume: bool,
    overwrite: bool,
    resume_step: int | None = None,
) -> Continuation:
    """Read the run directory (rank 0; the others receive its answer) and decide.

    ``resume_step``: the step the trainer has already loaded (the llm-foundry path decides
    at ``FIT_START``, after Composer's autoresume); None: the step of the run directory's
    latest checkpoint, which ``multirun train``'s autoresume will load.

    Raises:
        ResumeError: the launch would train nothing or drop planned steps.
    """
    answer: list[Continuation | ResumeError | None] = [None]
    if dist.get_global_rank() == 0:
        try:
            answer[0] = _decide(
                RunDir(run_dir), geometry, autoresume=autoresume, overwrite=overwrite, resume_step=resume_step
            )
        except ResumeError as exc:
            answer[0] = exc
    if dist.get_world_size() > 1:
        dist.broadcast_object_list(answer, src=0)
    if isinstance(answer[0], ResumeError):
        raise answer[0]
    assert answer[0] is not None
    return answer[0]


def recorded_continuation(run_dir: str | os.PathLike[str]) -> Continuation | None:
    """The static horizon and durations ``manifest.json`` records (None: no manifest).

    Work after training (``multirun evaluate``) rebuilds the plan the run trained with,
    an extended run's included.
    """
    manifest_path = RunDir(run_dir).manifest
    if not manifest_path.is_file():
        return None
    manifest = json.loads(manifest_path.read_text())
    steps = int(manifest.get("geometry", {}).get("num_steps", 0))
    if steps <= 0:
        return None
    durations = tuple(int(d) for d in manifest.get("durations", [steps]))
    return Continuation(static_steps=int(manifest.get("static_steps", steps)), durations=durations, resume_step=0)


def checkpoint_step(path: str | os.PathLike[str]) -> int:
    """The training step a Composer checkpoint was taken at (from its name, else its content)."""
    path = Path(path)
    match = re.search(r"ba(\d+)", path.name)
    if match:
        return int(match.group(1))
    import torch

    timestamp = torch.load(path, map_location="cpu", weights_only=False)["state"]["timestamp"]
    return int(timestamp.get("Timestamp", timestamp)["batch"])


def _decide(
    files: RunDir, geometry: BatchGeometry, *, autoresume: bool, overwrite: bool, resume_step: int | None
) -> Continuation:
    steps = geometry.num_steps
    fresh = Continuation(static_steps=steps, durations=(steps,), resume_step=0)
    if resume_step is None:
        latest = files.latest_checkpoint
        if overwrite or not autoresume or not latest.exists():
            return fresh  # nothing to continue: Composer starts at step 0
        resume_step = checkpoint_step(latest.resolve())
    if resume_step == 0 or not files.manifest.is_file():
        return fresh
    manifest = json.loads(files.manifest.read_text())
    planned = int(manifest.get("geometry", {}).get("num_steps", steps))
    static = int(manifest.get("static_steps", planned))
    durations = tuple(int(d) for d in manifest.get("durations", [planned]))
    if resume_step >= steps:
        finished = " finished" if files.summary.exists() else ""
        raise ResumeError(
            f"the{finished} run in {files.root} has trained {resume_step} steps and max_duration is {steps} steps: "
            "nothing to train. To train longer, raise train.max_duration (an extension keeps every planned span; "
            "docs/architecture.md, 'Runs over time'); to start over, pass --overwrite; to look at the run, "
            f"`multirun report {files.root}`",
            file=files.root,
        )
    if steps < planned:
        raise ResumeError(
            f"max_duration is {steps} steps but the run in {files.root} was launched for {planned}: a shorter run "
            "would never train the spans planned for its last steps. Resume with the same or a longer "
            "train.max_duration, or start a new run_dir",
            file=files.root,
        )
    if steps > durations[-1]:
        durations = (*durations, steps)
    return Continuation(static_steps=static, durations=durations, resume_step=resume_step)
