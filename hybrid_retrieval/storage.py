"""Writes that a full disk must not corrupt: a file appears under its final name whole or not at all, and a disk
that is full (or a quota, or a file-size limit) is reported as such, naming the folder, the bytes needed and the
bytes free, before or instead of an ``OSError`` deep in a library.

Used for the training state (``training.callbacks.RunFolderCheckpointIO``), the exported model
(``models.model_folder.export_encoder``) and MLflow artifacts copied into a local store (``tracking.TrackedRun``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

# ENOSPC: no space left; EDQUOT: a quota; EFBIG: a file larger than the file system or `ulimit -f` allows.
FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class DiskFullError(OSError):
    """A write that did not fit: what was being written, where, how many bytes it needed and how many were free."""

    def __init__(self, what: str, folder: Path, needed: int | None, advice: str = "") -> None:
        self.folder, self.needed, self.free = Path(folder), needed, free_bytes(folder)
        size = f"needs {human(needed)}, " if needed is not None else ""
        free = f"{human(self.free)} free" if self.free is not None else "free space unknown"
        message = f"disk full: {what} in {self.folder} did not fit ({size}{free} there)"
        super().__init__(errno.ENOSPC, message + (f"; {advice}" if advice else ""))

    def __str__(self) -> str:
        return str(self.args[1])


# How libraries that do not raise OSError say it: the Rust `tokenizers` raises a plain Exception
# "No space left on device (os error 28)".
FULL_MESSAGES = tuple(os.strerror(code) for code in FULL_ERRNOS)


def is_disk_full(error: BaseException) -> bool:
    if isinstance(error, DiskFullError) or (isinstance(error, OSError) and error.errno in FULL_ERRNOS):
        return True
    return isinstance(error, Exception) and any(message in str(error) for message in FULL_MESSAGES)


def free_bytes(folder: str | Path) -> int | None:
    """Bytes free to this user on the file system of ``folder`` (its nearest existing parent), or None."""
    path = Path(folder)
    for candidate in (path, *path.parents):
        if candidate.exists():
            try:
                return shutil.disk_usage(candidate).free
            except OSError:
                return None
    return None


def human(size: int | None) -> str:
    if size is None:
        return "?"
    for unit in ("bytes", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1024  # type: ignore[assignment]
    return f"{size} bytes"


def folder_size(path: str | Path) -> int:
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@contextlib.contextmanager
def reporting_disk_full(what: str, folder: str | Path, needed: int | None, advice: str = "") -> Iterator[None]:
    """Within this block an error of a full disk (an ``OSError``, or a library's message of one) becomes a :class:`DiskFullError` naming ``what``, ``folder``
    and ``needed``; other errors pass unchanged."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as error:
        if not is_disk_full(error):
            raise
        raise DiskFullError(what, Path(folder), needed, advice) from error


def write_bytes_atomic(data: bytes | memoryview, path: str | Path, what: str, advice: str = "") -> None:
    """``data`` into ``path`` through a temporary file in the same folder, flushed to disk and renamed: the old
    file stays whole until the new one is complete; on a full disk the temporary file is removed and a
    :class:`DiskFullError` says what did not fit. A folder without room for ``data`` is refused before anything
    is written."""
    with _replacing(Path(path), len(data), what, advice) as temporary:
        with open(temporary, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, 0o666 & ~_umask())


def copy_file_atomic(source: str | Path, target: str | Path, what: str, advice: str = "") -> None:
    """``shutil.copy2`` through a temporary file beside ``target``: never a partial ``target``."""
    with _replacing(Path(target), Path(source).stat().st_size, what, advice) as temporary:
        shutil.copy2(source, temporary)


@contextlib.contextmanager
def _replacing(path: Path, needed: int, what: str, advice: str) -> Iterator[Path]:
    """A temporary file beside ``path`` for the block to fill, renamed onto ``path`` when the block ends, removed
    when it fails; refused up front when the folder has less than ``needed`` bytes free."""
    path.parent.mkdir(parents=True, exist_ok=True)
    free = free_bytes(path.parent)
    if free is not None and free < needed:
        raise DiskFullError(what, path.parent, needed, advice)
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.partial-", dir=path.parent)
    os.close(handle)
    temporary = Path(name)
    try:
        with reporting_disk_full(what, path.parent, needed, advice):
            yield temporary
            os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
