"""Registries: where a config value that names a plug-in is looked up (docs/DESIGN.md, "Registries").

A registry maps names to entries, each given as the entry itself or as ``"module:attribute"``,
imported the first time it is asked for: a registry line costs nothing until it is used, and it
can name code that the module holding the registry must not import (the transports live below
the config in the layering, and the config still checks a transport's name). A name that is not
registered may itself be ``"module:attribute"``: a plug-in that lives outside opsd, found the same
way in every process of a run (the driver and each Ray actor import it by that name).

Plug-ins of every kind share this shape; each kind's entries say what they need in their own
terms (an objective its batch columns, a transport its kind and devices).
"""

from __future__ import annotations

import importlib
from typing import Any, Generic, Iterator, TypeVar

T = TypeVar("T")


class RegistryError(ValueError):
    """A name that no registry entry answers to, or an entry that cannot be imported."""


def load_attribute(target: str) -> Any:
    """``"package.module:attribute"`` -> that object (``attribute`` may be dotted)."""
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise RegistryError(f"{target!r} is not of the form 'package.module:attribute'")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise RegistryError(f"{target!r}: cannot import {module_name} ({exc})") from exc
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise RegistryError(f"{target!r}: {module_name} has no attribute {attr!r}") from None
    return obj


class Registry(Generic[T]):
    """Named entries of one kind of plug-in, for the config key ``key``."""

    def __init__(self, key: str, entries: dict[str, T | str]):
        self.key = key
        self._entries: dict[str, T | str] = dict(entries)

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def get(self, name: str) -> T:
        """The entry registered as ``name``, or the object ``name`` points to when it has the form
        ``module:attribute``; a :class:`RegistryError` naming the config key otherwise."""
        if name in self._entries:
            entry = self._entries[name]
            if isinstance(entry, str):
                entry = self._entries[name] = load_attribute(entry)
            return entry
        if ":" in name:
            try:
                return load_attribute(name)
            except RegistryError as exc:
                raise RegistryError(f"config key '{self.key}': {exc}") from None
        raise RegistryError(f"config key '{self.key}' = {name!r}; expected one of {self.names()} or a plug-in "
                            "given as 'package.module:attribute'")
