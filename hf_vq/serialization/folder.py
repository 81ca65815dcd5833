"""Writing compressed folders: the weights file, and folders replaced atomically."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from safetensors.torch import save_file
from torch import nn

from ..config import VQConfig
from .format import WEIGHTS_NAME, metadata_for
from .state_dict import disk_state_dict

__all__ = ["atomic_folder", "save_weights"]


@contextlib.contextmanager
def atomic_folder(save_directory: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder next to `save_directory`; on success it replaces `save_directory`.

    On any exception the temporary folder is removed and `save_directory` is left as it was.
    """
    target = Path(save_directory).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    try:
        yield tmp
        tmp.chmod(0o777 & ~umask)  # mkdtemp creates 0700; give the folder the permissions of a normal one
        for path in tmp.rglob("*"):
            path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
        backup = None
        if target.exists():
            backup = target.with_name(f".{target.name}.old-{os.getpid()}")
            shutil.rmtree(backup, ignore_errors=True)
            target.rename(backup)
        tmp.rename(target)
        if backup is not None:
            shutil.rmtree(backup, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def save_weights(model: nn.Module, folder: str | os.PathLike, *, config: VQConfig | None = None) -> Path:
    """Write `model.safetensors` ([`disk_state_dict`], with [`metadata_for`] the config) into `folder`."""
    config = getattr(model, "vq_config", None) if config is None else config
    path = Path(folder) / WEIGHTS_NAME
    metadata = metadata_for(config) if config is not None else {"format": "pt"}
    save_file(disk_state_dict(model, config), str(path), metadata=metadata)
    return path
