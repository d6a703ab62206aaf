"""The `lora_anywhere` logger: progress lines and notices of the trainer and the CLI.

Everything the library says goes through ``logging.getLogger("lora_anywhere")`` at
INFO (progress: one line per epoch, what a command is doing) or WARNING (a setting
was changed for the user, a run was interrupted). Where nobody configured logging —
a script run under nohup, Slurm or CI — a fallback handler prints those lines to
stderr, so a long run is never silent. Once the application configures logging
(``logging.basicConfig``, a framework, pytest), the fallback steps aside and the
records reach the application's handlers like any other library's. To quiet the
library: ``logging.getLogger("lora_anywhere").setLevel(logging.WARNING)``.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from typing import Iterator

logger = logging.getLogger("lora_anywhere")


class _Fallback(logging.Handler):
    """Prints to the current ``sys.stderr`` while no other handler would show the
    record: the root logger has none and neither has ours."""

    def emit(self, record: logging.LogRecord) -> None:
        if logging.getLogger().handlers or any(h is not self for h in logger.handlers):
            return
        try:
            print(f"lora_anywhere: {self.format(record)}", file=sys.stderr, flush=True)
        except Exception:  # a closed stream must never break training
            self.handleError(record)


class _Below(logging.Filter):
    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < self.level


class _CurrentStream(logging.StreamHandler):
    """A stream handler that looks the stream up at every record, so that a replaced
    ``sys.stdout`` (pytest's capsys, a redirect) receives what is logged."""

    def __init__(self, name: str) -> None:
        super().__init__(getattr(sys, name))
        self._name = name

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = getattr(sys, self._name)
        super().emit(record)


@contextlib.contextmanager
def console() -> Iterator[None]:
    """For a command-line run: INFO lines to stdout as plain text, warnings and worse
    to stderr, while the block runs."""
    out, err = _CurrentStream("stdout"), _CurrentStream("stderr")
    out.addFilter(_Below(logging.WARNING))
    err.setLevel(logging.WARNING)
    for handler in (out, err):
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(out)
        logger.removeHandler(err)


if not any(isinstance(h, _Fallback) for h in logger.handlers):
    logger.addHandler(_Fallback())
if logger.level == logging.NOTSET:
    logger.setLevel(logging.INFO)
