"""`lora-anywhere train` on every example config and its sample data, `merge` into
plain safetensors weights that load into the plain model, the four data loaders on
small files made here, and the error paths of configs, data and merge."""

from __future__ import annotations

import json
import shlex
import struct
import wave
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import lora_anywhere as la
from lora_anywhere.cli import main
from lora_anywhere.cli.config import load_config
from lora_anywhere.cli.data import hashing_tokenizer, load_data, read_wav
from lora_anywhere.errors import DataSpecError
from lora_anywhere.models import build_model
from lora_anywhere.testing import randomize_adapters
from lora_anywhere.training.tasks import LoaderSpec, get_task

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "examples" / "configs"


pytestmark = pytest.mark.usefixtures("one_thread")


def first_batch(config_path: Path):
    config = load_config(config_path)
    data = load_data(config.data, config_path.parent)
    task = get_task(config.train.get("task", data.task))
    return task, next(iter(task.batches(data.val, train=False, spec=LoaderSpec(batch_size=4))))


@pytest.mark.parametrize("domain", ["vision", "graph", "speech", "text"])
def test_train_then_merge_each_example_config(domain, tmp_path, capsys):
    config = CONFIGS / f"{domain}.toml"
    out = tmp_path / "run"
    assert main(["train", str(config), "--out", str(out), "--epochs", "1"]) == 0
    printed = capsys.readouterr().out
    for name in (
        "adapter/lora_anywhere_adapter.safetensors",
        "adapter/lora_anywhere_config.json",
        "metrics.csv",
        "curves.png",
        "best/lora_anywhere_config.json",
        "last/trainer_state.pt",
        "run.json",
    ):
        assert (out / name).is_file(), name
    run = json.loads((out / "run.json").read_text())
    assert run["classes"] and len(run["history"]) == 1 and "val_accuracy" in run["history"][0]

    # The printed merge command works as printed, and its file loads into the plain model.
    command = next(line for line in printed.splitlines() if line.startswith("to merge it into plain weights: "))
    argv = shlex.split(command.split(": ", 1)[1])[1:]
    assert argv[0] == "merge" and main(argv) == 0
    merged = load_file(out / "merged.safetensors")
    kwargs = run["model"]["kwargs"]
    torch.manual_seed(0)
    adapted = build_model(run["model"]["spec"], **kwargs)
    la.load_adapter(adapted, out / "adapter")
    plain = build_model(run["model"]["spec"], **kwargs)
    plain.load_state_dict(merged)  # strict: exactly the plain model's keys
    assert set(merged) == set(plain.state_dict())
    task, batch = first_batch(config)
    with torch.no_grad():
        want, _ = task.forward(adapted.eval(), batch, train=False)
        got, _ = task.forward(plain.eval(), batch, train=False)
    assert (want - got).abs().max() <= 1e-4 * max(1.0, want.abs().max().item())


def test_merge_uses_base_weights_and_seed(tmp_path, capsys):
    """A base loaded from a weights file: merge rebuilds it from the same file; a file
    that does not fit the model is refused with every mismatch named."""
    torch.manual_seed(3)
    base = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(tmp_path / "base.safetensors"))
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    model.load_state_dict(base.state_dict())
    la.apply(model, rank=2)
    randomize_adapters(model)
    la.save_adapter(model, tmp_path / "adapter")
    x = torch.randn(5, 4)
    (tmp_path / "net.py").write_text(
        "import torch\ndef build():\n    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))\n"
    )
    import sys

    sys.path.insert(0, str(tmp_path))
    try:
        argv = [
            "merge",
            "--model",
            "net:build",
            "--weights",
            str(tmp_path / "base.safetensors"),
            "--adapter",
            str(tmp_path / "adapter"),
            "--out",
            str(tmp_path / "merged.safetensors"),
        ]
        assert main(argv) == 0
        assert "wrote" in capsys.readouterr().out
        plain = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        plain.load_state_dict(load_file(tmp_path / "merged.safetensors"))
        with torch.no_grad():
            assert torch.allclose(plain(x), model(x), atol=1e-6)
            assert not torch.allclose(plain(x), base(x), atol=1e-3)  # the adapter is in there
        bad = tmp_path / "bad.safetensors"
        save_file({"0.weight": torch.zeros(3, 3)}, str(bad))
        assert main([*argv[:4], str(bad), *argv[5:]]) == 1
        err = capsys.readouterr().err
        assert "do not fit the model" in err and "0.weight: file (3, 3), model (8, 4)" in err and "missing 2.weight" in err
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("net", None)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "pyg:GCN", "--adapter", "no/such/adapter", "--out", "x.safetensors"], "no adapter at"),
        (["--model", "pyg:GCN", "--adapter", "a", "--out", "merged.pt"], "name the file *.safetensors"),
        (["--model", "no_such_module_xyz:build", "--adapter", "a", "--out", "m.safetensors"], "neither a model source"),
    ],
)
def test_merge_errors(argv, message, capsys):
    assert main(["merge", *argv]) == 1
    assert message in capsys.readouterr().err


def test_merge_refuses_an_adapter_of_another_shape(tmp_path, capsys):
    model = build_model("pyg:GCN", in_channels=8, out_channels=3)
    la.apply(model, rank=2)
    la.save_adapter(model, tmp_path / "adapter")
    assert main(["merge", "--model", "pyg:GCN", "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "m.safetensors")]) == 1
    err = capsys.readouterr().err
    assert "does not fit this model" in err and "saved for shape (32, 8), the model has (32, 16)" in err
    assert not (tmp_path / "m.safetensors").exists()


# ---------------------------------------------------------------------- config errors


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


GOOD_DATA = f'[data]\nkind = "text-csv"\ntrain = "{CONFIGS / "../data/text/train.csv"}"\nvocab_size = 100\n'
GOOD_MODEL = '[model]\nspec = "hf:BertForSequenceClassification"\nkwargs = { num_labels = "{classes}", vocab_size = 100 }\n'


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[model\nspec = 1", "is not valid TOML"),
        ("[models]\nspec = 'x'", "unknown section(s) models"),
        ("[data]\nkind = 'pyg'", "[model] needs spec"),
        (GOOD_MODEL + "[data]\ntrain = 'x'", "[data] needs kind"),
        (GOOD_MODEL + "[data]\nkind = 'parquet'", "kind must be one of 'image-folder', 'pyg', 'audio-folder', 'text-csv'"),
        (GOOD_MODEL + GOOD_DATA + "[lora]\nrnak = 4", "[lora] has no option 'rnak'"),
        (GOOD_MODEL + GOOD_DATA + "[train]\nepoch = 4", "[train] has no option 'epoch'"),
        (GOOD_MODEL + GOOD_DATA + "[train]\nepochs = 'many'", "[train] epochs must be an integer ≥ 1, got 'many' (str)"),
        (GOOD_MODEL + GOOD_DATA + "[train]\ntask = 'segmentation'", "unknown task 'segmentation'"),
        (GOOD_MODEL + GOOD_DATA + "[train]\ntask = 'regression'", "regression: the model outputs (24, 3) for targets (24,)"),
        (GOOD_MODEL + GOOD_DATA + "[lora]\ntargets = ['Conv2d']", "matched no layer"),
        (GOOD_MODEL + GOOD_DATA.replace("vocab_size = 100", "vocab_size = 100\nshuffle = true"), "has no option 'shuffle'"),
        (GOOD_MODEL + GOOD_DATA.replace("vocab_size = 100\n", ""), "needs vocab_size = N"),
        (GOOD_MODEL + GOOD_DATA.replace("train.csv", "missing.csv"), "does not exist"),
        (GOOD_MODEL.replace('"{classes}"', "7") + GOOD_DATA, "outputs 7 scores per example, but the data has 3 classes"),
        (GOOD_MODEL.replace("vocab_size = 100", "vocab_size = 10") + GOOD_DATA, "fails on the first training batch"),
        (GOOD_MODEL + 'weights = "nowhere.safetensors"\n' + GOOD_DATA, "base weights"),
        ('[model]\nspec = "hf:NoSuchModel"\n' + GOOD_DATA, "transformers has no model class"),
    ],
)
def test_config_errors_say_what_to_fix(tmp_path, capsys, text, message):
    assert main(["train", str(write(tmp_path, text)), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("lora-anywhere train: error: ") and message in err, err


def test_missing_config_file(capsys):
    assert main(["train", "no/such/config.toml"]) == 1
    assert "config file no/such/config.toml does not exist" in capsys.readouterr().err


# ---------------------------------------------------------------------- loaders


def test_image_folder_split_grayscale_and_class_mismatch(tmp_path):
    data = load_data(
        {"kind": "image-folder", "train": "images/train", "image_size": [12, 10], "grayscale": True, "val_fraction": 0.25},
        ROOT / "examples" / "data",
    )
    assert data.classes == ["bar", "cross", "ring"] and data.task == "image-classification"
    assert (len(data.train), len(data.val)) == (18, 6)
    image, label = data.train[0]
    assert image.shape == (1, 12, 10) and 0 <= label < 3
    (tmp_path / "val" / "other").mkdir(parents=True)
    from PIL import Image

    Image.new("RGB", (4, 4)).save(tmp_path / "val" / "other" / "a.png")
    with pytest.raises(DataSpecError, match="class folders differ"):
        load_data({"kind": "image-folder", "train": str(ROOT / "examples/data/images/train"), "val": str(tmp_path / "val")}, tmp_path)
    with pytest.raises(DataSpecError, match="one subfolder per class"):
        load_data({"kind": "image-folder", "train": str(tmp_path / "val" / "other")}, tmp_path)


def test_pyg_graph_classification_trains_from_a_config(tmp_path, monkeypatch, capsys):
    (tmp_path / "shapes_model.py").write_text(
        "import torch\nfrom torch_geometric.nn import GIN, global_add_pool\n"
        "class Net(torch.nn.Module):\n"
        "    def __init__(self, classes):\n"
        "        super().__init__()\n        self.gnn = GIN(1, 16, num_layers=2)\n        self.head = torch.nn.Linear(16, classes)\n"
        "    def forward(self, x, edge_index, batch):\n        return self.head(global_add_pool(self.gnn(x, edge_index), batch))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    config = write(
        tmp_path,
        f"""
[model]
spec = "shapes_model:Net"
kwargs = {{ classes = "{{classes}}" }}
[data]
kind = "pyg"
train = "{ROOT / "examples/data/graphs/shapes.pt"}"
val_fraction = 0.3
[lora]
rank = 2
targets = "graph-convs"
trainable = "head"
[train]
epochs = 2
batch_size = 8
""",
    )
    assert main(["train", str(config), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert (
        "21 training and 9 validation graphs, 3 classes" in out
        and (tmp_path / "out" / "adapter" / "lora_anywhere_adapter.safetensors").is_file()
    )


def test_pyg_node_classification_without_masks_gets_them(tmp_path):
    from torch_geometric.data import Data, InMemoryDataset

    graph = Data(x=torch.randn(10, 3), edge_index=torch.tensor([[0, 1], [1, 0]]), y=torch.arange(10) % 2)
    InMemoryDataset.save([graph], str(tmp_path / "g.pt"))
    data = load_data({"kind": "pyg", "train": "g.pt", "val_fraction": 0.3}, tmp_path)
    assert data.task == "node-classification" and data.classes == ["0", "1"]
    assert int(data.train.val_mask.sum()) == 3 and bool((data.train.train_mask ^ data.train.val_mask).all())
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(DataSpecError, match="not a PyG data set file"):
        load_data({"kind": "pyg", "train": "junk.pt"}, tmp_path)
    with pytest.raises(DataSpecError, match="is a folder; give the file itself"):
        load_data({"kind": "pyg", "train": "."}, tmp_path)


def write_wav(path: Path, samples: list[float], rate: int = 8000, width: int = 2) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(width)
        f.setframerate(rate)
        if width == 1:
            f.writeframes(bytes(int(128 + 127 * s) for s in samples))
        elif width == 2:
            f.writeframes(b"".join(struct.pack("<h", int(32767 * s)) for s in samples))
        else:  # 24-bit little endian
            f.writeframes(b"".join(int(8388607 * s).to_bytes(3, "little", signed=True) for s in samples))


@pytest.mark.parametrize("width", [1, 2, 3])
def test_read_wav_sample_widths(tmp_path, width):
    samples = [0.0, 0.5, -0.5, 0.25, -1.0 + 1e-3]
    write_wav(tmp_path / "a.wav", samples, rate=4000, width=width)
    wave_, rate = read_wav(tmp_path / "a.wav")
    assert rate == 4000 and torch.allclose(wave_, torch.tensor(samples), atol=1.5 / 2 ** (8 * width - 1) + 1e-2 * (width == 1))


def test_audio_class_folders_and_errors(tmp_path):
    for label in ("hi", "lo"):
        for i in range(3):
            write_wav(tmp_path / "clips" / label / f"{i}.wav", [0.1 * i] * (400 + 100 * i))
    data = load_data({"kind": "audio-folder", "train": "clips", "val_fraction": 0.34, "max_seconds": 0.05}, tmp_path)
    assert data.classes == ["hi", "lo"] and (len(data.train), len(data.val)) == (4, 2)
    assert all(len(data.train[i][0]) <= 400 for i in range(4))  # cropped to 0.05 s at 8 kHz
    with pytest.raises(DataSpecError, match="sample_rate is 16000, but"):
        load_data({"kind": "audio-folder", "train": "clips", "sample_rate": 16000}, tmp_path)
    write_wav(tmp_path / "clips" / "lo" / "odd.wav", [0.0] * 10, rate=16000)
    odd = load_data({"kind": "audio-folder", "train": "clips", "val": "clips"}, tmp_path)
    with pytest.raises(DataSpecError, match="resample it"):
        [odd.train[i] for i in range(len(odd.train))]
    (tmp_path / "clips" / "lo" / "odd.wav").write_bytes(b"RIFF....not a wav")
    with pytest.raises(DataSpecError, match="is not a PCM WAV file"):
        [odd.train[i] for i in range(len(odd.train))]
    (tmp_path / "listed").mkdir()
    (tmp_path / "listed" / "labels.csv").write_text("file,label\nmissing.wav,x\n")
    with pytest.raises(DataSpecError, match="lists files that do not exist"):
        load_data({"kind": "audio-folder", "train": "listed"}, tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataSpecError, match="neither labels.csv"):
        load_data({"kind": "audio-folder", "train": "empty"}, tmp_path)


def test_text_csv_columns_labels_and_tokenizers(tmp_path):
    (tmp_path / "t.csv").write_text("body,kind\nhello there,2\nbye now,10\nhello again,2\n")
    data = load_data(
        {
            "kind": "text-csv",
            "train": "t.csv",
            "val": "t.csv",
            "text_column": "body",
            "label_column": "kind",
            "vocab_size": 50,
            "max_length": 1,
        },
        tmp_path,
    )
    assert data.classes == ["2", "10"]  # integer labels sort as numbers
    sample = data.train[1]
    assert sample["labels"] == 1 and sample["input_ids"].tolist() == hashing_tokenizer(50)("bye")
    with pytest.raises(DataSpecError, match="has no column 'text'"):
        load_data({"kind": "text-csv", "train": "t.csv", "vocab_size": 50}, tmp_path)
    (tmp_path / "v.csv").write_text("body,kind\nhello,3\n")
    with pytest.raises(DataSpecError, match=r"validation labels \['3'\] do not occur"):
        load_data(
            {"kind": "text-csv", "train": "t.csv", "val": "v.csv", "text_column": "body", "label_column": "kind", "vocab_size": 50},
            tmp_path,
        )

    from transformers import BertTokenizer

    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "there", "bye", "now", "again"]))
    BertTokenizer(str(tmp_path / "vocab.txt")).save_pretrained(str(tmp_path / "tok"))
    data = load_data(
        {"kind": "text-csv", "train": "t.csv", "text_column": "body", "label_column": "kind", "tokenizer": "tok", "val_fraction": 0.34},
        tmp_path,
    )
    assert "tokenizer tok" in data.description
    for i in range(len(data.train)):
        ids = data.train[i]["input_ids"].tolist()
        assert ids[0] == 2 and ids[-1] == 3 and all(5 <= t <= 9 for t in ids[1:-1])  # [CLS] words [SEP]
    with pytest.raises(DataSpecError, match="either tokenizer"):
        load_data(
            {"kind": "text-csv", "train": "t.csv", "text_column": "body", "label_column": "kind", "tokenizer": "tok", "vocab_size": 5},
            tmp_path,
        )


def gcn_config(tmp_path: Path, graph_file: str, data_options: str = "") -> Path:
    return write(
        tmp_path,
        f"""
[model]
spec = "pyg:GCN"
kwargs = {{ in_channels = 3, out_channels = "{{classes}}" }}
[data]
kind = "pyg"
train = "{graph_file}"
{data_options}
[train]
epochs = 2
""",
    )


def test_a_nan_loss_stops_training_with_advice(tmp_path, capsys):
    from torch_geometric.data import Data, InMemoryDataset

    graph = Data(x=torch.full((6, 3), float("nan")), edge_index=torch.tensor([[0, 1], [1, 0]]), y=torch.arange(6) % 2)
    InMemoryDataset.save([graph], str(tmp_path / "nan.pt"))
    assert main(["train", str(gcn_config(tmp_path, "nan.pt", "val_fraction = 0.5")), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "error: the loss became nan" in err and "try a lower lr" in err


def test_an_interrupted_run_says_how_to_resume(tmp_path, capsys, monkeypatch):
    import lora_anywhere.cli.jobs as train_config

    class Interrupted(train_config.Trainer):
        def fit(self):
            history = super().fit()
            self.interrupted = True  # as after Ctrl-C: the trainer saved last/ and returned
            return history

    monkeypatch.setattr(train_config, "Trainer", Interrupted)
    config = gcn_config(tmp_path, str(ROOT / "examples/data/graphs/social.pt")).read_text().replace("in_channels = 3", "in_channels = 8")
    (tmp_path / "config.toml").write_text(config)
    assert main(["train", str(tmp_path / "config.toml"), "--out", str(tmp_path / "out")]) == 130
    out = capsys.readouterr().out
    assert "add resume = true to [train]" in out and (tmp_path / "out" / "last" / "trainer_state.pt").is_file()


def test_image_normalisation_augmentation_and_test_split_are_chosen_and_stated(tmp_path):
    base = {"kind": "image-folder", "train": "images/train", "val": "images/val", "image_size": 16}
    plain = load_data(base, ROOT / "examples" / "data")
    assert "not normalised" in plain.description and plain.info["normalize"] is None
    assert 0 <= float(plain.train[0][0].min()) and float(plain.train[0][0].max()) <= 1
    tuned = load_data({**base, "normalize": "imagenet", "augment": True, "test": "images/val"}, ROOT / "examples" / "data")
    assert tuned.info == {
        "image_size": 16,
        "grayscale": False,
        "normalize": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
        "augment": ["crop", "flip"],
    }
    assert "normalised with mean [0.485, 0.456, 0.406]" in tuned.description and "augmented with crop, flip" in tuned.description
    assert "24 training, 9 validation and 9 test images" in tuned.description
    torch.manual_seed(0)
    assert not torch.equal(tuned.train[0][0], tuned.train[0][0])  # training views are random...
    assert torch.equal(tuned.val[0][0], tuned.val[0][0]) and torch.equal(tuned.test[0][0], tuned.val[0][0])  # ...the others are not
    no_val = {k: v for k, v in base.items() if k != "val"}
    split = load_data({**no_val, "augment": ["flip", "color"]}, ROOT / "examples" / "data")
    assert torch.equal(split.val[0][0], split.val[0][0])  # split from the training folder, still without augmentation
    for options, message in (
        ({"normalize": "cifar"}, 'normalize must be "imagenet"'),
        ({"augment": ["rotate"]}, "augment must be true"),
        ({"normalize": "imagenet", "mean": [0.5], "std": [0.5]}, "either normalize or mean and std"),
    ):
        with pytest.raises(DataSpecError, match=message):
            load_data({**base, **options}, ROOT / "examples" / "data")


def test_audio_in_other_formats_goes_through_torchaudio(tmp_path, monkeypatch):
    import torchaudio

    from lora_anywhere.cli.data import read_audio

    for label in ("hi", "lo"):
        write_wav(tmp_path / "clips" / label / "0.wav", [0.1] * 400)
        (tmp_path / "clips" / label / "1.flac").write_bytes(b"fLaC not really")
    data = load_data({"kind": "audio-folder", "train": "clips", "val": "clips", "test": "clips"}, tmp_path)
    assert len(data.train) == 4 and len(data.test) == 4 and "4 training, 4 validation and 4 test clips" in data.description
    flac = tmp_path / "clips" / "hi" / "1.flac"

    def no_backend(path):
        raise ImportError("TorchCodec is required for load_with_torchcodec")

    monkeypatch.setattr(torchaudio, "load", no_backend)
    with pytest.raises(DataSpecError, match=r"1.flac cannot be read: torchaudio.load failed.*pip install torchcodec.*ffmpeg -i in.flac"):
        read_audio(flac)
    monkeypatch.setattr(torchaudio, "load", lambda path: (torch.stack([torch.zeros(500), torch.ones(500)]), 8000))
    wave_, rate = read_audio(flac)
    assert rate == 8000 and wave_.shape == (500,) and torch.allclose(wave_, torch.full((500,), 0.5))  # channels averaged
    (tmp_path / "float.wav").write_bytes(
        b"RIFF\x24\x00\x00\x00WAVEfmt \x10\x00\x00\x00\x03\x00\x01\x00\x40\x1f\x00\x00\x00\x7d\x00\x00\x04\x00\x20\x00data\x00\x00\x00\x00"
    )
    assert read_audio(tmp_path / "float.wav")[1] == 8000  # not PCM: torchaudio reads it
