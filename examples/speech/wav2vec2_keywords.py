"""LoRA on a torchaudio wav2vec2 for keyword classification, on generated "words".

    python examples/speech/wav2vec2_keywords.py [--fast]

Each keyword is a sequence of three tones (a toy stand-in for syllables), spoken at a
random speed, pitch shift and loudness, in noise, 0.4–0.7 s at 16 kHz. The model is
wav2vec2's architecture at a small size with random weights; in real use start from
``torchaudio.pipelines.WAV2VEC2_BASE.get_model()``. Adapters go on the transformer's
attention and feed-forward layers; the conv feature extractor and the positional
conv stay frozen, and a new pooling head trains fully.
"""

from __future__ import annotations

import argparse
import math

import torch
import torchaudio
from torch import nn

import lora_anywhere as la

RATE = 16000
KEYWORDS = {"go": (440, 660, 880), "stop": (880, 660, 440), "left": (440, 880, 440), "right": (880, 440, 880)}


class Keywords(torch.utils.data.Dataset):
    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.items = []
        names = list(KEYWORDS)
        for _ in range(n):
            label = int(torch.randint(0, len(names), (1,), generator=g))
            speed, shift, loud = (
                0.4 + 0.3 * torch.rand(1, generator=g).item(),
                0.9 + 0.2 * torch.rand(1, generator=g).item(),
                0.5 + torch.rand(1, generator=g).item(),
            )
            length = int(speed * RATE)
            t = torch.arange(length) / RATE
            syllable = (t * 3 / speed).long().clamp(max=2)  # which of the three tones is sounding
            freq = torch.tensor(KEYWORDS[names[label]], dtype=torch.float)[syllable] * shift
            wave = loud * torch.sin(2 * math.pi * torch.cumsum(freq, 0) / RATE) + 0.2 * torch.randn(length, generator=g)
            self.items.append((wave, label))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


class KeywordSpotter(nn.Module):
    """wav2vec2 features, averaged over the real (unpadded) frames, then a linear head."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        self.wav2vec2 = torchaudio.models.wav2vec2_model(
            extractor_mode="group_norm", extractor_conv_layer_config=[(32, 10, 5), (32, 3, 2), (32, 3, 2), (32, 2, 2)],
            extractor_conv_bias=False, encoder_embed_dim=64, encoder_projection_dropout=0.0, encoder_pos_conv_kernel=16,
            encoder_pos_conv_groups=4, encoder_num_layers=2, encoder_num_heads=2, encoder_attention_dropout=0.0,
            encoder_ff_interm_features=128, encoder_ff_interm_dropout=0.0, encoder_dropout=0.0, encoder_layer_norm_first=False,
            encoder_layer_drop=0.0, aux_num_out=None,
        )  # fmt: skip
        self.head = nn.Linear(64, classes)

    def forward(self, waves: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        features, frames = self.wav2vec2(waves, lengths)
        mask = (torch.arange(features.shape[1], device=features.device)[None] < frames[:, None]).to(features.dtype)
        return self.head((features * mask[..., None]).sum(1) / frames[:, None].to(features.dtype))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="a few steps only (CI)")
    parser.add_argument("--out", default="runs/examples/wav2vec2")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = KeywordSpotter(len(KEYWORDS))
    # torchaudio's attention is its own module with q_proj, k_proj, v_proj, out_proj Linears
    la.apply(model, rank=8, targets=["*.attention.*_proj", "*.feed_forward.*"], trainable="head")
    s = la.summary(model)
    print(f"{len(s.rows)} adapted tensors; {s.trainable_params:,} of {s.total_params:,} parameters train")
    train, val = Keywords(48 if args.fast else 800, 0), Keywords(24 if args.fast else 200, 1)
    history = la.Trainer(model, train, val, task="audio-classification", epochs=1 if args.fast else 8,
                         lr=3e-3, batch_size=16, warmup=0.1, out_dir=args.out).fit()  # fmt: skip
    print(f"validation accuracy {history[-1]['val_accuracy']:.3f} (chance 0.25)")

    model.eval()
    waves = torch.stack([val[i][0][:6400] for i in range(4)])
    lengths = torch.full((4,), 6400)
    with torch.no_grad():
        before = model(waves, lengths)
        la.merge(model)
        print(f"merged vs unmerged: max |Δ| {(model(waves, lengths) - before).abs().max():.1e}")


if __name__ == "__main__":
    main()
