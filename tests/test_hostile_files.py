"""Adapter folders as a hostile or careless sharer makes them: every refusal is an
`AdapterFileError` and leaves the model bit-identical; whatever loads, loads exactly.
Also: data files that would run code when unpickled are refused unread."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from torch import nn

import lora_anywhere as la
from lora_anywhere import io as la_io
from lora_anywhere.state import model_state
from lora_anywhere.testing import assert_same_fingerprint, randomize_adapters

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG, TENSORS = la_io.CONFIG_FILE, la_io.TENSORS_FILE


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        h = self.bn(self.stem(x)).flatten(2).transpose(1, 2)
        return self.head(self.attn(h, h, h)[0].mean(1))


def make(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net().eval()


X = torch.randn(2, 3, 4, 4)


def trained(**options: Any) -> Net:
    """An adapter as a user's loop leaves it: trained factors and head, and the frozen
    BatchNorm's running statistics moved by a forward in train mode."""
    model = la.apply(make(), rank=2, trainable="head", **options)
    randomize_adapters(model, std=0.2)
    with torch.no_grad():
        model.head.weight.mul_(1.5)
        model.train()(torch.randn(4, 3, 4, 4))
    return model.eval()


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("valid")
    plain = la.save_adapter(trained(), root / "plain")
    methods = la.save_adapter(trained(init="svd", dora=True), root / "methods")
    return {"plain": plain, "methods": methods}


def copy_of(folder: Path, tmp_path: Path) -> Path:
    target = tmp_path / f"copy{len(list(tmp_path.iterdir()))}"
    shutil.copytree(folder, target)
    return target


def fingerprint(model: nn.Module) -> dict[str, Any]:
    return {
        "tensors": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "grads": {n: p.requires_grad for n, p in model.named_parameters()},
        "classes": {n: type(m) for n, m in model.named_modules()},
        "names": la.adapter_names(model),
        "state": "_lora_anywhere_state" in model.__dict__,
    }


def assert_unchanged(model: nn.Module, before: dict[str, Any]) -> None:
    assert_same_fingerprint(before, fingerprint(model))


def targets_for_refusal() -> list[nn.Module]:
    """A plain base, and a model that already carries another adapter."""
    other = la.apply(make(), rank=1, name="other", targets="stem")
    randomize_adapters(other)
    return [make(), other]


def refused(folder: Path, match: str, error: type[Exception] = la.AdapterFileError) -> None:
    for model in targets_for_refusal():
        before = fingerprint(model)
        with pytest.raises(error, match=match) as info:
            la.load_adapter(model, folder)
        assert isinstance(info.value, la.AdapterFileError)
        assert_unchanged(model, before)


# ----------------------------------------------------------------------------- mutations


def edit_config(folder: Path, change: Callable[[dict[str, Any]], Any]) -> None:
    data = json.loads((folder / CONFIG).read_text())
    result = change(data)
    (folder / CONFIG).write_text(json.dumps(data if result is None else result))


def edit_tensors(folder: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(folder / TENSORS)
    change(tensors)
    save_file(tensors, folder / TENSORS)


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(data: dict[str, Any]) -> None:
        *parents, leaf = path.split("|")
        for p in parents:
            data = data[p]
        data[leaf] = value

    return change


CONFIG_CASES: dict[str, tuple[Callable[[dict[str, Any]], Any], str]] = {
    "a list, not an object": (lambda d: [d], "must be a JSON object"),
    "an unknown key": (_set("planted", 1), "unknown 'planted'"),
    "a missing key": (lambda d: d.pop("rank") and None, "missing rank"),
    "rank as a string": (_set("rank", "8"), "rank must be a whole number"),
    "rank zero": (_set("rank", 0), "rank must be at least 1"),
    "rank true": (_set("rank", True), "rank must be a whole number"),
    "a target rank of zero": (_set("layers|stem|targets|weight|rank", 0), "rank must be at least 1"),
    "a negative scale": (_set("layers|stem|scale", -1.0), "scale must be positive"),
    "an infinite scale": (_set("layers|stem|scale", 1e309), "Infinity is not a number JSON allows"),
    "a scale of text": (_set("layers|stem|scale", "1"), "scale must be a finite number"),
    "alpha zero": (_set("alpha", 0), "alpha must be positive"),
    "dropout one": (_set("dropout", 1.0), r"dropout must be in \[0, 1\)"),
    "a path-like name": (_set("name", "../../etc"), "name '../../etc' is not valid"),
    "an empty name": (_set("name", ""), "name '' is not valid"),
    "trainable not a list": (_set("trainable", "head"), "trainable must be a list of strings"),
    "a path-like layer name": (lambda d: d["layers"].update({"../x": d["layers"]["stem"]}), "a layer name '../x' is not valid"),
    "a future format": (_set("format", "lora_anywhere.adapter/99"), "format 'lora_anywhere.adapter/99'"),
    "an unknown route": (_set("layers|stem|route", "fast"), "route must be one of"),
    "dora as a string": (_set("dora", "yes"), "dora must be true or false"),
    "rows outside the tensor": (_set("layers|attn|targets|q|rows", [0, 99]), "are not a block"),
    "a shape of one size": (_set("layers|stem|targets|weight|shape", [8]), "shape must be a list of 2 to 8 sizes"),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_config_refusals(case: str, folders, tmp_path):
    change, match = CONFIG_CASES[case]
    folder = copy_of(folders["plain"], tmp_path)
    edit_config(folder, change)
    refused(folder, match)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("{not json", "not a valid lora_anywhere adapter config"),
        ('{"name": "a", "name": "b"}', "key 'name' appears twice"),
        ('{"rank": NaN}', "NaN is not a number JSON allows"),
        ("[" * 200_000 + "]" * 200_000, "nested too deeply"),
        (b"\xff\xfe not utf-8", "not a valid lora_anywhere adapter config"),
    ],
    ids=["not json", "a duplicated key", "NaN", "deep nesting", "not utf-8"],
)
def test_config_text_refusals(text: str | bytes, match: str, folders, tmp_path):
    folder = copy_of(folders["plain"], tmp_path)
    (folder / CONFIG).write_bytes(text if isinstance(text, bytes) else text.encode())
    refused(folder, match)


def test_an_oversized_config_is_refused_unread(folders, tmp_path, monkeypatch):
    folder = copy_of(folders["plain"], tmp_path)
    monkeypatch.setattr(la_io, "MAX_CONFIG_BYTES", 1000)
    refused(folder, "more than any adapter config needs")


TENSOR_CASES: dict[str, tuple[Callable[[dict[str, torch.Tensor]], None], str]] = {
    # the cases: an extra tensor would overwrite a frozen base weight; a (1,)
    # tensor would broadcast into a bias
    "a frozen base weight as a trainable tensor": (
        lambda t: t.update({"trainable/stem.weight": torch.zeros(8, 3, 3, 3)}),
        "tensor trainable/stem.weight belongs to no layer, trainable module or buffer",
    ),
    "a broadcastable bias": (
        lambda t: t.update({"trainable/head.bias": torch.zeros(1)}),
        r"trainable/head.bias: saved \(1,\), the model has \(5,\)",
    ),
    "a trainable tensor of no module": (
        lambda t: t.update({"trainable/head.ghost": torch.zeros(5)}),
        "head.ghost is not in the model's head",
    ),
    "a missing trainable tensor": (lambda t: t.pop("trainable/head.bias"), "trainable tensor head.bias is missing"),
    "a missing factor": (lambda t: t.pop("lora/stem/weight/B"), "tensor lora/stem/weight/B is missing"),
    "a factor of the wrong shape": (
        lambda t: t.update({"lora/stem/weight/A": torch.zeros(2, 26)}),
        r"lora/stem/weight/A has shape \(2, 26\), expected \(2, 27\)",
    ),
    "a factor of integers": (
        lambda t: t.update({"lora/stem/weight/A": torch.zeros(2, 27, dtype=torch.int32)}),
        "is torch.int32, expected a floating-point dtype",
    ),
    "a complex factor": (
        lambda t: t.update({"lora/stem/weight/A": torch.zeros(2, 27, dtype=torch.complex64)}),
        "expected a floating-point dtype",
    ),
    "NaN in a factor": (
        lambda t: t["lora/attn/q/B"].__setitem__((0, 0), float("nan")),
        "tensor lora/attn/q/B holds NaN or infinite values",
    ),
    "inf in a trainable tensor": (
        lambda t: t["trainable/head.weight"].__setitem__((0, 0), float("inf")),
        "trainable/head.weight holds NaN",
    ),
    "NaN in a buffer": (lambda t: t["buffers/bn.running_var"].__setitem__(0, float("nan")), "buffers/bn.running_var holds NaN"),
    "a buffer the config does not list": (
        lambda t: t.update({"buffers/stem.weight": torch.zeros(8, 3, 3, 3)}),
        "buffers/stem.weight belongs to no layer",
    ),
    "a missing buffer": (lambda t: t.pop("buffers/bn.running_mean"), "tensor buffers/bn.running_mean is missing"),
    "a counter as floats": (
        lambda t: t.update({"buffers/bn.num_batches_tracked": torch.tensor(1.0)}),
        "is torch.float32, the model's is torch.int64",
    ),
    "a factor of another adapter": (
        lambda t: t.update({"lora/head/weight/A": torch.zeros(2, 8)}),
        "lora/head/weight/A belongs to no layer",
    ),
}


@pytest.mark.parametrize("case", list(TENSOR_CASES))
def test_tensor_refusals(case: str, folders, tmp_path):
    change, match = TENSOR_CASES[case]
    folder = copy_of(folders["plain"], tmp_path)
    edit_tensors(folder, change)
    refused(folder, match)


def _layer_copy(source: str, name: str) -> Callable[[Path], None]:
    """A layer the config and the tensors agree on, under another name."""

    def change(folder: Path) -> None:
        edit_config(folder, lambda d: d["layers"].update({name: d["layers"][source]}))
        edit_tensors(
            folder,
            lambda t: t.update(
                {k.replace(f"lora/{source}/", f"lora/{name}/"): v.clone() for k, v in list(t.items()) if k.startswith(f"lora/{source}/")}
            ),
        )

    return change


def _target_copy(folder: Path) -> None:
    edit_config(folder, lambda d: d["layers"]["attn"]["targets"].update({"z": d["layers"]["attn"]["targets"]["q"]}))
    edit_tensors(folder, lambda t: t.update({f"lora/attn/z/{f}": t[f"lora/attn/q/{f}"].clone() for f in "AB"}))


def _config(change: Callable[[dict[str, Any]], Any]) -> Callable[[Path], None]:
    return lambda folder: edit_config(folder, change)


MODEL_CASES: dict[str, tuple[Callable[[Path], None], str]] = {
    "a layer the model lacks": (_layer_copy("stem", "ghost"), "layer 'ghost'.*is not in the model"),
    "a layer of another rule": (_config(_set("layers|stem|rule", "torch.nn.Linear")), "saved with rule torch.nn.Linear"),
    "a target shape of another model": (_config(_set("layers|stem|targets|weight|shape", [8, 3, 1, 9])), r"saved for shape \(8, 3, 1, 9\)"),
    "a target the rule does not name": (_target_copy, "has no target 'z'"),
    "another tensor for a target": (_config(_set("layers|stem|targets|weight|tensor", "bias")), "the rule now adapts .weight"),
    "a trainable module the model lacks": (_config(_set("trainable", ["ghost"])), "tensor trainable/head.bias belongs to no"),
    "a trainable module that is an adapted layer": (
        _config(_set("trainable", ["head", "stem"])),
        "trainable module 'stem' overlaps 'stem'",
    ),
    "a buffer the model lacks": (
        _config(lambda d: d["buffers"].append("ghost.running_mean")),
        "tensor buffers/ghost.running_mean is missing",
    ),
}


@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_refusals_against_the_model(case: str, folders, tmp_path):
    change, match = MODEL_CASES[case]
    folder = copy_of(folders["plain"], tmp_path)
    change(folder)
    refused(folder, match)


def test_a_buffer_the_model_lacks_is_refused_by_name(folders, tmp_path):
    folder = copy_of(folders["plain"], tmp_path)
    edit_config(folder, lambda d: d["buffers"].append("stem.weight"))
    edit_tensors(folder, lambda t: t.update({"buffers/stem.weight": torch.zeros(8, 3, 3, 3)}))
    refused(folder, "buffer 'stem.weight' is not a buffer of the base model", la.ShapeMismatchError)


def test_a_layer_under_the_adapters_is_refused(folders, tmp_path):
    folder = copy_of(folders["plain"], tmp_path)
    model = la.apply(make(), rank=1, name="other", targets="stem")
    edit_config(folder, lambda d: d["layers"].update({"stem.lora_adapters.other.factors": d["layers"].pop("stem")}))
    before = fingerprint(model)
    with pytest.raises(la.AdapterFileError):
        la.load_adapter(model, folder)
    assert_unchanged(model, before)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"\x00" * 20, "corrupt or not a safetensors file"),
        (struct.pack("<Q", 2**40) + b"{}", "corrupt or not a safetensors file"),  # a huge header length
        (None, "corrupt or not a safetensors file"),  # a pickle planted under the safetensors name
    ],
    ids=["zeros", "huge header", "planted pickle"],
)
def test_tensor_files_that_are_not_safetensors(content: bytes | None, match: str, folders, tmp_path):
    folder = copy_of(folders["plain"], tmp_path)
    if content is None:
        torch.save({"lora/stem/weight/A": torch.zeros(2, 27)}, folder / TENSORS)
    else:
        (folder / TENSORS).write_bytes(content)
    refused(folder, match)


def test_a_truncated_tensor_file(folders, tmp_path):
    folder = copy_of(folders["plain"], tmp_path)
    data = (folder / TENSORS).read_bytes()
    (folder / TENSORS).write_bytes(data[: len(data) // 2])
    refused(folder, "corrupt or not a safetensors file")


def test_a_name_given_at_load_is_checked(folders):
    model = make()
    with pytest.raises(la.LoraError, match="adapter name"):
        la.load_adapter(model, folders["plain"], name="../x")
    assert la.adapter_names(model) == []


def test_valid_folders_load_exactly(folders):
    for kind, options in (("plain", {}), ("methods", {"init": "svd", "dora": True})):
        expected = trained(**options)
        loaded = la.load_adapter(make(), folders[kind])
        assert torch.equal(loaded(X), expected(X)), kind


# ----------------------------------------------------------------------------- property


def loads_exactly(model: nn.Module, folder: Path) -> None:
    """Every tensor of the file is now in the model, cast to the model's dtype."""
    tensors = load_file(folder / TENSORS)
    live = {**la.adapter_state_dict(model), **{f"trainable/{k}": v for k, v in model.state_dict().items()}}
    live.update({f"buffers/{k}": v for k, v in model.state_dict().items()})
    for key, value in tensors.items():
        assert torch.equal(live[key], value.to(live[key].dtype)), key
    config = json.loads((folder / CONFIG).read_text())
    state = model_state(model).adapters[config["name"]]
    assert {n: r.scale for n, r in state.layers.items()} == {n: float(r["scale"]) for n, r in config["layers"].items()}


def json_values() -> st.SearchStrategy[Any]:
    leaves = st.none() | st.booleans() | st.integers(-3, 10**6) | st.floats(allow_nan=False) | st.text(max_size=12)
    return st.recursive(
        leaves, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8
    )


def config_paths(data: Any, prefix: tuple = ()) -> list[tuple]:
    paths = [prefix] if prefix else []
    if isinstance(data, dict):
        for key, value in data.items():
            paths += config_paths(value, (*prefix, key))
    elif isinstance(data, list):
        for index, value in enumerate(data):
            paths += config_paths(value, (*prefix, index))
    return paths


@st.composite
def mutations(draw: st.DrawFn) -> Callable[[Path], None]:
    kind = draw(st.sampled_from(["config value", "config key", "tensor value", "tensor dtype", "tensor shape", "tensor key", "bytes"]))
    seed = draw(st.integers(0, 2**16))

    def mutate(folder: Path) -> None:
        gen = torch.Generator().manual_seed(seed)
        pick = lambda items: items[int(torch.randint(len(items), (1,), generator=gen))]  # noqa: E731
        if kind.startswith("config"):
            data = json.loads((folder / CONFIG).read_text())
            path = pick(config_paths(data))
            parent = data
            for part in path[:-1]:
                parent = parent[part]
            if kind == "config value":
                parent[path[-1]] = draw(json_values())
            elif isinstance(parent, dict):
                del parent[path[-1]]
            else:
                parent.append(draw(json_values()))
            (folder / CONFIG).write_text(json.dumps(data))
        elif kind == "bytes":
            data = bytearray((folder / TENSORS).read_bytes())
            for _ in range(draw(st.integers(1, 4))):
                data[int(torch.randint(len(data), (1,), generator=gen))] = draw(st.integers(0, 255))
            (folder / TENSORS).write_bytes(bytes(data))
        else:
            tensors = load_file(folder / TENSORS)
            key = pick(sorted(tensors))
            value = tensors[key]
            if kind == "tensor value":
                floats = [float("nan"), float("inf"), -0.0, 1e30, 3.0] if value.is_floating_point() else [-1, 2**40]
                value.view(-1)[int(torch.randint(value.numel(), (1,), generator=gen))] = draw(st.sampled_from(floats))
            elif kind == "tensor dtype":
                tensors[key] = value.to(draw(st.sampled_from([torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.bool])))
            elif kind == "tensor shape":
                shapes = [value.reshape(-1), value[None], value.flatten()[:1]] + ([value[..., :1]] if value.dim() else [])
                tensors[key] = draw(st.sampled_from(shapes)).contiguous()
            else:
                other = pick(sorted(tensors))
                tensors[draw(st.sampled_from([f"{key}x", other.replace("A", "B"), "trainable/stem.weight", "buffers/bn.weight"]))] = (
                    value.clone()
                )
                if draw(st.booleans()):
                    del tensors[key]
            save_file(tensors, folder / TENSORS)

    return mutate


@settings(max_examples=80, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutate=mutations(), which=st.sampled_from(["plain", "methods"]))
def test_any_mutation_loads_exactly_or_is_refused_without_a_trace(mutate, which, folders, tmp_path_factory):
    folder = copy_of(folders[which], tmp_path_factory.mktemp("mutated"))
    mutate(folder)
    model = make()
    before = fingerprint(model)
    try:
        la.load_adapter(model, folder)
    except la.AdapterFileError:
        assert_unchanged(model, before)
    else:
        loads_exactly(model, folder)


# ----------------------------------------------------------------------------- data files


class Planted:
    """Unpickling it creates a file: what a crafted data set file could do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_pyg_file_that_would_run_code_is_refused_unread(tmp_path):
    pytest.importorskip("torch_geometric")
    from torch_geometric.data import Data

    from lora_anywhere.cli.data import load_data
    from lora_anywhere.errors import DataSpecError

    marker = tmp_path / "pwned"
    torch.save(({"x": torch.zeros(2, 1), "planted": Planted(marker)}, None, Data), tmp_path / "graphs.pt")
    with pytest.raises(DataSpecError, match="is not a PyG data set file"):
        load_data({"kind": "pyg", "train": "graphs.pt"}, tmp_path)
    assert not marker.exists()


def test_a_pyg_file_naming_another_class_is_refused(tmp_path):
    pytest.importorskip("torch_geometric")
    from lora_anywhere.cli.data import load_data
    from lora_anywhere.errors import DataSpecError

    torch.save(({"x": torch.zeros(2, 1)}, None, dict), tmp_path / "graphs.pt")
    with pytest.raises(DataSpecError, match="expected Data or HeteroData"):
        load_data({"kind": "pyg", "train": "graphs.pt"}, tmp_path)


def _shared(tied: bool) -> nn.Module:
    torch.manual_seed(0)
    first = nn.Linear(4, 4)
    if not tied:
        return nn.Sequential(first, first)
    second = nn.Linear(4, 4)
    second.weight = first.weight
    return nn.Sequential(first, second)


@pytest.mark.parametrize(
    ("tied", "match"), [(False, "layer '1' is the same module as layer '0'"), (True, "tied to one that layer '0' adapts")]
)
def test_one_tensor_is_adapted_once(tied: bool, match: str, tmp_path):
    """apply gives a module, or a tensor that several modules hold, one adapter; a file
    that adapts it twice would add ΔW twice."""
    folder = la.save_adapter(la.apply(_shared(tied), rank=2), tmp_path / "a")
    edit_config(folder, lambda d: d["layers"].update({"1": d["layers"]["0"]}))
    edit_tensors(folder, lambda t: t.update({k.replace("lora/0/", "lora/1/"): v.clone() for k, v in list(t.items())}))
    model = _shared(tied)
    before = fingerprint(model)
    with pytest.raises(la.ShapeMismatchError, match=match):
        la.load_adapter(model, folder)
    assert_unchanged(model, before)
