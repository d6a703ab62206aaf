"""Use the installed example plugin: lora_anywhere finds it through its entry point.

    pip install examples/custom_plugin        # once (add --no-deps in an env that has torch)
    python examples/custom_plugin/use_plugin.py [--fast]

Nothing here registers the plugin by hand: if it were not installed, apply() would
find no rule for GatedLinear and raise TargetError.
"""

from __future__ import annotations

import argparse

import torch

import lora_anywhere as la
from lora_anywhere.testing import check_exact


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="a few steps only (CI)")
    args = parser.parse_args()

    found = [info for info in la.plugins() if info.name == "example"]
    if not found or found[0].status != "active":
        raise SystemExit("the example plugin is not installed: pip install examples/custom_plugin")
    print(found[0])

    from la_example_plugin import GatedMLP  # importable because it is installed

    torch.manual_seed(0)
    model = la.apply(GatedMLP(), rank=4, trainable="head")
    print(la.summary(model))

    # The whole exactness contract on the plugin's layer: init, merge, unmerge, save/load, remove.
    report = check_exact(lambda: GatedMLP(), (torch.randn(8, 16),), rank=4)
    print(f"exact: merged vs unmerged {report.merge_error:.1e}, reloaded {report.load_error:.1e}, coverage {100 * report.coverage:.0f}%")

    # And it trains like any other model.
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 16, generator=g)
    y = (x[:, :4].argmax(1)).long()
    history = la.Trainer(model, [(x[i : i + 32], y[i : i + 32]) for i in range(0, 256, 32)], task="image-classification",
                         epochs=2 if args.fast else 20, lr=1e-2, progress=False).fit()  # fmt: skip
    print(f"training accuracy {history[-1]['train_accuracy']:.3f} (chance 0.25)")


if __name__ == "__main__":
    main()
