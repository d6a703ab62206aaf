"""lora_anywhere plugin for torch_geometric (placeholder until the graph rules land)."""

import torch_geometric  # noqa: F401  # inactive when torch_geometric is not installed
