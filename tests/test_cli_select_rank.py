"""`lora-anywhere select-rank CONFIG.toml`: k-fold cross-validation over ranks on the
example configs and their sample data (tiny: 2 ranks, 2 folds, 1 epoch), the JSON
table, the printed `train --rank` line, and the error paths with their exit codes."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from lora_anywhere.cli import main
from lora_anywhere.io import read_adapter

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "examples" / "configs"
DATA = ROOT / "examples" / "data"
FAST = ["--ranks", "1,4", "--folds", "2", "--epochs", "1"]


pytestmark = pytest.mark.usefixtures("one_thread")


def table_rows(printed: str) -> list[list[str]]:
    lines = printed.splitlines()
    start = next(i for i, line in enumerate(lines) if "(mean ± std)" in line) + 1
    rows = []
    for line in lines[start:]:
        if not line.strip() or not line.split()[0].isdigit():
            break
        rows.append(line.split())
    return rows


def config_with(tmp_path: Path, domain: str, extra: str = "") -> Path:
    """An example config copied to tmp_path (its data paths made absolute), plus `extra`."""
    text = (CONFIGS / f"{domain}.toml").read_text().replace('"../data/', f'"{DATA}/')
    path = tmp_path / f"{domain}.toml"
    path.write_text(text + extra)
    return path


def test_graph_config_end_to_end_with_json_and_train_hint(tmp_path, capsys, monkeypatch):
    """Node classification: the folds are the graph's labelled nodes."""
    config = CONFIGS / "graph.toml"
    monkeypatch.chdir(tmp_path)  # where [train] out_dir would go
    table = tmp_path / "out" / "ranks.json"
    assert main(["select-rank", str(config), *FAST, "--json", str(table)]) == 0
    printed = capsys.readouterr().out
    assert "47 nodes to fold" in printed and "cross-validating ranks 1, 4 with 2 folds on val_accuracy (1 epoch per fold)" in printed
    rows = table_rows(printed)
    assert [int(r[0]) for r in rows] == [1, 4] and sum("chosen" in " ".join(r) for r in rows) == 1

    result = json.loads(table.read_text())
    assert [s["rank"] for s in result["scores"]] == [1, 4] and result["folds"] == 2 and result["metric"] == "val_accuracy"
    assert result["scores"][0]["adapter_params"] < result["scores"][1]["adapter_params"]
    assert all(len(s["folds"]) == 2 and 0 <= s["mean"] <= 1 and s["std"] >= 0 for s in result["scores"])
    assert result["chosen"] in (1, 4) and f"chosen rank: {result['chosen']}" in printed
    assert [p.name for p in table.parent.iterdir()] == ["ranks.json"]  # atomic: no temporary left over
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # the folds write nothing: no runs/train-graph

    # The printed line trains at the chosen rank, as printed.
    line = next(line for line in printed.splitlines() if line.startswith("to train at that rank: "))
    argv = shlex.split(line.split(": ", 1)[1])[1:]
    assert argv == ["train", str(config), "--rank", str(result["chosen"])]
    assert main([*argv, "--epochs", "1", "--out", str(tmp_path / "trained")]) == 0
    assert read_adapter(tmp_path / "trained" / "adapter")[0].rank == result["chosen"]


def test_text_config_select_rank_table_and_flags_override_it(tmp_path, capsys):
    """A data set of samples (train + val CSVs together); [select_rank] is read, and
    the command-line flags override it."""
    config = config_with(tmp_path, "text", '\n[select_rank]\nranks = [2, 8]\nfolds = 3\nmetric = "val_loss"\nseed = 1\n')
    table = tmp_path / "ranks.json"
    assert main(["select-rank", str(config), "--epochs", "1", "--folds", "2", "--json", str(table)]) == 0
    printed = capsys.readouterr().out
    assert "39 samples to fold" in printed and "with 2 folds on val_loss" in printed
    result = json.loads(table.read_text())
    assert [s["rank"] for s in result["scores"]] == [2, 8] and result["metric"] == "val_loss" and result["seed"] == 1
    assert result["scores"][0]["adapter_params"] < result["scores"][1]["adapter_params"]
    assert all(s["mean"] > 0 for s in result["scores"])  # a loss
    assert "val_loss (mean ± std)" in printed and [int(r[0]) for r in table_rows(printed)] == [2, 8]


def test_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["select-rank", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: lora-anywhere select-rank") and "--ranks" in out and "--folds" in out


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--folds", "1"], "1 fold cannot cross-validate; give 2 or more"),
        (["--folds", "two"], "'two' is not a whole number"),
        (["--ranks", ""], "no rank given"),
        (["--ranks", ",,"], "no rank given"),
        (["--ranks", "0,2"], "every rank must be a positive whole number"),
        (["--ranks", "-1"], "every rank must be a positive whole number"),
        (["--ranks", "2,2"], "names a rank more than once"),
        (["--epochs", "0"], "0 is not positive"),
    ],
)
def test_bad_flags_are_usage_errors(flags, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["select-rank", str(CONFIGS / "graph.toml"), *flags])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "usage: lora-anywhere select-rank" in err and message in err, err


@pytest.mark.parametrize(
    ("extra", "flags", "message"),
    [
        ("[select_rank]\nrnaks = [1, 2]\n", [], "[select_rank] has no option 'rnaks'; its options are: folds, metric, ranks, seed"),
        ("[select_rank]\nfolds = 1\n", [], "[select_rank] folds must be an integer ≥ 2, got 1 (int)"),
        ("[select_rank]\nranks = []\n", [], "[select_rank] ranks must be a non-empty list of positive integers"),
        ("[select_rank]\nranks = [0, 2]\n", [], "[select_rank] ranks must be a non-empty list of positive integers"),
        ("[select_rank]\nmetric = 3\n", [], "[select_rank] metric must be a metric name such as"),
        (
            "",
            ["--metric", "val_f1"],
            "metric 'val_f1' is not one the trainer reports for this task; choose one of train_accuracy, train_loss, val_accuracy, val_loss, val_macro_f1",
        ),
        ("", ["--folds", "48"], "47 samples cannot be split into 48 folds"),
        ("", ["--ranks", "1", "--device", "tpu"], "device 'tpu' is not a torch device; use auto, cpu, cuda or cuda:N"),
    ],
)
def test_config_and_data_errors_say_what_to_fix(tmp_path, capsys, extra, flags, message):
    config = tmp_path / "graph.toml"
    config.write_text((CONFIGS / "graph.toml").read_text().replace('"../data/', f'"{DATA}/') + extra)
    assert main(["select-rank", str(config), "--epochs", "1", *flags]) == 1
    out, err = capsys.readouterr()
    assert err.startswith("lora-anywhere select-rank: error: ") and message in err, err
    assert "Traceback" not in err and "rank 1:" not in out  # nothing trained before the error


def test_missing_config(capsys):
    assert main(["select-rank", "no/such.toml"]) == 1
    assert "config file no/such.toml does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["train", "select-rank"])
def test_a_device_torch_does_not_know_is_refused_up_front(command, capsys, tmp_path):
    assert main([command, str(CONFIGS / "graph.toml"), "--device", "tpu", *(["--out", str(tmp_path)] if command == "train" else [])]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"lora-anywhere {command}: error: ") and "device 'tpu' is not a torch device" in err


def test_train_rank_flag_is_checked(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", str(CONFIGS / "graph.toml"), "--rank", "0"])
    assert exc.value.code == 2 and "0 is not positive" in capsys.readouterr().err
