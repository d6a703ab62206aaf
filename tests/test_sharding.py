"""FSDP2: adapted models shard (per layer, per block, at the root) on every rule and
route, and train exactly as they do unsharded. Two gloo processes on CPU run
tests/fsdp_worker.py once; each case below reads what they found."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import lora_anywhere as la
from lora_anywhere import sharding
from lora_anywhere.errors import ShardingError

WORKER = Path(__file__).with_name("fsdp_worker.py")
CASES = [
    "linear-activation",
    "linear-weight",
    "conv-bn-gru",
    "grouped-convs",
    "large-depthwise",
    "embedding-lstm-mha",
    "tied-embedding",
    "transformer-layer",
    "pyg-gcn",
    "pyg-gat",
    "timm-vit",
    "timm-vit-blocks",
    "timm-vit-blocks-checkpointed",
    "torchaudio-wav2vec2",
    "torchaudio-wav2vec2-layers",
]
OPTIONAL = {"pyg": "torch_geometric", "timm": "timm", "torchaudio": "torchaudio"}


@pytest.fixture(scope="module")
def reports(tmp_path_factory: pytest.TempPathFactory, two_ranks) -> list[dict]:
    return two_ranks(WORKER, tmp_path_factory.mktemp("fsdp"), 900)


@pytest.mark.parametrize("case", CASES)
def test_sharded_training_equals_training_alone(reports: list[dict], case: str) -> None:
    module = OPTIONAL.get(case.split("-")[0])
    if module is not None:
        pytest.importorskip(module)
    for report in (r[case] for r in reports):
        assert "error" not in report, report.get("error")
        assert report["frozen_sharded"] and report["trained_sharded"] and report["units"] >= 1
        assert report["adapter_moved"] and report["base_unchanged"]
        # The same data on both ranks: the averaged gradient is the one-process gradient.
        assert report["saved_keys_match"]
        assert report["saved_diff"] < 1e-6
        assert report["output_diff"] < 1e-5
        assert report["loaded_then_sharded_diff"] < 1e-5
        assert report["merged_diff"] < 1e-5
        refusals = (report["merge_sharded_refused"], report["apply_sharded_refused"], report["load_sharded_refused"])
        assert refusals == ("ShardingError",) * 3
        # A 5×5 depthwise conv forms its weight gradient on channels_last copies, sharded too.
        assert (report["channels_last_grads"] > 0) == (case == "large-depthwise")


def test_a_failed_save_raises_on_every_rank_and_writes_nothing(reports: list[dict]) -> None:
    assert [r["failed-save"]["raised"] for r in reports] == ["FileExistsError", "ShardingError"]
    assert all(r["failed-save"]["left_alone"] for r in reports)


def test_unsharded_tensors_and_models_are_left_alone() -> None:
    model = la.apply(nn.Sequential(nn.Linear(4, 4)), rank=2)
    assert not sharding.is_sharded(*model.parameters())
    assert sharding.gathered(la.adapter_state_dict(model))[1] is False
    assert sharding.keep_sharded_class(model[0], nn.Linear) is nn.Linear
    sharding.reshard(model)  # no FSDP unit: nothing to do


@pytest.mark.skipif(torch.distributed.is_available() and torch.distributed.is_initialized(), reason="needs no process group")
def test_shard_without_a_process_group_says_how_to_start_one() -> None:
    model = la.apply(nn.Sequential(nn.Linear(4, 4)), rank=2)
    with pytest.raises(ShardingError, match="torchrun"):
        sharding.shard(model)
    assert not sharding.is_sharded(*model.parameters())
