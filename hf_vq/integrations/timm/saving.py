"""Saving compressed timm models as timm Hub folders (timm's own `save_for_hf` layout) and pushing them."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import timm
from timm.models._hub import save_config_for_hf
from torch import nn

from ...config import VQConfig
from ...serialization import atomic_folder, check_save_target, checkpoint_size_report, save_weights
from ..cards import complete_record_, render_model_card
from ..hub import upload_folder
from .loading import ARCHITECTURE, BASE_ARG, _OWN_ARGS

__all__ = ["load_dense", "is_architecture", "base_architecture", "timm_config", "save_compressed", "push_to_hub",
           "eval_transform"]


def load_dense(ref: str, *, pretrained: bool = False) -> nn.Module:
    """A dense timm model from a folder written by `save_for_hf` / hf_vq, or from an architecture name."""
    if Path(ref).is_dir():
        return timm.create_model(f"local-dir:{Path(ref).resolve()}", pretrained=True)
    if not timm.is_model(ref):
        raise ValueError(f"{ref!r} is neither a folder nor a timm architecture name (see timm.list_models()).")
    return timm.create_model(ref, pretrained=pretrained)


def is_architecture(name: str) -> bool:
    """Whether `name` is a timm architecture (`timm.is_model`)."""
    return timm.is_model(name)


def base_architecture(model: nn.Module) -> str:
    """The timm architecture under a (compressed) timm model: `"resnet18"` for `hf_vq`-loaded ones too."""
    name = (getattr(model, "_model_args", None) or {}).get(BASE_ARG)
    if not name:
        name = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    if not name or name == ARCHITECTURE:
        raise ValueError(
            "Cannot tell which timm architecture this model is: it has no pretrained_cfg['architecture']. "
            "Create it with timm.create_model(...) before compressing it."
        )
    return name


def timm_config(model: nn.Module, *, model_args: dict[str, Any] | None = None,
                data_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """The config.json of a timm model in timm's `save_for_hf` layout (timm's own writer).

    For a model compressed with hf_vq, `architecture` is `"hf_vq"`, `model_args` holds
    `base_architecture` and `quantization_config` the full [`VQConfig`] with its layout.
    """
    if not hasattr(model, "pretrained_cfg") or not hasattr(model, "num_classes"):
        raise ValueError(
            "Only a whole timm classification model can be saved (it needs pretrained_cfg and num_classes); a "
            "features_only extractor cannot: save the full model and create the extractor with features_only=True."
        )
    vq_config: VQConfig | None = getattr(model, "vq_config", None)
    base = base_architecture(model)
    saved_args = model.__dict__.get("_model_args")
    # timm records every create_model kwarg; ours are rewritten below, non-serialisable ones must not leak.
    model._model_args = {k: v for k, v in (saved_args or {}).items() if k not in _OWN_ARGS}
    extra: dict[str, Any] = {}
    args = dict(model_args or {})
    if vq_config is not None:
        extra = {"pretrained_cfg": {"architecture": ARCHITECTURE}, "quantization_config": vq_config.to_dict()}
        args = {BASE_ARG: base, **args}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "config.json"
            save_config_for_hf(model, str(path), model_config=extra, model_args=args, data_config=data_config)
            config = json.loads(path.read_text())
    finally:
        if saved_args is None:
            model.__dict__.pop("_model_args", None)
        else:
            model._model_args = saved_args
    if vq_config is None:
        return config
    # hf_vq's keys last, so that config.json reads: timm's fields, then the compression.
    config.pop("quantization_config", None)
    config["quantization_config"] = vq_config.to_dict()
    return config


def save_compressed(model: nn.Module, save_directory: str | os.PathLike, *, base_model: str | None = None,
                    fidelity: dict | None = None, model_args: dict | None = None, repo_id: str | None = None,
                    license: str | None = None, data_config: dict | None = None, metrics: dict | None = None,
                    eval_dataset: dict | None = None) -> Path:
    """Write a compressed timm model as a timm Hub folder: config.json, model.safetensors, README.md.

    `timm.create_model("local-dir:<save_directory>", pretrained=True)` (after `import hf_vq`) loads it
    back with identical outputs. The folder is written atomically (a crash leaves the old one intact) and only hf_vq's
    own files of an earlier save are replaced ([`hf_vq.serialization.atomic_folder`]).

    Args:
        model: a timm model compressed with [`hf_vq.quantize_`] (or loaded compressed).
        save_directory: the output folder.
        base_model: Hub id of the dense model (e.g. `"timm/resnet18.a1_in1k"`), for the model card.
        fidelity: figures for the model card (e.g. from [`hf_vq.evaluate.image_fidelity`]).
        model_args: extra reconstruction arguments for `timm.create_model`, as timm's `save_for_hf`.
        repo_id: the Hub repo the folder is meant for (shown in the card's loading snippet).
        license: licence of the weights, for the card metadata.
        data_config: the preprocessing to record, as timm's `save_for_hf` (default: the model's own).
        metrics: task metrics for the card (e.g. `{"accuracy": 0.91}`); with `eval_dataset`
            (`{"name", "type", "split"}`) also the card's `model-index`.

    Raises:
        `ValueError`: if the model is not compressed (or its config matched no layer), or not a whole timm model.
        [`hf_vq.serialization.SaveTargetError`]: `save_directory` is a file, or a non-empty folder hf_vq did not
            write (nothing is written; see [`hf_vq.serialization.atomic_folder`]).
        `PermissionError`, `NotADirectoryError`: no folder can be created at `save_directory`.
    """
    vq_config: VQConfig | None = getattr(model, "vq_config", None)
    if vq_config is None:
        raise ValueError("save_compressed needs a model compressed with hf_vq.quantize_ (it has no vq_config).")
    if not vq_config.is_quantized:
        raise ValueError("This model holds no compressed module (its quantization config matched no layer, or it was "
                         "dequantized), so the folder could not be loaded back. Nothing was written; compress it with "
                         "a config that selects layers.")
    check_save_target(save_directory)
    config = timm_config(model, model_args=model_args, data_config=data_config)
    license = license or config.get("pretrained_cfg", {}).get("license")  # timm records the weights' licence
    complete_record_(vq_config, base_model=base_model, fidelity=fidelity, library="timm", license=license)
    with atomic_folder(save_directory) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_weights(model, tmp, config=vq_config)
        render_model_card(library_name="timm", config=vq_config, size=checkpoint_size_report(tmp), repo_id=repo_id,
                          metrics=metrics, eval_dataset=eval_dataset,
                          extra_tags=["timm", "image-classification"]).save(tmp / "README.md")
    return Path(save_directory)


def push_to_hub(model: nn.Module, repo_id: str, *, commit_message: str = "Add hf_vq-compressed timm model",
                token: str | None = None, revision: str | None = None, private: bool | None = None,
                create_pr: bool = False, base_model: str | None = None, fidelity: dict | None = None,
                model_args: dict | None = None, license: str | None = None, endpoint: str | None = None,
                metrics: dict | None = None, eval_dataset: dict | None = None):
    """Upload a compressed timm model to the Hub: the folder [`save_compressed`] writes, in one commit.

    The counterpart of timm's `push_to_hf_hub` for compressed models; it loads back with
    `timm.create_model("hf-hub:<repo_id>", pretrained=True)` after `import hf_vq`. Connection
    failures are retried (see [`hf_vq.integrations.hub.upload_folder`]).

    Returns:
        `huggingface_hub.CommitInfo` of the upload.
    """
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_compressed(model, Path(tmp) / "model", base_model=base_model, fidelity=fidelity,
                                 model_args=model_args, repo_id=repo_id, license=license, metrics=metrics,
                                 eval_dataset=eval_dataset)
        return upload_folder(folder, repo_id, token=token, private=private, revision=revision,
                             commit_message=commit_message, create_pr=create_pr, endpoint=endpoint)




def eval_transform(model: nn.Module | None = None, *, data_config: dict | None = None, training: bool = False):
    """timm's preprocessing for `model` (or `data_config`): `(transform, data_config)`, evaluation by default."""
    from timm.data import create_transform, resolve_data_config

    if data_config is None:
        data_config = resolve_data_config({}, model=model) if model is not None else resolve_data_config({"img_size": 224})
    return create_transform(**data_config, is_training=training), data_config
