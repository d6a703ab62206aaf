"""The registry that maps layer types to rules, and the plugin manager that fills it.

The built-in torch.nn rules are an ordinary plugin registered through the same hook
as everyone else's; a subclass finds its base class's rule through the MRO.
"""

from __future__ import annotations

import importlib.metadata
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

import pluggy
from torch import nn

from . import hookspecs
from .errors import PluginError
from .hookspecs import PROJECT
from .rule import Rule, rule_in_mro
from .rules import torch_nn

ENTRY_POINT_GROUP = PROJECT


@dataclass
class PluginInfo:
    """What `plugins()` reports for one plugin."""

    name: str
    status: str  # "active", "inactive" (its framework is not installed) or "failed"
    source: str  # "builtin", "entry point" or "runtime"
    rules: list[str] = field(default_factory=list)
    error: str | None = None

    def __str__(self) -> str:
        extra = f" — {self.error}" if self.error else ""
        return f"{self.name:<28} {self.status:<9} {self.source:<12} {len(self.rules)} rules{extra}"


class Registry:
    """Layer type → rule, filled by the `lora_anywhere_register_rules` hook."""

    def __init__(self) -> None:
        self._rules: dict[type, Rule] = {}
        self.presets: dict[str, Any] = {}
        self.model_sources: dict[str, Callable[..., nn.Module]] = {}
        self.tasks: dict[str, Any] = {}

    def register(self, layer_type: type, rule: Rule) -> None:
        if not isinstance(layer_type, type) or not issubclass(layer_type, nn.Module):
            raise PluginError(f"register() takes an nn.Module subclass, got {layer_type!r}")
        if not isinstance(rule, Rule):
            raise PluginError(f"register() takes a lora_anywhere.Rule instance, got {rule!r}")
        self._rules[layer_type] = rule

    def rule_for(self, module: nn.Module) -> Rule | None:
        return rule_in_mro(self._rules, module)


class _Plugins:
    """The one plugin manager and the registry built from it, made on first use."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._pm: pluggy.PluginManager | None = None
        self._registry: Registry | None = None
        self._infos: dict[str, PluginInfo] = {}

    def manager(self) -> pluggy.PluginManager:
        with self._lock:
            if self._pm is None:
                self._pm = self._make_manager()
            return self._pm

    def _make_manager(self) -> pluggy.PluginManager:
        pm = pluggy.PluginManager(PROJECT)
        pm.add_hookspecs(hookspecs)
        pm.register(torch_nn, name="torch.nn")
        self._infos["torch.nn"] = PluginInfo("torch.nn", "active", "builtin")
        for ep in _entry_points():
            if pm.get_plugin(ep.name) is not None or ep.name in self._infos:
                continue
            try:
                plugin = ep.load()
            except ModuleNotFoundError as exc:
                self._infos[ep.name] = PluginInfo(ep.name, "inactive", "entry point", error=f"needs {exc.name!r}, which is not installed")
                continue
            except Exception as exc:  # a broken plugin is reported, never fatal
                self._infos[ep.name] = PluginInfo(ep.name, "failed", "entry point", error=_one_line(exc))
                continue
            pm.register(plugin, name=ep.name)
            self._infos[ep.name] = PluginInfo(ep.name, "active", "entry point")
        pm.check_pending()
        return pm

    def register_plugin(self, plugin: object, name: str | None = None) -> str:
        with self._lock:
            pm = self.manager()
            registered = pm.register(plugin, name=name)
            if registered is None:
                raise PluginError(f"plugin {name or plugin!r} is already registered")
            try:
                pm.check_pending()
            except pluggy.PluginValidationError as exc:
                pm.unregister(name=registered)
                known = ", ".join(sorted(n for n in dir(hookspecs) if n.startswith("lora_anywhere_")))
                raise PluginError(f"plugin {registered!r}: {exc}; the hooks are {known}") from exc
            self._infos[registered] = PluginInfo(registered, "active", "runtime")
            self._registry = None
            return registered

    def unregister_plugin(self, name: str) -> None:
        with self._lock:
            pm = self.manager()
            if pm.get_plugin(name) is None:
                raise PluginError(f"no plugin named {name!r} is registered")
            pm.unregister(name=name)
            self._infos.pop(name, None)
            self._registry = None

    def registry(self) -> Registry:
        with self._lock:
            if self._registry is None:
                self._registry = self._build_registry()
            return self._registry

    def _build_registry(self) -> Registry:
        pm = self.manager()
        registry = Registry()
        sinks = {
            "lora_anywhere_register_rules": None,  # per plugin, below
            "lora_anywhere_register_presets": registry.presets.__setitem__,
            "lora_anywhere_register_model_sources": registry.model_sources.__setitem__,
            "lora_anywhere_register_tasks": registry.tasks.__setitem__,
        }
        for info in self._infos.values():
            info.rules = []
        # Each implementation is called on its own, in registration order (so a later
        # plugin overrides an earlier one for the same layer type), and one that
        # raises is reported and skipped rather than taking the others down.
        for hook_name, sink in sinks.items():
            for impl in getattr(pm.hook, hook_name).get_hookimpls():
                info = self._infos.setdefault(impl.plugin_name, PluginInfo(impl.plugin_name, "active", "runtime"))
                if info.status == "failed":
                    continue
                staged: list[tuple[Any, Any]] = []
                try:
                    impl.function(register=lambda *item: staged.append(item))  # noqa: B023 (called at once)
                    for item in staged:  # only a hook that finished registers anything
                        if sink is not None:
                            sink(*item)
                        else:
                            registry.register(*item)
                            info.rules.append(f"{item[0].__module__}.{item[0].__qualname__}")
                except Exception as exc:
                    info.status, info.error, info.rules = "failed", _one_line(exc), []
        return registry

    def infos(self) -> list[PluginInfo]:
        self.registry()
        return list(self._infos.values())

    def reset(self) -> None:
        with self._lock:
            self._pm, self._registry, self._infos = None, None, {}


def _entry_points() -> list[importlib.metadata.EntryPoint]:
    return list(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0]


_PLUGINS = _Plugins()


def registry() -> Registry:
    """The registry built from every active plugin."""
    return _PLUGINS.registry()


def plugins() -> list[PluginInfo]:
    """Every plugin lora_anywhere knows of, with its status and the layer types it registered."""
    return _PLUGINS.infos()


def register_plugin(plugin: object, name: str | None = None) -> str:
    """Register a plugin object (a module or an instance with `@hookimpl` methods) at run time."""
    return _PLUGINS.register_plugin(plugin, name)


def unregister_plugin(name: str) -> None:
    _PLUGINS.unregister_plugin(name)
