"""The pluggy hooks through which the built-in rules, domain plugins and third
parties extend lora_anywhere. Every hook receives a `register` callable, so a plugin
never imports the registry it feeds (the pattern of llm and tox)."""

from __future__ import annotations

from typing import Callable

import pluggy

PROJECT = "lora_anywhere"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def lora_anywhere_register_rules(register: Callable) -> None:
    """Register adapter rules: call ``register(layer_type, rule)`` once per layer type.

    Lookup walks the class MRO, so a rule for a base class covers its subclasses
    unless a more specific rule is registered for them.
    """


@hookspec
def lora_anywhere_register_model_sources(register: Callable) -> None:
    """Register model builders for specs such as ``torchvision:resnet50``:
    call ``register(prefix, build)`` where ``build(name, **kwargs)`` returns a model."""


@hookspec
def lora_anywhere_register_presets(register: Callable) -> None:
    """Register named target presets: call ``register(name, selector)``; a user then
    writes ``apply(model, targets="name")``."""


@hookspec
def lora_anywhere_register_tasks(register: Callable) -> None:
    """Register trainer tasks: call ``register(name, task)`` where ``task`` is a
    `lora_anywhere.Task` subclass instance (e.g. "node-classification")."""
