"""A name -> factory table that imports its package's modules on first use.

Backbones, methods and region proposers each have one; adding one of them is
adding one module to its package (or registering from outside, or exposing a
factory through the entry-point group named below).
"""
from __future__ import annotations

import importlib
import pkgutil
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

from .errors import InputError


@dataclass(frozen=True)
class Entry:
    name: str
    factory: Callable[..., Any]
    summary: str = ""
    extra: str | None = None              # pip extra that provides its dependencies
    info: dict = field(default_factory=dict)


class Registry:
    def __init__(self, kind: str, package: str, entry_point_group: str, skip: tuple[str, ...] = ()):
        self.kind, self.package, self.group = kind, package, entry_point_group
        self.skip = set(skip) | {"registry", "base"}
        self._entries: dict[str, Entry] = {}
        self._loaded = False

    def register(self, name: str, *, summary: str = "", extra: str | None = None, **info) -> Callable:
        def deco(factory):
            old = self._entries.get(name)
            if old is not None and old.factory is not factory and \
                    getattr(old.factory, "__qualname__", None) != getattr(factory, "__qualname__", None):
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = Entry(name, factory, summary, extra, dict(info))
            return factory
        return deco

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        pkg = importlib.import_module(self.package)
        for mod in pkgutil.iter_modules(pkg.__path__):
            if mod.name not in self.skip and not mod.name.startswith("_"):
                importlib.import_module(f"{self.package}.{mod.name}")
        try:
            from importlib.metadata import entry_points
            eps = list(entry_points(group=self.group))
        except Exception:  # pragma: no cover - broken metadata
            eps = []
        for ep in eps:
            try:
                ep.load()
            except Exception as e:  # a broken plugin must not break the built-ins
                warnings.warn(f"fdseg: could not load {self.kind} plugin {ep.name!r}: {e}")

    def names(self) -> list[str]:
        self._load()
        return sorted(self._entries)

    def entry(self, name: str) -> Entry:
        self._load()
        if name not in self._entries:
            raise InputError(f"--{self.kind}", f"unknown {self.kind} {name!r} "
                                               f"(available: {', '.join(sorted(self._entries))})")
        return self._entries[name]

    def create(self, name: str, **kwargs):
        return self.entry(name).factory(**kwargs)
