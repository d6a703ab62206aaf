"""What a training run leaves behind and says: checkpoints every `save_every` epochs,
curves at the end (or every `plot_every`), one log line per epoch when nobody watches a
terminal, TensorBoard scalars, and the tasks beyond single-label accuracy — regression,
multi-label, token classification — with their torchmetrics figures and reports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import lora_anywhere as la
from lora_anywhere.training import reporting
from lora_anywhere.training import trainer as trainer_mod
from lora_anywhere.training.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def xor(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    return TensorDataset(x, ((x[:, 0] > 0) ^ (x[:, 1] > 0)).long())


def adapted(out: int = 2) -> nn.Module:
    torch.manual_seed(0)
    return la.apply(nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, out)), rank=4)


def count_calls(monkeypatch: pytest.MonkeyPatch, module, name: str) -> list:
    calls: list = []
    original = getattr(module, name)

    def spy(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return calls


# ---------------------------------------------------------------------- checkpoints and plots


def test_save_every_and_plot_every_bound_the_writes_of_a_long_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    checkpoints = count_calls(monkeypatch, trainer_mod.Trainer, "_save_checkpoint")
    plots = count_calls(monkeypatch, trainer_mod, "plot_curves")
    trainer = Trainer(
        adapted(), xor(16, 0), xor(8, 1), task="image-classification", epochs=50, batch_size=16, out_dir=tmp_path, save_every=10
    )
    trainer.fit()
    assert [call[1]["epoch"] for call in checkpoints] == [10, 20, 30, 40, 50]
    assert len(plots) == 1 and (tmp_path / "curves.png").is_file()  # drawn once, at the end
    state = torch.load(tmp_path / "last" / trainer_mod.STATE_FILE, weights_only=True)
    assert state["epoch"] == 50 and len(state["history"]) == 50
    assert (tmp_path / "best" / "lora_anywhere_config.json").is_file()  # the best epoch is still tracked
    assert len((tmp_path / "metrics.csv").read_text().splitlines()) == 51

    checkpoints.clear(), plots.clear()
    Trainer(adapted(), xor(16, 0), task="image-classification", epochs=7, out_dir=tmp_path / "b", save_every=3, plot_every=2).fit()
    assert [call[1]["epoch"] for call in checkpoints] == [3, 6, 7]  # and always the last epoch
    assert len(plots) == 4  # epochs 2, 4, 6, then the end


def test_resuming_a_run_saved_every_few_epochs_continues_from_its_last_checkpoint(tmp_path: Path) -> None:
    first = Trainer(adapted(), xor(16, 0), task="image-classification", epochs=4, out_dir=tmp_path, save_every=3, batch_size=8)
    first.fit()
    again = Trainer(adapted(), xor(16, 0), task="image-classification", epochs=6, out_dir=tmp_path, save_every=3, batch_size=8, resume=True)
    assert [row["epoch"] for row in again.fit()] == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"save_every": 0}, "save_every"),
        ({"save_every": True}, "save_every"),
        ({"plot_every": 1.5}, "plot_every"),
        ({"tensorboard": True}, "give an out_dir"),
        ({"tensorboard": "yes", "out_dir": "x"}, "tensorboard must be true or false"),
    ],
)
def test_output_options_are_checked(options, message) -> None:
    with pytest.raises(la.LoraError, match=message):
        Trainer(adapted(), xor(8, 0), task="image-classification", **options)


# ---------------------------------------------------------------------- logging and TensorBoard


SCRIPT = textwrap.dedent(
    """
    import torch
    from torch import nn
    from torch.utils.data import TensorDataset
    import lora_anywhere as la

    torch.manual_seed(0)
    x = torch.randn(32, 8)
    model = la.apply(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)), rank=2)
    la.Trainer(model, TensorDataset(x, (x[:, 0] > 0).long()), task="image-classification", epochs=3, batch_size=8).fit()
    """
)


def test_a_run_under_nohup_logs_one_line_per_epoch(tmp_path: Path) -> None:
    """No terminal, no logging configured (nohup, Slurm, CI): the epoch lines reach the log file."""
    (tmp_path / "train.py").write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(p for p in sys.path if p and "site-packages" not in p)}
    with (tmp_path / "nohup.out").open("w") as log:
        done = subprocess.run(
            [sys.executable, "train.py"], cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
        )
    assert done.returncode == 0
    lines = (tmp_path / "nohup.out").read_text().splitlines()
    assert [line.split()[:3] for line in lines if "epoch" in line] == [["lora_anywhere:", "epoch", f"{e}/3"] for e in (1, 2, 3)]
    assert not any("it/s" in line for line in lines)  # no progress bars into a file


def test_tensorboard_gets_every_epoch_figure(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    history = Trainer(
        adapted(), xor(32, 0), xor(16, 1), task="image-classification", epochs=3, batch_size=8, out_dir=tmp_path, tensorboard=True
    ).fit()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss/train", "loss/val", "accuracy/train", "accuracy/val", "macro_f1/val", "lr"} <= tags
    assert [e.value for e in events.Scalars("accuracy/val")] == pytest.approx([row["val_accuracy"] for row in history])


# ---------------------------------------------------------------------- tasks and metrics


def test_classification_reports_macro_f1_per_class_accuracy_and_a_confusion_matrix(tmp_path: Path) -> None:
    trainer = Trainer(
        adapted(), xor(256, 0), xor(128, 1), task="image-classification", epochs=15, lr=2e-2, batch_size=32, out_dir=tmp_path,
        class_names=["same", "differ"],
    )  # fmt: skip
    history = trainer.fit()
    report = trainer.report(xor(128, 1))
    matrix = torch.tensor(report.details["confusion_matrix"])
    assert matrix.sum() == 128 and report.metrics["accuracy"] == pytest.approx(float(matrix.trace()) / 128)
    per_class = (matrix.diag() / matrix.sum(1)).tolist()
    assert report.details["per_class_accuracy"] == pytest.approx(per_class)
    precision, recall = matrix.diag() / matrix.sum(0), matrix.diag() / matrix.sum(1)
    assert report.metrics["macro_f1"] == pytest.approx(float((2 * precision * recall / (precision + recall)).mean()), rel=1e-5)
    assert history[-1]["val_macro_f1"] == pytest.approx(report.metrics["macro_f1"])
    saved = json.loads((tmp_path / "val_report.json").read_text())
    assert saved["classes"] == ["same", "differ"] and saved["confusion_matrix"] == report.details["confusion_matrix"]
    assert (tmp_path / "val_confusion.png").read_bytes()[:4] == b"\x89PNG"
    written = report.save(tmp_path / "elsewhere", "test")
    assert [p.name for p in written] == ["test_report.json", "test_confusion.png"]


def test_regression_learns_and_reports_r2() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 8, generator=g)
    y = x[:, 0] * 2 - x[:, 1]
    samples = [(x[i], float(y[i])) for i in range(512)]  # a list of (features, number)
    trainer = Trainer(adapted(out=1), samples[:384], samples[384:], task="regression", epochs=20, lr=2e-2, batch_size=32)
    history = trainer.fit()
    assert history[-1]["val_mae"] < 0.5 * history[0]["val_mae"] and history[-1]["val_r2"] > 0.8, history[-1]
    assert history[-1]["val_mse"] == pytest.approx(history[-1]["val_loss"], rel=1e-5)


def test_multi_label_learns_and_reports_macro_f1() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 8, generator=g)
    labels = torch.stack([x[:, 0] > 0, x[:, 1] > 0, x[:, 0] + x[:, 1] > 0], 1).float()  # any number of the 3 per example
    data = TensorDataset(x, labels)
    history = Trainer(adapted(out=3), data, task="multi-label-classification", epochs=15, lr=2e-2, batch_size=32).fit()
    report = Trainer(adapted(out=3), data, task="multi-label-classification").report(data)  # untrained, for comparison
    assert history[-1]["train_accuracy"] > 0.9 and len(report.details["per_label_accuracy"]) == 3


def test_token_classification_counts_only_labelled_tokens() -> None:
    """One label per token (-100: none), as a transformers token-classification model returns them."""
    transformers = pytest.importorskip("transformers")
    g = torch.Generator().manual_seed(0)
    samples = []
    for _ in range(128):
        n = int(torch.randint(4, 9, (1,), generator=g))
        ids = torch.randint(1, 40, (n,), generator=g)
        labels = (ids % 3).clone()
        labels[0] = -100  # a special token
        samples.append({"input_ids": ids, "attention_mask": torch.ones(n, dtype=torch.long), "labels": labels})
    config = transformers.BertConfig(
        vocab_size=40, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, num_labels=3
    )
    torch.manual_seed(0)
    model = la.apply(transformers.BertForTokenClassification(config), rank=4, trainable="classifier")
    trainer = Trainer(model, samples, samples[:32], task="token-classification", epochs=8, lr=3e-2, batch_size=16)
    history = trainer.fit()
    assert history[-1]["val_accuracy"] > 0.9, history[-1]  # the class is the token id mod 3
    batch = trainer.task.collate(samples[:2])
    assert batch["labels"].shape == batch["input_ids"].shape and (batch["labels"] == -100).sum() == 2 + abs(
        len(samples[0]["labels"]) - len(samples[1]["labels"])
    )
    counted = sum(int((s["labels"] != -100).sum()) for s in samples[:32])
    assert (
        trainer.report(samples[:32]).details["confusion_matrix"]
        and sum(map(sum, trainer.report(samples[:32]).details["confusion_matrix"])) == counted
    )


def test_reporting_helpers_write_atomically_readable_files(tmp_path: Path) -> None:
    history = [
        {"epoch": 1, "train_loss": 1.0, "val_accuracy": 0.5},
        {"epoch": 2, "train_loss": 0.5, "val_accuracy": 0.75, "val_macro_f1": 0.7},
    ]
    reporting.write_history(history, tmp_path / "metrics.csv")
    assert (tmp_path / "metrics.csv").read_text().splitlines()[0] == "epoch,train_loss,val_accuracy,val_macro_f1"
    reporting.write_history(history, tmp_path / "metrics.jsonl")
    assert [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == history
    assert reporting.epoch_line(history[1], 5) == "epoch 2/5  train_loss 0.5  val_accuracy 0.75  val_macro_f1 0.7"
