"""Write files and folders whole or not at all, whenever the process dies.

A file is written beside its target, flushed to disk and renamed over it: one atomic
step. A folder is written beside its target and the two names are exchanged in one
atomic step (Linux ``renameat2(RENAME_EXCHANGE)``), so at every instant the path
holds the old or the new complete folder. Where the exchange is not available (other
systems, some file systems) the old folder is first renamed aside to
``.NAME.<id>.old``; a crash before the new one takes its place leaves the path empty
for a moment, and `recover` — run by every reader and at the start of every write —
puts the old complete folder back.

Temporary entries are named ``.NAME.<id>.tmp`` and held under an advisory lock
(``flock``) while their writer lives; the next write to the same path deletes those
whose writer is gone. Files and folders are created with the mode an ordinary
``open`` or ``mkdir`` would give them: the kernel applies the process umask, which
is never read or changed here.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import secrets
import shutil
import stat
import sys
from pathlib import Path
from typing import Any, Iterator

try:
    import fcntl
except ImportError:  # Windows: no advisory locks, so leftovers of others are kept
    fcntl = None  # type: ignore[assignment]

TMP, OLD = ".tmp", ".old"
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_FOLDER = getattr(os, "O_DIRECTORY", 0)
RENAME_EXCHANGE = 2  # renameat2's flag
#: Whether to try the atomic exchange (tests turn it off to check the fallback).
exchange_enabled = sys.platform.startswith("linux")


def _sibling(target: Path, suffix: str) -> Path:
    return target.parent / f".{target.name}.{secrets.token_hex(6)}{suffix}"


def _leftovers(target: Path) -> list[Path]:
    """Temporary and set-aside entries that writes to `target` left beside it."""
    prefix = f".{target.name}."
    try:
        names = os.listdir(target.parent)
    except FileNotFoundError:
        return []
    return [target.parent / n for n in names if n.startswith(prefix) and n.endswith((TMP, OLD)) and len(n) == len(prefix) + 16]


def _open(path: Path) -> int:
    return os.open(path, os.O_RDONLY | _CLOEXEC | (_FOLDER if path.is_dir() else 0))


def _locked(fd: int, *, wait: bool) -> bool:
    """Take an exclusive advisory lock on `fd`: False if another descriptor holds one.
    Without locks (Windows) every entry counts as held by a live writer."""
    if fcntl is None:
        return wait
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except OSError:
        return False
    return True


def _abandoned(path: Path) -> int | None:
    """A locked descriptor of `path` if no live writer holds it, else None."""
    try:
        fd = _open(path)
    except OSError:
        return None
    if _locked(fd, wait=False):
        return fd
    os.close(fd)
    return None


def _new_entry(target: Path, *, folder: bool) -> tuple[Path, int | None]:
    """A fresh temporary file or folder beside `target`, and a descriptor that holds
    its lock (None where locks are not offered). A concurrent `_clean` may delete it
    between its creation and the lock: then the name no longer leads to the locked
    entry, and another is made."""
    while True:
        tmp = _sibling(target, TMP)
        try:
            if folder:
                os.mkdir(tmp, 0o777)  # the kernel applies the umask
            else:
                os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY | _CLOEXEC | getattr(os, "O_BINARY", 0), 0o666))
            if fcntl is None:
                return tmp, None
            fd = _open(tmp)
        except (FileExistsError, FileNotFoundError):
            continue
        _locked(fd, wait=True)
        try:
            if os.path.samestat(os.fstat(fd), os.stat(tmp)):
                return tmp, fd
        except FileNotFoundError:
            pass
        os.close(fd)


def _hold(path: Path) -> int | None:
    """A descriptor of `path` holding its lock, or None where locks are not offered."""
    if fcntl is None:
        return None
    fd = _open(path)
    _locked(fd, wait=True)
    return fd


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def recover(path: str | os.PathLike) -> Path:
    """Make `path` hold its last complete content again if a write died between
    setting the old folder aside and putting the new one in place (possible only
    without the atomic exchange). Returns `path`. Safe to call at any time."""
    target = Path(path)
    if os.path.lexists(target):
        return target
    held = [(entry, fd) for entry in _leftovers(target) if entry.name.endswith(OLD) for fd in [_abandoned(entry)] if fd is not None]
    try:
        if held:
            newest = max(held, key=lambda item: os.fstat(item[1]).st_mtime_ns)[0]
            with contextlib.suppress(OSError):  # another process recovered it first
                os.rename(newest, target)
                _fsync(target.parent)
    finally:
        for _, fd in held:
            os.close(fd)
    return target


def _clean(target: Path) -> None:
    """Delete what earlier writes to `target` left behind, once their writers are gone."""
    recover(target)
    for entry in _leftovers(target):
        fd = _abandoned(entry)
        if fd is not None:
            try:
                _remove(entry)
            finally:
                os.close(fd)


def _fsync(path: Path) -> None:
    """Flush a file's data, or a folder's entries, to disk."""
    if not _FOLDER and path.is_dir():
        return  # Windows cannot open a folder to flush it
    fd = _open(path)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _settle(folder: Path) -> None:
    """Give every entry below `folder` the mode the umask gives new entries (a third
    party may have written private 0600 files: safetensors does) and flush it all to
    disk, so that the folder is complete on disk before it replaces anything."""
    dir_mode = stat.S_IMODE(folder.stat().st_mode)  # mkdir(0o777) under the umask
    for root, dirs, files in os.walk(folder, topdown=False):
        for name in files:
            file = Path(root, name)
            if stat.S_IMODE(file.lstat().st_mode) != dir_mode & 0o666 and not file.is_symlink():
                os.chmod(file, dir_mode & 0o666)
            if not file.is_symlink():
                _fsync(file)
        for name in dirs:
            if stat.S_IMODE(Path(root, name).lstat().st_mode) != dir_mode:
                os.chmod(Path(root, name), dir_mode)
        _fsync(Path(root))


@functools.cache
def _renameat2() -> Any:
    return getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)


def _exchange(a: Path, b: Path) -> bool:
    """Swap the names `a` and `b` in one atomic step; False where that is not offered."""
    renameat2 = _renameat2() if exchange_enabled else None
    if renameat2 is None:
        return False
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV):
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))


def _resolved(path: str | os.PathLike) -> Path:
    """The path to write: a symlink's destination, so the link itself stays."""
    target = Path(path)
    return Path(os.path.realpath(target)) if target.is_symlink() else target


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; once the block has written it, it is
    flushed to disk and replaces `path` in one step. On error `path` is untouched."""
    target = _resolved(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    _clean(target)
    tmp, fd = _new_entry(target, folder=False)
    try:
        mode = stat.S_IMODE(tmp.stat().st_mode)  # 0o666 under the umask
        yield tmp
        if stat.S_IMODE(tmp.stat().st_mode) != mode:  # the writer made a file of its own
            os.chmod(tmp, mode)
        _fsync(tmp)
        os.replace(tmp, target)
        _fsync(target.parent)
    finally:
        if fd is not None:
            os.close(fd)
        _remove(tmp)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary folder beside `path`; once the block has filled it, it
    is flushed to disk and takes `path`'s place in one step (see the module's
    docstring). On error, or if the process dies at any point, `path` holds its old
    complete content or the new one, never a mix or nothing."""
    target = _resolved(path)
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a folder; choose another path or delete the file")
    target.parent.mkdir(parents=True, exist_ok=True)
    _clean(target)
    tmp, fd = _new_entry(target, folder=True)
    held = [fd]
    try:
        yield tmp
        _settle(tmp)
        if not target.exists():
            os.rename(tmp, target)
        elif not _exchange(tmp, target):
            # Two renames, with the old folder locked while it is aside: `recover`
            # puts it back only if this process dies before the new one is in place.
            held.append(_hold(target))
            aside = _sibling(target, OLD)
            os.rename(target, aside)
            os.rename(tmp, target)
            _fsync(target.parent)
            _remove(aside)
        _fsync(target.parent)
    finally:
        _remove(tmp)  # after an exchange: the old content
        for each in held:
            if each is not None:
                os.close(each)
