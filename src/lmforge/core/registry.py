"""Name → builder registries, so configs can pick implementations by name."""

from __future__ import annotations

from typing import Callable, Generic, TypeVar

from lmforge.core.config import FieldValueError
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

    def get(self, name: str, key: str | None = None) -> T:
        """The entry registered as ``name``; else a ConfigError naming ``key`` (the config key or
        argument that chose the name, when given) and the known names."""
        if name not in self._items:
            raise ConfigError(f"{key}: {self._unknown(name)}" if key else self._unknown(name))
        return self._items[name]

    def check(self, name: str, key: str) -> None:
        """For a config's ``__post_init__``: unless ``name`` is registered, a FieldValueError
        that ``Config.from_dict`` reports under the full key (``optim.name: unknown ...``)."""
        if name not in self._items:
            raise FieldValueError(key, self._unknown(name))

    def _unknown(self, name: str) -> str:
        return f"unknown {self.kind} {name!r} (known: {', '.join(sorted(self._items))})"

    def names(self) -> list[str]:
        return sorted(self._items)
