"""Atomic writes: a reader (or a resumed run) sees the old version or the new one, never a
half-written file or directory, even if the process is killed mid-write."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=2, default=str).encode())


@contextlib.contextmanager
def exclusive(path: str | Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``path`` (created if missing) for the ``with``
    body: processes that would build the same cached artifact take turns, so the second
    one finds it built instead of doing the same work beside the first. The kernel drops
    the lock when its holder dies, so a killed builder never wedges the others. Where
    ``fcntl`` is missing (Windows) it only runs the body: atomic renames still keep the
    artifact whole, the work may just be done twice."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on POSIX
        yield
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def build_once(path: str | Path, is_built: Callable[[], bool], build: Callable[[], None]) -> None:
    """Run ``build`` (which writes ``path`` atomically) unless ``is_built()``; concurrent
    callers take turns on ``path``.lock and check again after waiting, so one builds and
    the rest reuse it. A cache that already holds it (even a read-only one) takes no lock."""
    if is_built():
        return
    path = Path(path)
    with exclusive(path.with_name(path.name + ".lock")):
        if not is_built():  # not made while this one waited
            build()


@contextlib.contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces ``path`` in one rename.

    If ``path`` already exists it is first renamed aside and deleted after the swap, so an
    interrupted swap leaves either the old directory or ``path.old`` next to the new one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        old = path.with_name(path.name + ".old")
        if path.exists():
            if old.exists():
                shutil.rmtree(old)
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        if old.exists():
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def npz_bytes(state: dict[str, Any]) -> bytes:
    """A dict of NumPy arrays as the bytes of an ``.npz`` file (for atomic_write_bytes)."""
    import io

    import numpy as np

    buf = io.BytesIO()
    np.savez(buf, **state)
    return buf.getvalue()
