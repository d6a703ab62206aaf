"""The docs are tested like code: the site builds with `mkdocs build --strict` (every
link between pages and every API reference resolves), and every ```python block of
every page (and of README.md) runs, page by page, in one fresh namespace per page.

A block that cannot run here (it needs a GPU, torchrun, a download or the reader's own
data) says so on the line before its fence: `<!-- skip: needs torchrun -->`. The
reason is required; a marker without one fails the collection of its page."""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
README_MAX_BYTES = 12_500
# Pages whose blocks train real (small) models for many epochs: left out of
# `-m "not slow"` runs.
SLOW_PAGES = {"docs/trainer.md"}

FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[\w+-]*)[^\n]*\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.M | re.S)
SKIP = re.compile(r"<!--\s*skip:(?P<reason>.*?)-->\s*$")
LINK = re.compile(r"\]\((?P<target>[^)\s]+)\)")


class DocsError(Exception):
    """A page breaks a rule of this test (a skip marker without a reason)."""


@dataclass
class Block:
    line: int  # 1-based line of the block's first code line
    code: str
    skip: str | None  # the reason, when the block is marked as not runnable here


def python_blocks(text: str, source: str) -> list[Block]:
    """The page's ```python blocks in order, each with its skip reason if marked."""
    blocks = []
    for match in FENCE.finditer(text):
        line = text[: match.start()].count("\n") + 1
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        marker = SKIP.search(before)
        if match.group("lang") != "python":
            if marker:
                raise DocsError(f"{source}:{line}: a skip marker before a ```{match.group('lang')} block, which never runs")
            continue
        reason = marker.group("reason").strip() if marker else None
        if marker and not reason:
            raise DocsError(f"{source}:{line}: `<!-- skip: -->` needs a reason, e.g. `<!-- skip: needs torchrun -->`")
        indent = match.group("indent")
        code = "".join(ln[len(indent) :] if ln.startswith(indent) else ln for ln in match.group("body").splitlines(True))
        blocks.append(Block(line + 1, code, reason))
    return blocks


def run_page(blocks: list[Block], source: str, workdir: Path) -> str:
    """Runs the runnable blocks in order in one namespace, in `workdir`, on one torch
    thread; returns what they printed. An error names the page and line."""
    namespace: dict = {"__name__": "__docs__"}
    out = io.StringIO()
    threads = torch.get_num_threads()
    cwd = Path.cwd()
    torch.set_num_threads(1)
    os.chdir(workdir)
    try:
        with contextlib.redirect_stdout(out):
            for block in blocks:
                if block.skip is None:
                    exec(compile(block.code, f"{source}:{block.line}", "exec"), namespace)
    finally:
        os.chdir(cwd)
        torch.set_num_threads(threads)
    return out.getvalue()


def pages() -> list[Path]:
    return [*sorted(DOCS.rglob("*.md")), README]


def _page_params() -> list:
    params = []
    for page in pages():
        name = page.relative_to(ROOT).as_posix()
        marks = [pytest.mark.slow] if name in SLOW_PAGES else []
        params.append(pytest.param(page, id=name, marks=marks))
    return params


@pytest.mark.parametrize("page", _page_params())
def test_page_code_runs(page: Path, tmp_path: Path) -> None:
    source = page.relative_to(ROOT).as_posix()
    blocks = python_blocks(page.read_text(), source)
    if not any(b.skip is None for b in blocks):
        pytest.skip(f"{source} has no runnable python block")
    for module in dict.fromkeys(re.findall(r"^(?:from|import) (\w+)", "".join(b.code for b in blocks), re.M)):
        pytest.importorskip(module)
    run_page(blocks, source, tmp_path)


def test_skipped_blocks_are_few_and_say_why() -> None:
    skipped = [(p.name, b.line, b.skip) for p in pages() for b in python_blocks(p.read_text(), p.name) if b.skip]
    total = sum(len(python_blocks(p.read_text(), p.name)) for p in pages())
    assert total >= 20, "the docs lost their examples"
    assert len(skipped) <= total // 4, f"{len(skipped)} of {total} blocks do not run:\n{skipped}"


def test_site_builds_strictly(tmp_path: Path) -> None:
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, f"mkdocs build --strict failed:\n{done.stdout}\n{done.stderr}"
    assert (tmp_path / "site" / "reference" / "api" / "index.html").read_text().count('id="lora_anywhere.apply"') == 1


def broken_links(text: str, base: Path) -> list[str]:
    """Relative links in `text` whose file does not exist under `base`."""
    broken = []
    for match in LINK.finditer(text):
        target = match.group("target").split("#", 1)[0]
        if not target or re.match(r"^[a-z]+:", target):
            continue
        if not (base / target).exists():
            broken.append(match.group("target"))
    return broken


def test_readme_is_a_front_page() -> None:
    text = README.read_text()
    size = len(text.encode())
    assert size <= README_MAX_BYTES, f"README.md is {size:,} bytes; move detail into docs/ (limit {README_MAX_BYTES:,})"
    assert not broken_links(text, ROOT), f"README.md links to missing files: {broken_links(text, ROOT)}"
    assert re.search(r"\]\(docs/", text), "README.md links into docs/"
    first_screen = "\n".join(text.splitlines()[:40]).lower()
    assert "pip install" in first_screen and "quickstart" in first_screen


# The checks above must be able to fail: each is shown a broken input once.


def test_a_broken_block_fails_its_page(tmp_path: Path) -> None:
    page = "Intro\n\n```python\nx = 1\n```\n\ntext\n\n```python\nassert x == 2, 'the page says 2'\n```\n"
    with pytest.raises(AssertionError, match="the page says 2") as caught:
        run_page(python_blocks(page, "broken.md"), "broken.md", tmp_path)
    assert any(str(entry.path) == "broken.md:10" for entry in caught.traceback), "the error names the page and line"


def test_skip_markers_need_a_reason(tmp_path: Path) -> None:
    marked = "<!-- skip: needs torchrun -->\n```python\nraise SystemExit\n```\n"
    assert python_blocks(marked, "m.md")[0].skip == "needs torchrun"
    run_page(python_blocks(marked, "m.md"), "m.md", tmp_path)  # skipped, so it does not raise
    with pytest.raises(DocsError, match="needs a reason"):
        python_blocks("<!-- skip: -->\n```python\nx = 1\n```\n", "m.md")
    with pytest.raises(DocsError, match="never runs"):
        python_blocks("<!-- skip: why -->\n```bash\nls\n```\n", "m.md")


def test_indented_blocks_run_and_other_languages_do_not(tmp_path: Path) -> None:
    page = "1. step\n\n   ```python\n   y = 3\n   ```\n\n```bash\nexit 1\n```\n\n```python\nprint(y)\n```\n"
    assert run_page(python_blocks(page, "i.md"), "i.md", tmp_path) == "3\n"


def test_broken_links_are_found(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "here.md").write_text("")
    text = "[ok](docs/here.md#x) [web](https://example.org) [bad](docs/gone.md) [anchor](#top)"
    assert broken_links(text, tmp_path) == ["docs/gone.md"]
