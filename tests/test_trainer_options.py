"""Every option of the Trainer and of a `lora-anywhere train` config is checked before
anything happens: a value of the wrong type or range is one ConfigError (one line on
the command line) that names the option, the value and what is allowed — never a
traceback, never a silently accepted value."""

from __future__ import annotations

import inspect
import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import TensorDataset

import lora_anywhere as la
from lora_anywhere.cli import main
from lora_anywhere.cli.config import LORA_KEYS, LORA_OPTIONS, MODEL_OPTIONS, SELECT_RANK_OPTIONS, TRAIN_KEYS, load_config
from lora_anywhere.errors import ConfigError
from lora_anywhere.training import options
from lora_anywhere.training.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
TEXT_CSV = ROOT / "examples" / "data" / "text" / "train.csv"
MODEL = '[model]\nspec = "hf:BertForSequenceClassification"\n'
DATA = f'[data]\nkind = "text-csv"\ntrain = "{TEXT_CSV}"\nvocab_size = 100\n'
GOOD = MODEL + 'kwargs = { num_labels = "{classes}", vocab_size = 100 }\n' + DATA


def data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 8, generator=g)
    return TensorDataset(x, (x[:, 0] > 0).long())


def model() -> nn.Module:
    torch.manual_seed(0)
    return la.apply(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2)), rank=2, trainable=["2"])


def test_every_option_has_a_kind() -> None:
    keywords = {n for n, p in inspect.signature(Trainer.__init__).parameters.items() if p.kind is p.KEYWORD_ONLY}
    assert keywords == set(options.TRAINER)
    assert TRAIN_KEYS == keywords - {"class_names"}  # the CLI takes the class names from the data
    assert set(LORA_OPTIONS) == LORA_KEYS - {"name"}


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("seed", "0", "seed must be an integer ≥ 0, got '0' (str)"),
        ("epochs", 2.0, "epochs must be an integer ≥ 1, got 2.0 (float)"),
        ("epochs", True, "epochs must be an integer ≥ 1, got True (bool)"),
        ("batch_size", 0, "batch_size must be an integer ≥ 1, got 0 (int)"),
        ("lr", -1e-3, "lr must be a number > 0, 'find', None"),
        ("lr", math.nan, "lr must be a number > 0"),
        ("lr", {"adaptor": 1e-2}, "lr must be a number > 0, 'find', None (the measured defaults) or a table of rates by group"),
        ("lr", "1e-3", "got '1e-3' (str)"),
        ("optimizer", "adamax", "optimizer must be one of 'adamw', 'adam', 'sgd' or a function"),
        ("loraplus_ratio", 0, "loraplus_ratio must be a number > 0"),
        ("clip", -1, "clip must be None or a number > 0"),
        ("warmup", math.inf, "warmup must be a number ≥ 0, got inf (float)"),
        ("schedule", "step", "schedule must be one of 'cosine', 'linear', 'constant'"),
        ("progress", "yes", "progress must be None or true or false"),
        ("resume", 1, "resume must be true or false, got 1 (int)"),
        ("device", "tpu", "device must be 'auto', 'cpu', 'cuda', 'cuda:N' or another torch device, got 'tpu' (str)"),
        ("patience", 0, "patience must be None or an integer ≥ 1"),
        ("regularizer", "delta_frobenius", "regularizer must be None or a function"),
        ("out_dir", 3, "out_dir must be None or a folder path, got 3 (int)"),
    ],
)
def test_a_wrong_option_is_named_with_its_value_and_what_is_allowed(option: str, value: object, message: str) -> None:
    net = model()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ConfigError) as caught:
        Trainer(net, data(), task="image-classification", **{option: value})
    assert message in str(caught.value) and "\n" not in str(caught.value)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # nothing happened to the model


JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 3),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6),
    st.lists(st.integers(-1, 2), max_size=2),
    st.dictionaries(st.sampled_from(["adapter", "x", "model"]), st.floats(-1, 1), max_size=2),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(option=st.sampled_from(sorted(set(options.TRAINER) - {"task"})), value=JUNK)
def test_any_value_of_any_option_builds_a_trainer_or_fails_with_a_named_lora_error(option: str, value: object) -> None:
    try:
        Trainer(model(), data(), data(), task="image-classification", **({"progress": False} | {option: value}))
    except la.LoraError as exc:
        assert option in str(exc), exc


# ---------------------------------------------------------------------- the config file


def toml_value(value: object) -> str:
    """`value` as TOML (strings, numbers, booleans, lists and inline tables)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, (int, float, str)):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return "{ " + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + " }"  # type: ignore[attr-defined]


TOML_JUNK = st.one_of(
    st.booleans(),
    st.integers(-3, 3),
    st.floats(allow_nan=True),
    st.text(st.characters(codec="ascii", exclude_categories=["Cc"]), max_size=6),
    st.lists(st.integers(-1, 3), max_size=3),
    st.lists(st.text(st.sampled_from("ab*"), max_size=2), max_size=2),
    st.dictionaries(st.sampled_from(["a", "adapter", "fc"]), st.integers(-1, 3), max_size=2),
)
SECTIONS = {
    "train": sorted(TRAIN_KEYS),
    "lora": sorted(LORA_OPTIONS),
    "model": sorted(set(MODEL_OPTIONS) - {"spec"}),
    "select_rank": sorted(SELECT_RANK_OPTIONS),
}


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(where=st.sampled_from([(s, o) for s, names in SECTIONS.items() for o in names]), value=TOML_JUNK)
def test_any_value_in_a_config_loads_or_fails_naming_its_section_and_option(tmp_path: Path, where: tuple[str, str], value: object) -> None:
    section, option = where
    line = f"{option} = {toml_value(value)}\n"
    path = tmp_path / "config.toml"
    path.write_text(MODEL + line + DATA if section == "model" else GOOD + f"[{section}]\n" + line)
    try:
        load_config(path)
    except ConfigError as exc:
        assert f"[{section}] {option} must be " in str(exc) and "\n" not in str(exc), exc


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ('[train]\nseed = "0"\n', "[train] seed must be an integer ≥ 0, got '0' (str)"),
        ("[train]\nlr = 0\n", "[train] lr must be a number > 0"),
        ('[train]\noptimizer = "lion"\n', "[train] optimizer must be one of 'adamw', 'adam', 'sgd'"),
        ('[lora]\nfreeze_a = "yes"\n', "[lora] freeze_a must be true or false, got 'yes' (str)"),
        ("[lora]\nrank = 0\n", "[lora] rank must be an integer ≥ 1, got 0 (int)"),
        ("[lora]\ndropout = 1.0\n", "[lora] dropout must be a number in [0, 1), got 1.0 (float)"),
        ("[lora]\ntargets = 3\n", "[lora] targets must be a name, a glob or a class name, or a list of them"),
        ('[lora]\ninit = "pissa"\n', "[lora] init must be one of 'lora', 'svd'"),
        ("[select_rank]\nseed = -1\n", "[select_rank] seed must be an integer ≥ 0, got -1 (int)"),
    ],
)
def test_the_command_line_says_it_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture, extra: str, message: str) -> None:
    config = tmp_path / "config.toml"
    config.write_text(GOOD + extra)
    assert main(["train", str(config), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("lora-anywhere train: error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_model_options_are_checked_too(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(GOOD.replace("[model]\n", "[model]\nseed = 1.5\n"))
    with pytest.raises(ConfigError, match=r"\[model\] seed must be an integer ≥ 0, got 1.5 \(float\)"):
        load_config(config)
    config.write_text(GOOD.replace('spec = "hf:BertForSequenceClassification"', "spec = 7"))
    with pytest.raises(ConfigError, match=r"\[model\] spec must be a model spec"):
        load_config(config)


def test_rates_by_group_and_find_are_accepted_in_a_config(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(GOOD + '[train]\nlr = { adapter = 0.02, trainable = 0.005 }\noptimizer = "sgd"\n')
    assert load_config(config).train["lr"] == {"adapter": 0.02, "trainable": 0.005}
    config.write_text(GOOD + '[train]\nlr = "find"\nloraplus_ratio = 4\n')
    assert load_config(config).train["lr"] == "find"
