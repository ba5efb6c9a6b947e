"""Test helpers: write payload packages and run configs into a temporary directory."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from multirun.kinds.payloads import file_xxh64


def write_payload(
    root: str | Path,
    items: Sequence[Mapping[str, Any] | str | bytes],
    *,
    name: str = "test-payload",
    kind: str = "documents",
    version: str = "1.0.0",
    license: str = "CC0-1.0",
    role: str = "items",
    filename: str = "items.jsonl",
    manifest_overrides: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``root/items.jsonl`` and ``root/payload.yaml`` with the correct xxh64.

    ``items`` are JSON-encoded when they are mappings; ``str``/``bytes`` lines are
    written as they are (to build malformed files). ``manifest_overrides`` replaces
    top-level keys of ``payload.yaml`` (a value of None deletes the key).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    data = b"".join(
        (
            line
            if isinstance(line, bytes)
            else (line if isinstance(line, str) else json.dumps(dict(line))).encode("utf-8")
        )
        + b"\n"
        for line in items
    )
    (root / filename).write_bytes(data)
    manifest: dict[str, Any] = {
        "name": name,
        "version": version,
        "kind": kind,
        "description": "written by tests",
        "license": license,
        "files": {role: {"path": filename, "xxh64": file_xxh64(root / filename)}},
    }
    for key, value in (manifest_overrides or {}).items():
        if value is None:
            manifest.pop(key, None)
        else:
            manifest[key] = value
    (root / "payload.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False), encoding="utf-8")
    return root


def documents(n: int, *, prefix: str = "doc", text: str = "document number {i} says hello") -> list[dict[str, Any]]:
    """``n`` valid documents items with ids ``prefix-000`` ..."""
    return [{"id": f"{prefix}-{i:03d}", "text": text.format(i=i)} for i in range(n)]


def write_config(path: str | Path, doc: Mapping[str, Any] | str) -> Path:
    """Write a run config (a mapping dumped as YAML, or raw YAML text)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = doc if isinstance(doc, str) else yaml.safe_dump(dict(doc), sort_keys=False)
    path.write_text(text, encoding="utf-8")
    return path


def minimal_config(**experiments: Mapping[str, Any]) -> dict[str, Any]:
    """A small valid run config whose experiments are ``name=spec`` (spec without name)."""
    return {
        "run_name": "t",
        "train": {"max_duration": "100ba", "global_batch_size": 4},
        "data": {"sequence_length": 64},
        "experiments": [{"name": name, **spec} for name, spec in experiments.items()],
    }
