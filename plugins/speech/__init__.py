"""lora_anywhere plugin for torchaudio.

torchaudio's models are built from torch.nn layers, which the core already covers
exactly, including the cases that look special:

* WavLM's attention reads ``attention.in_proj_weight`` with ``F.linear`` and calls
  ``scaled_dot_product_attention`` itself; the core's weight property hands that read
  W + ΔW for the q, k and v blocks, and ``out_proj`` is called as a module. Its
  relative position bias table ``rel_attn_embed`` is an ``nn.Embedding`` (buckets ×
  heads), computed in the first layer and passed on to the others: it is adapted like
  any embedding (rank ≤ heads, a few hundred parameters); exclude it with
  ``exclude="*.rel_attn_embed"`` to keep the positional prior fixed.
* The convolutional positional embedding is weight-normed (``parametrizations.weight_norm``,
  or the old ``nn.utils.weight_norm`` hook in older releases): the core adapts v, so
  the norm is applied on top of the adapted direction and survives merging.
* Conformer's depthwise Conv1d, ConvTasNet's ConvTranspose1d, DeepSpeech's and
  WaveRNN's RNNs, HDemucs' convs and LSTMs: plain torch.nn layers.

The only torchaudio module holding a weight matrix of its own is HuBERT's pre-training
``LogitGenerator`` (its label embeddings), which gets a rule here. The other raw
Parameters (WavLM's ``gru_rel_pos_const``, HDemucs' ``LayerScale.scale``, the mask
embedding) are per-channel vectors, not matrices.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torchaudio  # inactive when torchaudio is not installed
from torch import nn
from torchaudio.models.wav2vec2.components import LogitGenerator

from lora_anywhere import LoraError, Rule, Target, hookimpl


class LabelEmbeddingRule(Rule):
    """HuBERT pre-training's ``LogitGenerator.label_embeddings`` (classes × final_dim),
    read directly by its forward for the cosine logits. Weight path: every reader
    sees W + ΔW. Its ``final_proj`` is an nn.Linear and is adapted on its own."""

    name = "torchaudio.LogitGenerator"

    def targets(self, layer: nn.Module) -> Sequence[Target]:
        return (Target("labels", "label_embeddings"),)


def build(name: str, **kwargs: Any) -> nn.Module:
    """``torchaudio:<factory>`` → ``torchaudio.models.<factory>(**kwargs)``: random weights."""
    factory = getattr(torchaudio.models, name, None)
    if not callable(factory) or name.startswith("_"):
        raise LoraError(f"torchaudio.models has no model factory {name!r} (e.g. 'wav2vec2_base', 'Conformer', 'conv_tasnet_base')")
    return factory(**kwargs)


@hookimpl
def lora_anywhere_register_rules(register: Callable[[type, Rule], None]) -> None:
    register(LogitGenerator, LabelEmbeddingRule())


@hookimpl
def lora_anywhere_register_model_sources(register: Callable[[str, Callable[..., nn.Module]], None]) -> None:
    register("torchaudio", build)
