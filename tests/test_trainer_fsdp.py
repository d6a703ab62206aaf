"""The Trainer with strategy="fsdp" under torchrun (two gloo processes on CPU): it
trains the sharded model to the same adapter as DDP does, evaluates uneven shares
of the validation data without hanging, and checkpoints and resumes to the bit."""

from __future__ import annotations

import textwrap
from pathlib import Path

import torch
from safetensors.torch import load_file

SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    from pathlib import Path

    import torch
    from torch import nn
    from torch.utils.data import TensorDataset

    import lora_anywhere as la
    from lora_anywhere.sharding import is_sharded

    torch.set_num_threads(1)
    out, rank = Path(sys.argv[1]), int(os.environ["RANK"])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, 10, generator=g)
    y = (x[:, 0].mean(1) > x[:, 1].mean(1)).long()
    val = [(x[i : i + 8], y[i : i + 8]) for i in range(0, 40, 8)]  # 5 batches: 3 on rank 0, 2 on rank 1

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(4, 16, 3, padding=1)
            self.bn = nn.BatchNorm1d(16)
            self.gru = nn.GRU(16, 16, batch_first=True)
            self.head = nn.Linear(16, 2)

        def forward(self, x):
            h, _ = self.gru(torch.relu(self.bn(self.conv(x))).transpose(1, 2))
            return self.head(h[:, -1])

    def train(strategy, epochs, folder, resume=False):
        torch.manual_seed(0)
        model = la.apply(Net(), rank=4, route="activation", trainable=["head"])
        trainer = la.Trainer(model, TensorDataset(x, y), val, task="image-classification", epochs=epochs, lr=1e-2,
                             batch_size=8, grad_accum=2, out_dir=out / folder, seed=0, strategy=strategy, resume=resume,
                             schedule="constant")
        history = trainer.fit()
        return trainer, [{k: v for k, v in r.items() if k != "seconds"} for r in history]

    ddp, ddp_history = train("ddp", 2, "ddp")
    fsdp, fsdp_history = train("fsdp", 2, "fsdp")
    frozen = [p for p in fsdp.model.parameters() if not p.requires_grad]
    _, straight = train("fsdp", 3, "straight")
    train("fsdp", 2, "resumed")
    _, resumed = train("fsdp", 3, "resumed", resume=True)
    (out / f"rank{rank}.json").write_text(json.dumps({
        "ddp": ddp_history, "fsdp": fsdp_history, "straight": straight, "resumed": resumed,
        "frozen_sharded": all(is_sharded(p) for p in frozen), "ddp_wrapped": ddp._ddp is not None, "fsdp_wrapped": fsdp._ddp is not None,
    }))
    """
)


def test_fsdp_trains_like_ddp_and_resumes(tmp_path: Path, two_ranks) -> None:
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    reports = two_ranks(script, tmp_path, 600)
    assert all(r["frozen_sharded"] and r["ddp_wrapped"] and not r["fsdp_wrapped"] for r in reports)
    assert reports[0] == reports[1]  # metrics reduced over both ranks' shares
    report = reports[0]
    for ddp, fsdp in zip(report["ddp"], report["fsdp"], strict=True):
        assert ddp.keys() == fsdp.keys()
        for key in ddp:
            assert abs(ddp[key] - fsdp[key]) < 1e-5, (key, ddp[key], fsdp[key])
    assert report["resumed"] == report["straight"]  # to the bit
    for folder in ("best", "last"):
        a = load_file(str(tmp_path / "ddp" / folder / "lora_anywhere_adapter.safetensors"))
        b = load_file(str(tmp_path / "fsdp" / folder / "lora_anywhere_adapter.safetensors"))
        assert a.keys() == b.keys()
        assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a), folder
    resumed = load_file(str(tmp_path / "resumed" / "last" / "lora_anywhere_adapter.safetensors"))
    straight = load_file(str(tmp_path / "straight" / "last" / "lora_anywhere_adapter.safetensors"))
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)
    assert not any(p.name.startswith(".") for p in (tmp_path / "fsdp").iterdir())  # no staging left behind


def test_strategy_is_checked_and_fsdp_on_one_process_trains_whole(log_lines: list[str]) -> None:
    import pytest
    from torch import nn

    import lora_anywhere as la
    from lora_anywhere.errors import ConfigError

    torch.manual_seed(0)
    model = la.apply(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), rank=2)
    batches = [(torch.randn(8, 4), torch.randint(0, 2, (8,))) for _ in range(3)]
    with pytest.raises(ConfigError, match="strategy must be one of 'ddp', 'fsdp'"):
        la.Trainer(model, batches, task="image-classification", strategy="zero3")
    trainer = la.Trainer(model, batches, task="image-classification", epochs=1, strategy="fsdp", progress=False)
    assert len(trainer.fit()) == 1
    assert any("nothing to shard" in line for line in log_lines)
