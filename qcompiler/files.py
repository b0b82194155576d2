"""File-system details every writer shares: the permissions a new file should get, and syncing."""
from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from typing import BinaryIO
from pathlib import Path


def umask() -> int:
    """The process's umask, read without changing it (``os.umask`` would, for every thread)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def as_umask_allows(path: Path, executable: bool = False) -> None:
    """Give ``path`` the mode a plain ``open()`` would have (``mkstemp``/``mkdtemp`` make 0600/0700,
    which another user, a CI's deploy step say, cannot read)."""
    base = 0o777 if executable or path.is_dir() else 0o666
    os.chmod(path, base & ~umask())


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable."""
    with contextlib.suppress(OSError):  # some file systems refuse to open or sync a directory
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write through a temporary file in the same folder, then rename: a crash never leaves
    a half-written file in place of a good one."""
    from .errors import QCompilerError

    if not path.parent.is_dir():
        raise QCompilerError(f"{path}: the folder {path.parent} does not exist")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        as_umask_allows(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
