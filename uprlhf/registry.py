"""One registry type for every name → implementation table of the library.

A registry maps names (what a config says: ``penalty.name: up_rlhf``) to entries
(a function, a class, or an entry object built from it with its metadata)::

    PENALTIES: Registry[Penalty] = Registry("penalty", make=Penalty.of)

    @PENALTIES.register("lcb", non_negative=("lam",))
    def _lcb(mean, std, *, lam=1.0): ...

    PENALTIES.get("lcb")      # the entry; an unknown name raises UnknownName
    PENALTIES.names()         # ('mean', 'lcb', ...) in registration order

Config fields name registry entries with ``registry_name("module:ATTR")``: a ``str``
checked against the registry when validated. The registry is looked up by import
path, on first use, because the modules that hold registries import the configs.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Generic, TypeVar, get_args, get_origin

from pydantic import AfterValidator

T = TypeVar("T")
O = TypeVar("O")


class UnknownName(LookupError, ValueError):
    """A name that is not in a registry; the message lists the allowed names."""


def _allowed(names: Sequence[str]) -> str:
    return ", ".join(repr(n) for n in names)


class Registry(Generic[T]):
    """Named entries of one ``kind`` ("penalty", "ensemble kind", ...), in registration order.

    ``make(name, obj, **metadata)`` turns what is registered into the stored entry
    (and may check the metadata); without it the object itself is stored and a
    registration takes no metadata.
    """

    def __init__(self, kind: str, *, make: Callable[..., T] | None = None) -> None:
        self.kind = kind
        self._make = make
        self._entries: dict[str, T] = {}

    def register(self, name: str, **metadata: Any) -> Callable[[O], O]:
        """Decorator: add the decorated object under ``name``; returns it unchanged."""

        def decorate(obj: O) -> O:
            self.add(name, obj, **metadata)
            return obj

        return decorate

    def add(self, name: str, obj: Any, **metadata: Any) -> T:
        """Add ``obj`` under ``name`` (a duplicate name is a ValueError) and return its entry."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind} name must be a non-empty string, got {name!r}")
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        if self._make is not None:
            entry = self._make(name, obj, **metadata)
        elif metadata:
            raise TypeError(f"{self.kind} registry takes no metadata, got {sorted(metadata)}")
        else:
            entry = obj
        self._entries[name] = entry
        return entry

    def unregister(self, name: str) -> None:
        """Remove ``name`` (for tests that register a throwaway entry)."""
        self.get(name)
        del self._entries[name]

    def get(self, name: str) -> T:
        """The entry called ``name``; ``UnknownName`` (a ValueError) lists the allowed names."""
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise UnknownName(f"unknown {self.kind} {name!r}; allowed: {_allowed(self.names())}") from None

    __getitem__ = get

    def check(self, name: str) -> str:
        """``name`` if it is registered, else ``UnknownName``: a pydantic ``AfterValidator``."""
        self.get(name)
        return name

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def items(self) -> list[tuple[str, T]]:
        return list(self._entries.items())

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(tuple(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self._entries)})"


@dataclass(frozen=True)
class RegistryRef:
    """A registry named by import path, ``"package.module:ATTRIBUTE"``, resolved on first use.

    ``extra`` are values a config field accepts besides the registry's names
    (``selector.strategy: off``). It is the metadata ``describe`` reads to list the
    allowed values of a field.
    """

    path: str
    extra: tuple[str, ...] = ()

    def registry(self) -> Registry:
        module, _, attribute = self.path.partition(":")
        found = getattr(importlib.import_module(module), attribute)
        if not isinstance(found, Registry):
            raise TypeError(f"{self.path} is not a Registry")
        return found

    def names(self) -> tuple[str, ...]:
        return (*self.extra, *self.registry().names())

    def check(self, name: str) -> str:
        if name in self.extra:
            return name
        registry = self.registry()
        if name not in registry:
            raise UnknownName(f"unknown {registry.kind} {name!r}; allowed: {_allowed(self.names())}")
        return name


def registry_name(registry: str | Registry, *extra: str) -> Any:
    """A config field type: a ``str`` that must name an entry of ``registry`` (or be one of ``extra``).

    ``registry`` is the registry itself, or its import path ``"module:ATTR"`` where
    the registry's module imports the config (the usual case).
    """
    if isinstance(registry, Registry):
        holder = registry

        class _Direct(RegistryRef):
            def registry(self) -> Registry:
                return holder

        ref: RegistryRef = _Direct(f"<{registry.kind}>", tuple(extra))
    else:
        if ":" not in registry:
            raise ValueError(f"registry path {registry!r} must be 'module:ATTRIBUTE'")
        ref = RegistryRef(registry, tuple(extra))
    return Annotated[str, AfterValidator(ref.check), ref]


class RegistryNames(Sequence[str]):
    """The names of a registry (import path), read when first used: a tuple-like constant."""

    def __init__(self, path: str) -> None:
        self._ref = RegistryRef(path)

    def _names(self) -> tuple[str, ...]:
        return self._ref.names()

    def __getitem__(self, index):  # type: ignore[override]
        return self._names()[index]

    def __len__(self) -> int:
        return len(self._names())

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __contains__(self, name: object) -> bool:
        return name in self._names()

    def __eq__(self, other: object) -> bool:
        return tuple(self) == (tuple(other) if isinstance(other, Sequence) and not isinstance(other, str) else other)

    def __hash__(self) -> int:
        return hash(self._ref.path)

    def __repr__(self) -> str:
        return repr(self._names())


def find_registry(annotation: Any, metadata: Sequence[object] = ()) -> RegistryRef | None:
    """The ``RegistryRef`` that ``registry_name`` put in a field's metadata or type (``list[Name]``), if any."""
    for item in metadata:
        if isinstance(item, RegistryRef):
            return item
    for arg in get_args(annotation):
        if isinstance(arg, RegistryRef):
            return arg
        if get_origin(arg) is not None or get_args(arg):
            found = find_registry(arg)
            if found is not None:
                return found
    return None
