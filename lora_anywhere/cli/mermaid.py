"""An adapted model as a Mermaid flowchart: the module tree, with each layer marked
adapted (rank and targets), trained fully (a `trainable` module) or frozen.

The tree of modules rather than the data flow: it needs no tracing, so it works for
every model (data-dependent control flow, PyG message passing, HF outputs). Modules
without parameters (activations, pooling) are left out, and subtrees below
``depth`` are folded into their parent with a count of what they hold.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from .. import attach
from ..errors import LoraError
from ..state import adapted_layers, model_state

STYLES = {
    "adapted": "fill:#d3f9d8,stroke:#2b8a3e,color:#000",
    "trainable": "fill:#fff3bf,stroke:#e67700,color:#000",
    "frozen": "fill:#f1f3f5,stroke:#868e96,color:#000",
}


@dataclass
class _Node:
    name: str
    module: nn.Module
    children: list[_Node] = field(default_factory=list)


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace('"', "#quot;").replace("<", "&lt;").replace(">", "&gt;")


def mermaid(model: nn.Module, depth: int | None = 3, direction: str = "LR") -> str:
    """The Mermaid source (``flowchart``) of `model`'s module tree, down to `depth`
    levels below the root (None: all). Paste it into a ```` ```mermaid ```` block of a
    Markdown file, or https://mermaid.live, to see it drawn."""
    if depth is not None and depth < 1:
        raise LoraError(f"depth must be at least 1 (or None for every level), got {depth}")
    adapters: dict[str, str] = {}
    for name, _, by_name in adapted_layers(model):
        parts = []
        for adapter_name, adapter in by_name.items():
            ranks = sorted({f.rank for f in adapter.factors.values()})
            rank = "/".join(map(str, ranks))
            prefix = "" if adapter_name == "default" else f"{adapter_name}: "
            parts.append(f"{prefix}LoRA r={rank} on {','.join(adapter.targets)}")
        adapters[name] = "; ".join(parts)
    state = model_state(model)
    trainable = {m for config in (state.adapters.values() if state else []) for m in config.trainable}

    root = _Node("", model)
    index = {"": root}
    for name, module in model.named_modules():
        if not name or attach.ADAPTERS in name.split(".") or not any(True for _ in module.parameters()):
            continue
        parent = name.rpartition(".")[0]
        while parent not in index:  # a parameterless container between two that have some
            parent = parent.rpartition(".")[0]
        node = _Node(name, module)
        index[parent].children.append(node)
        index[name] = node

    lines = [f"flowchart {direction}"]
    ids: dict[str, str] = {}

    def under(name: str, prefixes: set[str] | dict[str, str]) -> bool:
        return any(name == p or name.startswith(p + ".") for p in prefixes)

    def label(node: _Node, folded: bool) -> tuple[list[str], str]:
        kind = type(node.module).__name__
        title = f"{node.name.rpartition('.')[2]}: {kind}" if node.name else kind
        if node.name in adapters:
            return [title, adapters[node.name]], "adapted"
        if node.name and under(node.name, trainable):
            return [title, "trained fully"], "trainable"
        if folded:
            inner = sum(1 for n in adapters if n.startswith(node.name + "."))
            return ([title, f"{inner} adapted layer{'s' if inner > 1 else ''} inside"], "adapted") if inner else ([title], "frozen")
        return [title], "frozen"

    def walk(node: _Node, level: int) -> None:
        ids[node.name] = node_id = f"n{len(ids)}"
        folded = depth is not None and level >= depth and bool(node.children)
        parts, style = label(node, folded)
        lines.append(f'    {node_id}["{"<br/>".join(map(_escape, parts))}"]:::{style}')
        if folded:
            return
        for child in node.children:
            walk(child, level + 1)
            lines.append(f"    {node_id} --> {ids[child.name]}")

    walk(root, 0)
    lines.extend(f"    classDef {name} {style}" for name, style in STYLES.items())
    return "\n".join(lines)
