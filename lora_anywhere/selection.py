"""Which layers (and which of their targets) a user means.

A selector is a layer type, a string or a predicate. A string is, in this order: a
preset a plugin registered ("attention"); a class name in the layer's MRO ("Conv2d",
or "torch.nn.modules.conv.Conv2d"); a glob on the module name ("layer4.*"); a regex
that matches the whole name ("blocks\\.[0-3]\\..*"). A string may end in ``:a,b`` to
adapt only those targets of the matched layers ("MultiheadAttention:q,v",
"*.attn:q,v"). A predicate ``f(name, module)`` returns True, False, or the target
names to adapt.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from torch import nn

from .errors import TargetError

#: A match: None for "not selected", ALL for every target, else the target names.
ALL = frozenset({"*"})
Match = frozenset | None


def _class_names(module: nn.Module) -> set[str]:
    names = set()
    for cls in type(module).__mro__:
        names.add(cls.__name__)
        names.add(f"{cls.__module__}.{cls.__qualname__}")
    return names


@dataclass
class Selector:
    """One compiled selector, remembering what it was written as."""

    spec: Any
    test: Callable[[str, nn.Module], Match]

    def __call__(self, name: str, module: nn.Module) -> Match:
        return self.test(name, module)

    def describe(self) -> str:
        spec = self.spec
        if isinstance(spec, type):
            return spec.__name__
        if callable(spec) and not isinstance(spec, str):
            return getattr(spec, "__name__", repr(spec))
        return repr(spec)


def compile_selector(spec: Any, presets: dict[str, Any]) -> Selector:
    if isinstance(spec, Selector):
        return spec
    if isinstance(spec, type):
        if not issubclass(spec, nn.Module):
            raise TargetError(f"target {spec!r} is a type but not an nn.Module subclass; pass a layer class such as nn.Conv2d")
        return Selector(spec, lambda name, m: ALL if isinstance(m, spec) else None)
    if isinstance(spec, str):
        return _string_selector(spec, presets)
    if callable(spec):

        def test(name: str, module: nn.Module) -> Match:
            result = spec(name, module)
            if result is True:
                return ALL
            if not result:
                return None
            return frozenset([result] if isinstance(result, str) else result)

        return Selector(spec, test)
    raise TargetError(
        f"cannot use {spec!r} as a target: pass a layer type (nn.Linear), a type name ('Conv2d'), "
        "a module-name glob or regex ('encoder.*'), or a predicate f(name, module)"
    )


def _string_selector(spec: str, presets: dict[str, Any]) -> Selector:
    if spec in presets:
        inner = presets[spec]
        if inner is None:
            return Selector(spec, lambda name, m: ALL)
        return Selector(spec, compile_many(inner, presets).match)
    pattern, _, parts = spec.partition(":")
    wanted = frozenset(p.strip() for p in parts.split(",") if p.strip()) if parts else ALL
    try:
        regex = re.compile(pattern)
    except re.error:
        regex = None

    def test(name: str, module: nn.Module) -> Match:
        hit = (
            pattern in _class_names(module)
            or fnmatch.fnmatchcase(name, pattern)
            or (regex is not None and regex.fullmatch(name) is not None)
        )
        return wanted if hit else None

    return Selector(spec, test)


@dataclass
class SelectorSet:
    selectors: list[Selector]

    def match(self, name: str, module: nn.Module) -> Match:
        """The union of what every selector asks for, or None."""
        found: set[str] | None = None
        for s in self.selectors:
            m = s(name, module)
            if m is None:
                continue
            if m is ALL or "*" in m:
                return ALL
            found = (found or set()) | set(m)
        return frozenset(found) if found is not None else None


def compile_many(spec: Any, presets: dict[str, Any]) -> SelectorSet:
    items: Iterable[Any] = spec if isinstance(spec, (list, tuple, set, frozenset)) else [spec]
    return SelectorSet([compile_selector(s, presets) for s in items])


def first_value(overrides: dict[Any, Any] | None, name: str, module: nn.Module, presets: dict[str, Any]) -> Any:
    """The value of the first override whose selector matches the layer, or None."""
    for spec, value in (overrides or {}).items():
        if compile_selector(spec, presets)(name, module) is not None:
            return value
    return None
