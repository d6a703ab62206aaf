"""The `lora-anywhere` command line."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from . import __version__
from .errors import LoraError


def _cmd_plugins(args: argparse.Namespace) -> int:
    from .registry import plugins

    for info in plugins():
        print(info)
        if args.verbose:
            for rule in info.rules:
                print(f"    {rule}")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .api import apply
    from .models import build_model
    from .summary import summary

    model = build_model(args.model)
    targets = args.targets.split(";") if args.targets else None
    apply(model, rank=args.rank, targets=targets)
    print(summary(model))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(steps=args.steps, out_dir=args.out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lora-anywhere", description="Exact, fast LoRA adapters for any PyTorch model.")
    parser.add_argument("--version", action="version", version=f"lora_anywhere {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("plugins", help="list plugins, their status and the layer types they cover")
    p.add_argument("-v", "--verbose", action="store_true", help="also list every layer type")
    p.set_defaults(run=_cmd_plugins)

    p = sub.add_parser("inspect", help="show which layers of a model get adapters, by which rule")
    p.add_argument("model", help="model spec: torchvision:resnet50, timm:vit_small_patch16_224, torchaudio:wav2vec2_base, pyg:GAT, or package.module:callable")
    p.add_argument("--rank", type=int, default=None, help="LoRA rank (default 8, clamped per layer)")
    p.add_argument("--targets", default=None, help="selectors separated by ';', e.g. 'Conv2d;*.qkv:q,v' (default: every layer a rule covers)")
    p.set_defaults(run=_cmd_inspect)

    p = sub.add_parser("demo", help="the main job: adapt, train, merge, save and reload on generated data")
    p.add_argument("--steps", type=int, default=150, help="training steps per phase")
    p.add_argument("--out", default="runs/demo", help="folder for the saved adapter")
    p.set_defaults(run=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    try:
        return args.run(args)
    except LoraError as exc:
        print(f"lora-anywhere {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
