"""Shared fixtures. `coverage_table` collects the share of matrix weights each zoo
model gets adapters on, and the run prints it at the end."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

_COVERAGE: list[tuple[str, str, float, int]] = []


@pytest.fixture
def coverage_table():
    """Call ``coverage_table(domain, model_name, report)`` with a testing.Report."""

    def record(domain: str, name: str, report) -> None:
        _COVERAGE.append((domain, name, report.coverage, report.adapted))

    return record


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _COVERAGE:
        return
    tr = terminalreporter
    tr.section("lora_anywhere: matrix-weight coverage per model")
    for domain, name, coverage, adapted in sorted(_COVERAGE):
        tr.write_line(f"{domain:<8} {name:<44} {100 * coverage:7.2f}%  ({adapted} adapted tensors)")


@pytest.fixture(autouse=True)
def _fused_conv_calls(monkeypatch):
    """The tests' layers are tiny, and a tiny call in training takes the weight route
    (`SMALL_CONV_CALL` on the CPU, `SMALL_CALL_OFF_CPU` on a GPU; tested on their
    own): off, so that the fused functions are what activation-route tests run."""
    from lora_anywhere.rules import torch_nn

    monkeypatch.setattr(torch_nn, "SMALL_CONV_CALL", 0)
    monkeypatch.setattr(torch_nn, "SMALL_CALL_OFF_CPU", 0)


@pytest.fixture(autouse=True)
def _quiet_known_warnings():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*weight_norm.*deprecated.*")
        warnings.filterwarnings("ignore", message=".*not supported with oneDNN.*")
        yield


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from threads, and on a shared 2-core machine OpenMP's
    spinning threads make them many times slower. Modules that train use it with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def log_lines():
    """The messages the `lora_anywhere` logger emits during the test, in order."""
    lines: list[str] = []
    handler = _ListHandler(lines)
    logger = logging.getLogger("lora_anywhere")
    logger.addHandler(handler)
    yield lines
    logger.removeHandler(handler)


class _ListHandler(logging.Handler):
    def __init__(self, lines: list[str]) -> None:
        super().__init__()
        self.lines = lines

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture(scope="session")
def two_ranks() -> Callable[[Path, Path, int], list[dict[str, Any]]]:
    """``two_ranks(script, out, timeout)`` runs `script` (given `out` as its argument)
    under torchrun as 2 CPU processes and returns the ``rank{0,1}.json`` reports they
    write in `out`; a failed run fails the test with the end of its output."""

    def run(script: Path, out: Path, timeout: int) -> list[dict[str, Any]]:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), str(out)]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
        return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]

    return run
