"""The `lora-anywhere` command line.

Every command has ``--help``. A failure the user can fix (a bad spec, a missing
file, a config error) prints one ``lora-anywhere COMMAND: error: …`` line that says
what was wrong and what to do, and exits with 1; usage errors exit with 2 (argparse).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from .. import __version__
from ..errors import LoraError
from ..log import console

if TYPE_CHECKING:
    from .model_spec import ModelSpec

MODEL_HELP = (
    "model spec: torchvision:resnet50, timm:vit_small_patch16_224, torchaudio:wav2vec2_base, "
    "pyg:GCN, hf:BertModel, or package.module:callable (random weights; nothing is downloaded)"
)
DEMO_DOMAINS = ("vision", "graph", "speech", "text", "all")


def _selectors(text: str | None) -> list[str] | None:
    return [s for s in text.split(";") if s] if text else None


def _cmd_plugins(args: argparse.Namespace) -> int:
    from ..registry import plugins

    for info in plugins():
        print(info)
        if args.verbose:
            for rule in info.rules:
                print(f"    {rule}")
    return 0


def _model_spec(args: argparse.Namespace) -> ModelSpec:
    from .model_spec import ModelSpec, parse_model_args

    weights = Path(args.weights) if getattr(args, "weights", None) else None
    return ModelSpec(args.model, parse_model_args(args.model_arg or []), weights, [], args.seed)


def _cmd_inspect(args: argparse.Namespace) -> int:
    from ..api import apply
    from ..io import load_adapter
    from ..summary import summary

    model = _model_spec(args).build()
    if args.adapter:
        if args.rank is not None or args.targets or args.exclude or args.trainable:
            raise LoraError("--adapter shows a saved adapter as it is; leave out --rank, --targets, --exclude and --trainable")
        load_adapter(model, args.adapter)
    else:
        apply(
            model, rank=args.rank, targets=_selectors(args.targets), exclude=_selectors(args.exclude), trainable=_selectors(args.trainable)
        )
    if args.format == "mermaid":
        from .mermaid import mermaid

        print(mermaid(model, depth=args.depth or None, direction=args.direction))
    else:
        print(summary(model))
    if args.peft:
        from ..peft_format import export_plan

        print()
        print(export_plan(model).describe())
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from ..io import load_adapter, save_adapter
    from ..peft_format import export_plan, is_peft_folder

    destination = Path(args.destination)
    if destination.exists() and (not destination.is_dir() or (any(destination.iterdir()) and not _is_adapter_folder(destination))):
        raise LoraError(f"{destination} exists and is not an adapter folder; convert into a new folder (its whole content is replaced)")
    source = "a PEFT" if is_peft_folder(args.source) else "a lora_anywhere"
    model = _model_spec(args).build()
    load_adapter(model, args.source)
    if args.to == "peft":
        plan = export_plan(model)
        save_adapter(model, destination, format="peft", strict=not args.partial)
        left_out = f"; {len(plan.left_out)} adapted tensors left out, as listed above" if plan.left_out else ""
        print(
            f"wrote {destination}: a PEFT LoRA adapter with {len(plan.blocks)} LoRA layers and {len(plan.to_save)} modules to save{left_out}"
        )
        print(f"load it with peft.PeftModel.from_pretrained(base_model, {str(destination)!r})")
    else:
        save_adapter(model, destination)
        print(f"wrote {destination}: a lora_anywhere adapter, from {source} folder")
        print(f"load it with lora_anywhere.load_adapter(base_model, {str(destination)!r})")
    return 0


def _is_adapter_folder(folder: Path) -> bool:
    from ..io import CONFIG_FILE, LEGACY_FILES

    return (folder / CONFIG_FILE).is_file() or (folder / LEGACY_FILES[0]).is_file()


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args.domains or ["all"], args.out, fast=args.fast, device=args.device, threads=args.threads or None)
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from .config import load_config
    from .jobs import merge_command, run_training

    config = load_config(args.config)
    result = run_training(config, out_dir=args.out, epochs=args.epochs, device=args.device, rank=args.rank)
    print(f"adapter: {result.adapter}")
    if result.interrupted:
        print(
            f"interrupted: {result.out_dir / 'last'} holds the state to continue from; add resume = true to [train] and run the same command again"
        )
        return 130
    print(
        f"metrics: {result.out_dir / 'metrics.csv'}; curves: {result.out_dir / 'curves.png'}; best epoch's adapter: {result.out_dir / 'best'}"
    )
    print(f"to merge it into plain weights: {merge_command(result, config.model)}")
    return 0


def _cmd_select_rank(args: argparse.Namespace) -> int:
    import json

    from ..atomic import atomic_file
    from .config import load_config
    from .jobs import run_rank_selection, train_command

    config = load_config(args.config)
    result = run_rank_selection(config, ranks=args.ranks, folds=args.folds, metric=args.metric, epochs=args.epochs, device=args.device)
    print()
    print(result.selection)
    print(
        f"chosen rank: {result.selection.chosen} (the smallest rank within one standard error of the best mean {result.selection.metric})"
    )
    if args.json:
        with atomic_file(args.json) as tmp:
            tmp.write_text(json.dumps(result.as_dict(config), indent=2) + "\n")
        print(f"table: {args.json}")
    print(f"to train at that rank: {train_command(config, result.selection.chosen)}")
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    from .jobs import merge_to_file

    info = merge_to_file(_model_spec(args), args.adapter, args.out)
    print(f"wrote {args.out}: {info['tensors']} tensors, {info['parameters']:,} values, {info['bytes'] / 1024:.1f} KiB")
    print(f"load it into the plain model with model.load_state_dict(safetensors.torch.load_file({str(args.out)!r}))")
    return 0


def _add_model_args(p: argparse.ArgumentParser, *, weights: bool) -> None:
    p.add_argument(
        "--model-arg",
        action="append",
        metavar="KEY=VALUE",
        help="keyword argument for the model builder, repeatable (VALUE is read as JSON if it parses: 10, 0.5, true, [1,2])",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="torch seed the model is built under: the same random base every time (default 0, as in `train`)",
    )
    if weights:
        p.add_argument(
            "--weights", metavar="FILE", help="pretrained base weights (.safetensors or a torch state_dict) the adapter was trained on"
        )


def _whole(text: str) -> int:
    """An integer (argparse reports anything else as a usage error)."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def _count(text: str) -> int:
    """An integer ≥ 0."""
    value = _whole(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative; give 0 or more")
    return value


def _positive(text: str) -> int:
    """An integer ≥ 1."""
    value = _whole(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not positive; give 1 or more")
    return value


def _folds(text: str) -> int:
    value = _count(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"{value} fold{'s' if value != 1 else ''} cannot cross-validate; give 2 or more")
    return value


def _ranks(text: str) -> list[int]:
    """``"1,2,4"`` → ``[1, 2, 4]``: positive integers, each once."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError("no rank given; list candidate ranks separated by commas, e.g. 1,2,4,8")
    try:
        ranks = [_positive(t) for t in items]
    except argparse.ArgumentTypeError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: every rank must be a positive whole number ({exc})") from None
    if len(set(ranks)) != len(ranks):
        raise argparse.ArgumentTypeError(f"{text!r} names a rank more than once")
    return ranks


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lora-anywhere",
        description="Exact LoRA adapters for any PyTorch model.",
        epilog="Start with `lora-anywhere demo`; `lora-anywhere COMMAND --help` describes each command.",
    )
    parser.add_argument("--version", action="version", version=f"lora_anywhere {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("demo", help="the main job: LoRA vs head-only vs full fine-tuning in four domains, on generated data",
                       description="Pretrain a small model on task A and adapt it to task B with LoRA, head-only tuning and full fine-tuning, "
                       "for each domain; print one table, save the LoRA adapter, check it merges and reloads exactly, and plot the curves.")  # fmt: skip
    p.add_argument("domains", nargs="*", metavar="DOMAIN", help=f"one or more of {', '.join(DEMO_DOMAINS)} (default: all)")
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--fast", action="store_true", help="less data and fewer epochs: a smoke test, not the numbers the README reports")
    p.add_argument("--device", default="auto", help="auto (CUDA when there is a GPU), cpu or cuda")
    p.add_argument("--threads", type=_count, default=1, help="torch CPU threads (default 1: the models are tiny; 0 keeps torch's default)")
    p.set_defaults(run=_cmd_demo)

    p = sub.add_parser("inspect", aliases=["summary"], help="show which layers of a model get adapters (a table, or a Mermaid diagram)",
                       description="Build a model from its spec, apply adapters (or load a saved one) and print the result.")  # fmt: skip
    p.add_argument("model", help=MODEL_HELP)
    _add_model_args(p, weights=False)
    p.add_argument("--rank", type=int, default=None, help="LoRA rank (default 8, clamped per layer)")
    p.add_argument(
        "--targets", default=None, help="selectors separated by ';', e.g. 'Conv2d;*.attn:q,v' (default: every layer a rule covers)"
    )
    p.add_argument("--exclude", default=None, help="selectors of layers to leave alone, separated by ';'")
    p.add_argument("--trainable", default=None, help="modules to train fully, separated by ';' (e.g. 'fc')")
    p.add_argument(
        "--adapter",
        metavar="PATH",
        default=None,
        help="show a saved adapter folder (lora_anywhere's or PEFT's) loaded onto the model instead",
    )
    p.add_argument(
        "--format",
        choices=("table", "mermaid"),
        default="table",
        help="table (default) or mermaid: a flowchart of the module tree, adapted layers marked",
    )
    p.add_argument(
        "--depth", type=_count, default=3, help="mermaid: levels of the module tree to draw; deeper ones are folded (0: all; default 3)"
    )
    p.add_argument("--direction", choices=("LR", "TD"), default="LR", help="mermaid: left to right (default) or top down")
    p.add_argument(
        "--peft", action="store_true", help="also show what a PEFT export would keep, and each adapted tensor it would leave out and why"
    )
    p.set_defaults(run=_cmd_inspect)

    p = sub.add_parser("train", help="train an adapter as a TOML config says: model, data, LoRA and trainer options",
                       description="Train a LoRA adapter from a config file (see examples/configs/). Writes the adapter, metrics.csv, "
                       "curves.png, best/ and last/ checkpoints, labels and run.json to the output folder.")  # fmt: skip
    p.add_argument("config", metavar="CONFIG.toml", help="the config file; paths in [model] and [data] are relative to its folder")
    p.add_argument("--out", default=None, help="output folder (default: [train] out_dir, else runs/train)")
    p.add_argument("--epochs", type=int, default=None, help="override [train] epochs")
    p.add_argument("--device", default=None, help="override [train] device (auto, cpu, cuda)")
    p.add_argument("--rank", type=_positive, default=None, help="override [lora] rank (e.g. the one select-rank chose)")
    p.set_defaults(run=_cmd_train)

    p = sub.add_parser("select-rank", help="choose the LoRA rank by k-fold cross-validation on a train config's data",
                       description="Cross-validate candidate ranks with the trainer on the config's training and validation data together: "
                       "train on k-1 folds, score the held-out fold, per rank. Prints mean ± std of the metric and the adapter parameters "
                       "per rank, and the chosen rank: the smallest within one standard error of the best. Reads the optional "
                       "[select_rank] table (ranks, folds, metric, seed); nothing is written but --json.")  # fmt: skip
    p.add_argument(
        "config",
        metavar="CONFIG.toml",
        help="a `train` config; [lora] options other than rank and [train] options (but out_dir) apply to every fold",
    )
    p.add_argument(
        "--ranks", type=_ranks, default=None, help="candidate ranks, e.g. 1,2,4,8 (default: [select_rank] ranks, else 1,2,4,8,16)"
    )
    p.add_argument("--folds", type=_folds, default=None, help="number of folds, at least 2 (default: [select_rank] folds, else 5)")
    p.add_argument("--metric", default=None, help="what to score on the held-out fold: val_accuracy (default), val_loss (minimised), …")
    p.add_argument("--epochs", type=_positive, default=None, help="override [train] epochs for every fold")
    p.add_argument("--device", default=None, help="override [train] device (auto, cpu, cuda)")
    p.add_argument("--json", metavar="FILE", default=None, help="also write the table as JSON (atomically)")
    p.set_defaults(run=_cmd_select_rank)

    p = sub.add_parser("merge", help="merge a saved adapter into the base weights and write them as safetensors",
                       description="Build the base model, load the adapter, merge it in, and write the plain model's state_dict "
                       "(loadable with model.load_state_dict) as safetensors.")  # fmt: skip
    p.add_argument("--model", required=True, help=MODEL_HELP)
    _add_model_args(p, weights=True)
    p.add_argument("--adapter", required=True, metavar="PATH", help="adapter folder (lora_anywhere's or a PEFT LoRA folder)")
    p.add_argument("--out", required=True, metavar="FILE", help="where to write the merged weights (*.safetensors)")
    p.set_defaults(run=_cmd_merge)

    p = sub.add_parser("convert", help="convert an adapter folder between lora_anywhere's format and Hugging Face PEFT's",
                       description="Load the adapter at SRC (a lora_anywhere or a PEFT LoRA folder) onto the base model and write it to DST "
                       "in the other format, exactly: the PEFT folder loads with peft.PeftModel.from_pretrained, the lora_anywhere one with "
                       "lora_anywhere.load_adapter, both giving the same outputs. Layers PEFT cannot express exactly are refused, each named "
                       "(see `inspect --adapter SRC --peft`).")  # fmt: skip
    p.add_argument("source", metavar="SRC", help="adapter folder to read (lora_anywhere or PEFT; told apart by their files)")
    p.add_argument("destination", metavar="DST", help="folder to write, atomically (an existing adapter folder is replaced)")
    p.add_argument("--to", required=True, choices=("peft", "native"), help="the format to write: peft (Hugging Face PEFT) or native")
    p.add_argument(
        "--model",
        required=True,
        help=f"{MODEL_HELP}; the base the adapter belongs to: PEFT names modules, which only the model resolves",
    )
    _add_model_args(p, weights=True)
    p.add_argument(
        "--partial",
        action="store_true",
        help="--to peft: write what PEFT can express and leave out the rest, naming each (default: refuse)",
    )
    p.set_defaults(run=_cmd_convert)

    p = sub.add_parser("plugins", help="list plugins, their status and the layer types they cover")
    p.add_argument("-v", "--verbose", action="store_true", help="also list every layer type")
    p.set_defaults(run=_cmd_plugins)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    try:
        with console():
            return args.run(args)
    except LoraError as exc:
        print(f"lora-anywhere {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
