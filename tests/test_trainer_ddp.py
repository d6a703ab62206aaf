"""DDP on CPU: two gloo processes under torchrun train on different shards and end
with identical adapters (so gradients were reduced, and rank 0's start broadcast)."""

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
    from lora_anywhere.training.trainer import Trainer

    torch.set_num_threads(1)
    out, rank = Path(sys.argv[1]), int(os.environ["RANK"])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 8, generator=g)
    y = ((x[:, 0] > 0) ^ (x[:, 1] > 0)).long()

    def start_apart(model):
        # Each rank's adapters start different: DDP must make them rank 0's.
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.requires_grad:
                    p.normal_(generator=torch.Generator().manual_seed(rank), std=0.1)

    # 1. A Dataset: DistributedSampler shards it; val metrics are reduced over ranks.
    torch.manual_seed(0)  # the same base weights everywhere, as loaded from a checkpoint
    model = la.apply(nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2)), rank=4, dropout=0.1)
    start_apart(model)
    trainer = Trainer(model, TensorDataset(x, y), TensorDataset(x[:40], y[:40]), task="image-classification",
                      epochs=3, lr=1e-2, batch_size=8, out_dir=out / "run", seed=0)
    history = trainer.fit()
    la.save_adapter(model, out / f"dataset-rank{rank}")
    per_rank = len(trainer.task.batches(trainer.train_data, train=True, spec=trainer._spec(0)))

    # 2. A list of batches, accumulation (no_sync), and an adapter the loss never
    #    reaches, which needs find_unused_parameters (found by the trainer's probe).
    class WithUnused(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2))
            self.unused = nn.Linear(8, 8)

        def forward(self, x):
            return self.body(x)

    torch.manual_seed(0)
    model2 = la.apply(WithUnused(), rank=2)
    start_apart(model2)
    batches = [(x[i : i + 8], y[i : i + 8]) for i in range(0, 96, 8)]
    trainer2 = Trainer(model2, batches, task="image-classification", epochs=2, lr=1e-2, grad_accum=2)
    trainer2.fit()
    la.save_adapter(model2, out / f"list-rank{rank}")

    (out / f"rank{rank}.json").write_text(json.dumps({
        "history": [{k: v for k, v in r.items() if k != "seconds"} for r in history],
        "per_rank_batches": per_rank,
        "list_batches": len(trainer2.task.batches(batches, train=True, spec=trainer2._spec(0))),
        "find_unused": [trainer._ddp.find_unused_parameters, trainer2._ddp.find_unused_parameters],
        "world": trainer.world_size,
    }))
    """
)


def test_two_gloo_processes_end_with_identical_adapters(tmp_path: Path, two_ranks) -> None:
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    reports = two_ranks(script, tmp_path, 300)
    assert all(r["world"] == 2 for r in reports)
    assert [r["per_rank_batches"] for r in reports] == [6, 6]  # 96 samples / 8 / 2 ranks
    assert [r["list_batches"] for r in reports] == [6, 6]
    assert [r["find_unused"] for r in reports] == [[False, True]] * 2
    assert reports[0]["history"] == reports[1]["history"]  # metrics reduced over both shards
    for kind in ("dataset", "list"):
        a = load_file(str(tmp_path / f"{kind}-rank0" / "lora_anywhere_adapter.safetensors"))
        b = load_file(str(tmp_path / f"{kind}-rank1" / "lora_anywhere_adapter.safetensors"))
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{kind}: {key} differs between ranks"
    # Rank 0 alone wrote the run's files, and they match what both ranks hold.
    run = tmp_path / "run"
    assert len((run / "metrics.csv").read_text().splitlines()) == 4
    saved = load_file(str(run / "last" / "lora_anywhere_adapter.safetensors"))
    a = load_file(str(tmp_path / "dataset-rank0" / "lora_anywhere_adapter.safetensors"))
    assert all(torch.equal(saved[k], a[k]) for k in a)
