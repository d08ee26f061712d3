"""One registry type for every place where things vary: backends, selection criteria, dataset
sources, defer losses and exit methods. A thing registers beside its own definition, as timm's
``@register_model`` does, and an unknown name gets the same one line everywhere: the kind, the
name asked for and the names known.
"""
from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

from .errors import TinysaverError, UsageError

T = TypeVar("T")


class Registry(Generic[T]):
    """Named things of one ``kind``. ``listed``: names known before they are imported (the modules
    of a package), and ``load(name)`` imports one of them, which registers it."""

    def __init__(self, kind: str, error: type[TinysaverError] = UsageError,
                 listed: Callable[[], tuple[str, ...]] | None = None, load: Callable[[str], object] | None = None):
        self.kind, self.error, self._listed, self._load = kind, error, listed, load
        self._items: dict[str, T] = {}

    def add(self, name: str, item: T) -> T:
        if name in self._items:
            raise self.error(f"{self.kind} {name!r} is registered twice")
        self._items[name] = item
        return item

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: register what it decorates as ``name``."""
        return lambda item: self.add(name, item)

    def names(self) -> tuple[str, ...]:
        """Every name without importing anything: the listed ones, then any registered from outside
        them (a user's own), in the order registered."""
        listed = self._listed() if self._listed else ()
        return (*listed, *(n for n in self._items if n not in listed))

    def get(self, name: str) -> T:
        if name not in self._items and self._load and name in self.names():
            self._load(name)
        if name not in self._items:
            raise self.error(f"unknown {self.kind} {name!r}; choose from {', '.join(self.names())}")
        return self._items[name]

    def remove(self, name: str) -> None:
        """Forget ``name`` (a test's own registration, say)."""
        self._items.pop(name, None)

    def __contains__(self, name: object) -> bool:
        return name in self.names()

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


__all__ = ["Registry"]
