"""The `lora-anywhere` command line: commands, the train config schema, data and
model specs, and the demo. Nothing in the adapter core imports from here."""

from .commands import build_parser, main

__all__ = ["build_parser", "main"]
