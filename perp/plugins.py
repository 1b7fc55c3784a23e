"""Plugins: a tiny name → implementation registry, shared by pruning and recovery methods.

`perp.prune.methods` and `perp.recover` each keep one (`METHODS`), keyed by the config key their names come from
(`prune.method`, `recover.method`). Not to be confused with the model registry, `perp.registry` (versions,
promotion, rollback).
"""

from __future__ import annotations

from typing import Callable, Generic, TypeVar

from perp.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps a method name to its implementation. `key` names the config key, for error messages."""

    def __init__(self, key: str) -> None:
        self.key = key
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(item: T) -> T:
            if name in self._items:
                raise RuntimeError(f"{self.key}: '{name}' is registered twice")
            self._items[name] = item
            return item

        return decorator

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def get(self, name: str) -> T:
        if name not in self._items:
            raise ConfigError(f"{self.key}: unknown method '{name}' (allowed: {', '.join(self.names())})")
        return self._items[name]
