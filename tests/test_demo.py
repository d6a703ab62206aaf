"""`lora-anywhere demo` in fast mode: every domain runs end to end, prints its rows of
the table and passes its exactness checks; a broken merge, a missing framework and a
bad request each fail loudly. Times are printed, never asserted."""

from __future__ import annotations

import csv
import logging
import re
import sys

import pytest
import torch

import lora_anywhere as la
from lora_anywhere import api
from lora_anywhere.cli import main
from lora_anywhere.cli.demo import DOMAINS, resolve, run_demo
from lora_anywhere.cli.demo.vision import SmallCNN
from lora_anywhere.errors import DemoError


@pytest.fixture(scope="module")
def fast_demo(tmp_path_factory):
    """One fast run of `demo all`: (folder, printed text, outcomes). The command line
    around it is checked on one domain below."""
    out = tmp_path_factory.mktemp("demo")
    printed: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: printed.append(record.getMessage())
    logger = logging.getLogger("lora_anywhere")
    logger.addHandler(handler)
    try:
        outcomes = run_demo(["all"], out, fast=True)
    finally:
        logger.removeHandler(handler)
    return out, "\n".join(printed), outcomes


def test_table_has_every_domain_and_method(fast_demo):
    _, text, outcomes = fast_demo
    header = next(line for line in text.splitlines() if line.startswith("domain "))
    assert header.split() == [
        "domain",
        "task",
        "A",
        "→",
        "task",
        "B",
        "method",
        "accuracy",
        "trainable",
        "params",
        "train",
        "time",
        "adapter",
        "file",
    ]
    rows = [line for line in text.splitlines() if re.search(r"(LoRA r=4|head only|full FT) +\d\.\d{3} ", line)]
    assert len(rows) == 3 * len(DOMAINS)
    assert [o.domain.name for o in outcomes] == list(DOMAINS)


def test_exactness_checks_pass_in_every_domain(fast_demo):
    _, text, outcomes = fast_demo
    for o in outcomes:
        assert o.merge_error <= 1e-4 and o.reload_error <= 1e-4
        assert re.search(
            rf"^{o.domain.name}: merged vs unmerged max \|Δ\| \S+; adapter reloaded onto a fresh base: max \|Δ\| \S+$", text, re.M
        )


def test_costs_are_ordered_as_the_methods_promise(fast_demo):
    """Structure, not luck: a head is smaller than head + adapters, which is smaller
    than the whole model, both in trainable parameters and in the saved file."""
    _, _, outcomes = fast_demo
    for o in outcomes:
        lora, head, full = o.rows
        assert head.trainable < lora.trainable < full.trainable == full.total
        assert head.file_bytes < lora.file_bytes < full.file_bytes


def test_files_are_written(fast_demo):
    out, text, _ = fast_demo
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with (out / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 12 and {r["method"] for r in rows} == {"LoRA", "head only", "full FT"}
    for domain in DOMAINS:
        assert (out / domain / "adapter" / "lora_anywhere_adapter.safetensors").is_file()
        assert (out / domain / "lora" / "metrics.csv").is_file() and (out / domain / "full-ft" / "curves.png").is_file()
    assert f"written: {out / 'results.csv'}, {out / 'curves.png'}" in text


def test_saved_vision_adapter_loads_onto_the_plain_model(fast_demo):
    out, _, _ = fast_demo
    model = SmallCNN(4)
    la.load_adapter(model, out / "vision" / "adapter")
    assert len(la.summary(model).rows) == 4
    assert model(torch.randn(2, 1, 20, 20)).shape == (2, 4)


def test_cli_demo_one_domain(tmp_path, capsys):
    assert main(["demo", "text", "--fast", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "text: merged vs unmerged" in out and "vision" not in out
    assert re.search(r"^text +keyword pair → first keyword +LoRA r=4", out, re.M)


def test_a_merge_that_is_not_exact_fails_the_demo(tmp_path, capsys, monkeypatch):
    real_merge = api.merge

    def sloppy_merge(model, *args, **kwargs):
        real_merge(model, *args, **kwargs)
        with torch.no_grad():
            next(p for n, p in model.named_parameters() if "lora" not in n).add_(0.05)

    monkeypatch.setattr(api, "merge", sloppy_merge)
    assert main(["demo", "text", "--fast", "--out", str(tmp_path)]) == 1
    assert "exactness check failed" in capsys.readouterr().err


def test_a_domain_without_its_framework_is_skipped(tmp_path, monkeypatch, log_lines):
    for name in [n for n in sys.modules if n == "torch_geometric" or n.startswith("torch_geometric.")]:
        monkeypatch.setitem(sys.modules, name, None)  # importing it now fails as if it were not installed
    monkeypatch.delitem(sys.modules, "lora_anywhere.cli.demo.graph", raising=False)
    with pytest.raises(DemoError, match="no domain could run"):
        run_demo(["graph"], tmp_path, fast=True)
    assert "graph: skipped: torch_geometric is not installed (pip install 'lora_anywhere[graph]')" in log_lines


def test_resolve_expands_all_and_keeps_order():
    assert resolve([]) == list(DOMAINS)
    assert resolve(["text", "all"]) == ["text", "vision", "graph", "speech"]
    with pytest.raises(DemoError, match="choose from vision, graph, speech, text or all"):
        resolve(["images"])
