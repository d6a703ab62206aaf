"""The `lora-anywhere` command line: every command's help, `inspect`/`summary` (table
and Mermaid), and error paths with their messages and exit codes. `demo` is in
test_demo.py; `train` and `merge` in test_cli_train_merge.py; `select-rank` in
test_cli_select_rank.py."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch

import lora_anywhere as la
from lora_anywhere.cli import main
from lora_anywhere.cli.demo import SmallCNN
from lora_anywhere.cli.mermaid import mermaid

COMMANDS = ["demo", "inspect", "summary", "train", "select-rank", "merge", "plugins"]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_for_every_command(capsys, command):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: lora-anywhere") and "--help" in out


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    out = capsys.readouterr().out
    assert all(command in out for command in COMMANDS)


def test_inspect_prints_the_table(capsys):
    assert main(["inspect", "lora_anywhere.cli.demo:SmallCNN", "--rank", "2", "--targets", "Conv2d"]) == 0
    out = capsys.readouterr().out
    assert "torch.nn.Conv2d" in out and "matrix weights covered" in out and "head" not in out.split("adapted tensors")[0]


def test_summary_is_inspect_with_exclude_and_trainable(capsys):
    assert main(["summary", "lora_anywhere.cli.demo:SmallCNN", "--exclude", "stem.*", "--trainable", "head"]) == 0
    out = capsys.readouterr().out
    rows = [line.split()[0] for line in out.splitlines()[2:] if line and not line.startswith(("adapted", "trainable", "matrix"))]
    assert rows == ["depthwise.0", "pointwise.0", "conv.0"]


def test_inspect_model_args_reach_the_builder(capsys):
    assert main(["inspect", "torch.nn:Linear", "--model-arg", "in_features=6", "--model-arg", "out_features=3", "--rank", "2"]) == 0
    assert "3×6" in capsys.readouterr().out


def test_inspect_mermaid_marks_adapted_trainable_and_frozen(capsys):
    assert (
        main(["inspect", "lora_anywhere.cli.demo:SmallCNN", "--rank", "2", "--trainable", "head", "--format", "mermaid", "--depth", "0"])
        == 0
    )
    out = capsys.readouterr().out
    assert out.startswith("flowchart LR\n")
    assert len(re.findall(r":::adapted", out)) == 4  # the four convs
    assert re.search(r'\["head: Linear<br/>trained fully"\]:::trainable', out)
    assert re.search(r'\["1: BatchNorm2d"\]:::frozen', out)
    assert "classDef adapted" in out and out.count("-->") == 13  # every drawn module hangs off its parent


def test_mermaid_folds_deep_levels_and_counts_what_is_inside():
    model = la.apply(SmallCNN(), rank=2)
    text = mermaid(model, depth=1, direction="TD")
    assert text.startswith("flowchart TD") and "0: Conv2d" not in text
    assert text.count("1 adapted layer inside") == 4
    assert '"head: Linear<br/>LoRA r=2 on weight"' in text


def test_mermaid_of_attention_names_its_targets():
    model = torch.nn.Sequential(torch.nn.MultiheadAttention(8, 2))
    la.apply(model, rank=2, targets="MultiheadAttention:q,v")
    assert "LoRA r=2 on q,v" in mermaid(model)


def test_inspect_shows_a_saved_adapter(tmp_path, capsys):
    torch.manual_seed(0)
    model = la.apply(SmallCNN(), rank=3, targets="Conv2d", trainable="head")
    la.save_adapter(model, tmp_path / "adapter")
    assert main(["inspect", "lora_anywhere.cli.demo:SmallCNN", "--adapter", str(tmp_path / "adapter"), "--format", "mermaid"]) == 0
    out = capsys.readouterr().out
    assert out.count("LoRA r=3") == 4 and "trained fully" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["inspect", "nonsense"], "not of the form"),
        (["inspect", "no_such_module_xyz:thing"], "neither a model source"),
        (["inspect", "lora_anywhere.cli.demo:NoSuchThing"], "has no attribute"),
        (["inspect", "torch.nn:Linear"], "calling torch.nn.Linear() failed"),
        (
            ["inspect", "torch.nn:Linear", "--model-arg", "in_features=2", "--model-arg", "out_features=2", "--model-arg", "nonsense=1"],
            "unexpected keyword",
        ),
        (["inspect", "torch.nn:Linear", "--model-arg", "in_features"], "is not KEY=VALUE"),
        (["inspect", "torchaudio:no_such_factory"], "no model factory"),
        (["inspect", "lora_anywhere.cli.demo:SmallCNN", "--targets", "nothing*"], "matched no layer"),
        (["inspect", "lora_anywhere.cli.demo:SmallCNN", "--rank", "0"], "positive integer"),
        (["inspect", "lora_anywhere.cli.demo:SmallCNN", "--adapter", "no/such/folder"], "no adapter at"),
        (["inspect", "lora_anywhere.cli.demo:SmallCNN", "--adapter", "x", "--rank", "2"], "leave out --rank"),
        (["demo", "sound"], "unknown demo domain 'sound'"),
        (["demo", "text", "--device", "tpu"], "use auto, cpu, cuda"),
    ],
)
def test_errors_say_what_to_fix(capsys, argv, message):
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"lora-anywhere {argv[0]}: error: ") and message in err


@pytest.mark.parametrize(
    "argv",
    [
        ["inspect"],
        ["inspect", "x", "--format", "svg"],
        ["inspect", "x", "--depth", "-1"],
        ["demo", "--threads", "many"],
        ["merge", "--model", "x"],
        ["nonsense"],
    ],
)
def test_usage_errors_exit_2(capsys, argv):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_the_installed_command_sets_exit_codes():
    """The console script, as a shell sees it: 0, 1 for errors it explains, 2 for usage."""
    run = lambda *argv: subprocess.run([sys.executable, "-m", "lora_anywhere.cli", *argv], capture_output=True, text=True)  # noqa: E731
    ok, failed, usage = run("--version"), run("inspect", "nonsense"), run("inspect")
    assert ok.returncode == 0 and "lora_anywhere" in ok.stdout
    assert failed.returncode == 1 and "error: model spec 'nonsense'" in failed.stderr
    assert usage.returncode == 2


def test_plugins_lists_builtin_and_domain_plugins(capsys):
    assert main(["plugins", "-v"]) == 0
    out = capsys.readouterr().out
    names = [line.split()[0] for line in out.splitlines() if not line.startswith(" ")]
    assert {"graph", "vision", "speech", "text"} <= set(names)
    assert "\n    torch.nn.modules.linear.Linear\n" in out  # -v lists the layer types under each plugin
