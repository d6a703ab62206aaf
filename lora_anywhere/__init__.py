"""lora_anywhere: exact, fast LoRA adapters for any PyTorch model.

import lora_anywhere as la
la.apply(model, rank=8)          # adapters on every layer a rule knows; base frozen
...train...
la.save_adapter(model, "adapter/")
la.load_adapter(base_model, "adapter/")   # also reads Hugging Face PEFT LoRA folders
la.save_adapter(model, "peft/", format="peft")  # a folder peft.PeftModel.from_pretrained loads
la.merge(model); la.remove(model)
"""

from .api import adapter_names, apply, merge, remove, unmerge
from .errors import (
    AdapterFileError,
    AlreadyAdaptedError,
    ExportError,
    LazyLayerError,
    LoraError,
    NotAdaptedError,
    RankError,
    ShapeMismatchError,
    ShardingError,
    TargetError,
)
from .hookspecs import hookimpl
from .io import adapter_state_dict, load_adapter, save_adapter
from .named import active_adapters, combine, delete_adapter, disabled, set_adapter
from .registry import plugins, register_plugin, unregister_plugin
from .rule import Rule, Target
from .rules.torch_nn import ConvRule, LinearRule
from .serving import hotswap_adapter, per_sample
from .sharding import shard
from .summary import Summary, summary
from .training import regularize as regularize  # modules, reached as la.regularize and la.tasks
from .training import tasks as tasks
from .training.lr_finder import RangeTest, find_lr
from .training.rank_selection import RankSelection, select_rank
from .training.tasks import Task
from .training.trainer import Trainer
from .version import __version__

__all__ = [
    "__version__",
    "apply",
    "merge",
    "unmerge",
    "remove",
    "adapter_names",
    "set_adapter",
    "active_adapters",
    "disabled",
    "delete_adapter",
    "combine",
    "select_rank",
    "RankSelection",
    "save_adapter",
    "load_adapter",
    "adapter_state_dict",
    "summary",
    "Summary",
    "shard",
    "per_sample",
    "hotswap_adapter",
    "Trainer",
    "Task",
    "find_lr",
    "RangeTest",
    "plugins",
    "register_plugin",
    "unregister_plugin",
    "hookimpl",
    "Rule",
    "Target",
    "LinearRule",
    "ConvRule",
    "LoraError",
    "TargetError",
    "RankError",
    "AlreadyAdaptedError",
    "NotAdaptedError",
    "LazyLayerError",
    "AdapterFileError",
    "ShapeMismatchError",
    "ExportError",
    "ShardingError",
]
