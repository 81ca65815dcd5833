"""File-system primitives of safe saving: an atomic folder exchange, folder locks between savers and readers, signal
guards, and copying / merging back folders without ever losing a file.

* [`exchange`] swaps two folders in one step (Linux `renameat2(RENAME_EXCHANGE)`): the target path always names a
  complete folder. Elsewhere it falls back to two renames, with signals deferred in between.
* [`lock_folder`]: a reader pins a folder version with a shared `flock` on the folder itself; a saver takes the
  exclusive lock on the version it swapped out before deleting it, so a reader never loses files mid-load.
* [`link_tree`] / [`merge_back`]: entries that hf_vq did not write are hard-linked into the new folder, and whatever
  of the old folder has no identical copy in the new one is moved back instead of being deleted.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import shutil
import signal
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

__all__ = ["exchange", "lock_folder", "unlock_folder", "deferred_signals", "terminate_raises", "link_tree",
           "merge_back", "remove_entry", "pid_alive"]

logger = logging.getLogger(__name__)

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_renameat2 = None
try:  # glibc >= 2.28; absent on macOS, Windows and musl without it
    _renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    _renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
except (OSError, AttributeError, TypeError):
    _renameat2 = None

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; readers and savers then do not coordinate
    fcntl = None


def exchange(new: Path, target: Path, old: Path) -> None:
    """Make `new` the folder at `target`; the previous `target` ends up at `old`.

    With `renameat2(RENAME_EXCHANGE)` (Linux, local file systems) `target` names a complete folder at every instant.
    Otherwise `target` is renamed to `old` and `new` to `target`, with SIGINT / SIGTERM deferred in between (a SIGKILL
    there leaves `target` missing and `old` complete: the next save restores it, see `folder.recover_stale`).
    """
    if _renameat2 is not None:
        if _renameat2(_AT_FDCWD, os.fsencode(new), _AT_FDCWD, os.fsencode(target), _RENAME_EXCHANGE) == 0:
            os.rename(new, old)  # `new` now holds the previous folder
            return
        code = ctypes.get_errno()
        if code not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
            raise OSError(code, os.strerror(code), str(target))
    os.rename(target, old)
    try:
        os.rename(new, target)
    except OSError:
        os.rename(old, target)  # put the previous folder back
        raise


def lock_folder(fd: int, *, shared: bool, timeout: float | None = None) -> bool:
    """`flock` the open folder `fd`; waits up to `timeout` seconds (None: until granted). False if not granted in
    time; True also where locks are unavailable (Windows, some network file systems), which then do not coordinate."""
    if fcntl is None:
        return True
    mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
    if timeout is None:
        try:
            fcntl.flock(fd, mode)
        except OSError:
            pass
        return True
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.005)
        except OSError:
            return True


def unlock_folder(fd: int) -> None:
    """Release a lock taken with [`lock_folder`] and close `fd`."""
    with contextlib.suppress(OSError):
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
    with contextlib.suppress(OSError):
        os.close(fd)


@contextlib.contextmanager
def deferred_signals() -> Iterator[None]:
    """SIGINT and SIGTERM arrive only after the block (POSIX): a few renames that must not be cut in two."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


@contextlib.contextmanager
def terminate_raises() -> Iterator[None]:
    """While the block runs, SIGTERM raises `SystemExit(143)` instead of killing the process outright, so that
    `finally` clauses remove temporary folders (SIGINT already raises `KeyboardInterrupt`). Only in the main thread,
    and only when SIGTERM has its default action (a handler the application installed is left alone)."""
    main = threading.current_thread() is threading.main_thread()
    if not main or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def raise_exit(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, raise_exit)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists (on this machine)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def link_tree(source: Path, dest: Path) -> None:
    """Copy `source` (file, symlink or folder) to `dest` as hard links (a plain copy where links are refused).

    Nothing of `source` changes; `dest` then names the very same files, so deleting `source` afterwards loses nothing.
    """
    if source.is_symlink():
        os.symlink(os.readlink(source), dest)
    elif source.is_dir():
        dest.mkdir()
        for child in source.iterdir():
            link_tree(child, dest / child.name)
        shutil.copystat(source, dest)
    else:
        try:
            os.link(source, dest)
        except OSError:
            shutil.copy2(source, dest)


def _same_file(a: os.stat_result, b: os.stat_result) -> bool:
    """The same file (a hard link), or an unchanged copy of it (same size and modification time, as `copy2` makes)."""
    if (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino):
        return True
    return a.st_size == b.st_size and a.st_mtime_ns == b.st_mtime_ns


def remove_entry(path: Path) -> None:
    """Delete a file, symlink or folder tree."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def merge_back(old: Path, new: Path) -> list[Path]:
    """Empty `old` into `new` without losing anything: entries `new` holds identically are deleted from `old`,
    entries `new` lacks are moved there, folders are merged recursively.

    Returns:
        `list[Path]`: entries left in `old` because `new` holds a different entry under the same name.
    """
    kept: list[Path] = []
    for entry in list(old.iterdir()):
        twin = new / entry.name
        try:
            mine, theirs = entry.lstat(), twin.lstat()
        except FileNotFoundError:
            os.rename(entry, twin)  # only the old folder had it (e.g. created while the save ran): move it over
            continue
        if stat.S_ISDIR(mine.st_mode) and stat.S_ISDIR(theirs.st_mode):
            kept += merge_back(entry, twin)
            with contextlib.suppress(OSError):
                entry.rmdir()
        elif stat.S_ISLNK(mine.st_mode) and stat.S_ISLNK(theirs.st_mode) and os.readlink(entry) == os.readlink(twin):
            entry.unlink()
        elif stat.S_ISREG(mine.st_mode) and stat.S_ISREG(theirs.st_mode) and _same_file(mine, theirs):
            entry.unlink()
        else:
            kept.append(entry)
    return kept
