"""lora_anywhere plugin for timm and torchvision (placeholder until the vision rules land)."""

import timm  # noqa: F401
import torchvision  # noqa: F401
