"""Payload packages: a folder with ``payload.yaml`` plus the JSONL files it names.

``payload.yaml``::

    name: demo-canaries
    version: 1.0.0
    kind: documents                 # the injector kind that reads it
    description: ...
    license: CC0-1.0
    files:
      items: {path: items.jsonl, xxh64: "<16 hex>"}   # role -> file

Every file's xxh64 is checked on load, so a run can never train on payload content
other than the one recorded. After editing a file, recompute the hashes with
``multirun payload fingerprint DIR`` (:func:`write_fingerprints`).

Example:
    >>> pkg = load_payload("pkg:demo/canaries", base_dir=Path("."))
    >>> pkg.kind, len(pkg.read_jsonl("items", required={"id": str, "text": str}, optional={"repetitions": float})) > 0
    ('documents', True)
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import xxhash
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from multirun.errors import PayloadError
from multirun.yaml_load import KeyPath, load_yaml

__all__ = [
    "PayloadFile",
    "PayloadPackage",
    "file_xxh64",
    "load_payload",
    "resolve_payload_ref",
    "write_fingerprints",
]

PAYLOAD_YAML = "payload.yaml"
# A pkg: name: '/'-separated parts of plain characters (checked for '.' and '..' parts too).
_PKG_NAME = re.compile(r"[A-Za-z0-9._-]+(?:/[A-Za-z0-9._-]+)*")

# Lines (file -> line numbers) that JSONL readers treat as blank: how `multirun payload
# check` goes on past a bad line to report every problem of a package in one run.
_LEFT_OUT: ContextVar[Mapping[Path, frozenset[int]] | None] = ContextVar("multirun_payload_left_out", default=None)


@contextmanager
def leaving_out_lines(lines: Mapping[Path, frozenset[int]]) -> Iterator[None]:
    """Within the block, :func:`read_jsonl_file` reads the given lines of each file as blank.

    Only for validation (:func:`multirun.kinds.experiments.check_payload`): a run never
    trains on a package read this way. Paths are compared resolved.
    """
    token = _LEFT_OUT.set({Path(p).resolve(): frozenset(v) for p, v in lines.items()})
    try:
        yield
    finally:
        _LEFT_OUT.reset(token)


_RECOMPUTE = "if the change is intended, recompute the hashes with `multirun payload fingerprint {root}`"

TypeSpec = type | tuple[type, ...]


def file_xxh64(path: str | Path) -> str:
    """xxh64 of a file's bytes as 16 hex digits."""
    h = xxhash.xxh64()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class PayloadFile:
    """One file of a package: its role (``items``, ``probes``...), absolute path and hash."""

    role: str
    path: Path
    xxh64: str


@dataclass
class PayloadPackage:
    """A loaded, hash-verified payload package.

    ``fingerprint`` is the xxh64 over name, version, kind and the file hashes: it
    changes whenever any content changes.
    """

    root: Path
    name: str
    version: str
    kind: str
    description: str
    license: str
    files: dict[str, PayloadFile]
    fingerprint: str

    def path(self, role: str) -> Path:
        """Absolute path of the file with ``role``; PayloadError if the package has none."""
        if role not in self.files:
            have = ", ".join(self.files) or "none"
            raise PayloadError(
                f"a {self.kind} payload needs a file with role {role!r} (has: {have})",
                file=self.root / PAYLOAD_YAML,
                key="files",
            )
        return self.files[role].path

    def iter_jsonl(
        self,
        role: str,
        *,
        required: Mapping[str, TypeSpec],
        optional: Mapping[str, TypeSpec] | None = None,
    ) -> list[tuple[int, dict[str, Any]]]:
        """Like :meth:`read_jsonl` but each record comes with its 1-based line number."""
        return read_jsonl_file(self.path(role), required=required, optional=optional or {})

    def read_jsonl(
        self,
        role: str,
        *,
        required: Mapping[str, TypeSpec],
        optional: Mapping[str, TypeSpec] | None = None,
    ) -> list[dict[str, Any]]:
        """Read and validate the JSONL file with ``role``.

        Each non-blank line must be valid UTF-8 and one JSON object whose keys are
        the ``required`` ones (with those types) plus any of the ``optional`` ones;
        ``float`` accepts ints, no number type accepts booleans.

        Raises:
            PayloadError: naming ``file:line`` and the key.
        """
        return [record for _, record in self.iter_jsonl(role, required=required, optional=optional)]


def _type_ok(value: Any, spec: TypeSpec) -> bool:
    for t in spec if isinstance(spec, tuple) else (spec,):
        if isinstance(value, bool) and t is not bool:
            continue  # bool is an int subclass; `true` is never a count
        if t is float and isinstance(value, (int, float)):
            return True
        if isinstance(value, t):
            return True
    return False


def _type_name(spec: TypeSpec) -> str:
    names = {str: "string", int: "integer", float: "number", bool: "boolean", list: "list", dict: "object"}
    return " or ".join(names.get(t, t.__name__) for t in (spec if isinstance(spec, tuple) else (spec,)))


def _json_name(value: Any) -> str:
    return "null" if value is None else _type_name(type(value))


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a valid JSON number")


# A lone surrogate (valid JSON: "\ud800") is no Unicode character: no text can be
# encoded with one. A NUL in training text is almost surely an error (a binary file,
# a C string), and invisible in every viewer: refused too.
_SURROGATE_OR_NUL = re.compile("[\ud800-\udfff\x00]")


def _bad_string(value: Any, path: str) -> tuple[str, str] | None:
    """``(key path, problem)`` of the first string in a JSON value (keys included) that holds
    a lone surrogate or a NUL, or None."""
    if isinstance(value, str):
        m = _SURROGATE_OR_NUL.search(value)
        if m is None:
            return None
        char = m.group()
        if char == "\x00":
            return path, f"contains a NUL character (\\u0000) at position {m.start()}: refused in payload text"
        return path, (
            f"contains a lone surrogate \\u{ord(char):04x} at position {m.start()}: not a Unicode character "
            "(a \\u escape of a character outside the BMP needs both halves of its surrogate pair)"
        )
    if isinstance(value, dict):
        for k, v in value.items():
            name = ascii(k) if isinstance(k, str) and _SURROGATE_OR_NUL.search(k) else str(k)
            sub = f"{path}.{name}" if path else name
            bad = _bad_string(k, sub) or _bad_string(v, sub)
            if bad is not None:
                return bad
    elif isinstance(value, list):
        for i, v in enumerate(value):
            bad = _bad_string(v, f"{path}[{i}]")
            if bad is not None:
                return bad
    return None


def read_jsonl_file(
    path: Path,
    *,
    required: Mapping[str, TypeSpec],
    optional: Mapping[str, TypeSpec],
) -> list[tuple[int, dict[str, Any]]]:
    """Validated ``(line_number, record)`` pairs of a JSONL file (blank lines skipped)."""
    allowed = {**optional, **required}
    out: list[tuple[int, dict[str, Any]]] = []
    with open(path, "rb") as f:
        data = f.read()
    skipping = _LEFT_OUT.get()
    left_out = skipping.get(Path(path).resolve(), frozenset()) if skipping else frozenset()
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        if lineno in left_out:
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise PayloadError(
                f"not valid UTF-8 (byte {e.start} of the line: {raw[e.start : e.start + 4]!r})", file=path, line=lineno
            ) from None
        if not text.strip():
            continue
        try:
            record = json.loads(text, object_pairs_hook=_no_duplicate_keys, parse_constant=_reject_constant)
        except json.JSONDecodeError as e:
            raise PayloadError(f"invalid JSON: {e.msg} (column {e.colno})", file=path, line=lineno) from None
        except ValueError as e:
            raise PayloadError(f"invalid JSON: {e}", file=path, line=lineno) from None
        if not isinstance(record, dict):
            raise PayloadError(f"each line must be a JSON object, got {_json_name(record)}", file=path, line=lineno)
        bad = _bad_string(record, "")
        if bad is not None:
            raise PayloadError(bad[1], file=path, line=lineno, key=bad[0] or None)
        for key in required:
            if key not in record:
                raise PayloadError("required key is missing", file=path, line=lineno, key=key)
        for key, value in record.items():
            if key not in allowed:
                raise PayloadError(f"unknown key (allowed: {', '.join(allowed)})", file=path, line=lineno, key=key)
            if not _type_ok(value, allowed[key]):
                raise PayloadError(
                    f"expected a {_type_name(allowed[key])}, got {_json_name(value)}", file=path, line=lineno, key=key
                )
            if isinstance(value, float) and not math.isfinite(value):
                raise PayloadError("must be a finite number", file=path, line=lineno, key=key)
            if isinstance(value, int) and not -(2**63) <= value < 2**63:
                # JSON integers are unbounded; no count of a run is beyond int64 (nor a float's range).
                raise PayloadError(f"number too large ({len(str(abs(value)))} digits)", file=path, line=lineno, key=key)
        out.append((lineno, record))
    return out


# --------------------------------------------------------------------------- payload.yaml


class _FileEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str = Field(min_length=1)
    xxh64: str = Field(pattern=r"^[0-9a-f]{16}$")


class _Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True)
    name: str = Field(pattern=r"^[A-Za-z0-9._/-]+$")
    version: str = Field(min_length=1)
    kind: str = Field(pattern=r"^[A-Za-z0-9._-]+$")
    description: str = ""
    license: str = Field(min_length=1)
    files: dict[str, _FileEntry]


def _read_manifest(root: Path) -> tuple[dict[str, Any], dict[KeyPath, int]]:
    """``payload.yaml`` as a mapping, with the line of every key (the run config's YAML loader:
    bounded aliases, duplicate keys refused, merge keys with overrides)."""
    manifest = root / PAYLOAD_YAML
    try:
        text = manifest.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise PayloadError(f"not valid UTF-8 (byte {e.start})", file=manifest) from None
    doc, lines = load_yaml(text, source=manifest, error=PayloadError)
    if not isinstance(doc, dict):
        raise PayloadError(
            "the top level must be a mapping (name, version, kind, license, files)", file=manifest, line=1
        )
    bad = _bad_string(doc, "")
    if bad is not None:
        raise PayloadError(bad[1], file=manifest, key=bad[0], line=_line(lines, _split_dotted(bad[0])))
    return doc, lines


def _split_dotted(key: str) -> tuple[str | int, ...]:
    """``files.items.path`` -> ``("files", "items", "path")``; ``a[2]`` -> ``("a", 2)``."""
    return tuple(int(p) if p.isdigit() else p for p in re.sub(r"\[(\d+)\]", r".\1", key).split(".") if p)


def _line(lines: Mapping[KeyPath, int], path: Sequence[str | int]) -> int | None:
    """Line of ``path`` or of its nearest parent that has one."""
    for n in range(len(path), 0, -1):
        line = lines.get(tuple(path[:n]))
        if line is not None:
            return line
    return None


def _package_fingerprint(name: str, version: str, kind: str, hashes: Mapping[str, str]) -> str:
    doc = {"name": name, "version": version, "kind": kind, "files": dict(sorted(hashes.items()))}
    return xxhash.xxh64(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()


def _inside(root: Path, rel: str, manifest: Path, key: str, *, line: int | None = None) -> Path:
    p = Path(rel)
    try:
        full = (root / p).resolve()
    except (OSError, ValueError) as e:  # a NUL in the path, a symlink loop
        raise PayloadError(f"not a usable path ({e}): {rel!r}", file=manifest, key=key, line=line) from None
    # Files must live inside the package: its hashes then describe all of it.
    if p.is_absolute() or not full.is_relative_to(root.resolve()):
        raise PayloadError(
            f"path must be relative and inside the package, got {rel!r}", file=manifest, key=key, line=line
        )
    return full


def load_package(root: str | Path) -> PayloadPackage:
    """Load and verify the package in directory ``root``."""
    root = Path(root)
    manifest = root / PAYLOAD_YAML
    if not manifest.is_file():
        raise PayloadError(
            "payload package has no payload.yaml" if root.is_dir() else "payload directory not found",
            file=manifest if root.is_dir() else root,
        )
    doc, lines = _read_manifest(root)
    try:
        m = _Manifest.model_validate(doc)
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(s) for s in err["loc"]) or None
        line = _line(lines, err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = (
                f"unknown key (allowed: {', '.join(_Manifest.model_fields) if len(err['loc']) == 1 else 'path, xxh64'})"
            )
        elif err["type"] == "missing":
            msg = "required key is missing"
        elif err["type"] == "string_pattern_mismatch" and err["loc"][-1] == "xxh64":
            msg = f"must be 16 lowercase hex digits, got {err['input']!r}; {_RECOMPUTE.format(root=root)}"
        more = f" (and {len(e.errors()) - 1} more problems)" if len(e.errors()) > 1 else ""
        raise PayloadError(msg + more, file=manifest, key=key, line=line) from None
    files: dict[str, PayloadFile] = {}
    for role, entry in m.files.items():
        path_line = _line(lines, ("files", role, "path"))
        path = _inside(root, entry.path, manifest, f"files.{role}.path", line=path_line)
        if not path.is_file():
            raise PayloadError(f"file not found: {path}", file=manifest, key=f"files.{role}.path", line=path_line)
        actual = file_xxh64(path)
        if actual != entry.xxh64:
            raise PayloadError(
                f"content hash mismatch for {entry.path}: payload.yaml says {entry.xxh64}, the file has {actual}; "
                + _RECOMPUTE.format(root=root),
                file=manifest,
                key=f"files.{role}.xxh64",
                line=_line(lines, ("files", role, "xxh64")),
            )
        files[role] = PayloadFile(role=role, path=path, xxh64=actual)
    return PayloadPackage(
        root=root.resolve(),
        name=m.name,
        version=m.version,
        kind=m.kind,
        description=m.description,
        license=m.license,
        files=files,
        fingerprint=_package_fingerprint(m.name, m.version, m.kind, {r: f.xxh64 for r, f in files.items()}),
    )


def bundled_payload_dirs(name: str) -> list[Path]:
    """Candidate directories of ``pkg:NAME`` inside the ``experiments`` package.

    ``pkg:demo/canaries`` looks at ``experiments/demo/canaries`` and then at
    ``experiments/demo/payloads/canaries`` (where run configs keep their payloads).
    """
    base = Path(str(resources.files("experiments")))
    out = [base / name]
    group, _, rest = name.partition("/")
    if rest:
        out.append(base / group / "payloads" / rest)
    return out


def resolve_payload_ref(ref: str, *, base_dir: Path) -> Path:
    """Directory of a payload ref: a path (relative to ``base_dir``) or ``pkg:NAME``.

    ``pkg:NAME`` is first looked up in the ``multirun.payloads`` registry (entry
    points), then among the packages bundled in ``experiments``.

    Raises:
        PayloadError: nothing found; the message lists where it looked.
    """
    if ref.startswith("pkg:"):
        from multirun.kinds.registry import payloads  # the registry imports no payload code: no cycle

        name = ref[4:].strip().strip("/")
        if not _PKG_NAME.fullmatch(name) or any(part in (".", "..") for part in name.split("/")):
            raise PayloadError(
                f"payload package {ref!r}: a pkg: name is a plain relative name such as pkg:demo/canaries "
                "(letters, digits, '.', '_', '-' in '/'-separated parts; no '.' or '..' parts)"
            )
        if name in payloads:
            return Path(payloads.get(name))
        tried = bundled_payload_dirs(name)
        bundled = Path(str(resources.files("experiments"))).resolve()
        for d in tried:
            # Resolved and checked again: a symlink must not lead out of the bundled packages either.
            if (d / PAYLOAD_YAML).is_file() and d.resolve().is_relative_to(bundled):
                return d
        looked = ", ".join(str(d) for d in tried)
        known = ", ".join(payloads.names()) or "none"
        raise PayloadError(
            f"payload package {ref!r} not found (looked in {looked}; registered: {known})", file=tried[-1]
        )
    path = Path(ref).expanduser()
    path = path if path.is_absolute() else base_dir / path
    if not (path / PAYLOAD_YAML).is_file():
        what = "has no payload.yaml" if path.is_dir() else "not found"
        raise PayloadError(
            f"payload directory {what}: {path.resolve()} (relative refs resolve against {base_dir.resolve()})",
            file=path,
        )
    return path


def load_payload(ref: str, *, base_dir: Path) -> PayloadPackage:
    """Resolve a payload ref and load the package, verifying schema and file hashes.

    Raises:
        PayloadError: naming ``payload.yaml`` and the key (``files.items.xxh64``), or
            the directory that was not found.
    """
    return load_package(resolve_payload_ref(ref, base_dir=base_dir))


def write_fingerprints(root: str | Path) -> None:
    """Recompute the xxh64 of every file listed in ``payload.yaml`` and rewrite it.

    Comments in ``payload.yaml`` are not kept.
    """
    root = Path(root)
    manifest = root / PAYLOAD_YAML
    if not manifest.is_file():
        raise PayloadError("payload package has no payload.yaml", file=manifest)
    doc, _ = _read_manifest(root)
    files = doc.get("files")
    if not isinstance(files, dict):
        raise PayloadError("files must map roles to {path, xxh64}", file=manifest, key="files")
    for role, entry in files.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            raise PayloadError("each file needs a path", file=manifest, key=f"files.{role}.path")
        path = _inside(root, entry["path"], manifest, f"files.{role}.path")
        if not path.is_file():
            raise PayloadError(f"file not found: {path}", file=manifest, key=f"files.{role}.path")
        entry["xxh64"] = file_xxh64(path)
    tmp = manifest.with_name(manifest.name + ".tmp")
    tmp.write_text(yaml.safe_dump(doc, sort_keys=False, allow_unicode=True, width=4096), encoding="utf-8")
    os.replace(tmp, manifest)
