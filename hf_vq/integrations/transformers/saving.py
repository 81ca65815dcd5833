"""Saving compressed transformers models: `save_pretrained` / `push_to_hub` with hf_vq's model card, and a
complete folder for the CLI ([`save_compressed`]: tokenizer files, fidelity in the card, written atomically).

transformers' own `save_pretrained` writes config.json and the weights (through the quantizer's
`get_state_dict_and_metadata`); a compressed model's `save_pretrained` adds the model card next to them, and its
`push_to_hub` uploads that folder with huggingface_hub's public `upload_folder` (retried on dropped connections)
instead of transformers' generic card.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import types
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedModel

from ...config import VQConfig
from ...serialization import atomic_folder, check_save_target, checkpoint_size_report
from ..cards import complete_record_, render_model_card
from ..hub import upload_folder

__all__ = ["install_savers_", "load_dense", "save_compressed", "model_card"]

# Files of a transformers / sentence-transformers folder that are not weights and travel with the model.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".onnx", ".ckpt", ".index.json")
_SKIP_FILES = {"README.md", ".gitattributes", "config.json", "generation_config.json"}


def _config(model: nn.Module) -> VQConfig:
    return model.hf_quantizer.quantization_config


def _local_dir(ref: Any) -> str | None:
    return ref if isinstance(ref, str) and os.path.isdir(ref) else None


def model_card(model: nn.Module, folder: str | os.PathLike, *, repo_id: str | None = None,
               tags: list[str] | None = None):
    """The model card of a compressed transformers model saved in `folder` (sizes read from its files)."""
    return render_model_card(library_name="transformers", config=_config(model), size=checkpoint_size_report(folder),
                             repo_id=repo_id, extra_tags=tags,
                             source_dir=_local_dir(getattr(model.config, "_name_or_path", None)))


def _prepare_record(model: nn.Module) -> None:
    """Complete the record (licence, library) before the weights are written: their metadata carries it."""
    complete_record_(_config(model), library="transformers",
                     source_dir=_local_dir(getattr(model.config, "_name_or_path", None)))


def _require_modules(model: nn.Module) -> None:
    if not _config(model).modules:
        raise ValueError(
            "This model holds no compressed module: its quantization config matched no layer (check "
            "modules_to_not_convert, overrides and block_size; 0 leaves a kind dense), so the folder could not be "
            "loaded back. Nothing was written. Compress it with a config that selects layers, or call "
            "model.dequantize() and save the dense model."
        )


def _save_pretrained(self: PreTrainedModel, save_directory: str | os.PathLike, *args: Any, push_to_hub: bool = False,
                     **kwargs: Any) -> None:
    """`PreTrainedModel.save_pretrained`, then hf_vq's model card (README.md) next to the weights, written into a
    temporary sibling and swapped in at once ([`hf_vq.serialization.atomic_folder`] with `merge=True`: files hf_vq
    did not write, such as a tokenizer saved there, are kept; a file at `save_directory` is refused).

    With `push_to_hub=True` the folder (card included) is uploaded with [`hf_vq.integrations.hub.upload_folder`].
    """
    card_tags = kwargs.pop("tags", None)
    upload = {key: kwargs.pop(key) for key in ("repo_id", "commit_message", "create_pr", "private") if key in kwargs}
    _require_modules(self)
    if not self.should_save_on_this_rank(kwargs.get("is_main_process", True)):
        type(self).save_pretrained(self, save_directory, *args, **kwargs)  # gathers; writes nothing on this rank
        return
    check_save_target(save_directory, merge=True)
    _prepare_record(self)
    repo_id = upload.get("repo_id") or Path(os.fspath(save_directory)).name if push_to_hub else None
    with atomic_folder(save_directory, merge=True) as tmp:
        type(self).save_pretrained(self, tmp, *args, **kwargs)
        model_card(self, tmp, repo_id=repo_id, tags=card_tags).save(os.path.join(tmp, "README.md"))
    if push_to_hub:
        upload_folder(save_directory, repo_id, token=kwargs.get("token"), private=upload.get("private"),
                      commit_message=upload.get("commit_message") or "Add hf_vq-compressed model",
                      create_pr=upload.get("create_pr", False))


def _push_to_hub(self: PreTrainedModel, repo_id: str, *, commit_message: str | None = None,
                 commit_description: str | None = None, private: bool | None = None, token: bool | str | None = None,
                 revision: str | None = None, create_pr: bool = False, max_shard_size: int | str | None = "50GB",
                 tags: list[str] | None = None) -> Any:
    """`push_to_hub` that uploads hf_vq's model card instead of transformers' generic one (one commit)."""
    _require_modules(self)
    _prepare_record(self)
    with tempfile.TemporaryDirectory() as tmp:
        type(self).save_pretrained(self, tmp, max_shard_size=max_shard_size)
        model_card(self, tmp, repo_id=repo_id, tags=tags).save(os.path.join(tmp, "README.md"))
        return upload_folder(tmp, repo_id, token=token, private=private, revision=revision,
                             commit_message=commit_message or "Add hf_vq-compressed model", create_pr=create_pr,
                             commit_description=commit_description)


def install_savers_(model: PreTrainedModel) -> None:
    """Give a compressed model the `save_pretrained` / `push_to_hub` above (instance attributes: the class, whose
    name transformers records in config.json, stays the model's own)."""
    model.save_pretrained = types.MethodType(_save_pretrained, model)
    model.push_to_hub = types.MethodType(_push_to_hub, model)


def load_dense(folder: str | os.PathLike, *, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Load the model of a transformers folder with the class named in its config (`architectures[0]`).

    Args:
        folder (`str` or `os.PathLike`): a local transformers model folder.
        dtype (`torch.dtype`, defaults to `torch.float32`): dtype of the loaded weights.

    Returns:
        `PreTrainedModel`: the model class of `architectures[0]`, or `AutoModel` if transformers lacks it.
    """
    import transformers

    config = AutoConfig.from_pretrained(folder)
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    return (cls or AutoModel).from_pretrained(folder, dtype=dtype)


def save_compressed(model: nn.Module, save_directory: str | os.PathLike, *, source_dir: str | os.PathLike | None = None,
                    base_model: str | None = None, fidelity: dict[str, Any] | None = None,
                    max_shard_size: int | str = "50GB") -> Path:
    """Write a compressed transformers model as a Hugging Face folder, atomically (only hf_vq's own files of an
    earlier save are replaced; anything else in the folder is kept).

    The weights and config.json are written by `save_pretrained` (so the folder loads back with
    `from_pretrained` and no extra argument); the dense model's tokenizer and other non-weight files are
    copied next to them, and the model card records `base_model` and the fidelity figures (also kept in the
    config's record, so they survive reloading).

    Args:
        model (`PreTrainedModel`): a transformers model compressed with [`hf_vq.quantize_`] or loaded compressed.
        save_directory (`str` or `os.PathLike`): the output folder, replaced only once everything is written.
        source_dir (`str` or `os.PathLike`, *optional*): the dense model's folder; its tokenizer and other
            non-weight files are copied.
        base_model (`str`, *optional*): Hub id of the dense model (default: the record's).
        fidelity (`dict`, *optional*): figures for the model card (e.g. embedding cosine to the dense model).
        max_shard_size (`int` or `str`, defaults to `"50GB"`): shard the safetensors above this size.

    Returns:
        `Path`: `save_directory`.

    Raises:
        `ValueError`: if `model` is not a compressed transformers model, or holds no compressed module.
        [`hf_vq.serialization.SaveTargetError`]: `save_directory` is a file, or a non-empty folder hf_vq did not
            write (nothing is written; see [`hf_vq.serialization.atomic_folder`]).
        `PermissionError`, `NotADirectoryError`: no folder can be created at `save_directory`.
    """
    config = getattr(model, "vq_config", None)
    if config is None or not isinstance(model, PreTrainedModel) or getattr(model, "hf_quantizer", None) is None:
        raise ValueError("save_compressed needs a transformers PreTrainedModel compressed with hf_vq.quantize_.")
    _require_modules(model)
    check_save_target(save_directory)
    complete_record_(config, base_model=base_model, fidelity=fidelity, library="transformers", source_dir=source_dir)
    with atomic_folder(save_directory) as tmp:
        if source_dir is not None:
            _copy_assets(Path(source_dir), tmp)
        type(model).save_pretrained(model, tmp, max_shard_size=max_shard_size)
        card = render_model_card(library_name="transformers", config=config, size=checkpoint_size_report(tmp),
                                 source_dir=source_dir)
        card.save(tmp / "README.md")
    return Path(save_directory)


def _copy_assets(source: Path, target: Path) -> None:
    """Copy the dense folder's tokenizer and other non-weight files."""
    for path in source.iterdir():
        if path.name in _SKIP_FILES or path.name.endswith(_WEIGHT_SUFFIXES) or path.name.startswith("."):
            continue
        if path.is_dir():
            if path.name not in ("onnx", "openvino"):
                shutil.copytree(path, target / path.name)
        else:
            shutil.copy2(path, target / path.name)
