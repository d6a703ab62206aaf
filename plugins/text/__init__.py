"""lora_anywhere plugin for Hugging Face transformers.

Almost every transformers model is built from ``nn.Linear``, ``nn.Embedding`` and
``nn.Conv1d``, which the core already covers (its weight property also reaches code
that reads ``module.weight`` directly). What this plugin adds:

* a rule for ``transformers.pytorch_utils.Conv1D`` (GPT-2, OpenAI GPT, ImageGPT,
  Decision Transformer, CLVP): a linear layer whose weight is stored in × out;
* the ``text-attention`` and ``text-mlp`` presets, by module name, for the naming
  conventions of the common families;
* the ``hf`` model source: ``hf:BertModel`` builds that class from a tiny config
  (random weights, nothing downloaded).

Tied weights (input embeddings and an LM head sharing one Parameter) need nothing
here: the core gives a shared tensor one adapter, on the first module that selects it,
and every holder of the tensor reads the same W + ΔW.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Sequence

import torch
import transformers  # inactive when transformers is not installed
from torch import nn
from transformers.pytorch_utils import Conv1D

from lora_anywhere import LoraError, Rule, Target, hookimpl
from lora_anywhere.rules.torch_nn import linear_rows, many_rows

#: The one target of a layer that adapts its whole `weight`.
WEIGHT_TARGET = (Target("weight", "weight"),)


class Conv1DRule(Rule):
    """``y = x W + b`` with W stored in × out (``addmm(b, x, W)``).

    The rule's matrix is the stored in × out tensor, so ΔW = s·B A with B (in × r)
    and A (r × out): an exact low-rank update of the same layer. On activations the
    term is ``s · (x B) A``. B starts at zero, so here it is the input-side factor
    that starts at zero (loralib and PEFT zero the output side); both are rank-r
    updates starting from ΔW = 0 and train the same subspace family.
    """

    name = "transformers.Conv1D"
    activation_base = Conv1D

    def targets(self, layer: nn.Module) -> Sequence[Target]:
        return WEIGHT_TARGET

    def weight_cheaper_without_grad(self, layer, weight, x):  # type: ignore[override]
        return many_rows(linear_rows(x), *weight.shape)

    def output_dim(self, layer: nn.Module, target: Target) -> int:
        return 1  # stored in × out

    def forward(self, layer, weight, terms, x):  # type: ignore[override]
        size_out = x.size()[:-1] + (layer.nf,)
        x2d = x.view(-1, x.size(-1))
        y = torch.addmm(layer.bias, x2d, weight)
        for t in terms:  # dropout (and per-sample selection) on x itself: its first dim is the batch
            y = y + (t.dropout(x).reshape(x2d.shape) @ t.b) @ (t.a * t.scale)
        return y.view(size_out)


#: Last name part of attention projections: BERT/RoBERTa/ViT (query, key, value,
#: attention.output.dense), DistilBERT (q_lin…), GPT-2 (attn.c_attn, attn.c_proj),
#: T5 (q, k, v, o), BART/Whisper/Llama/OPT (q_proj, k_proj, v_proj, out_proj, o_proj).
ATTENTION_NAMES = re.compile(
    r"(.*\.)?(query|key|value|q|k|v|o|q_proj|k_proj|v_proj|o_proj|out_proj|q_lin|k_lin|v_lin|out_lin|qkv_proj|c_attn)"
    r"|.*attention\.output\.dense|.*\.attn\.c_proj"
)
#: Feed-forward layers: BERT (intermediate.dense, output.dense), GPT-2 (mlp.c_fc,
#: mlp.c_proj), T5 (wi, wi_0, wi_1, wo), BART/Whisper (fc1, fc2), Llama
#: (gate_proj, up_proj, down_proj), DistilBERT (lin1, lin2).
MLP_NAMES = re.compile(
    r"(.*\.)?(fc1|fc2|wi|wi_0|wi_1|wo|gate_proj|up_proj|down_proj|lin1|lin2|c_fc|dense_h_to_4h|dense_4h_to_h)"
    r"|.*\.intermediate\.dense|.*(?<!attention)\.output\.dense|.*\.mlp\.c_proj"
)


def _preset(pattern: re.Pattern[str]) -> Callable[[str, nn.Module], bool]:
    def select(name: str, module: nn.Module) -> bool:
        return isinstance(module, (nn.Linear, Conv1D)) and pattern.fullmatch(name) is not None

    select.__name__ = pattern.pattern[:40]
    return select


#: Small sizes under the names the common config classes use; a config takes those
#: it knows (directly or through its ``attribute_map``).
TINY: dict[str, Any] = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "num_key_value_heads": 2,
    "encoder_layers": 2,
    "decoder_layers": 2,
    "num_decoder_layers": 2,
    "encoder_attention_heads": 2,
    "decoder_attention_heads": 2,
    "encoder_ffn_dim": 64,
    "decoder_ffn_dim": 64,
    "d_ff": 64,
    "d_kv": 16,
    "n_inner": 64,
    "hidden_dim": 64,  # DistilBERT's feed-forward size
    "image_size": 32,
    "patch_size": 8,
}


def tiny_config(config_class: type, **overrides: Any) -> Any:
    """A config of ``config_class`` with every size it knows from `TINY`, then ``overrides``."""
    default = config_class()
    known = {k: v for k, v in TINY.items() if hasattr(default, k)}
    return config_class(**{**known, **overrides})


def build(name: str, **kwargs: Any) -> nn.Module:
    """``hf:<ModelClass>`` → that class on a tiny config; kwargs override config fields.

    Composite configs (CLIP's text_config/vision_config…) keep their sub-configs'
    default sizes: pass those sub-configs as kwargs."""
    cls = getattr(transformers, name, None)
    config_class = getattr(cls, "config_class", None)
    if not isinstance(cls, type) or not issubclass(cls, nn.Module) or config_class is None:
        raise LoraError(f"transformers has no model class {name!r} (e.g. 'BertModel', 'GPT2LMHeadModel', 'T5Model', 'WhisperModel')")
    return cls(tiny_config(config_class, **kwargs))


@hookimpl
def lora_anywhere_register_rules(register: Callable[[type, Rule], None]) -> None:
    register(Conv1D, Conv1DRule())


@hookimpl
def lora_anywhere_register_presets(register: Callable[[str, Any], None]) -> None:
    register("text-attention", _preset(ATTENTION_NAMES))
    register("text-mlp", _preset(MLP_NAMES))


@hookimpl
def lora_anywhere_register_model_sources(register: Callable[[str, Callable[..., nn.Module]], None]) -> None:
    register("hf", build)
