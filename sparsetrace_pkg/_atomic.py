"""Atomic file writes shared by every package (torch-free): temp file beside the target, then rename.

A failed write leaves neither a partial file nor a temp file (a failed folder, no partial folder). The result gets the usual umask-based
mode (mkstemp alone would leave it 0600).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from .errors import ConfigError, FormatError

__all__ = ["atomic_write", "atomic_write_text", "atomic_folder", "staged", "check_writable_parent"]


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)``, then rename the temp file over ``path``."""
    path = Path(path)
    if not path.parent.is_dir():
        raise FormatError(f"output folder {str(path.parent)!r} does not exist")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    return atomic_write(path, write)


def check_writable_parent(path: Path, what: str) -> None:
    """Fail before any work when ``path`` cannot be created (its nearest existing parent is not a
    writable folder)."""
    p = path.resolve().parent
    while not p.exists():
        p = p.parent
    if not p.is_dir() or not os.access(p, os.W_OK):
        raise ConfigError(f"{what} {str(path)!r} cannot be written: {str(p)!r} is not a writable folder")


@contextlib.contextmanager
def atomic_folder(target: Path) -> Iterator[Path]:
    """Yield a temp folder beside ``target``; on success it replaces ``target``, on any error it is
    removed, so a failed command leaves no partial output (and an old ``target`` untouched)."""
    target = Path(target)
    check_writable_parent(target, "output folder")
    if target.exists() and not target.is_dir():
        raise ConfigError(f"output folder {str(target)!r} exists and is not a folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        yield tmp
        _publish_modes(tmp)
        old = None
        if target.exists():
            old = target.parent / f".{target.name}.{os.getpid()}.old"
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def staged(folder: Path) -> Iterator[Path]:
    """A temp folder inside ``folder``; on success its files are renamed into ``folder`` (each rename is
    atomic), on error it is removed: no partial files either way."""
    check_writable_parent(folder / "x", "output folder")
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder, prefix=".staging.", suffix=".tmp"))
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        for p in sorted(tmp.iterdir()):
            os.chmod(p, 0o666 & ~umask)
            os.replace(p, folder / p.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _publish_modes(folder: Path) -> None:
    """mkdtemp/mkstemp make private (0700/0600) entries; outputs get the usual umask-based modes."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for p in folder.iterdir():
        if p.is_file():
            os.chmod(p, 0o666 & ~umask)
