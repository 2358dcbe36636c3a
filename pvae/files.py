"""Writing files the safe way: every file pvae writes goes to a fresh temporary file in its
folder (created with ``O_EXCL | O_NOFOLLOW``, so never through a link), is flushed to disk and
renamed into place; one process writes a folder at a time (an advisory lock); Ctrl-C and
SIGTERM wait until a file is complete; an OS error becomes one :class:`WriteError` that says
which file could not be written and why.

``atomic_writer(path)``
    a file object on a fresh temporary file beside ``path``; on success it replaces ``path``
    (a kill at any moment leaves either the old or the new file, never half of one).
``write_bytes``, ``write_text``, ``write_json``
    the same for a whole value.
``folder_lock(folder)``
    one writer per folder: ``fcntl.flock`` on ``folder/.lock`` (holding the writer's process
    id), held for as long as the process writes; a second writer gets
    :class:`FolderInUseError` naming the process. Readers take no lock and are never blocked.
    Taking the lock first refuses a folder with symbolic links out of it
    (:func:`check_folder`) and removes the temporary files that killed writers left (nobody
    else can be writing them: nobody else holds the lock). Re-entrant within a process.
``check_intact(path)``
    while a process holds a folder's lock, a write under it checks that the folder is still
    the one it locked: a folder deleted or moved away meanwhile stops the writer with
    :class:`FolderLostError` instead of being silently recreated.
``deferred_signals()``
    SIGINT and SIGTERM held back for a block and delivered (to whatever handler was there)
    once it is done.

Unix only for the lock (``fcntl``); elsewhere :func:`folder_lock` checks the folder but takes no
lock.
"""

from __future__ import annotations

import contextlib
import errno as errno_codes
import json
import os
import re
import secrets
import signal
import threading
from dataclasses import dataclass
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory lock
    fcntl = None

__all__ = ["LOCK_NAME", "FolderInUseError", "FolderLostError", "UnsafeFolderError", "WriteError",
           "atomic_writer", "check_folder", "check_intact", "deferred_signals", "folder_lock",
           "holds_lock", "os_error_in", "write_bytes", "write_json", "write_text"]

#: The lock file in a locked folder (it holds the writer's process id).
LOCK_NAME = ".lock"
#: Temporary files are ``.<name>.<random>.tmp`` beside their target.
TEMP_SUFFIX = ".tmp"
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


class WriteError(OSError):
    """A file could not be written: ``"cannot write PATH: <reason>[; <what now>]"``. An
    ``OSError`` whose ``errno`` and ``filename`` are those of the failure."""

    def __new__(cls, message: str, errno: int | None = None, filename: str | None = None):
        # OSError's constructor reads (errno, strerror, filename) from its arguments: give it
        # the message alone, so that str(error) is the message
        return super().__new__(cls, message)

    def __init__(self, message: str, errno: int | None = None, filename: str | None = None):
        super().__init__(message)
        self.errno, self.filename = errno, filename

    def __reduce__(self):  # (pickled to send it from rank 0 to the other processes)
        return type(self), (str(self), self.errno, self.filename)

    def __str__(self):
        return self.args[0]

    @classmethod
    def wrap(cls, path, error: OSError, hint: str = "") -> WriteError:
        """The error ``error`` (from writing ``path``) as one line, ``hint`` appended."""
        reason = error.strerror or str(error)
        if error.errno == errno_codes.EEXIST and error.filename:
            reason = f"{error.filename} is in the way (a file where a folder is needed)"
        elif error.errno == errno_codes.ENOTDIR:
            reason = "a part of the path is a file, not a folder"
        return cls(f"cannot write {path}: {reason}{'; ' + hint if hint else ''}", error.errno,
                   str(path))


class FolderLostError(WriteError):
    """The folder being written was deleted, moved or replaced while its writer held it."""


class FolderInUseError(RuntimeError):
    """Another process holds the folder's lock (it is writing the same run)."""


class UnsafeFolderError(ValueError):
    """A folder holds symbolic links that lead out of it (or its lock file is a link)."""


def os_error_in(error: BaseException) -> OSError | None:
    """The ``OSError`` behind ``error``: itself, or one in its chain of causes (``torch.save``
    reports a full disk as a ``RuntimeError`` raised from the ``OSError``)."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


# ---------------------------------------------------------------------------------------------
# signals


@contextlib.contextmanager
def deferred_signals(signums=(signal.SIGINT, signal.SIGTERM)):
    """Hold back ``signums`` during the block, then deliver each one received, once, to the
    handler that was installed before (Python's ``KeyboardInterrupt`` for Ctrl-C, the default
    action for SIGTERM: the process ends only after the block). Only in the main thread, where
    Python handles signals; elsewhere the block runs unchanged."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received, previous = [], {}
    for signum in signums:
        handler = signal.getsignal(signum)
        if handler in (signal.SIG_IGN, None):  # ignored, or set outside Python: leave it
            continue
        previous[signum] = handler
        signal.signal(signum, lambda s, frame: received.append(s))
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in dict.fromkeys(received):
            signal.raise_signal(signum)


# ---------------------------------------------------------------------------------------------
# folders: the lock, symbolic links, a folder that vanished


@dataclass
class _Held:
    fd: int
    count: int
    identity: tuple[int, int]  # (st_dev, st_ino) of the folder when it was locked
    shown: str  # the folder as the caller named it
    created: bool = False  # made by the lock (removed again if left empty)


_held: dict[Path, _Held] = {}
_registry = threading.Lock()


def _key(folder) -> Path:
    return Path(os.path.realpath(folder))


def holds_lock(folder) -> bool:
    """Whether this process holds ``folder``'s lock."""
    return _key(folder) in _held


def _inside(target: str, root: str) -> bool:
    return target == root or target.startswith(root.rstrip(os.sep) + os.sep)


def check_folder(folder, depth: int = 1) -> None:
    """Refuse a folder holding symbolic links that lead out of it: in the folder itself and in
    its subfolders down to ``depth`` levels (a run's ``figures/``). Links that stay inside are
    allowed; a link's target is where ``os.path.realpath`` leads (dangling links included).

    :raises UnsafeFolderError: naming the link and where it leads.
    """
    root = os.path.realpath(folder)
    if not os.path.isdir(root):
        return
    pending = [(root, 0)]
    while pending:
        current, level = pending.pop()
        try:
            entries = list(os.scandir(current))
        except OSError:
            continue  # an unreadable subfolder: writing into it fails with its own error
        for entry in entries:
            if entry.is_symlink():
                target = os.path.realpath(entry.path)
                if not _inside(target, root):
                    shown = Path(folder) / os.path.relpath(entry.path, root)
                    raise UnsafeFolderError(
                        f"{shown} is a symbolic link to {os.readlink(entry.path)}, which is "
                        f"outside the run folder {folder}; pvae neither reads nor writes a run "
                        "through links that leave it: remove the link, or copy the run with its "
                        "links resolved (cp -rL)")
            elif level < depth and entry.is_dir(follow_symlinks=False):
                pending.append((entry.path, level + 1))


def check_intact(path) -> None:
    """Before writing ``path``: if this process holds the lock of a folder that contains it,
    that folder must still exist and be the same folder (not deleted, moved away, or replaced
    by another of the same name).

    :raises FolderLostError: what happened, and that nothing more is written there.
    """
    if not _held:
        return
    target = Path(os.path.realpath(Path(path).parent))
    for key, held in list(_held.items()):
        if target != key and key not in target.parents:
            continue
        try:
            info = os.stat(key)
            identity = (info.st_dev, info.st_ino)
        except OSError:
            identity = None
        if identity != held.identity:
            what = "deleted or moved away" if identity is None else "replaced by another folder"
            raise FolderLostError(
                f"cannot write {path}: the folder {held.shown} was {what} while this process "
                "was writing it; nothing more is written there (a run is never rebuilt "
                "half-way). If the run was moved, its checkpoint is whole: continue it where it "
                "is now (pvae train --resume --out NEW_PLACE); `pvae repair RUN` rebuilds a "
                "lost config.json or history.csv from the checkpoint",
                errno_codes.ENOENT, str(path))


#: The names of temporary files: ``.<name>.<8 characters>.tmp`` (ours, and ``mkstemp``'s of
#: earlier pvae versions), and the fixed names that earlier versions used.
_TEMP_NAME = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$"
                        r"|^\.(config|metrics|report)\.json\.tmp$|^history\.csv\.tmp$")


def _remove_stale_temp_files(folder: Path, depth: int = 1) -> None:
    """Temporary files of killed writers (``.<name>.<random>.tmp``) in ``folder`` and its
    subfolders: called with the lock held, so no live writer owns them."""
    pending = [(folder, 0)]
    while pending:
        current, level = pending.pop()
        try:
            entries = list(os.scandir(current))
        except OSError:
            continue
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                if level < depth:
                    pending.append((Path(entry.path), level + 1))
            elif _TEMP_NAME.match(entry.name):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)


def _read_pid(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        text = ""
    return text if text.isdigit() else "(unknown)"


def _acquire(folder: Path, create: bool) -> tuple[int, tuple[int, int]]:
    """The first acquisition (see :func:`folder_lock`): ``(fd of .lock, folder identity)``."""
    if create:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise WriteError.wrap(folder, e) from e
    check_folder(folder)
    lock_path = folder / LOCK_NAME
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | _NOFOLLOW | _CLOEXEC, 0o644)
    except OSError as e:
        if e.errno == errno_codes.ELOOP:
            raise UnsafeFolderError(f"{lock_path} is a symbolic link; pvae does not write "
                                    "through links: remove it") from e
        raise WriteError.wrap(lock_path, e, "pvae writes into the run folder; copy the run "
                              "somewhere writable") from e
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise FolderInUseError(
                    f"run {folder} is in use by process {_read_pid(fd)}: one process writes a run "
                    "at a time (pvae train, evaluate, ppca, repair or fit(checkpoint_dir=...)); "
                    "wait for it to finish, or use another folder") from None
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        info = os.stat(folder)
        _remove_stale_temp_files(folder)
    except BaseException:
        os.close(fd)
        raise
    return fd, (info.st_dev, info.st_ino)


@contextlib.contextmanager
def folder_lock(folder, *, create: bool = False):
    """Hold ``folder``'s write lock for the block (re-entrant within this process).

    On first acquisition: refuse symbolic links out of the folder (:func:`check_folder`),
    open ``folder/.lock`` without following a link, ``flock`` it without waiting, write this
    process's id into it, and remove stale temporary files. With ``create``, a missing folder
    is created first (with its parents) and, if the block leaves nothing in it but the lock
    file, removed again.

    :raises FolderInUseError: another process holds the lock ("... in use by process N").
    :raises UnsafeFolderError: symbolic links out of the folder, or ``.lock`` is a link.
    :raises WriteError: the lock file cannot be created (read-only or full file system, no
        permission, ...).
    """
    folder = Path(folder)
    key = _key(folder)
    with _registry:  # (held while acquiring: the threads of one process share one lock)
        held = _held.get(key)
        if held is not None:
            held.count += 1
        else:
            created = create and not folder.exists()
            fd, identity = _acquire(folder, create)
            held = _held[key] = _Held(fd, 1, identity, str(folder), created)
    try:
        yield folder
    finally:
        with _registry:
            held.count -= 1
            last = held.count == 0
            if last:
                del _held[key]
        if last:
            _release(folder, held)


def _release(folder: Path, held: _Held) -> None:
    if held.created:  # made for the block and left empty: removed again
        with contextlib.suppress(OSError):
            if [p.name for p in folder.iterdir()] == [LOCK_NAME]:
                (folder / LOCK_NAME).unlink()
                folder.rmdir()
    if fcntl is not None:
        with contextlib.suppress(OSError):
            fcntl.flock(held.fd, fcntl.LOCK_UN)
    os.close(held.fd)


# ---------------------------------------------------------------------------------------------
# atomic writes


def _open_temp(folder: Path, name: str) -> tuple[int, Path]:
    """A new, empty file ``.<name>.<random>.tmp`` in ``folder``: ``O_CREAT | O_EXCL`` (fails on
    any existing name, links included) and ``O_NOFOLLOW``; permissions as the umask says."""
    for _ in range(100):
        tmp = folder / f".{name}.{secrets.token_hex(4)}{TEMP_SUFFIX}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, 0o666)
        except FileExistsError:
            continue
        return fd, tmp
    raise FileExistsError(errno_codes.EEXIST, "no free temporary file name", str(folder))


def _prepare_folder(path: Path, make_parents: bool) -> None:
    parent = path.parent
    if parent.is_dir():
        return
    if parent.exists() or parent.is_symlink():
        raise WriteError(f"cannot write {path}: {parent} is a file, not a folder",
                         errno_codes.ENOTDIR, str(path))
    if not make_parents:
        raise WriteError(f"cannot write {path}: the folder {parent} does not exist",
                         errno_codes.ENOENT, str(path))
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WriteError.wrap(path, e) from e


@contextlib.contextmanager
def atomic_writer(path, *, make_parents: bool = True, hint: str = ""):
    """A binary file object on a fresh temporary file beside ``path``; when the block ends
    without error the file is flushed, ``fsync``-ed and renamed over ``path`` (and the folder
    entry synced), else removed. Ctrl-C and SIGTERM wait for the end of the block
    (:func:`deferred_signals`). Writing never follows a link: a link at ``path`` is replaced,
    not written through.

    :param bool make_parents: create missing parent folders (never inside a folder that this
        process holds and that was lost: :func:`check_intact` comes first).
    :param str hint: appended to the message of a :class:`WriteError`.
    :raises WriteError: any OS error while writing (full disk, read-only file system, no
        permission, name too long, a file where a folder should be ...), as one line naming
        ``path``; also an ``OSError`` behind another exception raised in the block.
    :raises FolderLostError: see :func:`check_intact`.
    """
    path = Path(path)
    check_intact(path)
    _prepare_folder(path, make_parents)
    with deferred_signals():
        try:
            fd, tmp = _open_temp(path.parent, path.name)
        except OSError as e:
            check_intact(path)  # a folder that vanished says so
            raise WriteError.wrap(path, e, hint) from e
        try:
            with os.fdopen(fd, "wb") as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException as e:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            cause = os_error_in(e)
            if cause is not None and not isinstance(e, WriteError):
                check_intact(path)
                if cause.errno == errno_codes.EISDIR or (path.is_dir() and not path.is_symlink()):
                    raise WriteError(f"cannot write {path}: it is a folder",
                                     errno_codes.EISDIR, str(path)) from e
                raise WriteError.wrap(path, cause, hint) from e
            raise
        _sync_folder(path.parent)


def _sync_folder(folder: Path) -> None:
    """Make the rename durable (where the platform lets a folder be opened and synced)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes(path, data: bytes, **kwargs) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_writer`)."""
    with atomic_writer(path, **kwargs) as f:
        f.write(data)


def write_text(path, text: str, **kwargs) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_writer`)."""
    write_bytes(path, text.encode("utf-8"), **kwargs)


def write_json(path, obj, **kwargs) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically (see :func:`atomic_writer`)."""
    write_text(path, json.dumps(obj, indent=2), **kwargs)
