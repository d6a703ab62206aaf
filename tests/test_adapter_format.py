"""Adapter folders written by older versions keep loading (CHANGELOG.md lists formats)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import lora_anywhere as la
from lora_anywhere.testing import randomize_adapters


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))


def test_format_1_folders_with_path_keys_still_load(tmp_path):
    adapted = la.apply(model(), rank=2, route="activation")
    randomize_adapters(adapted)
    la.save_adapter(adapted, tmp_path / "a")
    config_file = tmp_path / "a" / "lora_anywhere_config.json"
    config = json.loads(config_file.read_text())
    assert config["format"] == "lora_anywhere.adapter/3" and config["route"] == "activation"
    # What version /1 wrote: the compute route under "path", no base buffers.
    config["format"] = "lora_anywhere.adapter/1"
    del config["buffers"]
    config["path"] = config.pop("route")
    for record in config["layers"].values():
        record["path"] = record.pop("route")
    config_file.write_text(json.dumps(config))

    loaded = la.load_adapter(model(), tmp_path / "a")
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(loaded(x), adapted(x), rtol=0, atol=0)
    assert {row.route for row in la.summary(loaded).rows} == {"activation"}


def as_format_2(folder) -> None:
    """Rewrite a folder as version /2 wrote it: no list of base buffers."""
    config_file = folder / "lora_anywhere_config.json"
    config = json.loads(config_file.read_text())
    assert not config.pop("buffers")
    config["format"] = "lora_anywhere.adapter/2"
    config_file.write_text(json.dumps(config))


def test_format_2_folders_still_load(tmp_path):
    adapted = la.apply(model(), rank=2, dora=True)
    randomize_adapters(adapted)
    as_format_2(la.save_adapter(adapted, tmp_path / "a"))
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(la.load_adapter(model(), tmp_path / "a")(x), adapted(x), rtol=0, atol=0)


def test_format_2_dora_on_embeddings_is_refused_clearly(tmp_path):
    """/2 kept DoRA's magnitudes per row of an Embedding table, a different function:
    such a folder cannot be read as one magnitude per output feature."""
    torch.manual_seed(0)
    adapted = la.apply(nn.Embedding(6, 6), rank=2, dora=True)  # square: the shapes alone would agree
    as_format_2(la.save_adapter(adapted, tmp_path / "a"))
    fresh = nn.Embedding(6, 6)
    with pytest.raises(la.ShapeMismatchError, match="format lora_anywhere.adapter/2.*one per output feature"):
        la.load_adapter(fresh, tmp_path / "a")
    assert la.adapter_names(fresh) == []


def test_folders_with_the_old_file_names_still_load(tmp_path):
    """Format /1 and early /2 folders used PEFT's file names (adapter_config.json,
    adapter_model.safetensors), which PEFT could not read; they load as before."""
    from lora_anywhere import io

    adapted = la.apply(model(), rank=2)
    randomize_adapters(adapted)
    folder = la.save_adapter(adapted, tmp_path / "a")
    (folder / io.CONFIG_FILE).rename(folder / "adapter_config.json")
    (folder / io.TENSORS_FILE).rename(folder / "adapter_model.safetensors")
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(la.load_adapter(model(), folder)(x), adapted(x), rtol=0, atol=0)
    assert set(io.read_adapter(folder)[1]) == set(la.adapter_state_dict(adapted))
