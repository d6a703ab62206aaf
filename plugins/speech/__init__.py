"""lora_anywhere plugin for torchaudio (placeholder until the speech rules land)."""

import torchaudio  # noqa: F401
