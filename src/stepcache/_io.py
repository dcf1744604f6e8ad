"""Atomic file writes: a reader sees the old file or the new one, never half of either."""

from __future__ import annotations

import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would make results private to their writer
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    # Serialise first so an unserialisable object never touches the disk.
    text = json.dumps(obj, indent=2, sort_keys=False, allow_nan=True) + "\n"
    return atomic_write_bytes(path, text.encode("utf-8"))


class UnreadableFileError(ValueError):
    """A file given by the user that is not a regular file, too large, or not readable."""


def read_limited(path: str | os.PathLike, max_bytes: int, what: str = "file") -> bytes:
    """The bytes of a regular file no larger than ``max_bytes``.

    A FIFO would block forever and ``/dev/zero`` never ends: only regular files are read, opened
    without blocking, and the read stops one byte past the limit so a huge file is not loaded.
    """
    import stat

    p = Path(path)
    try:
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise UnreadableFileError(f"{p}: no such {what}") from None
    except OSError as e:
        raise UnreadableFileError(f"{p}: cannot read {what} ({e.strerror or e})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            kind = "a directory" if stat.S_ISDIR(info.st_mode) else "not a regular file"
            raise UnreadableFileError(f"{p}: {what} is {kind}")
        if info.st_size > max_bytes:
            raise UnreadableFileError(
                f"{p}: {what} is {info.st_size} bytes, more than the {max_bytes} allowed"
            )
        chunks, size = [], 0
        while size <= max_bytes:
            chunk = os.read(fd, min(1 << 20, max_bytes + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as e:
        raise UnreadableFileError(f"{p}: cannot read {what} ({e.strerror or e})") from None
    finally:
        os.close(fd)
    if size > max_bytes:
        raise UnreadableFileError(f"{p}: {what} is larger than the {max_bytes} bytes allowed")
    return b"".join(chunks)


def atomic_write_many(items: list[tuple[str | os.PathLike, bytes]]) -> list[Path]:
    """Write several files so that a failure leaves every one of them as it was, where possible.

    Every file is first written in full to a temporary file beside it (where a full disk or a
    bad path fails); only then are they renamed into place, in the order given, so the file
    that marks the set as complete belongs last.
    """
    staged: list[tuple[str, Path]] = []
    try:
        for path, data in items:
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            staged.append((tmp, path))
            os.fchmod(fd, 0o666 & ~_umask())
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        for tmp, path in staged:
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in staged:
            Path(tmp).unlink(missing_ok=True)
        raise
    return [path for _, path in staged]


def _existing_folder(start: Path, what: str) -> Path:
    """The nearest folder at or above ``start`` that exists; a file in the way is an error."""
    for folder in (start, *start.parents):
        try:
            info = os.stat(folder)
        except (FileNotFoundError, NotADirectoryError):
            if os.path.lexists(folder):  # a dangling link: mkdir would fail on it at the end
                raise ValueError(f"{what}: {folder} is a link to nothing") from None
            continue
        except OSError as e:
            raise ValueError(f"{what}: cannot use {folder} ({e.strerror or e})") from None
        if not stat.S_ISDIR(info.st_mode):
            raise ValueError(f"{what}: {folder} is a file, not a directory")
        return folder
    return Path(".")


def _probe(folder: Path, what: str) -> None:
    """Create and remove a file in ``folder``: the only test that holds for root and read-only mounts."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=".stepcache-write-test.", dir=folder)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise ValueError(f"{what}: cannot write to {folder} ({e.strerror or e})") from None


def _refuse_non_file(path: Path, what: str) -> None:
    """An existing ``path`` must be a regular file: a directory or a device cannot be replaced."""
    try:
        info = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return
    except OSError as e:
        raise ValueError(f"{what}: cannot use {path} ({e.strerror or e})") from None
    if stat.S_ISDIR(info.st_mode):
        raise ValueError(f"{what}: {path} is a directory, not a file")
    if not stat.S_ISREG(info.st_mode):
        raise ValueError(f"{what}: {path} is not a regular file")


def check_out_file(path: str | os.PathLike, what: str = "out") -> Path:
    """Prove, before any long work, that ``path`` can be written as a file (ValueError if not).

    Refused: an existing directory or non-regular file (``/dev/full``), a file where a parent
    folder must be, and a folder where no file can be created. Creates nothing that stays.
    """
    p = Path(path)
    _refuse_non_file(p, what)
    _probe(_existing_folder(p.parent, what), what)
    return p


def check_out_dir(path: str | os.PathLike, files: tuple[str, ...] = (), what: str = "out") -> Path:
    """Prove, before any long work, that the folder ``path`` can be created (if missing) and
    written, and that each of ``files`` already there is a regular file (ValueError if not).

    Creates nothing that stays: a command that fails later leaves no empty folder behind; the
    atomic writes create the folder when the results exist.
    """
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{what}: {out} exists and is not a directory")
    for name in files:
        _refuse_non_file(out / name, what)
    _probe(_existing_folder(out, what), what)
    return out


def json_bytes(obj: Any) -> bytes:
    """The bytes ``atomic_write_json`` writes for ``obj``, for writing with ``atomic_write_many``."""
    return (json.dumps(obj, indent=2, sort_keys=False, allow_nan=True) + "\n").encode("utf-8")
