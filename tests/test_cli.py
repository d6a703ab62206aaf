"""The `lora-anywhere` command line: every command, its help, and its error paths."""

from __future__ import annotations

import pytest

from lora_anywhere.cli import main


def test_help_for_every_command(capsys):
    for argv in ([], ["plugins", "--help"], ["inspect", "--help"], ["demo", "--help"]):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code
        assert code in (0, 2)
    assert "inspect" in capsys.readouterr().out


def test_inspect_callable_that_needs_arguments(capsys):
    assert main(["inspect", "torch.nn:Linear"]) == 1
    assert "calling torch.nn.Linear() failed" in capsys.readouterr().err


def test_inspect_prints_the_table(capsys):
    assert main(["inspect", "lora_anywhere.demo:SmallCNN", "--rank", "2", "--targets", "Conv2d"]) == 0
    out = capsys.readouterr().out
    assert "torch.nn.Conv2d" in out and "matrix weights covered" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["inspect", "nonsense"], "not of the form"),
        (["inspect", "no_such_module_xyz:thing"], "neither a model source"),
        (["inspect", "lora_anywhere.demo:NoSuchThing"], "has no attribute"),
        (["inspect", "lora_anywhere.demo:SmallCNN", "--targets", "nothing*"], "matched no layer"),
        (["inspect", "lora_anywhere.demo:SmallCNN", "--rank", "0"], "positive integer"),
    ],
)
def test_inspect_errors_say_what_to_fix(capsys, argv, message):
    assert main(argv) == 1
    assert message in capsys.readouterr().err


def test_demo_runs_end_to_end(tmp_path, capsys):
    assert main(["demo", "--steps", "30", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "[5/5] saved" in out and (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
