"""Output files and folders that appear whole or not at all, with the permissions any file gets.

An output is assembled under a temporary name beside its target and renamed into place:
`.<name>.<8 characters>.tmp` for a file, `.<name>.<8 characters>` for a folder. Its writer holds
an exclusive `flock` on the temporary while it works, so the next write of the same target
removes the temporaries a killed writer left behind, and never one that is still being written;
nothing that does not match the target's own temporary pattern is touched (nor a folder holding
anything its writer would not put there). The temporary is
created as `open` and `mkdir` create (0666 / 0777 less the umask), unlike `tempfile`'s 0600 /
0700, so the renamed output is readable by whoever may read its folder.

Every failed write on the way (a read-only or full disk, a missing permission), whether Python
reports it as an OSError or TensorStore (under orbax) as a ValueError, is an `OutputError` naming
the target and the system's reason.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import secrets
import shutil
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import BinaryIO

from es3_jax.errors import Es3Error


class OutputError(Es3Error):
    """An output that cannot be written; the message names it and the system's reason."""


# How TensorStore (and orbax, which writes through it) tags the errno of a failed file operation.
_TENSORSTORE_ERRNO = re.compile(r"\[os_error_code='(\d+)'\]")


def system_error(error: BaseException) -> OSError | None:
    """The failed file operation behind `error` or what caused it: the OSError itself, or one made
    from the errno in a TensorStore error's message; None when there is no such failure (or `error`
    is already an es3 error, which names its cause)."""
    seen: BaseException | None = error
    while seen is not None and not isinstance(seen, Es3Error):
        if isinstance(seen, OSError):
            return seen
        found = _TENSORSTORE_ERRNO.search(str(seen)) if isinstance(seen, ValueError) else None
        if found:
            code = int(found.group(1))
            return OSError(code, os.strerror(code))
        seen = seen.__cause__ or seen.__context__
    return None


def _failed(target: Path, error: OSError) -> OutputError:
    """OutputError with the system's words, and the path it failed on unless that was the target's
    temporary (an implementation detail)."""
    reason = error.strerror or str(error)
    name = Path(str(error.filename or "")).name
    if error.filename and not name.startswith(f".{target.name}."):
        reason = f"{reason} ({error.filename})"
    return OutputError(f"cannot write {target}: {reason}")


def _temp_pattern(target: Path, *, folder: bool) -> re.Pattern[str]:
    # The names `tempfile.mkstemp` / `mkdtemp` gave earlier writers match too: 8 of [a-z0-9_].
    suffix = "" if folder else r"\.tmp"
    return re.compile(rf"\.{re.escape(target.name)}\.[a-z0-9_]{{8}}{suffix}")


def _lock(fd: int, *, wait: bool) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        return False
    return True


def _only_holds(folder: Path, holds: Collection[str]) -> bool:
    # `<name>.<anything>` counts as `<name>`: a library's own temporary of it (orbax's, say).
    return all(any(n == h or n.startswith(f"{h}.") for h in holds) for n in os.listdir(folder))


def remove_stale(target: Path, *, folder: bool, holds: Collection[str] = ()) -> list[Path]:
    """Remove the temporaries of `target` that no writer holds any more; -> those removed. A folder
    is removed only when it holds nothing but entries named in `holds` (what its writer puts there)."""
    pattern = _temp_pattern(target, folder=folder)
    try:
        names = sorted(n for n in os.listdir(target.parent) if pattern.fullmatch(n))
    except FileNotFoundError:
        return []
    removed = []
    for path in (target.parent / n for n in names):
        if path.is_symlink() or path.is_dir() != folder:
            continue
        try:
            if folder and not _only_holds(path, holds):
                continue
            fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if folder else 0))
        except OSError:
            continue  # gone meanwhile, or not ours to read
        try:
            if _lock(fd, wait=False):
                shutil.rmtree(path) if folder else path.unlink()
                removed.append(path)
        except OSError:
            pass  # left where it is: it does not stand in the new write's way
        finally:
            os.close(fd)
    return removed


def _create_temp(target: Path, *, folder: bool) -> tuple[Path, int]:
    """A new, locked temporary of `target` -> (its path, the descriptor holding the lock)."""
    while True:
        token = secrets.token_hex(4)
        path = target.with_name(f".{target.name}.{token}" + ("" if folder else ".tmp"))
        try:
            if folder:
                os.mkdir(path, 0o777)
                fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
            else:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        _lock(fd, wait=True)
        # A concurrent `remove_stale` may have taken it between its creation and the lock.
        if os.fstat(fd).st_nlink > 0:
            return path, fd
        os.close(fd)


def _begin(target: Path, *, folder: bool, holds: Collection[str] = ()) -> tuple[Path, int]:
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(target, folder=folder, holds=holds)
        return _create_temp(target, folder=folder)
    except OSError as e:
        raise _failed(target, e) from e


def open_permissions(path: Path) -> None:
    """Give a file that a library wrote through `tempfile` (0600) the permissions `open` would have
    given it (0666 less the umask), as every output here has."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def check_writable(target: str | Path) -> None:
    """OutputError unless `target` could be written now: called before the work whose result goes
    there. Leaves nothing behind (a missing folder is tried by creating and removing it)."""
    target = Path(target).absolute()
    missing = target.parent
    while not missing.parent.exists():
        missing = missing.parent
    try:
        if missing.exists():
            path, fd = _create_temp(target, folder=False)
            os.close(fd)
            path.unlink()
        else:
            missing.mkdir()
            missing.rmdir()
    except OSError as e:
        raise _failed(target, e) from e


def _sync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def staged_file(target: str | Path) -> Iterator[BinaryIO]:
    """A binary file to write `target` through: on a clean exit it is synced and renamed to
    `target` (replacing it), on any exception removed."""
    target = Path(target).absolute()
    path, fd = _begin(target, folder=False)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
            os.replace(path, target)
        _sync_folder(target.parent)
    except BaseException as e:
        path.unlink(missing_ok=True)
        failure = system_error(e)
        if failure is None:
            raise
        raise _failed(target, failure) from e


@contextlib.contextmanager
def staged_folder(target: str | Path, holds: Collection[str]) -> Iterator[Path]:
    """An empty folder to assemble `target` in: on a clean exit it is renamed to `target` (which
    must be absent or an empty folder), on any exception removed with what it holds (files a
    library's threads still write after the failure are removed by the next write of `target`).
    holds: the names the writer puts in it (a stale temporary holding anything else is kept)."""
    target = Path(target).absolute()
    path, fd = _begin(target, folder=True, holds=holds)
    try:
        yield path
        if target.exists():
            target.rmdir()
        os.replace(path, target)
        _sync_folder(target.parent)
    except BaseException as e:
        shutil.rmtree(path, ignore_errors=True)
        failure = system_error(e)
        if failure is None:
            raise
        raise _failed(target, failure) from e
    finally:
        os.close(fd)
