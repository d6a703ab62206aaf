"""A benchmark's results on disk: the JSON of its settings and rows beside the
Markdown a reader reads, each file written whole or not at all (`atomic_file`), so an
interrupted run never leaves half a table in bench/results."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lora_anywhere.atomic import atomic_file


def write_results(folder: Path, stem: str, meta: dict[str, Any], results: Any, markdown: str) -> None:
    """`folder`/`stem`.json ({"meta", "results"}) and `folder`/`stem`.md."""
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_file(folder / f"{stem}.json") as tmp:
        tmp.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    with atomic_file(folder / f"{stem}.md") as tmp:
        tmp.write_text(markdown)
