"""Every script in examples/ runs in its fast mode, as a user would run it (a fresh
process); the custom plugin is pip-installed into a temporary folder, offline, and
found through its entry point alone."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"

SCRIPTS = {
    "vision/resnet_lora.py": ["merged vs unmerged: max |Δ|", "reloaded onto a fresh base: the same outputs"],
    "vision/vit_qv.py": ["blocks.0.attn  q", "blocks.0.attn  v", "merged vs unmerged: max |Δ|"],
    "graph/gcn_node.py": ["test accuracy", "merged vs unmerged: max |Δ|"],
    "graph/gin_graph.py": ["validation accuracy", "best epoch's adapter reloaded: 6 adapted tensors"],
    "speech/wav2vec2_keywords.py": ["12 adapted tensors", "merged vs unmerged: max |Δ|"],
    "text/encoder.py": ["12 adapted tensors", "validation accuracy", "adapter:"],
}


def run(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    # One thread: the fast modes train tiny models, where more threads only wait on each other.
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **env}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=300)


def test_every_example_script_is_tested():
    found = {str(p.relative_to(EXAMPLES)) for p in EXAMPLES.glob("*/*.py")} - {"data/make_samples.py", "custom_plugin/use_plugin.py"}
    assert found == set(SCRIPTS)


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_example_runs_in_fast_mode(script, tmp_path):
    result = run([str(EXAMPLES / script), "--fast", "--out", str(tmp_path / "out")], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    for expected in SCRIPTS[script]:
        assert expected in result.stdout, result.stdout
    merged = [line for line in result.stdout.splitlines() if line.startswith("merged vs unmerged")]
    for line in merged:
        assert float(line.rsplit(" ", 1)[1]) <= 1e-4


def test_sample_data_generator_reproduces_the_shipped_files(tmp_path):
    """make_samples.py is the source of examples/data: run on a copy, it writes the same bytes."""
    copy = tmp_path / "data"
    shutil.copytree(EXAMPLES / "data", copy)
    result = run([str(copy / "make_samples.py")], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    shipped = {p.relative_to(EXAMPLES / "data"): p.read_bytes() for p in (EXAMPLES / "data").rglob("*") if p.is_file()}
    made = {p.relative_to(copy): p.read_bytes() for p in copy.rglob("*") if p.is_file()}
    assert made.keys() == shipped.keys()
    assert [str(k) for k in made if made[k] != shipped[k]] == []


def test_custom_plugin_installs_and_is_found_through_its_entry_point(tmp_path):
    source = tmp_path / "src"
    shutil.copytree(EXAMPLES / "custom_plugin", source, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    target = tmp_path / "site"
    install = run(
        ["-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index", "--target", str(target), str(source)],
        cwd=tmp_path,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    assert (target / "la_example_plugin").is_dir() and list(target.glob("la_example_plugin-*.dist-info/entry_points.txt"))

    script = EXAMPLES / "custom_plugin" / "use_plugin.py"
    without = run([str(script), "--fast"], cwd=tmp_path)
    assert without.returncode != 0 and "the example plugin is not installed" in (without.stdout + without.stderr)

    used = run([str(script), "--fast"], cwd=tmp_path, PYTHONPATH=str(target))
    assert used.returncode == 0, used.stderr[-3000:]
    assert "example" in used.stdout and "entry point" in used.stdout
    assert "la_example_plugin.GatedLinear" in used.stdout and "exact: merged vs unmerged" in used.stdout

    cli = run(["-m", "lora_anywhere.cli", "inspect", "example:GatedMLP", "--format", "mermaid"], cwd=tmp_path, PYTHONPATH=str(target))
    assert cli.returncode == 0, cli.stderr[-2000:]
    assert cli.stdout.count("on value,gate") == 2
