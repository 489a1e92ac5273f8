"""A small name -> object registry that raises on duplicates and on unknown names.

A name can be *declared* with the module that registers it (``fedgan.catalog`` does this for
every built-in name); the module is imported the first time the name is asked for, so listing
the names of GAN families, strategies or metrics (what the config checks) never imports torch
or flwr.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to objects (classes, factories, functions) of one kind.

    Args:
        kind: What is registered, used in error messages (e.g. ``"GAN family"``).
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        self._declared: dict[str, str] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator registering ``obj`` under ``name``.

        Raises:
            ValueError: If ``name`` is already registered.
        """

        def decorator(obj: T) -> T:
            self.add(name, obj)
            return obj

        return decorator

    def add(self, name: str, obj: T) -> None:
        """Registers ``obj`` under ``name`` (a declared name is filled in by its module).

        Raises:
            ValueError: If ``name`` already has an object.
        """
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._items[name] = obj

    def remove(self, name: str) -> None:
        """Forgets a name registered at run time (a plugin unloading, a test cleaning up).

        Raises:
            KeyError: If ``name`` was not registered, or was declared (built-in names stay).
        """
        if name in self._declared or name not in self._items:
            raise KeyError(f"{self.kind} {name!r} is not a run-time registration")
        del self._items[name]

    def declare(self, name: str, module: str) -> None:
        """Declares that importing ``module`` registers ``name``; :meth:`get` imports it on
        first use, :meth:`names` lists it without importing anything.

        Raises:
            ValueError: If ``name`` is already declared or registered.
        """
        if name in self:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._declared[name] = module

    def declared_module(self, name: str) -> str | None:
        """The module declared to register ``name`` (None if it was registered directly)."""
        return self._declared.get(name)

    def get(self, name: str) -> T:
        """Returns the object registered as ``name``, importing its declared module if needed.

        Raises:
            KeyError: If ``name`` is unknown; the message lists the known names.
        """
        if name not in self._items and name in self._declared:
            importlib.import_module(self._declared[name])
            if name not in self._items:
                raise KeyError(
                    f"{self.kind} {name!r}: module {self._declared[name]!r} did not register it"
                )
        try:
            return self._items[name]
        except KeyError:
            raise KeyError(
                f"unknown {self.kind} {name!r}; known: {', '.join(self.names()) or '(none)'}"
            ) from None

    def names(self) -> list[str]:
        """The registered names, sorted (declared ones included, without importing them)."""
        return sorted({*self._items, *self._declared})

    def __contains__(self, name: object) -> bool:
        return name in self._items or name in self._declared

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
