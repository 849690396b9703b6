"""Atomic file and folder writes (write under a temporary name beside the target, fsync, rename,
fsync the folder), file digests, and advisory locks on units of work. The bottom layer: no torch,
nothing above ``mera.errors`` and ``mera.faults``.

A write that fails for a reason of the disk (no space left, quota exceeded, an I/O error, a read-only
or size-limited filesystem) raises :class:`mera.errors.WriteError`: one line naming the file and what
to do. The atomic writers below do it themselves; other writes (a library writing a file itself, a
database) go inside :func:`writing`.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path

from mera.errors import MeraError, WriteError
from mera.faults import fault_point

# the failed writes that are the disk's doing, and what to do about each
WRITE_ERRNOS: dict[int, str] = {
    errno.ENOSPC: "free space on that disk",
    errno.EDQUOT: "free space within your disk quota (or have it raised)",
    errno.EIO: "the disk or its connection failed: check it (the kernel log says more)",
    errno.EROFS: "the filesystem is mounted read-only: remount it read-write or write elsewhere",
    errno.EFBIG: "the file is larger than that filesystem allows: write elsewhere",
}
AFTER = "then run the command again (a run with --resume keeps what it finished)"
_SQLITE_ERRNOS = {13: errno.ENOSPC, 10: errno.EIO}  # SQLITE_FULL, SQLITE_IOERR (primary codes)
_OS_ERROR_TEXT = re.compile(r"\bos error (\d+)\b")  # how Rust libraries (safetensors) quote an errno


def write_errno(exc: BaseException) -> int | None:
    """The errno of ``exc`` when it is a failed write of :data:`WRITE_ERRNOS`, else None. Besides
    OSError, what libraries raise for one: sqlite3's "database or disk is full" (its error code),
    safetensors' SafetensorError or a RuntimeError quoting the OS error ("... (os error 28)",
    "No space left on device")."""
    if not isinstance(exc, Exception) or isinstance(exc, MeraError):
        return None
    if isinstance(exc, OSError):
        return exc.errno if exc.errno in WRITE_ERRNOS else None
    code = getattr(exc, "sqlite_errorcode", None)
    if isinstance(code, int):
        return _SQLITE_ERRNOS.get(code & 0xFF)
    text = str(exc)
    found = _OS_ERROR_TEXT.search(text)
    if found and int(found.group(1)) in WRITE_ERRNOS:
        return int(found.group(1))
    return next((e for e in WRITE_ERRNOS if os.strerror(e) in text), None)


def write_message(path: str | os.PathLike | None, code: int, what: str = "", note: str = "") -> str:
    """``<path>: cannot write[ <what>] (<the OS's words>); [<note>; ]<what to do>, then run again``."""
    where = f"{path}: cannot write" if path is not None else "cannot write a file"
    return (f"{where}{' ' + what if what else ''} ({os.strerror(code)}); {note + '; ' if note else ''}"
            f"{WRITE_ERRNOS[code]}, {AFTER}")


def write_failure(path: str | os.PathLike | None, exc: BaseException) -> WriteError | None:
    """The :class:`WriteError` for ``exc``, raised while writing ``path``; None when ``exc`` is not a
    failed write of the disk's doing (it is then the caller's to raise as it is)."""
    code = write_errno(exc)
    if code is None:
        return None
    return WriteError(write_message(path, code), None if path is None else str(path), code)


@contextmanager
def writing(path: str | os.PathLike):
    """Turn a failed write of the disk's doing inside the block into a :class:`WriteError` naming
    ``path`` (other errors pass unchanged). For writes that do not go through :func:`atomic_path`."""
    try:
        yield
    except Exception as e:
        failure = write_failure(path, e)
        if failure is None:
            raise
        raise failure from None


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's (or a folder's entries') data to the disk; a no-op where the OS cannot. A
    failed write that only the flush reports (an I/O error, a full network disk) is raised."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as e:  # e.g. a folder on a filesystem that does not sync folders (EINVAL): ignored
        if e.errno in WRITE_ERRNOS:
            raise
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike, durable: bool = True):
    """Yield a temporary path beside ``path``; on success rename it onto ``path``.

    On error the temporary file is removed and ``path`` is left as it was; a failed write of the
    disk's doing, in the block too, is a :class:`WriteError` naming ``path``. ``durable``: the file
    is fsynced before the rename and the folder after it, so that after a power cut the name
    points at the whole file (or at the old one), never at an empty one.
    """
    path = Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with writing(path):
            yield Path(tmp)
            fault_point("write")
            if os.path.exists(tmp):  # mkstemp makes 0600 files: give the usual permissions
                os.chmod(tmp, 0o666 & ~_umask())
                if durable:
                    fsync_path(tmp)
            os.replace(tmp, path)
            if durable:
                fsync_path(path.parent)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path, text: str) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")


def write_json(path, obj, indent: int | None = 2) -> None:
    write_text(path, json.dumps(obj, indent=indent) + "\n")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def replace_dir(src: Path, dst: Path) -> None:
    """Move the finished folder ``src`` onto ``dst``, replacing any old ``dst`` (same filesystem)."""
    src, dst = Path(src), Path(dst)
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(dst, old)
    os.replace(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_dir(dst: str | os.PathLike):
    """Yield a fresh temporary folder beside ``dst``; on success it replaces ``dst``, on error it is removed."""
    dst = Path(dst)
    with writing(dst):
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        tmp.mkdir()
    try:
        yield tmp
        with writing(dst):
            replace_dir(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class UnitLock:
    """An advisory, exclusive lock on a unit of work (``flock`` on ``path``), held by this process
    until :meth:`release` or its exit: the kernel drops the lock of a process that dies, so a
    crashed run never leaves a stale lock behind. The file records who holds it (pid, host, what,
    since), for the message of whoever finds it taken. Where ``fcntl`` is missing (Windows) every
    lock is granted."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._file = None

    def acquire(self, what: str) -> str | None:
        """Take the lock; None if taken, else who holds it (one line)."""
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            return None
        import socket
        import time

        with writing(self.path):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            f = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            text = f.read()
            f.close()
            try:
                h = json.loads(text)
                return f"process {h['pid']} on {h['host']} ({h['what']}, since {h['since']})"
            except (ValueError, KeyError, TypeError):
                return f"another process (lock file {self.path})"
        with writing(self.path):
            f.seek(0)
            f.truncate()
            f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "what": what,
                                "since": time.strftime("%Y-%m-%d %H:%M:%S")}))
            f.flush()
        self._file = f
        return None

    def release(self) -> None:
        if self._file is not None:
            import fcntl

            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None
