"""Atomic file writes: a reader (or a crash) sees the old file or the new one, never half of one."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from .errors import FlowerxError


def atomic_write(path: str | os.PathLike, data: bytes, durable: bool = True) -> None:
    """Write data to path via a temporary file in the same folder, then rename over path.

    The temporary name is unique per process and thread (cheaper than mkstemp, which matters for the
    bottleneck cache's thousands of small files). durable=True also fsyncs, so the file survives a power
    cut; caches that verify what they read skip it.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise FlowerxError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        if tmp.exists():
            tmp.unlink()
