"""A run folder as a new user gets it from `lora-anywhere train`: the printed merge line
works for the README's own vision config with pretrained weights and a skipped head,
`evaluate` and `predict` rebuild the trained model from the run record, pretrained
weights come as people have them (a torchvision weights name in the hub cache, a timm
checkpoint at another image size, a transformers folder), and the command-line
overrides, test splits, graph masks and model builders in the current folder behave."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import lora_anywhere as la
from lora_anywhere.cli import main
from lora_anywhere.cli.model_spec import ModelSpec
from lora_anywhere.cli.pretrained import resolve
from lora_anywhere.errors import ConfigError
from lora_anywhere.models import build_model

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "examples" / "configs"
DATA = ROOT / "examples" / "data"

pytestmark = pytest.mark.usefixtures("one_thread")


def vision_config(tmp_path: Path, model: str, extra_data: str = "") -> Path:
    """The README's vision config, with the [model] section given and paths made absolute."""
    text = (CONFIGS / "vision.toml").read_text().replace('"../data/', f'"{DATA}/')
    head, _, rest = text.partition("\n[data]\n")
    rest = rest.replace("image_size = 32\n", f"image_size = 32\n{extra_data}")
    path = tmp_path / "vision.toml"
    path.write_text(f"{model}\n[data]\n{rest}")
    return path


def printed(out: str, prefix: str) -> str:
    return next(line for line in out.splitlines() if line.startswith(prefix)).split(": ", 1)[1]


def images(split: str = "val") -> torch.Tensor:
    from PIL import Image
    from torchvision.transforms.functional import to_tensor

    files = sorted((DATA / "images" / split).rglob("*.png"))
    return torch.stack([to_tensor(Image.open(f).convert("RGB").resize((32, 32))) for f in files])


def test_the_printed_merge_line_reproduces_the_trained_vision_model(tmp_path, capsys):
    """Blocker 1: the README's vision config with pretrained weights and weights_ignore
    = ["fc."]; the merge line `train` prints used to fail to load those weights."""
    torch.manual_seed(1)
    pretrained = build_model("torchvision:resnet18")  # 1000 classes: its fc is the old head
    save_file({k: v.contiguous() for k, v in pretrained.state_dict().items()}, str(tmp_path / "resnet18-base.safetensors"))
    model = '[model]\nspec = "torchvision:resnet18"\nkwargs = { num_classes = "{classes}" }\nweights = "resnet18-base.safetensors"\nweights_ignore = ["fc."]\n'
    config = vision_config(tmp_path, model, 'test = "images/val"\n'.replace("images", f"{DATA}/images"))
    out_dir = tmp_path / "run"
    assert main(["train", str(config), "--out", str(out_dir), "--epochs", "1", "--batch-size", "6", "--lr", "0.01", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    command = printed(out, "to merge it into plain weights")
    assert command == f"lora-anywhere merge --run {out_dir}"
    assert main(shlex.split(command)[1:]) == 0
    run = json.loads((out_dir / "run.json").read_text())
    assert run["model"]["weights_ignore"] == ["fc."] and len(run["model"]["weights"]["sha256"]) == 64
    assert run["train"]["batch_size"] == 6 and run["train"]["lr"] == 0.01 and run["train"]["seed"] == 3  # the overrides

    # The merged file in the plain torchvision model gives the trained model's outputs.
    plain = build_model("torchvision:resnet18", num_classes=3)
    plain.load_state_dict(load_file(out_dir / "merged.safetensors"))
    torch.manual_seed(0)
    trained = build_model("torchvision:resnet18", num_classes=3)
    trained.load_state_dict({k: v for k, v in pretrained.state_dict().items() if not k.startswith("fc.")}, strict=False)
    la.load_adapter(trained, out_dir / "adapter")
    x = images()
    with torch.no_grad():
        want, got = trained.eval()(x), plain.eval()(x)
    assert (want - got).abs().max() <= 1e-4 * max(1.0, want.abs().max().item())

    # evaluate rebuilds it from the record: the validation loss of the last epoch again.
    assert main(["evaluate", str(out_dir), "--json", str(tmp_path / "val.json")]) == 0
    report = json.loads((tmp_path / "val.json").read_text())
    assert report["metrics"]["loss"] == pytest.approx(run["history"][-1]["val_loss"], rel=1e-4)
    assert len(report["per_class_accuracy"]) == 3 and sum(map(sum, report["confusion_matrix"])) == 9
    assert (out_dir / "test_report.json").is_file() and (out_dir / "test_confusion.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["evaluate", str(out_dir), "--split", "test"]) == 0
    assert f"loss {run['test']['loss']:.4f}" in capsys.readouterr().out

    # ...and refuses weights that changed since training.
    save_file({k: v.contiguous() * 2 for k, v in pretrained.state_dict().items()}, str(tmp_path / "resnet18-base.safetensors"))
    assert main(["merge", "--run", str(out_dir)]) == 1
    assert "changed since this run trained on them" in capsys.readouterr().err


def test_predict_gives_a_class_per_image_and_per_node(tmp_path, capsys):
    config = vision_config(
        tmp_path, '[model]\nspec = "lora_anywhere.cli.demo:SmallCNN"\nkwargs = { classes = "{classes}" }\n', "grayscale = true\n"
    )
    config.write_text(config.read_text().replace('targets = ["Conv2d"]\ntrainable = ["fc"]', 'targets = ["Conv2d"]\ntrainable = ["head"]'))
    assert main(["train", str(config), "--out", str(tmp_path / "run"), "--epochs", "1"]) == 0
    capsys.readouterr()
    assert (
        main(["predict", str(tmp_path / "run"), str(DATA / "images" / "val" / "ring"), str(DATA / "images" / "val" / "bar" / "0.png")]) == 0
    )
    rows = capsys.readouterr().out.strip().splitlines()
    assert rows[0] == "input,label,probability" and len(rows) == 1 + 3 + 1
    assert all(row.split(",")[1] in ("bar", "cross", "ring") and 0 < float(row.split(",")[2]) <= 1 for row in rows[1:])
    assert main(["predict", str(tmp_path / "run"), str(tmp_path / "nowhere")]) == 1
    assert "does not exist" in capsys.readouterr().err

    graph = tmp_path / "graph.toml"
    graph.write_text((CONFIGS / "graph.toml").read_text().replace('"../data/', f'"{DATA}/').replace("epochs = 15", "epochs = 2"))
    assert main(["train", str(graph), "--out", str(tmp_path / "g")]) == 0
    out = capsys.readouterr().out
    assert "one graph of 60 nodes (" in out and "to test on (test_mask)" in out
    assert main(["predict", str(tmp_path / "g"), "--out", str(tmp_path / "nodes.csv")]) == 0
    assert len((tmp_path / "nodes.csv").read_text().splitlines()) == 61  # every node, labelled or not


def test_a_torchvision_weights_name_is_read_from_the_hub_cache(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    model = '[model]\nspec = "torchvision:squeezenet1_1"\nkwargs = { num_classes = "{classes}" }\nweights = "SqueezeNet1_1_Weights.IMAGENET1K_V1"\nweights_ignore = ["classifier.1."]\n'
    config = vision_config(tmp_path, model)
    config.write_text(config.read_text().replace('trainable = ["fc"]', 'trainable = ["classifier.1"]'))
    assert main(["train", str(config), "--out", str(tmp_path / "run"), "--epochs", "1"]) == 1
    err = capsys.readouterr().err
    assert "SqueezeNet1_1_Weights.IMAGENET1K_V1 are not in the torch hub cache" in err and "squeezenet1_1-b8a52dc0.pth" in err
    torch.manual_seed(5)
    imagenet = build_model("torchvision:squeezenet1_1")  # stands in for the downloaded ImageNet file
    (tmp_path / "torch" / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(imagenet.state_dict(), tmp_path / "torch" / "hub" / "checkpoints" / "squeezenet1_1-b8a52dc0.pth")
    assert main(["train", str(config), "--out", str(tmp_path / "run"), "--epochs", "1"]) == 0
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["model"]["weights"]["name"] == "SqueezeNet1_1_Weights.IMAGENET1K_V1"
    spec = ModelSpec.from_record(run["model"])
    rebuilt = spec.build()
    assert torch.equal(rebuilt.features[0].weight, imagenet.features[0].weight)
    assert main(["merge", "--run", str(tmp_path / "run"), "--adapter", "best", "--out", str(tmp_path / "m.safetensors")]) == 0
    with pytest.raises(
        ConfigError, match=r"'IMAGENET2K' is not a torchvision weights name for squeezenet1_1 \(SqueezeNet1_1_Weights.IMAGENET1K_V1"
    ):
        resolve("IMAGENET2K", "torchvision:squeezenet1_1", tmp_path)


def test_a_timm_checkpoint_at_another_image_size_keeps_its_position_embeddings(tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(2)
    at_64 = timm.create_model("vit_tiny_patch16_224", img_size=64, depth=2, num_classes=1000)
    torch.save({"state_dict": at_64.state_dict()}, tmp_path / "vit64.pth")  # a 4×4 grid of patches
    spec = ModelSpec(
        "timm:vit_tiny_patch16_224",
        {"img_size": 32, "depth": 2, "num_classes": 3},
        resolve("vit64.pth", "timm:vit_tiny_patch16_224", tmp_path),
        ["head."],
    )
    model = spec.build()  # a 2×2 grid: timm's own filter resamples the embeddings
    from timm.layers import resample_abs_pos_embed

    want = resample_abs_pos_embed(at_64.pos_embed, (2, 2), num_prefix_tokens=1)
    assert model.pos_embed.shape == (1, 5, 192) and torch.allclose(model.pos_embed, want)
    assert torch.equal(model.blocks[1].attn.qkv.weight, at_64.blocks[1].attn.qkv.weight)
    with pytest.raises(ConfigError, match=r"head.weight: file \(1000, 192\), model \(3, 192\)"):
        ModelSpec(spec.spec, spec.kwargs, spec.weights, []).build()


def test_a_transformers_folder_is_built_with_from_pretrained(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=1000, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, num_labels=2
    )
    torch.manual_seed(4)
    pretrained = transformers.BertForSequenceClassification(config)
    pretrained.save_pretrained(str(tmp_path / "bert-base"))
    text = (CONFIGS / "text.toml").read_text().replace('"../data/', f'"{DATA}/')
    text = text.replace('spec = "hf:BertForSequenceClassification"', 'spec = "hf:BertForSequenceClassification"\nweights = "bert-base"')
    text = text.replace('kwargs = { num_labels = "{classes}", vocab_size = 1000 }', 'kwargs = { num_labels = "{classes}" }')
    (tmp_path / "text.toml").write_text(text)
    assert main(["train", str(tmp_path / "text.toml"), "--out", str(tmp_path / "run"), "--epochs", "1"]) == 1
    err = capsys.readouterr().err
    assert (
        "classifier.weight" in err
        and "classifier.bias" in err
        and "differ in shape from the model; list them (or their prefix) in weights_ignore" in err
    )
    (tmp_path / "text.toml").write_text(text.replace('weights = "bert-base"', 'weights = "bert-base"\nweights_ignore = ["classifier."]'))
    assert main(["train", str(tmp_path / "text.toml"), "--out", str(tmp_path / "run"), "--epochs", "1"]) == 0
    capsys.readouterr()
    assert main(["merge", "--run", str(tmp_path / "run")]) == 0
    record = json.loads((tmp_path / "run" / "run.json").read_text())["model"]
    base = ModelSpec.from_record(record).build()
    assert torch.equal(base.bert.encoder.layer[1].output.dense.weight, pretrained.bert.encoder.layer[1].output.dense.weight)
    la.load_adapter(base, tmp_path / "run" / "adapter")
    plain = transformers.BertForSequenceClassification(transformers.BertConfig(**{**config.to_dict(), "num_labels": 3}))
    plain.load_state_dict(load_file(tmp_path / "run" / "merged.safetensors"))
    ids = torch.randint(1, 1000, (3, 9))
    with torch.no_grad():
        assert torch.allclose(base.eval()(input_ids=ids).logits, plain.eval()(input_ids=ids).logits, atol=1e-5)


def test_node_masks_are_used_as_the_graph_has_them(tmp_path, capsys):
    from torch_geometric.data import Data, InMemoryDataset

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(20, 8, generator=g), torch.arange(20) % 3
    edges = torch.randint(0, 20, (2, 60), generator=g)
    only_train = Data(x=x, edge_index=edges, y=y, train_mask=torch.arange(20) < 6)  # as KarateClub: no val_mask
    InMemoryDataset.save([only_train], str(tmp_path / "train_mask.pt"))
    InMemoryDataset.save([Data(x=x, edge_index=edges, y=y)], str(tmp_path / "none.pt"))
    config = (CONFIGS / "graph.toml").read_text().replace("epochs = 15", "epochs = 1")
    for name in ("train_mask", "none"):
        (tmp_path / f"{name}.toml").write_text(config.replace("../data/graphs/social.pt", f"{tmp_path}/{name}.pt"))
    assert main(["train", str(tmp_path / "train_mask.toml"), "--out", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "6 to train on (train_mask), 14 to validate on (the nodes in no train_mask (the graph has no val_mask))" in out
    assert "val_ figures on 14 nodes" in out
    assert main(["train", str(tmp_path / "none.toml"), "--out", str(tmp_path / "b")]) == 1
    assert "no train_mask, val_mask or test_mask, so nothing is held out" in capsys.readouterr().err
    (tmp_path / "none.toml").write_text((tmp_path / "none.toml").read_text().replace('.pt"', '.pt"\nval_fraction = 0.25'))
    assert main(["train", str(tmp_path / "none.toml"), "--out", str(tmp_path / "b")]) == 0
    assert "15 to train on (train_mask), 5 to validate on (a random 25% (val_fraction; the graph has no masks))" in capsys.readouterr().out


def test_a_model_builder_in_the_current_folder_is_found_as_python_m_would(tmp_path):
    """The console script's sys.path starts with its own folder, not the current one."""
    (tmp_path / "mymodels.py").write_text("import torch\ndef build(classes=2):\n    return torch.nn.Linear(4, classes)\n")
    (tmp_path / "broken.py").write_text("import no_such_dependency_xyz\ndef build():\n    pass\n")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "lora-anywhere").write_text("import sys\nfrom lora_anywhere.cli import main\nsys.exit(main())\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p and "site-packages" not in p)}
    run = lambda *argv: subprocess.run(  # noqa: E731
        [sys.executable, str(tmp_path / "bin" / "lora-anywhere"), *argv], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    found = run("inspect", "mymodels:build")
    assert found.returncode == 0 and "Linear" in found.stdout, found.stderr
    missing, broken = run("inspect", "othermodels:build"), run("inspect", "broken:build")
    assert (
        missing.returncode == 1 and f"nor a module in the current folder ({tmp_path / 'othermodels.py'} does not exist)" in missing.stderr
    )
    assert broken.returncode == 1 and "importing broken failed inside it: No module named 'no_such_dependency_xyz'" in broken.stderr


def test_train_under_torchrun_with_two_processes(tmp_path):
    """`train --nproc 2`: two gloo processes, one run folder written by rank 0, one
    line per epoch (not two)."""
    config = (CONFIGS / "text.toml").read_text().replace('"../data/', f'"{DATA}/').replace("epochs = 15", "epochs = 2")
    (tmp_path / "text.toml").write_text(config)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(p for p in sys.path if p and "site-packages" not in p)}
    done = subprocess.run(
        [sys.executable, "-m", "lora_anywhere.cli", "train", str(tmp_path / "text.toml"), "--out", str(tmp_path / "run"), "--nproc", "2"],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "torch.distributed.run --standalone --nproc_per_node=2" in done.stdout
    assert done.stdout.count("epoch 1/2 ") == 1 and done.stdout.count("to merge it into plain weights") == 1
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert len(run["history"]) == 2 and (tmp_path / "run" / "adapter" / "lora_anywhere_adapter.safetensors").is_file()
    assert main(["merge", "--run", str(tmp_path / "run")]) == 0


def test_a_speech_model_with_per_frame_logits_fails_in_one_line_before_training(tmp_path, monkeypatch, capsys):
    """Blocker 5: the README promised a pre-flight check with the fix in the message."""
    (tmp_path / "frames_model.py").write_text(
        "import torch\n"
        "class PerFrame(torch.nn.Module):\n"
        "    def __init__(self, classes):\n"
        "        super().__init__()\n        self.conv = torch.nn.Conv1d(1, 8, 64, stride=32)\n        self.head = torch.nn.Linear(8, classes)\n"
        "    def forward(self, waves, lengths):\n"
        "        return self.head(torch.relu(self.conv(waves.unsqueeze(1))).transpose(1, 2))  # (batch, frames, classes)\n"
    )
    monkeypatch.chdir(tmp_path)  # the model module is in the current folder
    config = (CONFIGS / "speech.toml").read_text().replace('"../data/', f'"{DATA}/')
    config = config.replace('spec = "lora_anywhere.cli.demo.speech:AudioNet"', 'spec = "frames_model:PerFrame"')
    config = config.replace('trainable = ["head", "conv1.1", "conv2.1", "conv3.1"]', 'trainable = ["head"]')
    (tmp_path / "speech.toml").write_text(config)
    assert main(["train", "speech.toml", "--out", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lora-anywhere train: error: audio-classification: the model outputs (2, ")
    assert "a score vector per time step" in err and "task='frame-classification'" in err
    assert not (tmp_path / "run").exists()  # nothing trained, nothing written
