"""A process killed at every step of a write leaves the last complete state.

A forked child runs `save_adapter` (or a Trainer checkpoint) with every call that
changes the file system counted — mkdir, open, rename, the exchange, chmod, fsync,
unlink, rmdir, rmtree, safetensors' and torch's writes, locks — and dies by
``os._exit`` just before, or just after, the k-th of them. For k = 1, 2, … until the
write completes, the folder must then load as exactly the old or exactly the new
adapter, and a resumed Trainer must continue from a complete checkpoint.
"""

from __future__ import annotations

import builtins
import io
import itertools
import os
import shutil
import sys
import threading
import traceback
from pathlib import Path
from typing import Callable

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import lora_anywhere as la
from lora_anywhere import atomic
from lora_anywhere import io as la_io
from lora_anywhere.io import read_adapter
from lora_anywhere.testing import randomize_adapters
from lora_anywhere.training import trainer as trainer_mod
from lora_anywhere.training.trainer import Trainer

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(not hasattr(os, "fork"), reason="kills a forked child"),
]

KILLED = 137


def _steps() -> list[tuple[object, str]]:
    """Every call through which a write changes the file system."""
    calls = [(os, n) for n in ("mkdir", "open", "close", "rename", "replace", "chmod", "fsync", "unlink", "rmdir", "write")]
    calls += [(shutil, "rmtree"), (atomic, "_exchange"), (la_io, "save_file"), (torch, "save"), (builtins, "open"), (io, "open")]
    if atomic.fcntl is not None:
        calls.append((atomic.fcntl, "flock"))
    return calls


def killed_at(step: int, action: Callable[[], None], armed: Callable[[], bool] = lambda: True) -> int:
    """Run `action` in a forked child that dies at counted call `step` (odd: before
    call (step + 1) // 2, even: after call step // 2) while `armed()`; return its
    exit code: KILLED, or 0 if the action completed first."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        try:
            counter = itertools.count(1)

            def counted(call):
                def run(*args, **kwargs):
                    if armed() and next(counter) == step:
                        os._exit(KILLED)
                    result = call(*args, **kwargs)
                    if armed() and next(counter) == step:
                        os._exit(KILLED)
                    return result

                return run

            for owner, name in _steps():
                setattr(owner, name, counted(getattr(owner, name)))
            action()
            os._exit(0)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def base() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)).eval()


def adapted(seed: int) -> nn.Module:
    model = la.apply(base(), rank=2, trainable="3")
    randomize_adapters(model, seed=seed)
    with torch.no_grad():
        model.train()(torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(seed)))  # moves the BN statistics
    return model.eval()


def tensors_of(folder: Path) -> dict[str, torch.Tensor]:
    _, tensors = read_adapter(folder)
    return tensors


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def leftovers(folder: Path) -> list[str]:
    return sorted(n for n in os.listdir(folder.parent) if n.startswith(f".{folder.name}."))


def _no_flush(fd: int) -> None:
    """fsync guards against a power cut; a killed process leaves the page cache whole,
    so these tests count fsync as a step but do not wait for the disk."""


@pytest.mark.parametrize("exchange", [True, False], ids=["atomic exchange", "two renames and recovery"])
def test_a_kill_at_every_step_of_save_adapter_leaves_the_old_or_the_new_adapter(exchange: bool, tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "exchange_enabled", exchange)
    monkeypatch.setattr(os, "fsync", _no_flush)
    old_model, new_model = adapted(1), adapted(2)
    target = tmp_path / "adapter"
    la.save_adapter(old_model, target)
    old = tensors_of(target)
    new = {k: v.cpu() for k, v in la.adapter_state_dict(new_model).items()}
    assert not same(old, new)
    seen = []
    for step in itertools.count(1):
        la.save_adapter(old_model, target)  # the state before the write; clears what the last kill left
        code = killed_at(step, lambda: la.save_adapter(new_model, target))
        assert code in (0, KILLED), f"the child failed at step {step}"
        found = tensors_of(target)  # recovers the old folder if the kill came between two renames
        which = "old" if same(found, old) else "new" if same(found, new) else None
        assert which, f"killed at step {step}: the folder is neither the old nor the new adapter"
        x = torch.randn(2, 3, 6, 6)
        expected = (old_model if which == "old" else new_model)(x)
        assert torch.equal(la.load_adapter(base(), target)(x), expected)
        seen.append(which)
        if code == 0:
            break
    assert seen[0] == "old" and seen[-1] == "new" and len(seen) > 20
    assert seen == sorted(seen, key=["old", "new"].index), "once the new adapter is in place it stays"
    la.save_adapter(new_model, target)
    assert leftovers(target) == []


def _trainer(out: Path, *, resume: bool = False) -> Trainer:
    torch.manual_seed(3)
    model = la.apply(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2)), rank=2, trainable="2")
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(4))
    data = TensorDataset(x, (x[:, 0] > 0).long())
    return Trainer(model, data, data, task="image-classification", epochs=2, lr=1e-2, batch_size=16, out_dir=out, seed=5,
                   resume=resume, progress=False)  # fmt: skip


def test_a_kill_at_every_step_of_a_trainer_checkpoint_resumes_from_a_complete_one(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "fsync", _no_flush)
    original = Trainer._save_checkpoint
    reference: dict[int, dict[str, torch.Tensor]] = {}

    def keep(self, position):  # an uninterrupted run's checkpoint after each epoch
        original(self, position)
        reference[position["epoch"]] = tensors_of(self.out_dir / "last")

    monkeypatch.setattr(Trainer, "_save_checkpoint", keep)
    _trainer(tmp_path / "reference").fit()
    assert sorted(reference) == [1, 2] and not same(reference[1], reference[2])

    seen: list[int] = []

    def kill_the_second(self, position):
        """Train once; at epoch 2's checkpoint, write it once per kill step, each
        time into a copy of the run folder as epoch 1 left it."""
        if position["epoch"] != 2 or seen:
            return original(self, position)
        after_epoch_1 = tmp_path / "after-epoch-1"
        shutil.copytree(self.out_dir, after_epoch_1)
        for step in itertools.count(1):
            out = tmp_path / f"step{step}"
            shutil.copytree(after_epoch_1, out)

            def write(out=out):
                self.out_dir = out
                original(self, position)

            code = killed_at(step, write)
            assert code in (0, KILLED), f"the child failed at step {step}"
            found = tensors_of(out / "last")
            epoch = next((e for e, t in reference.items() if same(found, t)), None)
            assert epoch, f"killed at step {step}: last/ is neither epoch 1's checkpoint nor epoch 2's"
            state = torch.load(out / "last" / trainer_mod.STATE_FILE, weights_only=True)
            assert state["epoch"] == epoch, "the adapter and the trainer state come from one checkpoint"
            seen.append(epoch)
            _trainer(out, resume=True).fit()
            assert same(tensors_of(out / "last"), reference[2]), "the resumed run ends where the uninterrupted one did"
            shutil.rmtree(out)
            if code == 0:
                break
        original(self, position)

    monkeypatch.setattr(Trainer, "_save_checkpoint", kill_the_second)
    _trainer(tmp_path / "run").fit()
    assert seen[0] == 1 and seen[-1] == 2 and len(seen) > 20
    assert seen == sorted(seen), "once the new checkpoint is in place it stays"


# ----------------------------------------------------------------------------- concurrency and modes


def _umask_now() -> str:
    """The process umask as the kernel reports it, read without changing it."""
    with open("/proc/self/status") as status:
        return next(line for line in status if line.startswith("Umask:"))


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the umask from /proc")
def test_concurrent_saves_never_touch_the_process_umask(tmp_path):
    models = [adapted(seed) for seed in range(4)]
    seen: set[str] = set()
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            seen.add(_umask_now())

    def save(i: int) -> None:
        for round_ in range(5):
            la.save_adapter(models[(i + round_) % 4], tmp_path / ("shared" if i % 2 else f"own{i}"))

    mask = os.umask(0o027)
    try:
        watcher = threading.Thread(target=watch)
        watcher.start()
        savers = [threading.Thread(target=save, args=(i,)) for i in range(8)]
        for t in savers:
            t.start()
        for t in savers:
            t.join()
        stop.set()
        watcher.join()
        assert _umask_now().split()[-1] == "0027"
    finally:
        os.umask(mask)
    assert seen == {"Umask:\t0027\n"}
    for folder in tmp_path.iterdir():
        assert folder.stat().st_mode & 0o777 == 0o750
        assert {p.stat().st_mode & 0o777 for p in folder.iterdir()} == {0o640}
        final = tensors_of(folder)
        assert any(same(final, {k: v.cpu() for k, v in la.adapter_state_dict(m).items()}) for m in models)
    assert sorted(os.listdir(tmp_path)) == ["own0", "own2", "own4", "own6", "shared"]


def test_a_symlinked_target_is_written_through(tmp_path):
    la.save_adapter(adapted(1), tmp_path / "real")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    la.save_adapter(adapted(2), tmp_path / "link")
    assert (tmp_path / "link").is_symlink()
    assert same(tensors_of(tmp_path / "real"), {k: v.cpu() for k, v in la.adapter_state_dict(adapted(2)).items()})
    assert sorted(os.listdir(tmp_path)) == ["link", "real"]


def test_a_failed_write_leaves_the_old_folder_and_nothing_else(tmp_path):
    la.save_adapter(adapted(1), tmp_path / "a")
    with pytest.raises(RuntimeError, match="disk full"), atomic.atomic_dir(tmp_path / "a") as tmp:
        (tmp / "half").write_text("x")
        raise RuntimeError("disk full")
    assert same(tensors_of(tmp_path / "a"), {k: v.cpu() for k, v in la.adapter_state_dict(adapted(1)).items()})
    assert sorted(os.listdir(tmp_path)) == ["a"]
