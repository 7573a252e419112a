"""Local files written whole: the standard library only, so the light commands (`prouigan platform`) use the same
code as the store (``storage``, which loads pyarrow) without its import cost."""

from __future__ import annotations

import contextlib
import os
import uuid


def fsync_dir(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_local_tmp(path: str, data: bytes) -> str:
    """``data`` in a temporary file beside ``path``, flushed to disk; -> its name."""
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f"_tmp.{os.getpid()}.{uuid.uuid4().hex[:8]}.{os.path.basename(path)}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:  # a full disk, a signal: no half-written file is left behind
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return tmp


def write_local_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Readers never see a half-written file, and once this returns the bytes are on disk (the file and its folder
    fsync'd): a temporary file renamed into place."""
    path = os.fspath(path)
    tmp = write_local_tmp(path, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(os.path.dirname(path))
