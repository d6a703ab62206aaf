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


def merged_rows(folder: Path, stem: str, meta: dict[str, Any], results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`results` in place of the rows of the same cases in `folder`/`stem`.json, whose
    other rows stay as they are (new cases go last): rerunning some models updates a
    table without rerunning all of them. Only onto results of the same settings
    (torch, threads, sizes…), which a reader can then rerun as one table."""
    path = folder / f"{stem}.json"
    old = json.loads(path.read_text())
    if old["meta"] != meta:
        raise SystemExit(f"{path} holds results of other settings ({old['meta']}, this run: {meta}); rerun every model instead of --update")
    new = {row["case"]: row for row in results}
    return [new.pop(row["case"], row) for row in old["results"]] + list(new.values())
