"""The Trainer's optimizer: which parameters train at which learning rate.

Adapter factors and fully trained modules are different things to optimise. A and B
start at a random projection and at zero, and every step moves a low-rank update of a
frozen weight; a new head, a norm or a plain model's weights are trained as they are.
So the trainer puts them in separate parameter groups, each with its own default
rate, measured on real data and on the demo's tasks (`bench/quality.py`; the numbers
and why each default is what it is are in docs/trainer.md, "Learning rates"):

* ``adapter``: the A and B factors of every adapter;
* ``magnitude``: DoRA's per-row magnitudes;
* ``trainable``: the parameters of the ``trainable`` modules (and any other parameter
  of an adapted model that requires grad);
* ``model``: every parameter that requires grad in a model without an adapter.

By default B trains at 16× A's rate (LoRA+): under Adam each factor moves about one
learning rate per step whatever its gradient, so with A and B at one rate their
product B·A, and with it the size of each step of the update, keeps growing: on the
small tasks of `bench/quality.py` it ended 2–8× the size of the weight it adapts,
where full fine-tuning moved it 0.6–2×, and overfit or stalled. With A slow and B
fast it ends 2–4× (`bench/update_size.py`).
PiSSA's factors (``init="svd"``) start as the weight's principal part, not at B = 0,
which is what LoRA+ is built on: they keep one rate, 3e-2, for A and B, where PiSSA
measured better (bench/quality.py).

``lr=`` overrides the rates as a plain optimizer's rate would: one number is the rate
of every group, A and B alike; a mapping sets the groups it names. ``loraplus_ratio``
sets B's multiple of A's rate; left out, it is 16 while the adapter trains at its
default rate and 1 once ``lr`` gives the adapter a rate.

Weight decay is per group too (``weight_decay=``: one number for every group, or a
mapping) and off by default: decay on the factors alone, which bounds B·A, helped
where the update overgrew and cost the other tasks more (docs/trainer.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
from torch import nn

from .. import attach
from ..errors import ConfigError

ADAPTER, MAGNITUDE, TRAINABLE, MODEL = "adapter", "magnitude", "trainable", "model"
GROUPS = (ADAPTER, MAGNITUDE, TRAINABLE, MODEL)
#: The rate of each group when ``lr`` does not say otherwise (AdamW; bench/quality.py).
#: ``adapter`` is A's rate; B's is DEFAULT_LORAPLUS_RATIO times it.
DEFAULT_LR: dict[str, float] = {ADAPTER: 5e-3, MAGNITUDE: 3e-2, TRAINABLE: 3e-2, MODEL: 1e-2}
DEFAULT_LORAPLUS_RATIO = 16.0
#: The adapter's default rate, A and B alike, when it starts from the SVD (PiSSA).
SVD_ADAPTER_LR = 3e-2
#: Each group's weight decay when ``weight_decay`` does not say otherwise (decoupled
#: under AdamW): none, see above.
DEFAULT_WEIGHT_DECAY: dict[str, float] = dict.fromkeys(GROUPS, 0.0)
OPTIMIZERS = ("adamw", "adam", "sgd")
#: SGD's momentum when ``optimizer="sgd"``: plain SGD without it trains these models far slower.
SGD_MOMENTUM = 0.9

#: What `make_optimizer` accepts as ``optimizer``: a name, or a function of the groups.
OptimizerChoice = str | Callable[[list[dict[str, Any]]], torch.optim.Optimizer]


@dataclass
class Group:
    """One parameter group: its name (``"adapter"``, or ``"adapter A"``/``"adapter B"``
    under LoRA+), the default it takes its rate from, its parameters by name, its rate
    and its weight decay."""

    name: str
    kind: str
    params: list[tuple[str, nn.Parameter]]
    lr: float
    weight_decay: float = 0.0

    @property
    def size(self) -> int:
        return sum(p.numel() for _, p in self.params)


def classify(name: str, adapted: bool) -> str:
    """The group of a parameter, from its name: adapter factors and DoRA magnitudes
    live below a ``lora_adapters`` child (see `attach`)."""
    parts = name.split(".")
    if attach.ADAPTERS in parts:
        return MAGNITUDE if "magnitudes" in parts else ADAPTER
    return TRAINABLE if adapted else MODEL


def rates(lr: float | Mapping[str, float] | None, *, svd_init: bool = False) -> dict[str, float]:
    """Each group's rate: the defaults (the adapter's from `SVD_ADAPTER_LR` for PiSSA
    factors), one number for all, or the defaults with the groups a mapping names replaced."""
    return _by_group("lr", lr, {**DEFAULT_LR, ADAPTER: SVD_ADAPTER_LR} if svd_init else DEFAULT_LR)


def loraplus_ratio(ratio: float | None, lr: float | Mapping[str, float] | str | None, *, svd_init: bool = False) -> float:
    """B's multiple of A's rate: `ratio` if given; else the default while the adapter
    keeps its default rate, and 1 once `lr` sets it (a number, ``"find"``, or a
    mapping that names the adapter): a rate the user gives is the rate A and B take.
    PiSSA factors (`svd_init`) default to 1."""
    if ratio is not None:
        return float(ratio)
    default_rate = lr is None or (isinstance(lr, Mapping) and ADAPTER not in lr)
    return DEFAULT_LORAPLUS_RATIO if default_rate and not svd_init else 1.0


def decays(weight_decay: float | Mapping[str, float] | None) -> dict[str, float]:
    """Each group's weight decay, as `rates` gives rates."""
    return _by_group("weight_decay", weight_decay, DEFAULT_WEIGHT_DECAY)


def _by_group(option: str, value: float | Mapping[str, float] | None, defaults: Mapping[str, float]) -> dict[str, float]:
    if value is None:
        return dict(defaults)
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - set(GROUPS))
        if unknown:
            raise ConfigError(f"{option} has no group {', '.join(map(repr, unknown))}; the groups are {', '.join(GROUPS)}")
        return {**defaults, **{k: float(v) for k, v in value.items()}}
    return dict.fromkeys(GROUPS, float(value))


def parameter_groups(
    model: nn.Module,
    *,
    adapted: bool,
    lr: Mapping[str, float],
    weight_decay: Mapping[str, float] | None = None,
    loraplus_ratio: float = 1.0,
) -> list[Group]:
    """The parameters that require grad, in groups that have any, in a fixed order."""
    decay = weight_decay if weight_decay is not None else DEFAULT_WEIGHT_DECAY
    found: dict[str, list[tuple[str, nn.Parameter]]] = {kind: [] for kind in GROUPS}
    for name, p in model.named_parameters():
        if p.requires_grad:
            found[classify(name, adapted)].append((name, p))
    groups: list[Group] = []
    for kind in GROUPS:
        params = found[kind]
        if kind == ADAPTER and loraplus_ratio != 1.0:
            a = [(n, p) for n, p in params if n.endswith(".A")]
            b = [(n, p) for n, p in params if not n.endswith(".A")]
            groups += [
                Group("adapter A", kind, a, lr[kind], decay[kind]),
                Group("adapter B", kind, b, lr[kind] * loraplus_ratio, decay[kind]),
            ]
        else:
            groups.append(Group(kind, kind, params, lr[kind], decay[kind]))
    return [g for g in groups if g.params]


def make_optimizer(groups: list[Group], optimizer: OptimizerChoice) -> torch.optim.Optimizer:
    """The optimizer over `groups`: AdamW, Adam (weight decay as L2), SGD with momentum
    0.9, or ``optimizer(param_groups)`` for a function (e.g. a torch.optim class)."""
    param_groups = [{"params": [p for _, p in g.params], "lr": g.lr, "weight_decay": g.weight_decay, "name": g.name} for g in groups]
    if optimizer == "adamw":
        return torch.optim.AdamW(param_groups)
    if optimizer == "adam":
        return torch.optim.Adam(param_groups)
    if optimizer == "sgd":
        return torch.optim.SGD(param_groups, momentum=SGD_MOMENTUM)
    made = optimizer(param_groups)  # type: ignore[operator]
    if not isinstance(made, torch.optim.Optimizer):
        raise ConfigError(
            f"optimizer {getattr(optimizer, '__name__', optimizer)!r} returned {type(made).__name__}, not a torch.optim.Optimizer; "
            "pass a function of the parameter groups, e.g. torch.optim.RAdam or functools.partial(torch.optim.SGD, momentum=0.9)"
        )
    return made


def optimizer_name(optimizer: OptimizerChoice) -> str:
    return optimizer if isinstance(optimizer, str) else getattr(optimizer, "__name__", type(optimizer).__name__)


def describe(groups: list[Group], optimizer: torch.optim.Optimizer) -> str:
    """One line: the optimizer and each group's size and rate (as the run starts)."""
    parts = [
        f"{g.name} lr {pg['lr']:.3g}"
        + (f" weight decay {pg['weight_decay']:g}" if pg.get("weight_decay") else "")
        + f" ({g.size:,} parameters)"
        for g, pg in zip(groups, optimizer.param_groups)
    ]
    return f"optimizer {type(optimizer).__name__}: " + "; ".join(parts)


def setup(groups: list[Group], optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """What a checkpoint records of the optimizer, for `resume` to compare with."""
    return {"optimizer": type(optimizer).__name__, "groups": [[g.name, [n for n, _ in g.params]] for g in groups]}


def setup_difference(saved: Mapping[str, Any], current: Mapping[str, Any]) -> str | None:
    """How two optimizer setups differ, in words, or None if they match."""
    if saved["optimizer"] != current["optimizer"]:
        return f"optimizer {saved['optimizer']} in the checkpoint, {current['optimizer']} now"
    was, now = dict((n, p) for n, p in saved["groups"]), dict((n, p) for n, p in current["groups"])
    if list(was) != list(now):
        return f"parameter groups {', '.join(was) or 'none'} in the checkpoint, {', '.join(now) or 'none'} now"
    for name in was:
        if was[name] != now[name]:
            differ = sorted(set(was[name]) ^ set(now[name]))
            shown = ", ".join(differ[:3]) + (f" and {len(differ) - 3} more" if len(differ) > 3 else "")
            return f"group {name!r} trains {len(was[name])} tensors in the checkpoint, {len(now[name])} now" + (
                f" (differs in {shown})" if differ else " (in another order)"
            )
    return None
