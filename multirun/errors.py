"""Errors raised for bad user input.

Every input problem is reported before training starts and names *where* it is:
the file, the config key (dotted path such as ``experiments[1].placement.start``)
and, for JSONL payloads, the line number.
"""

from __future__ import annotations

from pathlib import Path


class MultirunError(Exception):
    """Base class of all multirun errors."""


class InputError(MultirunError):
    """A config, payload or checkpoint is malformed.

    Example:
        >>> str(InputError("must be positive", file="run.yaml", key="train.global_batch_size"))
        'run.yaml: train.global_batch_size: must be positive'
    """

    def __init__(
        self,
        message: str,
        *,
        file: str | Path | None = None,
        key: str | None = None,
        line: int | None = None,
    ) -> None:
        self.message = message
        self.file = str(file) if file is not None else None
        self.key = key
        self.line = line
        super().__init__(self._render())

    def _render(self) -> str:
        where = []
        if self.file is not None:
            where.append(self.file if self.line is None else f"{self.file}:{self.line}")
        elif self.line is not None:
            where.append(f"line {self.line}")
        if self.key:
            where.append(self.key)
        return ": ".join([*where, self.message])


class ConfigError(InputError):
    """The run config (YAML, overrides or environment) is invalid."""


class PayloadError(InputError):
    """A payload package (``payload.yaml`` or its JSONL files) is invalid."""


class PlacementError(MultirunError):
    """Spans could not be placed under the configured caps."""


class ResumeError(InputError):
    """A checkpoint does not belong to this run's experiments."""


class CorruptionError(InputError):
    """A file the run wrote no longer holds what was written: a ledger shard whose bytes do
    not match its checksum, or a JSON-lines record that is malformed or fails its checksum
    (anything but a torn last line). Names the file (and line)."""
