"""The Trainer's optimizer: parameter groups with their own rates, what ``lr=`` means,
LoRA+, the choice of optimizer; plain models trained and resumed like adapted ones;
a resume with another setup refused before anything is loaded; the range test."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_trainer import SignalAt, xor_data
from torch import nn
from torch.utils.data import TensorDataset

import lora_anywhere as la
from lora_anywhere.cli.demo.vision import NORMS, SmallCNN
from lora_anywhere.errors import AdapterFileError, ConfigError, ResumeError
from lora_anywhere.training import lr_finder, optim
from lora_anywhere.training.checkpoint import MODEL_FILE, load_trained
from lora_anywhere.training.trainer import STATE_FILE, Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

DIGITS = Path(__file__).resolve().parents[1] / "bench" / "data" / "digits.npz"


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 2))


def digits(low: int, n: int | None = None) -> TensorDataset:
    """Real data: the UCI handwritten digits low..low+4 as 1×8×8 images in [0, 1]."""
    with np.load(DIGITS) as z:
        images, labels = torch.from_numpy(z["images"]).float() / 16, torch.from_numpy(z["labels"]).long()
    keep = (labels >= low) & (labels < low + 5)
    return TensorDataset(images[keep][:n, None], labels[keep][:n] - low)


def names(trainer: Trainer) -> dict[str, list[str]]:
    return {g.name: [n for n, _ in g.params] for g in trainer.groups}


# ---------------------------------------------------------------------- groups and rates


def test_each_kind_of_parameter_gets_its_group_and_default_rate(log_lines: list[str]) -> None:
    torch.manual_seed(0)
    model = la.apply(mlp(), rank=2, dora=True, trainable=["1", "3"])
    trainer = Trainer(model, xor_data(32, 1), task="image-classification", epochs=1, batch_size=16)
    groups = names(trainer)
    assert list(groups) == ["adapter A", "adapter B", "magnitude", "trainable"]
    assert groups["adapter A"] == ["0.lora_adapters.default.factors.weight.A"]
    assert groups["adapter B"] == ["0.lora_adapters.default.factors.weight.B"]
    assert groups["magnitude"] == ["0.lora_adapters.default.magnitudes.weight"]
    assert groups["trainable"] == ["1.weight", "1.bias", "3.weight", "3.bias"]
    # Every parameter that trains is in exactly one group, and nothing else is.
    grouped = [p for g in trainer.groups for _, p in g.params]
    assert len({id(p) for p in grouped}) == len(grouped) == sum(1 for p in model.parameters() if p.requires_grad)
    a_rate = optim.DEFAULT_LR["adapter"]
    assert [g["lr"] for g in trainer.optimizer.param_groups] == [
        a_rate, a_rate * optim.DEFAULT_LORAPLUS_RATIO, optim.DEFAULT_LR["magnitude"], optim.DEFAULT_LR["trainable"]
    ]  # fmt: skip
    trainer.fit()
    assert log_lines[0].startswith("optimizer AdamW: adapter A lr ") and "adapter B lr" in log_lines[0] and "trainable lr" in log_lines[0]


def test_a_number_sets_every_group_and_a_mapping_the_groups_it_names() -> None:
    torch.manual_seed(0)
    model = la.apply(mlp(), rank=2, trainable=["3"])
    same = Trainer(model, xor_data(32, 1), task="image-classification", lr=5e-4)
    assert [g["lr"] for g in same.optimizer.param_groups] == [5e-4, 5e-4]  # A and B alike: no LoRA+ once lr is given
    some = Trainer(model, xor_data(32, 1), task="image-classification", lr={"trainable": 2e-3})
    a_rate = optim.DEFAULT_LR["adapter"]
    assert [g["lr"] for g in some.optimizer.param_groups] == [a_rate, a_rate * optim.DEFAULT_LORAPLUS_RATIO, 2e-3]
    adapter = Trainer(model, xor_data(32, 1), task="image-classification", lr={"adapter": 2e-3})
    assert [(g.name, g.lr) for g in adapter.groups] == [("adapter", 2e-3), ("trainable", optim.DEFAULT_LR["trainable"])]
    with pytest.raises(ConfigError, match="lr must be .* a table of rates by group"):
        Trainer(model, xor_data(32, 1), task="image-classification", lr={"head": 1e-3})


def test_pissa_factors_default_to_one_rate_for_a_and_b() -> None:
    torch.manual_seed(0)
    pissa = la.apply(mlp(), rank=2, init="svd", trainable=["3"])
    trainer = Trainer(pissa, xor_data(32, 1), task="image-classification")
    assert [(g.name, g.lr) for g in trainer.groups] == [("adapter", optim.SVD_ADAPTER_LR), ("trainable", optim.DEFAULT_LR["trainable"])]
    chosen = Trainer(pissa, xor_data(32, 1), task="image-classification", lr={"adapter": 1e-3}, loraplus_ratio=4)
    assert [(g.name, g.lr) for g in chosen.groups][:2] == [("adapter A", 1e-3), ("adapter B", 4e-3)]


def test_weight_decay_is_per_group_like_the_rate() -> None:
    torch.manual_seed(0)
    model = la.apply(mlp(), rank=2, dora=True, trainable=["3"])
    default = Trainer(model, xor_data(32, 1), task="image-classification")
    assert [(g.kind, g.weight_decay) for g in default.groups] == [
        (k, optim.DEFAULT_WEIGHT_DECAY[k]) for k in ("adapter", "adapter", "magnitude", "trainable")
    ]  # fmt: skip
    assert [g["weight_decay"] for g in default.optimizer.param_groups] == [g.weight_decay for g in default.groups]
    some = Trainer(model, xor_data(32, 1), task="image-classification", weight_decay={"trainable": 0.05})
    assert [g.name for g in some.groups] == ["adapter A", "adapter B", "magnitude", "trainable"]
    assert [g["weight_decay"] for g in some.optimizer.param_groups] == [optim.DEFAULT_WEIGHT_DECAY["adapter"]] * 2 + [0.0, 0.05]
    every = Trainer(model, xor_data(32, 1), task="image-classification", weight_decay=0.01)
    assert {g["weight_decay"] for g in every.optimizer.param_groups} == {0.01}
    for bad in ({"head": 0.1}, -1.0, "lots"):
        with pytest.raises(ConfigError, match="weight_decay must be .* a table of weight decays by group"):
            Trainer(model, xor_data(32, 1), task="image-classification", weight_decay=bad)


def test_loraplus_trains_b_at_a_multiple_of_a() -> None:
    torch.manual_seed(0)
    model = la.apply(mlp(), rank=2)
    trainer = Trainer(model, xor_data(32, 1), task="image-classification", lr=1e-3, loraplus_ratio=16)
    assert [(g.name, g.lr) for g in trainer.groups] == [("adapter A", 1e-3), ("adapter B", 16e-3)]
    assert all(n.endswith(".A") for n, _ in trainer.groups[0].params) and all(n.endswith(".B") for n, _ in trainer.groups[1].params)
    frozen_a = la.apply(mlp(), rank=2, freeze_a=True)
    assert [g.name for g in Trainer(frozen_a, xor_data(32, 1), task="image-classification", loraplus_ratio=4).groups] == ["adapter B"]


@pytest.mark.parametrize(
    ("choice", "kind"),
    [
        ("adamw", torch.optim.AdamW),
        ("adam", torch.optim.Adam),
        ("sgd", torch.optim.SGD),
        (torch.optim.RAdam, torch.optim.RAdam),
        (functools.partial(torch.optim.SGD, nesterov=True, momentum=0.5), torch.optim.SGD),
    ],
)
def test_a_choice_of_optimizer_trains(choice: object, kind: type) -> None:
    torch.manual_seed(0)
    model = la.apply(mlp(), rank=4, trainable=["3"])
    trainer = Trainer(model, xor_data(256, 1), xor_data(128, 2), task="image-classification", epochs=6, optimizer=choice, weight_decay=1e-4)
    assert type(trainer.optimizer) is kind and all(g["weight_decay"] == 1e-4 for g in trainer.optimizer.param_groups)
    if choice == "sgd":
        assert trainer.optimizer.param_groups[0]["momentum"] == optim.SGD_MOMENTUM
    history = trainer.fit()
    assert history[-1]["train_loss"] < history[0]["train_loss"]


def test_an_optimizer_function_must_return_an_optimizer() -> None:
    with pytest.raises(ConfigError, match="returned list, not a torch.optim.Optimizer"):
        Trainer(la.apply(mlp(), rank=2), xor_data(8, 1), task="image-classification", optimizer=lambda groups: groups)


# ---------------------------------------------------------------------- plain models


def test_a_plain_model_trains_every_parameter_that_requires_grad(tmp_path: Path, log_lines: list[str]) -> None:
    torch.manual_seed(0)
    model = mlp()
    model[0].bias.requires_grad_(False)  # a user's own freezing is respected
    frozen = model[0].bias.detach().clone()
    assert [(g.name, g.lr) for g in Trainer(model, xor_data(8, 1), task="image-classification").groups] == [
        ("model", optim.DEFAULT_LR["model"])
    ]
    trainer = Trainer(model, xor_data(256, 1), xor_data(128, 2), task="image-classification", epochs=10, lr=2e-2, out_dir=tmp_path)
    history = trainer.fit()
    assert history[-1]["val_accuracy"] >= 0.8, history[-1]
    assert log_lines[0] == "optimizer AdamW: model lr 0.02 (386 parameters)"
    assert torch.equal(model[0].bias, frozen)
    saved = load_file(str(tmp_path / "last" / MODEL_FILE))
    assert "0.bias" not in saved and {"0.weight", "3.weight", "1.running_mean", "1.num_batches_tracked"} <= set(saved)
    # best/ loads into the same model, built the same way, and gives the best val_loss.
    fresh = mlp()
    fresh[0].bias.data.copy_(frozen)
    load_trained(fresh, tmp_path / "best")
    best = min(r["val_loss"] for r in history)
    assert Trainer(fresh, xor_data(8, 1), task="image-classification").evaluate(xor_data(128, 2))["loss"] == pytest.approx(best, rel=1e-5)
    with pytest.raises(la.ShapeMismatchError, match="does not fit this model"):
        load_trained(nn.Sequential(nn.Linear(8, 4)), tmp_path / "best")


def _plain_run(out: Path, *, at: int | None, resume: bool) -> tuple[Trainer, list]:
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 2))
    trainer = Trainer(
        model, SignalAt(xor_data(80, 1), at), xor_data(32, 2), task="image-classification",
        epochs=3, batch_size=8, grad_accum=2, warmup=2, out_dir=out, seed=3, resume=resume,
    )  # fmt: skip
    return trainer, trainer.fit()


def test_a_plain_model_resumes_to_the_bit(tmp_path: Path) -> None:
    _, reference = _plain_run(tmp_path / "a", at=None, resume=False)
    first, _ = _plain_run(tmp_path / "b", at=100, resume=False)  # Ctrl-C in epoch 2
    assert first.interrupted
    second, history = _plain_run(tmp_path / "b", at=None, resume=True)
    a, b = (load_file(str(tmp_path / x / "last" / MODEL_FILE)) for x in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    drop = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert drop(history) == drop(reference)


def test_adapter_option_on_a_plain_model_is_an_error() -> None:
    with pytest.raises(la.NotAdaptedError, match="carries no adapter"):
        Trainer(mlp(), xor_data(8, 1), task="image-classification", adapter="default")


# ---------------------------------------------------------------------- resume checks


def _adapted(**apply_options: object) -> nn.Module:
    return la.apply(mlp(), rank=2, trainable=["3"], **apply_options)


@pytest.mark.parametrize(
    ("now", "message"),
    [
        ({"apply": {"freeze_a": True}}, "parameter groups adapter A, adapter B, trainable in the checkpoint, adapter B, trainable now"),
        (
            {"before": {"loraplus_ratio": 1.0}, "apply": {"freeze_a": True}, "trainer": {"loraplus_ratio": 1.0}},
            "group 'adapter' trains 2 tensors in the checkpoint, 1 now",
        ),
        ({"trainer": {"optimizer": "sgd"}}, "optimizer AdamW in the checkpoint, SGD now"),
        (
            {"trainer": {"loraplus_ratio": 1.0}},
            "parameter groups adapter A, adapter B, trainable in the checkpoint, adapter, trainable now",
        ),
    ],
)
def test_a_resume_with_another_optimizer_setup_loads_nothing(tmp_path: Path, now: dict, message: str) -> None:
    torch.manual_seed(0)
    Trainer(
        _adapted(), xor_data(32, 1), task="image-classification", epochs=1, batch_size=8, out_dir=tmp_path, **now.get("before", {})
    ).fit()
    torch.manual_seed(1)
    model = _adapted(**now.get("apply", {}))
    before = {k: v.clone() for k, v in la.adapter_state_dict(model).items()}
    trainer = Trainer(
        model, xor_data(32, 1), task="image-classification", epochs=2, out_dir=tmp_path, resume=True, **now.get("trainer", {})
    )
    with pytest.raises(ResumeError, match=message):
        trainer.fit()
    assert all(torch.equal(before[k], v) for k, v in la.adapter_state_dict(model).items())  # nothing was copied
    assert not trainer.optimizer.state and trainer.history == []


def test_a_checkpoint_that_does_not_fit_loads_nothing(tmp_path: Path) -> None:
    torch.manual_seed(0)
    Trainer(la.apply(mlp(), rank=2, trainable=["3"]), xor_data(32, 1), task="image-classification", epochs=1, out_dir=tmp_path).fit()
    model = la.apply(mlp(), rank=2, ranks={"0": 1}, trainable=["3"])  # the head fits, the adapter does not
    before = {k: v.clone() for k, v in la.adapter_state_dict(model).items()}
    with pytest.raises(AdapterFileError, match="of shape"):
        Trainer(model, xor_data(32, 1), task="image-classification", epochs=2, out_dir=tmp_path, resume=True).fit()
    assert all(torch.equal(before[k], v) for k, v in la.adapter_state_dict(model).items())


def test_resuming_keeps_the_checkpoints_rates_and_says_so(tmp_path: Path, log_lines: list[str]) -> None:
    torch.manual_seed(0)
    model = _adapted()
    Trainer(model, xor_data(32, 1), task="image-classification", epochs=1, out_dir=tmp_path, lr=1e-3).fit()
    trainer = Trainer(model, xor_data(32, 1), task="image-classification", epochs=2, out_dir=tmp_path, lr=5e-3, resume=True)
    trainer.fit()
    assert any("resuming with the checkpoint's learning rates (0.001, 0.001)" in line for line in log_lines)
    assert torch.load(tmp_path / "last" / STATE_FILE, weights_only=True)["scheduler"]["base_lrs"] == [1e-3, 1e-3]


# ---------------------------------------------------------------------- the range test


def _digits_model() -> nn.Module:
    torch.manual_seed(0)
    return la.apply(SmallCNN(5), rank=4, trainable=["head", *NORMS])


def test_the_range_test_restores_the_model_and_its_suggestion_trains(tmp_path: Path) -> None:
    model = _digits_model()
    model.stem.eval()  # a mode of the user's choice survives too
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    result = la.find_lr(model, digits(0, 400), task="image-classification", steps=120, out_dir=tmp_path)
    assert torch.equal(torch.rand(3), expected)  # the generators are where they were
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())  # BatchNorm statistics included
    assert [m.training for m in model.modules()] == modes
    assert all(p.grad is None for p in model.parameters())
    assert 1e-4 < result.suggestion < 0.3 and len(result.lrs) == len(result.smoothed) > 30
    assert result.lrs == sorted(result.lrs) and min(result.smoothed) < 0.7 * result.smoothed[0]  # it learned on the way
    assert (tmp_path / lr_finder.CURVE_PNG).read_bytes()[:4] == b"\x89PNG"
    assert len((tmp_path / lr_finder.CURVE_CSV).read_text().splitlines()) == len(result.lrs) + 1
    history = Trainer(model, digits(0, 400), digits(0), task="image-classification", epochs=4, lr=result.suggestion).fit()
    assert history[-1]["val_accuracy"] >= 0.8, history[-1]


def test_lr_find_in_the_trainer_uses_the_suggestion(tmp_path: Path, log_lines: list[str]) -> None:
    trainer = Trainer(_digits_model(), digits(0, 300), digits(0, 200), task="image-classification", epochs=2, lr="find", out_dir=tmp_path)
    trainer.fit()
    found = trainer.range_test.suggestion
    assert [g["initial_lr"] for g in trainer.optimizer.param_groups] == [found, found]
    assert any(line.startswith(f"lr='find': the range test suggests lr {found:.3g}") for line in log_lines)
    assert (tmp_path / lr_finder.CURVE_PNG).is_file()


def test_the_range_test_rejects_what_it_cannot_do() -> None:
    with pytest.raises(ConfigError, match="leave lr out"):
        la.find_lr(_digits_model(), digits(0, 64), task="image-classification", lr=1e-3)
    with pytest.raises(ConfigError, match="start .* must be below stop"):
        la.find_lr(_digits_model(), digits(0, 64), task="image-classification", start=1.0, stop=1e-3)
    with pytest.raises(ConfigError, match="steps must be an integer ≥ 10"):
        la.find_lr(_digits_model(), digits(0, 64), task="image-classification", steps=2)


def test_suggest_picks_the_steep_part_below_the_minimum() -> None:
    lrs = [10 ** (-6 + i * 0.1) for i in range(61)]  # 1e-6 … 1
    # Flat, then falling fastest around 1e-3, lowest at 3e-2, then rising.
    loss = [2.0 - 1.5 / (1 + np.exp(-(np.log10(lr) + 3) * 4)) + (max(0.0, np.log10(lr) + 1.5) ** 2) for lr in lrs]
    found = lr_finder.suggest(lrs, loss)
    assert 5e-4 < found < 3e-3
