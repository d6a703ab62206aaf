"""What each option allows, declared once, and one check that runs before anything
happens.

The Trainer and every section of a `lora-anywhere train` config describe their
options as `Kind`s: a test and the words for it ("an integer ≥ 1"). `check` runs a
whole set of values against them and raises one `ConfigError` naming the option,
the value and what is allowed, so a typo in a config (``seed = "0"``) is a one-line
message instead of a traceback minutes into a run.
"""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from ..errors import ConfigError
from .optim import GROUPS, OPTIMIZERS


@dataclass(frozen=True)
class Kind:
    """What an option allows: `test(value)` and how to say it."""

    test: Callable[[Any], bool]
    words: str

    def __or__(self, other: Kind) -> Kind:
        return Kind(lambda v: self.test(v) or other.test(v), f"{self.words} or {other.words}")

    def __call__(self, value: Any) -> bool:
        return self.test(value)


def _real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def integer(minimum: int | None = None) -> Kind:
    """A whole number (never a bool, a float or a string), at least `minimum`."""

    def test(v: Any) -> bool:
        return isinstance(v, numbers.Integral) and not isinstance(v, bool) and (minimum is None or v >= minimum)

    return Kind(test, "an integer" + (f" ≥ {minimum}" if minimum is not None else ""))


def number(minimum: float | None = None, *, above: bool = False, below: float | None = None) -> Kind:
    """A finite real number ≥ `minimum` (> with `above`), and < `below`."""
    low = "" if minimum is None else f" {'>' if above else '≥'} {minimum:g}"
    high = "" if below is None else f" and < {below:g}"

    def test(v: Any) -> bool:
        if not _real(v):
            return False
        if minimum is not None and (v <= minimum if above else v < minimum):
            return False
        return below is None or v < below

    words = f"a number in [{minimum:g}, {below:g})" if minimum is not None and below is not None and not above else "a number" + low + high
    return Kind(test, words)


def choice(*values: Any) -> Kind:
    return Kind(lambda v: isinstance(v, str) and v in values, "one of " + ", ".join(repr(v) for v in values))


def instance(types: type | tuple[type, ...], words: str) -> Kind:
    return Kind(lambda v: isinstance(v, types) and not (isinstance(v, bool) and bool not in _tuple(types)), words)


def _tuple(types: type | tuple[type, ...]) -> tuple[type, ...]:
    return types if isinstance(types, tuple) else (types,)


def strings(*, empty: bool = True) -> Kind:
    """A list of strings (non-empty unless `empty`)."""
    return Kind(
        lambda v: isinstance(v, (list, tuple)) and (empty or len(v) > 0) and all(isinstance(i, str) for i in v),
        "a list of strings" if empty else "a non-empty list of strings",
    )


def table(keys: Kind, values: Kind) -> Kind:
    """A mapping (a TOML table, a dict) whose keys and values have these kinds."""
    return Kind(
        lambda v: isinstance(v, Mapping) and all(keys(k) and values(x) for k, x in v.items()),
        f"a table of {keys.words} → {values.words}",
    )


def listing(items: Kind, words: str) -> Kind:
    """A non-empty list whose items have the kind `items`."""
    return Kind(lambda v: isinstance(v, (list, tuple)) and len(v) > 0 and all(items(i) for i in v), words)


NONE = Kind(lambda v: v is None, "None")
BOOLEAN = Kind(lambda v: isinstance(v, bool), "true or false")
TEXT = Kind(lambda v: isinstance(v, str) and v != "", "a non-empty string")
FOLDER = Kind(lambda v: isinstance(v, (str, os.PathLike)) and str(v) != "", "a folder path")
FUNCTION = Kind(lambda v: callable(v) and not isinstance(v, (str, type(None))), "a function")


def shown(value: Any) -> str:
    """A value as an error message shows it: its repr and its type."""
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({type(value).__name__})"


def check(values: Mapping[str, Any], kinds: Mapping[str, Kind], *, where: str = "") -> None:
    """Raise `ConfigError` for the first value its option's kind does not allow.
    Options without a declared kind are left to their user."""
    for name, value in values.items():
        kind = kinds.get(name)
        if kind is not None and not kind(value):
            raise ConfigError(f"{where}{name} must be {kind.words}, got {shown(value)}")


# ---------------------------------------------------------------------- the Trainer's options


def _device(value: Any) -> bool:
    import torch

    if isinstance(value, torch.device) or value == "auto":
        return True
    try:
        return isinstance(value, str) and torch.device(value) is not None
    except (RuntimeError, TypeError):
        return False


POSITIVE = number(0, above=True)
NON_NEGATIVE = number(0)
#: Every keyword option of `Trainer` (tests/test_trainer_options.py checks that none is
#: missing).
TRAINER: dict[str, Kind] = {
    "task": TEXT | Kind(lambda v: callable(v) or hasattr(v, "step"), "a Task or a function loss = fn(model, batch)"),
    "epochs": integer(1),
    "lr": Kind(
        (NONE | POSITIVE | choice("find") | table(choice(*GROUPS), POSITIVE)).test,
        f"a number > 0, 'find', None (the measured defaults) or a table of rates by group ({', '.join(GROUPS)})",
    ),
    "loraplus_ratio": Kind((NONE | POSITIVE).test, "a number > 0, or None (16 at the default rates, 1 once lr sets the adapter's rate)"),
    "optimizer": choice(*OPTIMIZERS) | FUNCTION,
    "weight_decay": Kind(
        (NONE | NON_NEGATIVE | table(choice(*GROUPS), NON_NEGATIVE)).test,
        f"a number >= 0, None (0 for every group) or a table of weight decays by group ({', '.join(GROUPS)})",
    ),
    "batch_size": integer(1),
    "grad_accum": integer(1),
    "clip": NONE | POSITIVE,
    "warmup": NON_NEGATIVE,
    "schedule": choice("cosine", "linear", "constant"),
    "precision": choice("auto", "bf16", "fp32"),
    "device": Kind(_device, "'auto', 'cpu', 'cuda', 'cuda:N' or another torch device"),
    "seed": integer(0),
    "out_dir": NONE | FOLDER,
    "log_format": choice("csv", "jsonl"),
    "progress": NONE | BOOLEAN,
    "monitor": TEXT,
    "patience": NONE | integer(1),
    "resume": BOOLEAN,
    "num_workers": integer(0),
    "adapter": NONE | TEXT,
    "find_unused_parameters": NONE | BOOLEAN,
    "regularizer": NONE | FUNCTION,
    "regularizer_weight": NON_NEGATIVE,
    "weight": NONE | NON_NEGATIVE,
    "save_every": integer(1),
    "plot_every": NONE | integer(1),
    "tensorboard": BOOLEAN,
    "class_names": NONE | strings(),
    "strategy": choice("ddp", "fsdp"),
}
