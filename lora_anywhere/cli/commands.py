"""The `lora-anywhere` command line.

Every command has ``--help``. A failure the user can fix (a bad spec, a missing
file, a config error) prints one ``lora-anywhere COMMAND: error: …`` line that says
what was wrong and what to do, and exits with 1; usage errors exit with 2 (argparse).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

from .. import __version__
from ..errors import LoraError
from ..log import console, logger

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
    from .pretrained import resolve

    weights = resolve(args.weights, args.model, Path.cwd()) if getattr(args, "weights", None) else None
    ignore = [prefix for item in getattr(args, "weights_ignore", None) or [] for prefix in item.split(",") if prefix]
    return ModelSpec(args.model, parse_model_args(args.model_arg or []), weights, ignore, args.seed)


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

    if args.nproc and args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        return _launch(args.nproc, args.argv)
    config = load_config(args.config)
    overrides = {"epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size, "seed": args.seed, "device": args.device}
    result = run_training(config, out_dir=args.out, overrides=overrides, rank=args.rank)
    if result.process_rank != 0:
        return 0
    print(f"adapter: {result.adapter}")
    if result.interrupted:
        print(
            f"interrupted: {result.out_dir / 'last'} holds the state to continue from; add resume = true to [train] and run the same command again"
        )
        return 130
    print(
        f"metrics: {result.out_dir / 'metrics.csv'}; curves: {result.out_dir / 'curves.png'}; best epoch's adapter: {result.out_dir / 'best'}"
    )
    if result.test is not None:
        print(f"test: {result.out_dir / 'test_report.json'}")
    print(f"to merge it into plain weights: {merge_command(result)}")
    return 0


def _launch(nproc: int, argv: list[str]) -> int:
    """`train --nproc N`: the same command under torchrun, N processes on this machine
    (gloo on CPU, NCCL with one GPU each)."""
    import subprocess

    rest = _without_option(argv, "--nproc")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "lora_anywhere.cli", *rest]
    print("launching: " + " ".join(command[1:]), flush=True)
    return subprocess.run(command, check=False).returncode


def _without_option(argv: list[str], option: str) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == option:
            skip = True
        elif not arg.startswith(f"{option}="):
            out.append(arg)
    return out


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
    from .jobs import merge_run, merge_to_file

    if args.run_dir is not None:
        out, info = merge_run(args.run_dir, args.adapter, args.out)
    else:
        out = Path(args.out)
        info = merge_to_file(_model_spec(args), args.adapter, out)
    print(f"wrote {out}: {info['tensors']} tensors, {info['parameters']:,} values, {info['bytes'] / 1024:.1f} KiB")
    print(f"load it into the plain model with model.load_state_dict(safetensors.torch.load_file({str(out)!r}))")
    return 0


def _merge_usage(args: argparse.Namespace) -> str | None:
    """What is wrong with merge's options, as a usage error."""
    if args.run_dir is not None and (args.model is not None or args.weights or args.weights_ignore or args.model_arg):
        return "--run rebuilds the model the run recorded; leave out --model, --model-arg, --weights and --weights-ignore"
    if args.run_dir is None and (args.model is None or args.adapter is None or args.out is None):
        return "give --run RUN_DIR (a folder `train` wrote), or all of --model, --adapter and --out"
    return None


def _cmd_evaluate(args: argparse.Namespace) -> int:
    import json

    from ..atomic import atomic_file
    from .jobs import evaluate_run

    result = evaluate_run(args.run_dir, split=args.split, adapter=args.adapter, device=args.device, batch_size=args.batch_size)
    metrics = result.report.metrics
    print(f"{result.split} ({result.adapter}): " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    per_class = result.report.details.get("per_class_accuracy")
    if per_class is not None:
        width = max(len(c) for c in result.record.classes)
        for name, accuracy in zip(result.record.classes, per_class):
            print(f"  {name:<{width}}  accuracy {accuracy:.4f}")
    if args.json:
        with atomic_file(args.json) as tmp:
            tmp.write_text(
                json.dumps({"split": result.split, "adapter": str(result.adapter), "metrics": metrics, **result.report.details}, indent=2)
                + "\n"
            )
        print(f"report: {args.json}")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from .predict import predict_run, write_predictions

    predictions = predict_run(args.run_dir, args.inputs, adapter=args.adapter, batch_size=args.batch_size)
    written = write_predictions(predictions, args.out)
    print(f"{len(predictions)} predictions: {written}" if args.out else written)
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
            "--weights",
            metavar="FILE",
            help="pretrained base weights the adapter was trained on: a .safetensors or torch file, a transformers folder, "
            "or a torchvision weights name (from the torch hub cache)",
        )
        p.add_argument(
            "--weights-ignore", action="append", metavar="PREFIX", help="weight keys not to load, repeatable or comma-separated (e.g. fc.)"
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


def _positive_float(text: str) -> float:
    """A number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
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


def _add_run_args(p: argparse.ArgumentParser) -> None:
    """What `evaluate` and `predict` take to find a trained run and its adapter."""
    p.add_argument("run_dir", metavar="RUN_DIR", help="a folder `train` wrote")
    p.add_argument("--adapter", default=None, help="adapter (the final one, default), best, last, or an adapter folder")


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
    p.add_argument("--epochs", type=_positive, default=None, help="override [train] epochs")
    p.add_argument("--lr", type=_positive_float, default=None, help="override [train] lr")
    p.add_argument("--batch-size", type=_positive, default=None, help="override [train] batch_size (per process)")
    p.add_argument(
        "--seed", type=_count, default=None, help="override [train] seed (data order, dropout; the base model keeps [model] seed)"
    )
    p.add_argument("--device", default=None, help="override [train] device (auto, cpu, cuda)")
    p.add_argument("--rank", type=_positive, default=None, help="override [lora] rank (e.g. the one select-rank chose)")
    p.add_argument(
        "--nproc",
        type=_positive,
        default=None,
        help="train with N processes on this machine under torchrun (DDP: gloo on CPU, one GPU each with NCCL)",
    )
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
                       "(loadable with model.load_state_dict) as safetensors. --run rebuilds exactly what `train` used from the "
                       "run folder's record; --model/--weights/--adapter describe the base and adapter by hand.")  # fmt: skip
    p.add_argument("--run", dest="run_dir", metavar="RUN_DIR", default=None, help="a folder `train` wrote: its model, weights and adapter")
    p.add_argument("--model", default=None, help=MODEL_HELP)
    _add_model_args(p, weights=True)
    p.add_argument(
        "--adapter",
        metavar="PATH",
        default=None,
        help="adapter folder (lora_anywhere's or a PEFT LoRA folder); with --run also adapter (default), best or last",
    )
    p.add_argument(
        "--out", metavar="FILE", default=None, help="where to write the merged weights, *.safetensors (--run: RUN_DIR/merged.safetensors)"
    )
    p.set_defaults(run=_cmd_merge, usage=_merge_usage, parser=p)

    p = sub.add_parser("evaluate", help="score a trained run's adapter on its validation, test or training data",
                       description="Rebuild the model a `train` run recorded, load its adapter, and print the loss and metrics "
                       "(accuracy, macro-F1, per-class accuracy) on one split of its data.")  # fmt: skip
    _add_run_args(p)
    p.add_argument("--split", choices=("val", "test", "train"), default="val", help="which data (default val; test needs [data] test)")
    p.add_argument("--device", default=None, help="auto, cpu or cuda (default: the run's)")
    p.add_argument("--batch-size", type=_positive, default=None, help="default: the run's")
    p.add_argument("--json", metavar="FILE", default=None, help="also write the report (metrics, per-class accuracy, confusion matrix)")
    p.set_defaults(run=_cmd_evaluate)

    p = sub.add_parser("predict", help="a trained run's predictions on new images, audio files or texts",
                       description="Rebuild the model a `train` run recorded, load its adapter, read the inputs as its [data] kind "
                       "reads files (the same resizing, normalisation, tokenizer) and print (or write) one CSV row per input: "
                       "input, label, probability. A node-classification run predicts every node of its own graph.")  # fmt: skip
    _add_run_args(p)
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="files or folders (images, audio); CSV or text files (texts, one per line)")
    p.add_argument("--out", metavar="FILE", default=None, help="write the CSV here instead of printing it")
    p.add_argument("--batch-size", type=_positive, default=32, help="default 32")
    p.set_defaults(run=_cmd_predict)

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
    args.argv = list(argv if argv is not None else sys.argv[1:])
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    problem = args.usage(args) if getattr(args, "usage", None) else None
    if problem:
        args.parser.error(problem)  # exits with 2, as argparse does
    try:
        with console(), _rank_zero_speaks():
            return args.run(args)
    except LoraError as exc:
        print(f"lora-anywhere {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


@contextlib.contextmanager
def _rank_zero_speaks() -> Iterator[None]:
    """Under torchrun, progress lines from rank 0 only (warnings and errors from all)."""
    rank = int(os.environ.get("RANK", "0") or 0)
    previous = logger.level
    if rank > 0:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(previous)
