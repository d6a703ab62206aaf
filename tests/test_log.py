"""What the library says goes through the `lora_anywhere` logger, and is seen even
where nobody configured logging (nohup, Slurm, CI: stderr is not a terminal)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import torch
    from torch import nn
    import lora_anywhere as la

    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(16, 4), torch.arange(16) % 2)
    model = la.apply(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), rank=2)
    la.Trainer(model, data, task="image-classification", epochs=2, batch_size=8{extra}).fit()
    """
)


def run(setup: str = "", extra: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", setup + SCRIPT.format(extra=extra)], capture_output=True, text=True, timeout=300)


def test_epoch_lines_reach_stderr_when_logging_is_not_configured() -> None:
    done = run()
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("lora_anywhere: epoch")]
    assert [line.split()[2] for line in lines] == ["1/2", "2/2"] and "train_loss" in lines[0]


def test_a_configured_application_gets_the_records_once_and_can_quiet_them() -> None:
    configured = run("import logging, sys\nlogging.basicConfig(stream=sys.stdout, format='%(name)s|%(message)s')\n")
    assert configured.stdout.count("lora_anywhere|epoch 1/2") == 1 and "lora_anywhere: epoch" not in configured.stderr
    quiet = run("import logging\nlogging.getLogger('lora_anywhere').setLevel(logging.WARNING)\n")
    assert "epoch" not in quiet.stderr + quiet.stdout


def test_progress_false_is_silent() -> None:
    done = run(extra=", progress=False")
    assert done.returncode == 0 and "epoch" not in done.stderr
