"""Atomic file writes: a reader (or a crash) sees either the old file or the new one, never half of one."""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def fsync_dir(directory: Path) -> None:
    """Make a rename inside `directory` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """`write(file)` into a temporary file beside `path`, fsync it, then rename it over `path`.

    The rename is atomic within a file system. If `write` fails, `path` is untouched and the temporary
    file is removed. Concurrent writers never share a temporary file (`temporary_name`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        # O_EXCL: never someone else's file; the mode honours the umask, as a plain open does
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def temporary_name(path: Path) -> Path:
    """`.NAME.<host>.<pid>.<random>.tmp` beside `path`: unique across the nodes of a shared file system,
    where ranks of one job may have equal process ids (containers) and write the same record at once."""
    return path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
