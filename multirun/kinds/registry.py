"""Name -> implementation registries, extensible through entry points.

Built-ins are registered in code (lazily, as ``"module:attr"`` strings, so that
importing the registry imports no injector); third-party packages add their own
through the entry-point groups ``multirun.injectors``, ``multirun.monitors`` and
``multirun.payloads``. A name registered in code wins over an entry point of the
same name, so an installed plugin cannot silently replace a built-in.

Example:
    >>> from multirun.kinds.registry import injectors
    >>> "documents" in injectors.names()
    True
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from importlib import metadata, resources
from pathlib import Path
from types import ModuleType
from typing import Any, Generic, TypeVar

from multirun.errors import ConfigError

T = TypeVar("T")

__all__ = ["Registry", "injectors", "monitors", "payloads"]


def _import_target(target: str) -> Any:
    module, _, attr = target.partition(":")
    obj: Any = importlib.import_module(module)
    for part in attr.split(".") if attr else ():
        obj = getattr(obj, part)
    return obj


class Registry(Generic[T]):
    """A name -> object registry backed by code registrations and entry points.

    Args:
        group: entry-point group searched for names not registered in code.
        what: noun used in error messages ("injector kind").
        loader: turns an entry point into the registered object (default ``ep.load()``).
    """

    def __init__(self, group: str, *, what: str, loader: Callable[[metadata.EntryPoint], T] | None = None) -> None:
        self.group = group
        self.what = what
        self._loader = loader or (lambda ep: ep.load())
        self._entries: dict[str, T | str] = {}
        self._entry_points: dict[str, metadata.EntryPoint] | None = None
        self._loaded: dict[str, T] = {}  # objects loaded from entry points

    def register(self, name: str, obj: T | str | None = None, *, override: bool = False) -> Any:
        """Register ``obj`` (or a lazy ``"module:attr"`` string) under ``name``.

        Without ``obj`` it returns a class decorator:

            >>> reg = Registry("example.group", what="thing")
            >>> @reg.register("mine")
            ... class Mine: ...
            >>> reg.get("mine").__name__
            'Mine'
        """
        if obj is None:

            def decorator(o: T) -> T:
                self.register(name, o, override=override)
                return o

            return decorator
        if name in self._entries and self._entries[name] is not obj and not override:
            raise ValueError(f"{self.what} {name!r} is already registered; pass override=True to replace it")
        self._entries[name] = obj
        return obj

    def _eps(self) -> dict[str, metadata.EntryPoint]:
        if self._entry_points is None:  # scanning installed distributions is slow: do it once
            self._entry_points = {ep.name: ep for ep in metadata.entry_points(group=self.group)}
        return self._entry_points

    def refresh(self) -> None:
        """Forget cached entry points and what they loaded (after installing a plugin at run time)."""
        self._entry_points = None
        self._loaded.clear()

    def names(self) -> list[str]:
        """All known names, from code and entry points, sorted."""
        return sorted(set(self._entries) | set(self._eps()))

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and (name in self._entries or name in self._eps())

    def get(self, name: str, *, file: str | Path | None = None, key: str | None = None) -> T:
        """The object registered under ``name``.

        Raises:
            ConfigError: unknown name (listing the known ones) or a plugin that
                fails to import; ``file``/``key`` say where the name came from.
        """
        if name in self._entries:
            entry = self._entries[name]
            if isinstance(entry, str):
                try:
                    entry = _import_target(entry)
                except Exception as e:
                    raise ConfigError(
                        f"{self.what} {name!r} failed to import ({entry}): {e}", file=file, key=key
                    ) from e
                self._entries[name] = entry
            return entry
        if name in self._loaded:
            return self._loaded[name]
        ep = self._eps().get(name)
        if ep is None:
            known = ", ".join(self.names()) or "none"
            raise ConfigError(
                f"unknown {self.what} {name!r} (known: {known}; plugins add more via the entry-point group {self.group!r})",
                file=file,
                key=key,
            )
        try:
            obj = self._loader(ep)
        except Exception as e:
            raise ConfigError(
                f"{self.what} {name!r} from entry point {ep.value!r} failed to load: {e}", file=file, key=key
            ) from e
        self._loaded[name] = obj
        return obj


def payload_dir_from_entry_point(ep: metadata.EntryPoint) -> Path:
    """Directory of a payload package named by an entry point.

    The value is an object reference, as the entry-point specification requires:
    an importable package (``mypkg.payloads.canaries``, its directory holds
    ``payload.yaml``) or ``module:attr`` where the attribute is a path or a module.
    """
    value = ep.value.strip()
    if ":" in value:
        obj = ep.load()
        if isinstance(obj, ModuleType):
            return Path(str(resources.files(obj)))
        return Path(obj)
    return Path(str(resources.files(value)))


injectors: Registry[type] = Registry("multirun.injectors", what="injector kind")
monitors: Registry[type] = Registry("multirun.monitors", what="monitor")
payloads: Registry[Path] = Registry("multirun.payloads", what="payload package", loader=payload_dir_from_entry_point)

# Built-ins. Lazy strings: importing the registry must not import every injector.
injectors.register("documents", "injectors.documents:DocumentsInjector")
for _kind in ("contamination", "knowledge", "poison", "watermark", "memorization", "math", "muse"):
    injectors.register(_kind, f"injectors.{_kind}:{_kind.capitalize()}Injector")
    monitors.register(_kind, f"monitors.{_kind}:{_kind.capitalize()}Monitor")
monitors.register("documents", "monitors.documents:DocumentsMonitor")
injectors.register("removal", "injectors.removal:RemovalInjector")
monitors.register("removal", "monitors.removal:RemovalMonitor")
monitors.register("forgetting", "monitors.forgetting:ForgettingMonitor")
# replay's items are rows of the run's own data: the documents monitor scores them as texts.
injectors.register("replay", "injectors.replay:ReplayInjector")
monitors.register("replay", "monitors.documents:DocumentsMonitor")
