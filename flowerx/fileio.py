"""Files written safely: atomic replacement, verified downloads, safe archive extraction."""

from __future__ import annotations

import glob
import hashlib
import os
import re
import shutil
import stat
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # tarfile and urllib.request load only when an archive or a download is used (classify needs neither)
    import tarfile

from .errors import FlowerxError


class RefusedFile(OSError):
    """A path that is not a regular file, or larger than the caller allows; str() is the reason."""


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def read_regular(path: str | os.PathLike, limit: int | None = None) -> bytes:
    """The bytes of a regular file (links followed), refusing FIFOs, devices and folders (which hang or never
    end) and files over limit bytes, with RefusedFile. Opened non-blocking, so a FIFO cannot stall the open."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise RefusedFile(f"is {_kind(info.st_mode)}, not a regular file")
        if limit is not None and info.st_size > limit:
            raise RefusedFile(
                f"file is too large ({info.st_size / 2**20:.0f} MiB; the limit is {limit / 2**20:.0f} MiB)"
            )
        data = f.read() if limit is None else f.read(limit + 1)
    if limit is not None and len(data) > limit:  # grew while we read it
        raise RefusedFile(f"file is too large (over the limit of {limit / 2**20:.0f} MiB)")
    return data


def check_regular(path: str | os.PathLike, what: str) -> Path:
    """path, if it is an existing regular file (links followed); else one clear FlowerxError naming it."""
    path = Path(path)
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise FlowerxError(f"{path}: no such {what}") from None
    except OSError as e:
        raise FlowerxError(f"{path}: cannot read the {what} ({e.strerror or e})") from None
    if not stat.S_ISREG(info.st_mode):
        raise FlowerxError(f"{path}: the {what} is {_kind(info.st_mode)}, not a regular file")
    return path


def user_cache_dir() -> Path:
    """flowerx's per-user cache: $FLOWERX_CACHE_DIR, else $XDG_CACHE_HOME/flowerx, else ~/.cache/flowerx."""
    if os.environ.get("FLOWERX_CACHE_DIR"):
        return Path(os.environ["FLOWERX_CACHE_DIR"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "flowerx"


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
        ours = re.compile(re.escape(f".{path.name}.") + r"(\d+)\.\d+\.tmp")
        for stale in glob.glob(glob.escape(str(path.parent / f".{path.name}.")) + "*.tmp"):
            named = ours.fullmatch(Path(stale).name)  # only names atomic_write makes: a user's own file stays
            if named and not _alive(int(named[1])):
                Path(stale).unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    """Whether process pid (one that named a temporary file) still runs."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
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


def download(
    url: str,
    dest: Path,
    expected_hash: str | None = None,
    timeout: float = 30.0,
    on_progress: Callable[[int, int | None], None] | None = None,
) -> Path:
    """Download url over HTTPS to dest: into a temporary file beside it, check the hash where one is known
    (32 hex digits: md5 as Keras pins them; 64: sha256), and only then move it into place.
    on_progress(bytes so far, total bytes or None) is called as the bytes arrive.

    FlowerxError on failure, saying which side failed: the network ("offline?", cut off, the server's answer)
    or this machine (a folder that cannot be written, a full disk)."""
    if not url.startswith("https://"):
        raise FlowerxError(f"refusing to download over plain HTTP: {url}")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    except OSError as e:
        raise FlowerxError(f"cannot download into {dest.parent}: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "wb") as out:
            _fetch(url, out, timeout, on_progress)
        if expected_hash:
            algorithm = "md5" if len(expected_hash) == 32 else "sha256"
            actual = file_hash(tmp, algorithm)
            if actual != expected_hash:
                raise FlowerxError(f"download of {url} is corrupt: {algorithm} {actual} != {expected_hash}")
        os.replace(tmp, dest)
    except OSError as e:  # this machine's side: _fetch turns the network's errors into FlowerxError
        raise FlowerxError(f"cannot write {dest}: {e.strerror or e}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest


def _fetch(url: str, out, timeout: float, on_progress: Callable[[int, int | None], None] | None) -> None:
    """Stream url into the open file out. The network's failures become FlowerxError; the file's own
    (a full disk) stay OSError, for download to report as this machine's."""
    import http.client
    import urllib.error
    import urllib.request

    network_errors = (OSError, http.client.HTTPException)  # urllib's URLError and socket timeouts are OSErrors
    try:
        response = urllib.request.urlopen(url, timeout=timeout)
    except urllib.error.HTTPError as e:
        raise FlowerxError(f"cannot download {url}: the server answered {e.code} {e.reason}") from None
    except network_errors as e:
        raise FlowerxError(f"cannot download {url} (offline? {getattr(e, 'reason', e)})") from None
    try:
        expected = response.headers.get("Content-Length") if hasattr(response, "headers") else None
        total = int(expected) if expected is not None and expected.strip().isdigit() else None
        while True:
            try:
                chunk = response.read(1 << 20)
            except network_errors as e:
                raise FlowerxError(f"download of {url} was cut off: {e}") from None
            if not chunk:
                break
            out.write(chunk)
            if on_progress:
                on_progress(out.tell(), total)
        out.flush()
        if total is not None and out.tell() != total:
            raise FlowerxError(f"download of {url} was cut off ({out.tell()} of {total} bytes)")
    finally:
        try:
            response.close()
        except network_errors:
            pass


MAX_EXTRACT_BYTES = 8 << 30  # the flower photos unpack to 0.23 GB
MAX_EXTRACT_RATIO = 50  # unpacked / packed size; the flower photos: 1.05 (JPEGs do not compress)
MAX_EXTRACT_MEMBERS = 1_000_000


def _leaves(link: str, target: str) -> bool:
    """Whether a link at `link` (relative to a folder) to `target` points outside that folder, wherever the
    folder is later moved: absolute targets and any climb above the folder count."""
    if os.path.isabs(target):
        return True
    resolved = os.path.normpath(os.path.join(os.path.dirname(link), target))
    return resolved == ".." or resolved.startswith(".." + os.sep)


def _check_fully_read(tar: tarfile.TarFile, archive: Path) -> None:
    """A damaged archive can look like an early end: what follows the last member must be padding only."""
    while chunk := tar.fileobj.read(1 << 20):
        if chunk.strip(b"\0"):
            raise FlowerxError(f"cannot unpack {archive.name}: it is damaged (data after an unreadable member)")


def extract_tar(
    archive: Path, dest: Path, inner: str = "", max_bytes: int = MAX_EXTRACT_BYTES, max_ratio: float = MAX_EXTRACT_RATIO
) -> Path:
    """Unpack a tar archive (its folder `inner`, if given) into dest, which must not exist, all or nothing:
    into a temporary folder first, refusing members that would land outside it (absolute paths, '..',
    devices, links out), links that point outside `inner` once unpacked, and archives that unpack to more
    than max_bytes or max_ratio times their own size (bombs), checked before each member is written; then
    renamed into place."""
    import tarfile

    if dest.exists():
        raise FlowerxError(f"{dest} exists already")
    dest.parent.mkdir(parents=True, exist_ok=True)
    budget = min(max_bytes, int(max_ratio * archive.stat().st_size))
    work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        with tarfile.open(archive) as tar:
            total = 0
            for count, member in enumerate(tar, 1):
                total += member.size if member.isfile() else 0
                if total > budget or count > MAX_EXTRACT_MEMBERS:
                    raise FlowerxError(
                        f"{archive.name} unpacks to more than {budget / 2**20:.0f} MiB or "
                        f"{MAX_EXTRACT_MEMBERS} files: refused (an archive bomb?)"
                    )
                try:
                    tar.extract(member, work, filter="data")  # rejects absolute paths, '..', devices, links out
                except tarfile.FilterError as e:
                    raise FlowerxError(f"{archive.name}: unsafe archive member refused ({e})") from None
            _check_fully_read(tar, archive)
        top = work / inner
        if top.is_symlink() or not top.is_dir():
            raise FlowerxError(f"{archive.name} has no folder {inner!r}")
        for folder, dirnames, filenames in os.walk(top):
            for name in dirnames + filenames:
                link = os.path.join(folder, name)
                if os.path.islink(link) and _leaves(os.path.relpath(link, top), os.readlink(link)):
                    raise FlowerxError(
                        f"{archive.name}: link {os.path.relpath(link, work)} points outside "
                        f"{inner or 'the archive'}: refused"
                    )
        os.replace(top, dest)
    except (tarfile.TarError, OSError, EOFError) as e:  # EOFError: a truncated archive
        raise FlowerxError(f"cannot unpack {archive.name}: {e or 'truncated archive'}") from None
    finally:
        if work.exists():
            shutil.rmtree(work)
    return dest


def _same(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def check_outputs(
    outputs: dict[str, str | os.PathLike],
    inputs: dict[str, str | os.PathLike | None] | None = None,
    input_dirs: dict[str, str | os.PathLike | None] | None = None,
) -> None:
    """Before any work: every output (flag -> path) is a distinct file, none is one of the inputs or an existing
    file inside an input folder (a photo of the image dir, an entry of the cache), none is an existing folder or
    other non-file, and each can be written (a probe file in its nearest existing folder). Fails with one
    FlowerxError naming the flag, so nothing is overwritten by mistake or lost after a long run."""
    seen: dict[str, str] = {}
    for flag, raw in outputs.items():
        path = Path(raw).expanduser()
        real = os.path.realpath(path)
        if real in seen:
            raise FlowerxError(f"{flag} and {seen[real]} are the same file ({path}): give them different paths")
        seen[real] = flag
        for in_flag, in_path in (inputs or {}).items():
            if in_path and _same(path, Path(in_path).expanduser()):
                raise FlowerxError(f"{flag} {path} is the {in_flag} file: it would be overwritten")
        for in_flag, folder in (input_dirs or {}).items():
            inside = folder and os.path.realpath(Path(folder).expanduser())
            if inside and real.startswith(inside.rstrip(os.sep) + os.sep) and os.path.lexists(path):
                raise FlowerxError(f"{flag} {path} is a file in the {in_flag}: it would be overwritten")
        if path.is_dir():
            raise FlowerxError(f"{flag} {path} is a folder: give a file path")
        if path.exists() and not path.is_file():
            raise FlowerxError(f"{flag} {path} is not a regular file")
        folder = path.parent
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        if not folder.is_dir():
            raise FlowerxError(f"{flag} {path}: {folder} is a file, not a folder")
        try:
            tempfile.TemporaryFile(dir=folder).close()
        except OSError as e:
            raise FlowerxError(f"cannot write {path}: {e.strerror or e}") from None


def check_folder(path: str | os.PathLike, flag: str) -> None:
    """A folder flowerx will create or write into must not be an existing file."""
    path = folder = Path(path).expanduser()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise FlowerxError(f"{flag} {path}: {folder} is a file, not a folder")
