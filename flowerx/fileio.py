"""Files written safely: atomic replacement, verified downloads, safe archive extraction."""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
import tarfile
import tempfile
import threading
import urllib.request
from pathlib import Path

from .errors import FlowerxError


def atomic_write(path: str | os.PathLike, data: bytes, durable: bool = True) -> None:
    """Write data to path via a temporary file in the same folder, then rename over path.

    A reader, or a run killed at any moment, sees the old file or the new one, never half of one.
    The temporary name is unique per process and thread; durable=True also fsyncs (survives a power cut)
    and then removes temporary files that killed runs left beside path.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as e:
        raise FlowerxError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        if tmp.exists():
            tmp.unlink()
    if durable:
        for stale in glob.glob(glob.escape(str(path.parent / f".{path.name}.")) + "*.tmp"):
            if not _writer_alive(stale):
                Path(stale).unlink(missing_ok=True)


def _writer_alive(tmp: str) -> bool:
    """Whether the process that named this temporary file (.<name>.<pid>.<thread>.tmp) still runs."""
    try:
        pid = int(tmp.rsplit(".", 3)[-3])
        os.kill(pid, 0)
    except (ValueError, IndexError, ProcessLookupError):
        return False
    except PermissionError:  # alive, another user's
        pass
    return True


def file_hash(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download(url: str, dest: Path, expected_hash: str | None = None, timeout: float = 30.0) -> Path:
    """Download url over HTTPS to dest: into a temporary file beside it, check the hash where one is known
    (32 hex digits: md5 as Keras pins them; 64: sha256), and only then move it into place."""
    if not url.startswith("https://"):
        raise FlowerxError(f"refusing to download over plain HTTP: {url}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            expected = response.headers.get("Content-Length") if hasattr(response, "headers") else None
            for chunk in iter(lambda: response.read(1 << 20), b""):
                out.write(chunk)
            if expected is not None and out.tell() != int(expected):
                raise FlowerxError(f"download of {url} was cut off ({out.tell()} of {expected} bytes)")
        if expected_hash:
            algorithm = "md5" if len(expected_hash) == 32 else "sha256"
            actual = file_hash(tmp, algorithm)
            if actual != expected_hash:
                raise FlowerxError(f"download of {url} is corrupt: {algorithm} {actual} != {expected_hash}")
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest


def extract_tar(archive: Path, dest: Path, inner: str = "") -> Path:
    """Unpack a tar archive (its folder `inner`, if given) into dest, which must not exist, all or nothing:
    into a temporary folder first, refusing members that would land outside it (absolute paths, '..',
    links out), then renamed into place."""
    if dest.exists():
        raise FlowerxError(f"{dest} exists already")
    dest.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        with tarfile.open(archive) as tar:
            try:
                tar.extractall(work, filter="data")  # rejects absolute paths, '..', devices, links out
            except tarfile.FilterError as e:
                raise FlowerxError(f"{archive.name}: unsafe archive member refused ({e})") from None
        if not (work / inner).is_dir():
            raise FlowerxError(f"{archive.name} has no folder {inner!r}")
        os.replace(work / inner, dest)
    except (tarfile.TarError, OSError, EOFError) as e:  # EOFError: a truncated archive
        raise FlowerxError(f"cannot unpack {archive.name}: {e or 'truncated archive'}") from None
    finally:
        if work.exists():
            shutil.rmtree(work)
    return dest
