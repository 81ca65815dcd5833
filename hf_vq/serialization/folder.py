"""Writing compressed folders safely: never a user's file deleted, never a half-written folder visible.

Every save of hf_vq (`save_compressed` of transformers and timm, `save_pretrained`, `push_to_hub`, the CLI,
fine-tuning's output folder) goes through [`atomic_folder`]:

* **What may be replaced.** The target may be missing, an empty folder, or a folder hf_vq wrote (it lists its own
  files in `.hf_vq.json`; older hf_vq folders are recognised by the `quantization_config` of their config.json).
  Only hf_vq's own files are replaced; every other entry (a tokenizer saved next to the model, `checkpoints/`,
  notes) is kept. A file, or a folder of other files, is refused before anything is written ([`SaveTargetError`]);
  `merge=True` (transformers' `save_pretrained`) adds the model's files to such a folder when none of them exists.
* **Atomic for readers.** Everything is written into a hidden sibling, then swapped in with one rename
  ([`hf_vq.serialization.fsops.exchange`]): the folder path always names a complete model. The replaced version is
  deleted once no reader holds it ([`hf_vq.serialization.pin.PinnedFolder`]); anything in it hf_vq did not write and
  the new folder lacks is moved over instead of deleted.
* **Interruptions.** SIGINT / SIGTERM remove the temporary folder; a killed process leaves a hidden
  `.<name>.hf_vq-tmp-<pid>-*` / `-old-*` sibling that the next save into the same folder removes, or restores when
  the kill fell between the two renames of the non-Linux fallback.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import shutil
import tempfile
import time
from collections.abc import Collection, Iterator
from pathlib import Path

from safetensors.torch import save_file
from torch import nn

from ..config import VQConfig
from .checksum import CHECKSUMS_KEY, checksums_json
from .format import WEIGHTS_NAME, metadata_for
from .fsops import (deferred_signals, exchange, link_tree, lock_folder, merge_back, pid_alive, remove_entry,
                    terminate_raises, unlock_folder)
from .state_dict import disk_state_dict

__all__ = ["MANIFEST_NAME", "SaveTargetError", "atomic_folder", "check_save_target", "check_writable", "owned_files",
           "save_weights"]

logger = logging.getLogger(__name__)

#: The file in which a folder written by hf_vq lists the entries hf_vq wrote (kept out of Hub uploads).
MANIFEST_NAME = ".hf_vq.json"
#: What hf_vq writes into a folder, for folders written before the manifest existed.
_LEGACY_OWNED = re.compile(r"^(config\.json|generation_config\.json|README\.md|model\.safetensors(\.index\.json)?"
                           r"|model-\d{5}-of-\d{5}\.safetensors)$")
#: Seconds a save waits for readers of the version it replaced before deleting it anyway.
READER_TIMEOUT_S = 60.0
_ACTIVE: set[Path] = set()  # temporary folders of saves running in this process


class SaveTargetError(FileExistsError):
    """A save refused before anything was written: the target is a file, or a folder of files hf_vq did not write."""


def owned_files(folder: Path) -> set[str] | None:
    """The entries of `folder` hf_vq wrote (its manifest; the names hf_vq writes for older hf_vq folders), or None
    when `folder` was not written by hf_vq."""
    try:
        files = json.loads((folder / MANIFEST_NAME).read_text())["files"]
        return {str(name) for name in files}
    except (OSError, ValueError, KeyError, TypeError):
        pass
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    quantization = config.get("quantization_config") if isinstance(config, dict) else None
    if isinstance(quantization, dict) and quantization.get("quant_method") == "hf_vq":
        return {entry.name for entry in folder.iterdir() if _LEGACY_OWNED.match(entry.name)}
    return None


def _resolve(path: str | os.PathLike) -> Path:
    """The target as an absolute path, through a symlink to a folder (the folder it names is what gets replaced)."""
    path = Path(os.path.abspath(os.fspath(path)))
    if path.is_symlink():
        if not path.is_dir():
            raise SaveTargetError(f"{path} is a symbolic link to {os.readlink(path)}, not to a folder: hf_vq saves "
                                  "a model as a folder and never replaces a link. Choose another path.")
        return path.resolve()
    return path


def check_writable(target: Path) -> None:
    """Raise now if nothing can be created at `target` (a read-only location, a file on the way).

    Raises:
        `PermissionError` / `NotADirectoryError`: naming the location and the fix.
    """
    ancestor = target.parent
    while not ancestor.exists():
        if ancestor.is_symlink():  # dangling link on the way
            break
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise NotADirectoryError(f"Cannot save to {target}: {ancestor} is a file, so nothing can be created under "
                                 "it. Choose another path.")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".hf_vq-write-test-", dir=ancestor))
    except OSError as err:
        raise PermissionError(err.errno, f"Cannot save to {target}: {ancestor} is not writable ({err.strerror}). "
                                         "Choose a writable location.") from None


def check_save_target(path: str | os.PathLike, *, keep: Collection[str] = (), merge: bool = False) -> Path:
    """Check, before any work, that a save into `path` is allowed and possible (what [`atomic_folder`] would refuse).

    Args:
        path (`str` or `os.PathLike`): the folder to write.
        keep (`Collection[str]`): entries a folder hf_vq did not write may hold and still be saved into (they are
            kept), e.g. `{"checkpoints"}` for fine-tuning's output folder.
        merge (`bool`, defaults to `False`): allow any folder, adding the model's files (`save_pretrained`).

    Returns:
        `Path`: the absolute target (through a symlink to a folder).

    Raises:
        [`SaveTargetError`]: the target is a file or a link to one, or a non-empty folder hf_vq did not write.
        `PermissionError` / `NotADirectoryError`: no folder can be created there.
    """
    target = _resolve(path)
    if target.exists() and not target.is_dir():
        raise SaveTargetError(f"{target} is a file, not a folder: hf_vq saves a model as a folder and never replaces "
                              "a file. Choose another path, or move the file away.")
    if target.is_dir() and not merge and owned_files(target) is None:
        foreign = sorted(entry.name for entry in target.iterdir() if entry.name not in keep)
        if foreign:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise SaveTargetError(
                f"{target} is a folder that hf_vq did not write (it holds {shown}): saving there would mix the model "
                "with other files. Save into a new or empty folder, or empty it yourself."
            )
    check_writable(target)
    return target


@contextlib.contextmanager
def atomic_folder(save_directory: str | os.PathLike, *, keep: Collection[str] = (), merge: bool = False
                  ) -> Iterator[Path]:
    """Yield an empty temporary folder; once the block succeeds it becomes `save_directory` in one step.

    The rules (what may be replaced, what is kept, how readers and interruptions are handled) are in this module's
    docstring. On any exception (SIGINT and SIGTERM included) the temporary folder is removed and `save_directory`
    is left exactly as it was.

    Args:
        keep, merge: see [`check_save_target`].

    Raises:
        [`SaveTargetError`], `PermissionError`, `NotADirectoryError`: see [`check_save_target`]; with `merge=True`
            also when the folder already holds, under a name the model writes, a file hf_vq did not write.
    """
    target = check_save_target(save_directory, keep=keep, merge=merge)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_stale(target)
    token = secrets.token_hex(4)
    tmp = target.with_name(f".{target.name}.hf_vq-tmp-{os.getpid()}-{token}")
    umask = os.umask(0)
    os.umask(umask)
    with terminate_raises():
        _ACTIVE.add(tmp)
        try:
            tmp.mkdir(mode=0o777 & ~umask)
            yield tmp
            _commit(tmp, target, token)
        finally:
            _ACTIVE.discard(tmp)
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)  # new files, and links to entries the target still holds


def _commit(tmp: Path, target: Path, token: str) -> None:
    """Swap the written folder `tmp` in at `target` (or add its files, see [`atomic_folder`]).

    Raises:
        [`SaveTargetError`]: a name the model writes is taken by an entry hf_vq did not write (nothing changed).
    """
    new = sorted(entry.name for entry in tmp.iterdir())
    (tmp / MANIFEST_NAME).write_text(json.dumps({"written_by": "hf_vq", "save": token, "files": new}, indent=1) + "\n")
    if not target.exists():
        with contextlib.suppress(OSError):
            os.rename(tmp, target)  # a new folder (one created meanwhile is handled below)
            return
    owned = owned_files(target)
    if owned is not None and not (target / MANIFEST_NAME).exists():  # written by hf_vq before manifests: all of it
        owned |= {name for name in new if (target / name).exists()}
    clash = sorted(name for name in new if name not in (owned or ()) and os.path.lexists(target / name))
    if clash:
        raise SaveTargetError(f"{target} already holds {', '.join(clash)}, which hf_vq did not write: saving the "
                              "model there would replace them. Save into a new or empty folder, or move them away.")
    if owned is None and any(target.iterdir()) or _holds_cwd(target):
        _commit_in_place(tmp, target, new, owned or set())
        return
    for entry in target.iterdir():  # entries hf_vq did not write travel with the model
        if entry.name != MANIFEST_NAME and entry.name not in new and entry.name not in (owned or ()):
            link_tree(entry, tmp / entry.name)
    old = target.with_name(f".{target.name}.hf_vq-old-{os.getpid()}-{token}")
    try:
        with deferred_signals():
            exchange(tmp, target, old)
        _discard(old, target, owned or set(), timeout=READER_TIMEOUT_S)
    except BaseException:  # e.g. SIGINT right after the swap: clean up the replaced version now, then stop
        if old.exists() and target.exists():
            _discard(old, target, owned or set(), timeout=0)
        raise


def _holds_cwd(target: Path) -> bool:
    """Whether `target` is this process's working folder or one of its parents (swapping it would strand the
    process in a deleted folder)."""
    with contextlib.suppress(OSError):
        cwd = Path(os.getcwd()).resolve()
        return cwd == target or target in cwd.parents
    return False


def _commit_in_place(tmp: Path, target: Path, new: list[str], owned: set[str]) -> None:
    """Move the written files into `target` one by one (not atomic for readers): into a folder of other files
    (`merge=True`, or only `keep` entries), or into the working folder. Only hf_vq's own files are replaced."""
    for name in [n for n in new if n != "config.json"] + ["config.json", MANIFEST_NAME]:  # reads as a model last
        if not (tmp / name).exists():
            continue
        if (target / name).is_dir() and not (target / name).is_symlink():
            shutil.rmtree(target / name)
        os.replace(tmp / name, target / name)
    for name in owned - set(new) - {MANIFEST_NAME}:  # hf_vq's files of the previous save (old shards, ...)
        with contextlib.suppress(FileNotFoundError):
            remove_entry(target / name)


def _discard(old: Path, target: Path, owned: set[str], *, timeout: float) -> bool:
    """Delete the replaced version `old` of `target` once its readers are done: hf_vq's files, and entries the new
    folder holds identically; anything else is moved into `target` (or, when `target` holds a different entry of
    that name, left in `old` with a warning). Returns False when readers still held it after `timeout` seconds."""
    try:
        fd = os.open(old, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return True
    try:
        if not lock_folder(fd, shared=False, timeout=timeout):
            if timeout > 0:
                logger.warning("hf_vq: readers held %s for %.0f s; deleting it anyway.", old, timeout)
            else:
                return False
        with deferred_signals():  # not cut in two: the next save would have to finish it
            for name in owned | {MANIFEST_NAME}:
                with contextlib.suppress(FileNotFoundError):
                    remove_entry(old / name)
            kept = merge_back(old, target)
            if not kept:
                with contextlib.suppress(OSError):
                    old.rmdir()
    finally:
        unlock_folder(fd)
    if kept:
        logger.warning("hf_vq: kept %s: it holds %s, which differ from the entries of that name in %s; compare and "
                       "merge them by hand.", old, [str(p.relative_to(old)) for p in kept[:5]], target)
    return True


_STALE = re.compile(r"^\.(?P<name>.+)\.(?:hf_vq-(?P<kind>tmp|old)-(?P<pid>\d+)-(?P<token>[0-9a-f]+)"
                    r"|(?P<legacy>tmp-.+|old-(?P<legacy_pid>\d+)))$")


def recover_stale(target: Path) -> None:
    """Clean up after saves into `target` that were killed: remove their temporary folders, finish deleting the
    versions they replaced, and restore `target` from the version a kill left it without. Folders of running saves
    (their process is alive) are left alone; nothing hf_vq did not write is deleted."""
    for entry in sorted(target.parent.glob(f".{glob_escape(target.name)}.*")):
        match = _STALE.match(entry.name)
        if match is None or match["name"] != target.name or entry in _ACTIVE:
            continue
        pid = int(match["pid"] or match["legacy_pid"] or 0)
        if pid and pid != os.getpid() and pid_alive(pid):
            continue
        try:
            _recover(entry, target, match)
        except OSError as err:
            logger.warning("hf_vq: could not clean up %s left by an interrupted save (%s).", entry, err)


def _recover(entry: Path, target: Path, match: re.Match) -> None:
    if match["legacy"] and match["legacy"].startswith("tmp-"):  # hf_vq < manifest: only new files, if abandoned
        if time.time() - entry.stat().st_mtime > 3600:
            shutil.rmtree(entry, ignore_errors=True)
        return
    replaced = match["kind"] == "old" or match["legacy_pid"] is not None or (
        match["kind"] == "tmp" and _save_token(target) == match["token"])  # killed right after the exchange
    if not replaced:  # the new files of a save that never got swapped in, and links to the target's own entries
        shutil.rmtree(entry, ignore_errors=True)
        return
    if not target.exists():
        os.rename(entry, target)
        logger.warning("hf_vq: restored %s from %s (a save into it was interrupted).", target, entry)
    elif entry.is_dir() and target.is_dir():
        _discard(entry, target, owned_files(entry) or set(), timeout=0)
    else:
        logger.warning("hf_vq: %s holds what was at %s before an interrupted save of hf_vq replaced it; move it back "
                       "by hand.", entry, target)


def _save_token(folder: Path) -> str | None:
    try:
        return str(json.loads((folder / MANIFEST_NAME).read_text())["save"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def glob_escape(name: str) -> str:
    """`name` with glob metacharacters escaped."""
    return re.sub(r"([*?\[])", r"[\1]", name)


def save_weights(model: nn.Module, folder: str | os.PathLike, *, config: VQConfig | None = None) -> Path:
    """Write `model.safetensors` ([`disk_state_dict`], with [`metadata_for`] the config and the checksums of every
    tensor) into `folder`."""
    config = getattr(model, "vq_config", None) if config is None else config
    path = Path(folder) / WEIGHTS_NAME
    state = disk_state_dict(model, config)
    metadata = metadata_for(config) if config is not None else {"format": "pt"}
    metadata[CHECKSUMS_KEY] = checksums_json(state)
    save_file(state, str(path), metadata=metadata)
    return path
