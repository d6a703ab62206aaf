"""lora_anywhere plugin for transformers (placeholder until the text rules land)."""

import transformers  # noqa: F401
