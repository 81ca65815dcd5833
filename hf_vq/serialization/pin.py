"""Reading one version of a folder that a concurrent save may replace.

hf_vq replaces a saved folder in one step ([`hf_vq.serialization.fsops.exchange`]), but a load opens several files
(config.json, then each shard) at different moments: a save in between would hand it files of two versions. A
[`PinnedFolder`] holds the version that was current when it was opened: a shared lock on that folder (the saver
deletes a replaced version only once no reader holds it) and, on Linux, paths through the open folder descriptor
(`/proc/self/fd/N/<file>`) that keep naming that version's files after the swap.
"""

from __future__ import annotations

import os
import weakref
from pathlib import Path

from .fsops import lock_folder, unlock_folder

__all__ = ["PinnedFolder", "shown"]

_PROC_FD = os.path.isdir("/proc/self/fd")


class PinnedFolder:
    """A folder held at one version while it is read (`with PinnedFolder(folder) as pin: pin.file("config.json")`).

    Args:
        folder (`str` or `os.PathLike`): the model folder.

    Where folders cannot be pinned (no `/proc/self/fd`, no directory descriptors) [`file`] returns plain paths.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self._fd: int | None = None
        self._finalizer = None
        if not self.folder.is_dir():
            return
        for _ in range(50):  # each retry means a save swapped the folder while it was being pinned
            try:
                fd = os.open(self.folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
            except OSError:
                return
            lock_folder(fd, shared=True)  # waits while a saver deletes this version (then it is stale: retry)
            try:
                now, held = os.stat(self.folder), os.fstat(fd)
            except OSError:
                now = held = None
            if now is not None and (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino):
                self._fd = fd
                self._finalizer = weakref.finalize(self, unlock_folder, fd)
                return
            unlock_folder(fd)

    @property
    def pinned(self) -> bool:
        """Whether [`file`] names the pinned version (True on Linux for an existing folder)."""
        return self._fd is not None and _PROC_FD

    @property
    def root(self) -> Path:
        """A folder path that reads the pinned version (the plain folder where pinning is unavailable)."""
        return Path(f"/proc/self/fd/{self._fd}") if self.pinned else self.folder

    def file(self, name: str) -> Path:
        """A path that reads `name` of the pinned version (the plain path where pinning is unavailable)."""
        return self.root / name

    def close(self) -> None:
        """Release the folder: a save may delete this version from now on."""
        if self._finalizer is not None:
            self._finalizer()
            self._finalizer = None
        self._fd = None

    def __enter__(self) -> "PinnedFolder":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def shown(path: str | os.PathLike) -> str:
    """`path` as messages should show it: a pinned path (`/proc/self/fd/N/...`) as the folder it reads."""
    text = os.fspath(path)
    if text.startswith("/proc/self/fd/"):
        fd, _, rest = text[len("/proc/self/fd/"):].partition("/")
        try:
            real = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            return text
        return os.path.join(real, rest) if rest else real
    return text
