"""Name → builder registries, so configs can pick implementations by name."""

from __future__ import annotations

from typing import Callable, Generic, TypeVar

from lmforge.core.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(item: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self._items[name] = item
            return item

        return decorator

    def get(self, name: str) -> T:
        if name not in self._items:
            known = ", ".join(sorted(self._items))
            raise ConfigError(f"unknown {self.kind} {name!r} (known: {known})")
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)
