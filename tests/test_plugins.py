"""Plugins: built-in rules via the hook, runtime plugins, entry-point plugins, and
plugins that are missing their framework or broken."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import lora_anywhere as la
from lora_anywhere.testing import check_exact


class Bilinear2(nn.Module):
    def __init__(self, i, o):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(o, i))
        self.w2 = nn.Parameter(torch.randn(o, i))

    def forward(self, x):
        return x @ self.w1.T + x @ self.w2.T


class Bilinear2Rule(la.Rule):
    name = "tests.Bilinear2"

    def targets(self, layer):
        return [la.Target("w1", "w1"), la.Target("w2", "w2")]


class MyPlugin:
    @la.hookimpl
    def lora_anywhere_register_rules(self, register):
        register(Bilinear2, Bilinear2Rule())


@pytest.fixture
def runtime_plugin():
    name = la.register_plugin(MyPlugin(), name="tests-bilinear")
    yield name
    la.unregister_plugin(name)


def test_builtin_rules_come_through_the_hook():
    info = {p.name: p for p in la.plugins()}["torch.nn"]
    assert info.status == "active" and info.source == "builtin"
    assert "torch.nn.modules.activation.MultiheadAttention" in info.rules


def test_subclasses_are_found_through_the_mro():
    class MyLinear(nn.Linear):
        pass

    model = la.apply(nn.Sequential(MyLinear(4, 4), nn.modules.linear.NonDynamicallyQuantizableLinear(4, 4)), rank=2)
    assert [r.rule for r in la.summary(model).rows] == ["torch.nn.Linear", "torch.nn.Linear"]


def test_subclass_with_its_own_forward_takes_the_weight_path():
    class Scaled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    model = la.apply(nn.Sequential(Scaled(4, 4)), rank=2)
    assert la.summary(model).rows[0].path == "weight"
    check_exact(lambda: nn.Sequential(Scaled(4, 4)), (torch.randn(3, 4),), rank=2)


def test_runtime_plugin_adapts_its_layer_exactly(runtime_plugin):
    assert {p.name: p.status for p in la.plugins()}[runtime_plugin] == "active"
    report = check_exact(lambda: nn.Sequential(Bilinear2(5, 6), nn.ReLU(), nn.Linear(6, 2)), (torch.randn(3, 5),), rank=2)
    assert report.coverage == 1.0 and report.adapted == 3


def test_unknown_layer_without_plugin():
    with pytest.raises(la.TargetError, match="nothing to adapt"):
        la.apply(nn.Sequential(Bilinear2(3, 3)))


def test_misspelt_hook_is_caught():
    class Typo:
        @la.hookimpl
        def lora_anywhere_register_rulez(self, register):
            pass

    with pytest.raises(ValueError, match="unknown hook.*the hooks are lora_anywhere_register_model_sources"):
        la.register_plugin(Typo(), name="typo")
    assert "typo" not in {p.name for p in la.plugins()}


# The plugin example in docs/writing-plugins.md runs in tests/test_docs.py.


ENTRY_POINT_PROBE = textwrap.dedent(
    """
    import json, sys
    import lora_anywhere as la
    from torch import nn
    print(json.dumps({p.name: [p.status, p.error, len(p.rules)] for p in la.plugins()}))
    import good_plugin
    model = la.apply(nn.Sequential(good_plugin.Twice(3)), rank=2)
    print(len(la.summary(model).rows))
    """
)


def test_entry_point_plugins_installed_broken_and_inactive(tmp_path):
    """Three distributions on sys.path: one good, one whose import raises, one whose
    framework is missing. The good one adapts its layer; the others are reported."""
    (tmp_path / "good_plugin.py").write_text(
        textwrap.dedent(
            """
            import torch
            from torch import nn
            import lora_anywhere as la

            class Twice(nn.Module):
                def __init__(self, n):
                    super().__init__()
                    self.m = nn.Parameter(torch.randn(n, n))
                def forward(self, x):
                    return 2 * x @ self.m.T

            class TwiceRule(la.Rule):
                name = "good.Twice"
                def targets(self, layer):
                    return [la.Target("m", "m")]

            @la.hookimpl
            def lora_anywhere_register_rules(register):
                register(Twice, TwiceRule())
            """
        )
    )
    (tmp_path / "broken_plugin.py").write_text("raise RuntimeError('boom at import')\n")
    (tmp_path / "missing_plugin.py").write_text("import a_framework_that_is_not_installed\n")
    for dist, module in (("good", "good_plugin"), ("broken", "broken_plugin"), ("missing", "missing_plugin")):
        info = tmp_path / f"{dist}_plugin-1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}-plugin\nVersion: 1.0\n")
        (info / "entry_points.txt").write_text(f"[lora_anywhere]\n{dist} = {module}\n")
    result = subprocess.run(
        [sys.executable, "-c", ENTRY_POINT_PROBE],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"},
        check=False,
    )
    assert result.returncode == 0, result.stderr
    import json

    lines = result.stdout.strip().splitlines()
    statuses = json.loads(lines[0])
    assert statuses["good"][0] == "active" and statuses["good"][2] == 1
    assert statuses["broken"][0] == "failed" and "boom at import" in statuses["broken"][1]
    assert statuses["missing"][0] == "inactive" and "a_framework_that_is_not_installed" in statuses["missing"][1]
    assert lines[1] == "1"


def test_cli_plugins_lists_them():
    result = subprocess.run([sys.executable, "-m", "lora_anywhere.cli", "plugins", "-v"], capture_output=True, text=True, check=True)
    assert "torch.nn" in result.stdout and "active" in result.stdout
