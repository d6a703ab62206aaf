"""The shared trainer: each domain's small model learns its generated task through
its adapters alone; a resumed run ends bit-identical to an uninterrupted one; no
checkpoint holds a frozen base tensor; NaN and Ctrl-C leave a good checkpoint."""

from __future__ import annotations

import copy
import json
import math
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import lora_anywhere as la
from lora_anywhere.errors import NonFiniteLossError
from lora_anywhere.training import reporting as reporting_mod
from lora_anywhere.training import tasks as tasks_mod
from lora_anywhere.training import trainer as trainer_mod
from lora_anywhere.training.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- data & models


def image_data(n: int, seed: int) -> TensorDataset:
    """4 classes: a bright 4×4 patch in the class's quadrant, on noise."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 12, 12, generator=g) * 0.5
    y = torch.randint(0, 4, (n,), generator=g)
    for i, c in enumerate(y.tolist()):
        r, col = 6 * (c // 2) + 1, 6 * (c % 2) + 1
        x[i, :, r : r + 4, col : col + 4] += 1.5
    return TensorDataset(x, y)


class TinyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU()
        )
        self.head = nn.Linear(16 * 6 * 6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


def sbm_graph(seed: int):
    """Node classification: 4 communities, dense inside, sparse across; noisy features
    that only neighbourhood averaging makes clear."""
    from torch_geometric.data import Data

    g = torch.Generator().manual_seed(seed)
    n, k = 240, 4
    y = torch.arange(n) % k
    same = y[:, None] == y[None, :]
    prob = torch.where(same, torch.tensor(0.1), torch.tensor(0.004))
    adj = torch.rand(n, n, generator=g) < prob
    adj = torch.triu(adj, 1)
    adj = adj | adj.T
    edge_index = adj.nonzero().T.contiguous()
    x = torch.nn.functional.one_hot(y, 8).float() * 0.8 + torch.randn(n, 8, generator=g)
    split = torch.rand(n, generator=g)
    return Data(x=x, edge_index=edge_index, y=y, train_mask=split < 0.6, val_mask=(split >= 0.6) & (split < 0.8), test_mask=split >= 0.8)


class TinyGCN(nn.Module):
    """Two rounds of mean aggregation with self loops around nn.Linear transforms."""

    def __init__(self, cin: int = 8, hidden: int = 16, classes: int = 4) -> None:
        super().__init__()
        from torch_geometric.nn import SimpleConv

        self.conv = SimpleConv(aggr="mean", combine_root="self_loop")
        self.lin1, self.lin2 = nn.Linear(cin, hidden), nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.lin1(self.conv(x, edge_index)))
        return self.lin2(self.conv(h, edge_index))


def er_graphs(n: int, seed: int) -> list:
    """Graph classification by structure alone: sparse (p=0.15) or dense (p=0.6)
    random graphs, all node features 1."""
    from torch_geometric.data import Data

    g = torch.Generator().manual_seed(seed)
    graphs = []
    for _ in range(n):
        label = int(torch.randint(0, 2, (1,), generator=g))
        nodes = int(torch.randint(8, 15, (1,), generator=g))
        adj = torch.triu(torch.rand(nodes, nodes, generator=g) < (0.6 if label else 0.15), 1)
        edge_index = (adj | adj.T).nonzero().T.contiguous()
        graphs.append(Data(x=torch.ones(nodes, 1), edge_index=edge_index, y=torch.tensor([label])))
    return graphs


class TinyGraphNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        from torch_geometric.nn import SimpleConv

        self.conv = SimpleConv(aggr="sum", combine_root="self_loop")
        self.lin1, self.lin2, self.head = nn.Linear(1, 16), nn.Linear(16, 16), nn.Linear(16, 2)

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        from torch_geometric.nn import global_mean_pool

        h = torch.relu(self.lin1(self.conv(x, edge_index) / 4))
        h = torch.relu(self.lin2(h))
        return self.head(global_mean_pool(h, batch))


class Tones(Dataset):
    """Audio: a noisy tone whose frequency is the class, of random length."""

    FREQS = (300.0, 700.0, 1300.0, 2100.0)

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.items = []
        for _ in range(n):
            label = int(torch.randint(0, 4, (1,), generator=g))
            length = int(torch.randint(400, 801, (1,), generator=g))
            t = torch.arange(length) / 8000.0
            phase = float(torch.rand(1, generator=g)) * 2 * math.pi
            wave = torch.sin(2 * math.pi * self.FREQS[label] * t + phase) + 0.3 * torch.randn(length, generator=g)
            self.items.append((wave, label))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


class TinyAudioNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(1, 16, 16, stride=8)
        self.gru = nn.GRU(16, 32, batch_first=True)
        self.head = nn.Linear(32, 4)

    def forward(self, waves: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(waves.unsqueeze(1))).transpose(1, 2)
        h, _ = self.gru(h)
        steps = (lengths - 16) // 8 + 1
        mask = (torch.arange(h.shape[1])[None, :] < steps[:, None]).unsqueeze(-1)
        return self.head((h * mask).sum(1) / steps[:, None])


class Keywords(Dataset):
    """Text: filler tokens with one keyword (the class) somewhere; random length."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.items = []
        for _ in range(n):
            label = int(torch.randint(0, 4, (1,), generator=g))
            length = int(torch.randint(6, 13, (1,), generator=g))
            ids = torch.randint(10, 40, (length,), generator=g)
            ids[int(torch.randint(0, length, (1,), generator=g))] = 2 + label
            self.items.append({"input_ids": ids, "attention_mask": torch.ones(length, dtype=torch.long), "labels": torch.tensor(label)})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


class TinyEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(40, 32)
        layer = nn.TransformerEncoderLayer(32, 2, 64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(32, 4)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.encoder(self.embed(input_ids), src_key_padding_mask=attention_mask == 0)
        m = attention_mask.unsqueeze(-1).float()
        return self.head((h * m).sum(1) / m.sum(1))


def mlp(dropout: float = 0.0) -> nn.Module:
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(dropout), nn.Linear(32, 2))


def xor_data(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    return TensorDataset(x, ((x[:, 0] > 0) ^ (x[:, 1] > 0)).long())


# ----------------------------------------------------------------------------- each domain learns


def test_image_classification_learns_and_logs(tmp_path: Path) -> None:
    torch.manual_seed(0)
    base = TinyCNN()
    base_state = copy.deepcopy(base.state_dict())
    model = la.apply(base, rank=4)
    bn = model.features[1]
    stats = (bn.running_mean.clone(), bn.running_var.clone())
    trainer = Trainer(
        model,
        image_data(384, 1),
        image_data(128, 2),
        task="image-classification",
        epochs=4,
        lr=1e-2,
        batch_size=32,
        warmup=0.1,
        out_dir=tmp_path,
        seed=0,
    )
    history = trainer.fit()
    assert [row["epoch"] for row in history] == [1, 2, 3, 4]
    assert history[-1]["val_accuracy"] >= 0.7, history  # chance: 0.25
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    # A frozen BatchNorm keeps its statistics: they belong to the base model.
    assert torch.equal(bn.running_mean, stats[0]) and torch.equal(bn.running_var, stats[1])
    lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert lines[0].split(",")[:5] == ["epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy"] and len(lines) == 5
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # best/ holds the adapter of the epoch with the lowest val_loss: on a fresh base it
    # gives that loss again.
    fresh = TinyCNN()
    fresh.load_state_dict(base_state)
    la.load_adapter(fresh, tmp_path / "best")
    best = min(row["val_loss"] for row in history)
    assert Trainer(fresh, image_data(8, 3), task="image-classification").evaluate(image_data(128, 2))["loss"] == pytest.approx(
        best, rel=1e-5
    )


def test_node_classification_one_graph_and_minibatches() -> None:
    from torch_geometric.loader import RandomNodeLoader

    graph = sbm_graph(0)
    torch.manual_seed(0)
    model = la.apply(TinyGCN(), rank=4)
    history = Trainer(model, graph, graph, task="node-classification", epochs=60, lr=3e-2, seed=0).fit()
    assert history[-1]["val_accuracy"] >= 0.75, history[-1]  # chance: 0.25
    test = Trainer(model, graph, task=la.tasks.NodeClassification(eval_mask="test_mask")).evaluate(graph)
    assert test["accuracy"] >= 0.75

    torch.manual_seed(0)
    model = la.apply(TinyGCN(), rank=4)
    loader = RandomNodeLoader(graph, num_parts=2, shuffle=True)
    history = Trainer(model, loader, graph, task="node-classification", epochs=40, lr=3e-2, seed=0).fit()
    assert history[-1]["val_accuracy"] >= 0.75, history[-1]


def test_node_task_counts_only_seed_nodes_of_a_neighbour_batch() -> None:
    from torch_geometric.data import Data

    batch = Data(
        x=torch.eye(5), edge_index=torch.zeros(2, 0, dtype=torch.long), y=torch.arange(5), train_mask=torch.tensor([1, 0, 1, 1, 1]).bool()
    )
    batch.batch_size = 3  # NeighborLoader: the first batch_size nodes are the seeds
    logits, labels = la.tasks.NodeClassification().forward(lambda x, e: x, batch, train=True)
    assert labels.tolist() == [0, 2]


def test_graph_classification_learns() -> None:
    from torch_geometric.loader import DataLoader as GraphLoader

    torch.manual_seed(0)
    model = la.apply(TinyGraphNet(), rank=4)
    train = GraphLoader(er_graphs(160, 1), batch_size=16, shuffle=True)
    val = er_graphs(64, 2)  # a plain list of graphs: the task batches it
    history = Trainer(model, train, val, task="graph-classification", epochs=8, lr=2e-2, seed=0).fit()
    assert history[-1]["val_accuracy"] >= 0.85, history  # chance: 0.5


def test_audio_classification_learns() -> None:
    torch.manual_seed(0)
    model = la.apply(TinyAudioNet(), rank=4)
    history = Trainer(model, Tones(192, 1), Tones(96, 2), task="audio-classification", epochs=6, lr=1e-2, batch_size=16, seed=0).fit()
    assert history[-1]["val_accuracy"] >= 0.7, history  # chance: 0.25


def test_text_classification_learns() -> None:
    torch.manual_seed(0)
    model = la.apply(TinyEncoder(), rank=4)
    history = Trainer(model, Keywords(256, 1), Keywords(128, 2), task="text-classification", epochs=6, lr=1e-2, batch_size=16, seed=0).fit()
    assert history[-1]["val_accuracy"] >= 0.7, history  # chance: 0.25


# ----------------------------------------------------------------------------- resume, checkpoints, failures


class SignalAt(Dataset):
    """Wraps a dataset and sends this process SIGINT at its `at`-th item read, once."""

    def __init__(self, data: Dataset, at: int | None) -> None:
        self.data, self.at, self.reads = data, at, 0

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        self.reads += 1
        if self.reads == self.at:
            signal.raise_signal(signal.SIGINT)
        return self.data[i]


def _resumable_run(out: Path, *, train_at: int | None, val_at: int | None, loader: bool, resume: bool):
    torch.manual_seed(123)
    model = la.apply(mlp(dropout=0.2), rank=2, dropout=0.1)
    train = SignalAt(xor_data(80, 1), train_at)
    data = DataLoader(train, batch_size=8, shuffle=True) if loader else train
    trainer = Trainer(
        model, data, SignalAt(xor_data(32, 2), val_at), task="image-classification",
        epochs=3, lr=2e-2, batch_size=8, grad_accum=3, warmup=2, clip=0.5, out_dir=out, seed=7, resume=resume,
    )  # fmt: skip
    return trainer, trainer.fit()


@pytest.mark.parametrize(
    "where, loader",
    [("train", False), ("train", True), ("val", False)],
    ids=["mid-epoch, Dataset", "mid-epoch, shuffling DataLoader", "during validation"],
)
def test_interrupted_and_resumed_run_ends_identical(tmp_path: Path, where: str, loader: bool) -> None:
    _, reference = _resumable_run(tmp_path / "a", train_at=None, val_at=None, loader=loader, resume=False)
    # SIGINT at the 100th training read (epoch 2, inside an accumulation group), or at
    # the 40th validation read (epoch 2's validation).
    at = {"train_at": 100, "val_at": None} if where == "train" else {"train_at": None, "val_at": 40}
    first, partial = _resumable_run(tmp_path / "b", **at, loader=loader, resume=False)
    assert first.interrupted and len(partial) == (1 if where == "train" else 2)
    state = torch.load(tmp_path / "b" / "last" / trainer_mod.STATE_FILE, weights_only=True)
    assert (state["epoch"], state["batch"] > 0) == ((1, True) if where == "train" else (2, False))
    second, history = _resumable_run(tmp_path / "b", train_at=None, val_at=None, loader=loader, resume=True)
    assert not second.interrupted
    a = load_file(str(tmp_path / "a" / "last" / "lora_anywhere_adapter.safetensors"))
    b = load_file(str(tmp_path / "b" / "last" / "lora_anywhere_adapter.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(v.abs().sum() > 0 for k, v in a.items() if k.endswith("/B"))  # it did train
    drop = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert drop(history) == drop(reference)


def _all_tensors(folder: Path) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []

    def walk(obj) -> None:
        if isinstance(obj, torch.Tensor):
            found.append(obj)
        elif isinstance(obj, dict):
            for v in obj.values():
                walk(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                walk(v)

    for path in folder.rglob("*"):
        if path.suffix == ".safetensors":
            walk(load_file(str(path)))
        elif path.suffix == ".pt":
            walk(torch.load(path, weights_only=True))
    return found


def test_no_frozen_base_tensor_is_ever_written(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = la.apply(TinyCNN(), rank=2, targets=["features.0", "features.3"], trainable="head")
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    frozen.update({f"buffer {n}": b.clone() for n, b in model.named_buffers() if b.is_floating_point()})
    assert frozen
    Trainer(model, image_data(64, 1), image_data(32, 2), task="image-classification", epochs=2, batch_size=16, out_dir=tmp_path).fit()
    saved = _all_tensors(tmp_path)
    assert len(saved) > 10  # adapters, head, optimizer moments, RNG states
    for name, tensor in frozen.items():
        for s in saved:
            assert not (s.shape == tensor.shape and s.dtype == tensor.dtype and torch.equal(s, tensor)), (
                f"{name} was written to a checkpoint"
            )
    head = load_file(str(tmp_path / "best" / "lora_anywhere_adapter.safetensors"))
    assert "trainable/head.weight" in head  # the trainable module is saved


def test_nan_loss_stops_clearly_and_keeps_last_good_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = la.apply(mlp(), rank=2)
    calls = {"n": 0}

    def loss_fn(model: nn.Module, batch) -> torch.Tensor:
        calls["n"] += 1
        x, y = batch
        loss = nn.functional.cross_entropy(model(x), y)
        return loss * math.nan if calls["n"] == 7 else loss  # epoch 2 of 5 batches each

    trainer = Trainer(model, xor_data(40, 1), task=loss_fn, epochs=3, batch_size=8, out_dir=tmp_path)
    good = load_file(str(tmp_path / "last" / "lora_anywhere_adapter.safetensors")) if (tmp_path / "last").exists() else None
    assert good is None
    with pytest.raises(NonFiniteLossError, match=r"loss became nan at epoch 2, batch 2.*last good checkpoint is kept"):
        trainer.fit()
    state = torch.load(tmp_path / "last" / trainer_mod.STATE_FILE, weights_only=True)
    assert (state["epoch"], state["batch"]) == (1, 0)
    assert [set(r) for r in state["history"]] == [{"epoch", "train_loss", "lr", "seconds"}]  # a loss function has no metrics
    saved = load_file(str(tmp_path / "last" / "lora_anywhere_adapter.safetensors"))
    live = la.adapter_state_dict(model)
    # The model itself is one step past the checkpoint (5 in epoch 1 + 1), nothing more.
    assert any(not torch.equal(saved[k], live[k]) for k in saved)
    assert all(torch.isfinite(v).all() for v in live.values())


def test_early_stopping_on_a_worsening_metric(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = la.apply(mlp(), rank=2)
    evals = {"n": 0}

    def loss_fn(model: nn.Module, batch) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(model(x), y)
        if not model.training:  # validation gets worse every epoch after the first
            evals["n"] += 1
            loss = loss * 0 + evals["n"]
        return loss

    history = Trainer(model, xor_data(16, 1), xor_data(8, 2), task=loss_fn, epochs=10, batch_size=8, patience=2, out_dir=tmp_path).fit()
    assert len(history) == 3  # best at 1, then two epochs without improvement
    assert (tmp_path / "best" / "lora_anywhere_config.json").is_file()


def test_jsonl_log_and_quiet_progress(tmp_path: Path, capsys: pytest.CaptureFixture, log_lines: list[str]) -> None:
    torch.manual_seed(0)
    model = la.apply(mlp(), rank=2)
    Trainer(
        model, xor_data(32, 1), xor_data(16, 2), task="image-classification", epochs=2, batch_size=8, out_dir=tmp_path, log_format="jsonl"
    ).fit()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and {"train_loss", "val_loss", "val_accuracy", "lr"} <= set(rows[0])
    assert "it/s" not in capsys.readouterr().err  # stderr is not a terminal here: no bars
    # The optimizer's groups as the run starts, then one line per epoch, tty or not.
    assert [line.split()[:2] for line in log_lines] == [["optimizer", "AdamW:"], ["epoch", "1/2"], ["epoch", "2/2"]]
    Trainer(model, xor_data(32, 1), task="image-classification", epochs=1, batch_size=8, progress=True).fit()
    assert "it/s" in capsys.readouterr().err and log_lines[-1].startswith("epoch 1/1  train_loss")


def test_missing_optional_dependencies_degrade_to_a_notice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, log_lines: list[str]) -> None:
    for module in ("tqdm.auto", "matplotlib.figure", "torchmetrics", "torch.utils.tensorboard"):
        monkeypatch.setitem(__import__("sys").modules, module, None)
    monkeypatch.setattr(reporting_mod, "_MISSING_NOTED", set())
    torch.manual_seed(0)
    model = la.apply(mlp(), rank=2)
    trainer = Trainer(
        model, xor_data(32, 1), xor_data(16, 2), task="image-classification", epochs=2, batch_size=8, out_dir=tmp_path, progress=True,
        tensorboard=True,
    )  # fmt: skip
    history = trainer.fit()
    assert len(history) == 2 and (tmp_path / "metrics.csv").is_file() and not (tmp_path / "curves.png").exists()
    assert "val_accuracy" in history[-1] and "val_macro_f1" not in history[-1]  # the sums need no torchmetrics
    assert not (tmp_path / "tensorboard").exists() and not (tmp_path / "val_report.json").exists()
    notes = "\n".join(log_lines)
    for module in ("tqdm.auto", "matplotlib.figure", "torchmetrics", "torch.utils.tensorboard"):
        assert notes.count(f"{module} is not installed") == 1, module


# ----------------------------------------------------------------------------- tasks


def test_tasks_by_name_object_class_function_and_plugin() -> None:
    assert isinstance(tasks_mod.get_task("text-classification"), la.tasks.TextClassification)
    assert isinstance(tasks_mod.get_task(la.tasks.AudioClassification), la.tasks.AudioClassification)
    custom = la.tasks.NodeClassification(eval_mask="test_mask")
    assert tasks_mod.get_task(custom) is custom
    assert isinstance(tasks_mod.get_task(lambda model, batch: model(batch).sum()), la.tasks.LossTask)
    with pytest.raises(ValueError, match="unknown task 'segmentation'.*image-classification"):
        tasks_mod.get_task("segmentation")

    class Regression(la.Task):
        name = "toy-regression"

        def step(self, model, batch, *, train):
            x, y = batch
            return la.tasks.StepResult(nn.functional.mse_loss(model(x).squeeze(-1), y), len(y), {})

    class Plugin:
        @la.hookimpl
        def lora_anywhere_register_tasks(self, register):
            register("toy-regression", Regression())

    name = la.register_plugin(Plugin(), name="toy-tasks")
    try:
        assert isinstance(tasks_mod.get_task("toy-regression"), Regression)
        torch.manual_seed(0)
        model = la.apply(nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1)), rank=2)
        x = torch.randn(64, 4)
        data = TensorDataset(x, x.sum(1))
        history = Trainer(model, data, data, task="toy-regression", epochs=10, lr=2e-2, batch_size=16).fit()
        assert history[-1]["val_loss"] < 0.5 * history[0]["val_loss"]
    finally:
        la.unregister_plugin(name)
    with pytest.raises(ValueError, match="unknown task"):
        tasks_mod.get_task("toy-regression")


def test_collate_pads_audio_and_text() -> None:
    waves, lengths, labels = la.tasks.AudioClassification().collate([(torch.ones(3), 1), (torch.ones(5), 0)])
    assert waves.shape == (2, 5) and lengths.tolist() == [3, 5] and waves[0, 3:].abs().sum() == 0 and labels.tolist() == [1, 0]
    batch = la.tasks.TextClassification(pad_id=9).collate(
        [
            {"input_ids": torch.tensor([1, 2]), "attention_mask": torch.ones(2), "labels": 0},
            {"input_ids": torch.tensor([3]), "attention_mask": torch.ones(1), "labels": 1},
        ]
    )
    assert (
        batch["input_ids"].tolist() == [[1, 2], [3, 9]]
        and batch["attention_mask"].tolist() == [[1, 1], [1, 0]]
        and batch["labels"].tolist() == [0, 1]
    )


def test_strided_shards_cover_the_data_evenly() -> None:
    batches = list(range(7))
    train = [list(tasks_mod.Strided(batches, r, 3, equal=True)) for r in range(3)]
    assert train == [[0, 3], [1, 4], [2, 5]]
    val = [list(tasks_mod.Strided(batches, r, 3, equal=False)) for r in range(3)]
    assert sorted(sum(val, [])) == batches and [len(tasks_mod.Strided(batches, r, 3, equal=False)) for r in range(3)] == [3, 2, 2]


def test_trainer_rejects_what_it_cannot_train() -> None:
    frozen = mlp().requires_grad_(False)  # a plain model trains; one with nothing to train does not
    with pytest.raises(la.NotAdaptedError, match="no parameter of the model requires grad"):
        Trainer(frozen, xor_data(8, 1), task="image-classification")
    with pytest.raises(la.LoraError, match="patience"):
        Trainer(la.apply(mlp(), rank=2), xor_data(8, 1), task="image-classification", patience=2)
    with pytest.raises(la.LoraError, match="re-iterable"):
        Trainer(la.apply(mlp(), rank=2), iter([]), task="image-classification")


def test_ctrl_c_forwarded_twice_at_once_still_saves_and_a_later_one_quits() -> None:
    before = signal.getsignal(signal.SIGINT)
    stop = trainer_mod._StopRequest()
    with stop:
        signal.raise_signal(signal.SIGINT)
        signal.raise_signal(signal.SIGINT)  # torchrun's agent forwards the terminal's Ctrl-C
        assert stop.requested
        stop.REPEAT_AFTER_S = 0.0  # a press after the user has seen the notice
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before


# The examples in docs/trainer.md run, and check that they learn, in tests/test_docs.py.
