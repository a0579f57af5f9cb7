"""Durable writes: a file replaced atomically (temporary file, fsync, rename, fsync the
folder), so after a crash it holds either the old bytes or the new ones, never a mix."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

#: Chunks are joined into writes of about this size.
WRITE_BUFFER = 1 << 20


def write_all(fd: int, data: bytes) -> None:
    """os.write until every byte of `data` is written."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def sync_directory(path: str | os.PathLike[str]) -> None:
    """fsync a folder, so that files created or renamed in it survive a crash."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(
    path: str | os.PathLike[str],
    chunks: Iterable[bytes],
    *,
    mode: int = 0o600,
    temporary: str | os.PathLike[str] | None = None,
    fsync: bool = True,
) -> int:
    """Replace `path` by the concatenation of `chunks`; returns the size written.

    The temporary file (`temporary`, by default ``.NAME.tmp`` beside it) is created with
    `mode`, so a secret is never readable by others, not even for a moment. `fsync=False`
    skips both fsyncs (for tests and benchmarks). On any error the temporary file is
    removed, `path` is untouched and the OSError propagates.
    """
    path = Path(path)
    temp = Path(temporary) if temporary is not None else path.with_name(f".{path.name}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)
        size = pending_size = 0
        pending: list[bytes] = []
        for chunk in chunks:
            pending.append(chunk)
            pending_size += len(chunk)
            if pending_size >= WRITE_BUFFER:
                write_all(fd, b"".join(pending))
                size += pending_size
                pending, pending_size = [], 0
        write_all(fd, b"".join(pending))
        size += pending_size
        if fsync:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(temp)
        raise
    os.close(fd)
    os.replace(temp, path)
    if fsync:
        sync_directory(path.parent)
    return size
