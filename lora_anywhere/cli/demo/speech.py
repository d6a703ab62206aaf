"""Speech: an audio CNN pretrained on the pitch of a beeping tone, adapted to the
rhythm of the beeps.

Each clip (0.4–0.6 s at 8 kHz, in noise) is a tone of one of 4 pitches, switched on
and off with one of 4 periods; the tone is on half of the time whatever the period.
Task A is the pitch, task B the rhythm. The pretrained convolutions over the log-mel
spectrogram (torchaudio) detect pitches, and averaging them over time gives the same
numbers for every rhythm: a new head alone stays at chance. Rank-4 updates of the
convolutions (with their BatchNorms) learn the on/off timing.
"""

from __future__ import annotations

import math

import torch
import torchaudio
from torch import nn
from torch.utils.data import Dataset

from ...training.tasks import AudioClassification
from .common import Data, Domain

RATE = 8000
HOP = 80  # 10 ms frames
PITCHES = (300.0, 500.0, 800.0, 1300.0)  # Hz
PERIODS = (0.08, 0.12, 0.18, 0.27)  # seconds per on/off cycle


class Beeps(Dataset):
    """``(waveform, label)`` clips of different lengths; label is the pitch
    (``"pitch"``) or the rhythm (``"rhythm"``) class."""

    def __init__(self, n: int, seed: int, label: str) -> None:
        g = torch.Generator().manual_seed(seed)
        self.items: list[tuple[torch.Tensor, int]] = []
        for _ in range(n):
            pitch, rhythm = (int(v) for v in torch.randint(0, 4, (2,), generator=g))
            length = int(torch.randint(3200, 4801, (1,), generator=g))
            jitter, phase, loudness = torch.rand(3, generator=g).tolist()
            t = torch.arange(length) / RATE
            gate = ((t / PERIODS[rhythm] + phase) % 1.0 < 0.5).float()
            tone = torch.sin(2 * math.pi * PITCHES[pitch] * (1 + 0.05 * (jitter - 0.5)) * t)
            wave = tone * gate * (0.5 + loudness) + 0.3 * torch.randn(length, generator=g)
            self.items.append((wave, pitch if label == "pitch" else rhythm))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.items[i]


class AudioNet(nn.Module):
    """Log-mel spectrogram → three dilated Conv1d blocks → mean over the clip's real
    frames → a 16-wide projection → a linear head (17k parameters)."""

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.mel = torchaudio.transforms.MelSpectrogram(RATE, n_fft=256, hop_length=HOP, n_mels=32)

        def block(dilation: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv1d(32, 32, 5, padding=2 * dilation, dilation=dilation), nn.BatchNorm1d(32), nn.ReLU())

        self.conv1, self.conv2, self.conv3 = block(1), block(2), block(4)
        self.proj = nn.Sequential(nn.Linear(32, 16), nn.ReLU())
        self.head = nn.Linear(16, classes)

    def forward(self, waves: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        h = self.conv3(self.conv2(self.conv1(torch.log(self.mel(waves) + 1e-4))))
        frames = lengths // HOP + 1  # the padding's frames do not count
        mask = (torch.arange(h.shape[-1], device=h.device)[None] < frames[:, None]).to(h.dtype)
        return self.head(self.proj((h * mask[:, None]).sum(-1) / frames[:, None]))


def _data(label: str, fast: bool) -> Data:
    sizes = (600, 200, 300) if fast else (2000, 400, 800)
    return Data(*(Beeps(n, seed, label) for seed, n in zip((1, 2, 3), sizes)), classes=4)


def _outputs(model: nn.Module, data: Data) -> torch.Tensor:
    waves, lengths, _ = AudioClassification().collate([data.test[i] for i in range(16)])
    return model(waves, lengths)


DOMAIN = Domain(
    name="speech",
    task="audio-classification",
    task_a="pitch",
    task_b="rhythm",
    model="an audio CNN on log-mel (torchaudio)",
    data_a=lambda fast: _data("pitch", fast),
    data_b=lambda fast: _data("rhythm", fast),
    build=AudioNet,
    head="head",
    outputs=_outputs,
    rank=4,
    lora_trainable=["conv1.1", "conv2.1", "conv3.1"],
    epochs_a=6,
    epochs_b=8,
    lr_a=3e-3,
)
