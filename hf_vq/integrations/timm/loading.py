"""Loading compressed timm models: the "hf_vq" entrypoint that `timm.create_model` reaches through
`hf-hub:` / `local-dir:`, built on hf_vq's one validator and reader ([`hf_vq.serialization`]).

Only the timm-specific parts live here: the saved `pretrained_cfg` and `model_args`, a fresh dense classifier when
`num_classes` differs, the stem adapted to `in_chans` (timm's `adapt_input_conv`), and feature extractors
(`features_only`) whose module names differ from the checkpoint's. timm's own `load_pretrained` is not used: it
falls back to pickled `.bin` / `.pth` files, which hf_vq never loads.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from ...config import VQConfig
from ...nn import build_skeleton_, layer_kind
from ...pipeline import head_module
from ...nn import VQModuleMixin
from ...serialization import (WEIGHTS_NAME, CheckpointError, PinnedFolder, check_unlisted, read_files, record_of,
                              shown, storage_groups)

__all__ = ["ARCHITECTURE", "BASE_ARG", "register_entrypoint"]

#: The timm architecture name of every hf_vq-compressed model (the entrypoint registered on import).
ARCHITECTURE = "hf_vq"
#: The `model_args` key naming the timm architecture under the compression.
BASE_ARG = "base_architecture"
# Keyword arguments of the entrypoint that are hf_vq's own, never passed to the base architecture.
_OWN_ARGS = (BASE_ARG, "quantization_config", "verify")


def _norm(name: str) -> str:
    """Module/key names up to timm's feature-wrapper renaming (`stages.0` -> `stages_0`)."""
    return name.replace(".", "_")


def _match_name(name: str, table: dict[str, str]) -> str | None:
    """The entry of `table` (normalised name -> original) that `name` of a (feature-wrapped) model stands for."""
    hit = table.get(_norm(name))
    if hit is None and name.startswith("model."):  # FeatureGetterNet keeps the model as `.model`
        hit = table.get(_norm(name[len("model."):]))
    return hit


def _read_source(cfg: dict[str, Any], cache_dir: str | os.PathLike | None) -> tuple[str, Any] | None:
    """Where the checkpoint of a pretrained_cfg is: ("local", folder) or ("hub", (repo_id, revision))."""
    source = cfg.get("source") or ""
    if source == "hf-hub" and cfg.get("hf_hub_id"):
        from timm.models._hub import hf_split

        return "hub", hf_split(cfg["hf_hub_id"])
    if cfg.get("file"):
        path = Path(cfg["file"])
        return "local", path if path.is_dir() else path.parent
    return None


def _fetch(loc: tuple[str, Any], filename: str, cache_dir: str | os.PathLike | None) -> Path:
    kind, where = loc
    if kind == "local":
        path = where / filename
        if not path.is_file():
            hint = ""
            if filename == WEIGHTS_NAME and (any(where.glob("*.bin")) or any(where.glob("*.pth"))):
                hint = " hf_vq loads only safetensors weights, never pickled .bin/.pth files."
            raise CheckpointError(f"{shown(path)} does not exist: {shown(where)} is not a complete hf_vq checkpoint."
                                  f"{hint}")
        return path
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    repo_id, revision = where
    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir))
    except EntryNotFoundError:
        raise CheckpointError(
            f"The Hub repo {repo_id!r} has no {filename}: it is not an hf_vq checkpoint (hf_vq loads only "
            "safetensors weights, never pickled files)."
        ) from None


def _as_config(value: Any) -> VQConfig:
    if isinstance(value, VQConfig):
        return value
    if isinstance(value, dict):
        return VQConfig.from_dict(value)
    raise ValueError(f"quantization_config must be a VQConfig or its dict, not {type(value).__name__}.")


def _where(loc: tuple[str, Any]) -> Any:
    """A checkpoint location as messages show it (a local folder by its path, a Hub repo as (id, revision))."""
    return shown(loc[1]) if loc[0] == "local" else loc[1]


def _saved_config(loc: tuple[str, Any] | None, cache_dir: Any, needed: bool) -> dict[str, Any]:
    """The checkpoint's config.json (empty when there is none or it is not needed)."""
    if loc is None or not needed:
        return {}
    try:
        data = json.loads(_fetch(loc, "config.json", cache_dir).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"config.json of {_where(loc)} is not valid JSON ({err}).") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"config.json of {_where(loc)} is not a JSON object; fix or re-download it.")
    return data


def _resolve(qconfig: Any, base: str | None, saved: dict[str, Any], loc: tuple[str, Any] | None) -> tuple[VQConfig, str]:
    """The quantization config and base architecture, from the caller's arguments or the saved config.json."""
    if qconfig is None:
        qconfig = saved.get("quantization_config")
        if not isinstance(qconfig, dict) or qconfig.get("quant_method") != "hf_vq":
            raise CheckpointError(
                f"The timm architecture {ARCHITECTURE!r} is hf_vq's compressed-model loader, but no hf_vq "
                "quantization_config was found"
                + (f" in the config.json of {_where(loc)}." if loc else ". Load a compressed checkpoint with "
                   "timm.create_model('hf-hub:org/name' or 'local-dir:/path', pretrained=True), or pass "
                   "base_architecture=... and quantization_config=...")
            )
    try:
        config = _as_config(qconfig)
    except ValueError as err:
        raise CheckpointError(f"config.json of {_where(loc) if loc else 'the checkpoint'}: {err}") from None
    base = base or (saved.get("model_args") or {}).get(BASE_ARG)
    if not base:
        raise CheckpointError(f"config.json lacks model_args[{BASE_ARG!r}]: which timm architecture was compressed?")
    if not timm.models.is_model(base):
        raise CheckpointError(
            f"The checkpoint was made from the timm architecture {base!r}, which this timm ({timm.__version__}) "
            "does not know. Upgrade timm."
        )
    return config, base


def _new_head(model: nn.Module, cfg: dict[str, Any], saved: dict[str, Any], features_only: bool) -> set[str]:
    """The classifier modules that get a fresh dense head (`num_classes` differs from the checkpoint's)."""
    source_classes = saved.get("num_classes", cfg.get("num_classes"))
    target_classes = None if features_only else getattr(model, "num_classes", None)
    if features_only or source_classes is None or target_classes == source_classes:
        return set()
    classifier = cfg.get("classifier") or ()
    new_head = {classifier} if isinstance(classifier, str) else set(classifier)
    if not new_head:  # no pretrained_cfg['classifier']: the module get_classifier() returns
        head = head_module(model)
        new_head = {n for n, m in model.named_modules() if head is not None and m is head}
    return new_head


def _model_layouts(model: nn.Module, config: VQConfig, features_only: bool, new_head: set[str]) -> dict[str, dict]:
    """The layouts of the modules `model` has, under its names (feature wrappers keep a subset and rename)."""
    layouts = config.to_dict()["modules"]
    if not features_only:  # build_skeleton_ names a module the model lacks
        return {name: layout for name, layout in layouts.items() if name not in new_head}
    by_norm = {_norm(n): n for n in layouts}
    renamed: dict[str, dict] = {}
    for name, module in model.named_modules():  # heads may have become Identity
        src = _match_name(name, by_norm) if name else None
        weight = module._parameters.get("weight") if src is not None else None
        if (weight is not None and layer_kind(module) == layouts[src]["kind"]
                and list(weight.shape) == list(layouts[src]["shape"])):
            renamed[name] = layouts[src]
    return renamed


def _build(pretrained: bool, base: str | None, qconfig: Any, pretrained_cfg: dict | None,
           pretrained_cfg_overlay: dict | None, cache_dir: Any, kwargs: dict[str, Any]) -> nn.Module:
    from timm.models._builder import resolve_pretrained_cfg

    cfg = resolve_pretrained_cfg(ARCHITECTURE, pretrained_cfg, pretrained_cfg_overlay).to_dict()
    loc = _read_source(cfg, cache_dir)
    if loc is None or loc[0] != "local":
        return _build_from(loc, pretrained, base, qconfig, cfg, cache_dir, kwargs)
    with PinnedFolder(loc[1]) as pin:  # config.json and weights of one version, even while a save replaces them
        return _build_from(("local", pin.root), pretrained, base, qconfig, cfg, cache_dir, kwargs)


def _build_from(loc: tuple[str, Any] | None, pretrained: bool, base: str | None, qconfig: Any, cfg: dict[str, Any],
                cache_dir: Any, kwargs: dict[str, Any]) -> nn.Module:
    from timm.models import model_entrypoint

    verify = kwargs.pop("verify", None)
    saved = _saved_config(loc, cache_dir, needed=qconfig is None or base is None or pretrained)
    config, base = _resolve(qconfig, base, saved, loc)
    if pretrained and loc is None:
        raise RuntimeError(
            f"{ARCHITECTURE!r} has no weights of its own: load a compressed checkpoint with "
            "timm.create_model('hf-hub:org/name', pretrained=True) or 'local-dir:/path/to/folder'."
        )
    # The base architecture, built from the saved pretrained_cfg (preprocessing, num_classes) and arguments.
    base_cfg = None
    if loc is not None:
        base_cfg = {k: v for k, v in cfg.items() if k != "state_dict"}
        base_cfg["architecture"] = ARCHITECTURE
    src_args = {k: v for k, v in (kwargs.pop("pretrained_model_args", None) or {}).items() if k not in _OWN_ARGS}
    if src_args:
        kwargs["pretrained_model_args"] = src_args
    features_only = bool(kwargs.get("features_only", False))
    model = model_entrypoint(base)(pretrained=False, pretrained_cfg=base_cfg, cache_dir=cache_dir, **kwargs)
    kwargs.pop("pretrained_model_args", None)
    new_head = _new_head(model, cfg, saved, features_only)
    fitted = config.replace(modules=_model_layouts(model, config, features_only, new_head))
    if fitted.modules:
        build_skeleton_(model, fitted)
    else:
        model.vq_config = fitted
    if pretrained:
        _load_weights(model, loc, config, cfg, cache_dir, features_only=features_only, new_head=new_head,
                      kwargs=kwargs, verify=verify)
    return model


def _load_weights(model: nn.Module, loc: tuple[str, Any], config: VQConfig, cfg: dict[str, Any], cache_dir: Any, *,
                  features_only: bool, new_head: set[str], kwargs: dict[str, Any], verify: bool | None) -> None:
    path = _fetch(loc, WEIGHTS_NAME, cache_dir)
    state_dict = read_files([path], config, where=shown(path), verify=verify)
    if not features_only:
        dense = {name for name, m in model.named_modules() if not isinstance(m, VQModuleMixin)}
        check_unlisted(state_dict, config, dense, where=shown(path))
    model.vq_config.record = record_of(path)
    path = shown(path)
    by_norm = {_norm(k): k for k in state_dict}
    own = model.state_dict()
    present = {k for k in own if k in state_dict or _match_name(k, by_norm)}
    aliases = {k for keys in storage_groups(own) if len(keys) > 1 and set(keys) & present for k in keys
               if k not in present}  # tied weights, stored once on disk
    first_convs = cfg.get("first_conv") or ()
    first_convs = (first_convs,) if isinstance(first_convs, str) else tuple(first_convs)
    loaded: dict[str, torch.Tensor] = {}
    missing, used = [], set()
    for key, target in own.items():
        if any(key.startswith(h + ".") for h in new_head):
            continue  # a new classifier: keeps its fresh initialisation, as timm does
        src = key if key in state_dict else (_match_name(key, by_norm) if features_only else None)
        if src is None:
            if key not in aliases:
                missing.append(key)
            continue
        used.add(src)
        tensor = state_dict[src]
        if tuple(tensor.shape) != tuple(target.shape):
            stem = next((c for c in first_convs if key in (f"{c}.weight", f"model.{c}.weight")), None)
            in_chans = kwargs.get("in_chans")
            if stem is not None and in_chans is not None and tensor.ndim == 4:
                from timm.models._manipulate import adapt_input_conv

                tensor = adapt_input_conv(in_chans, tensor, base_chans=(cfg.get("input_size") or (3,))[0])
            if tuple(tensor.shape) != tuple(target.shape):
                raise CheckpointError(
                    f"{path}: tensor {src!r} has shape {list(tensor.shape)}, the model expects {list(target.shape)} "
                    f"for {key!r}. The arguments passed to create_model change this layer; only num_classes, "
                    "in_chans and features_only can differ from the saved model."
                )
        loaded[key] = tensor
    unused = sorted(k for k in set(state_dict) - used if not any(k.startswith(h + ".") for h in new_head))
    if missing or (unused and not features_only):
        raise CheckpointError(
            f"{path} does not match the model built from its config.json: missing tensors {missing[:5]}, unexpected "
            f"tensors {unused[:5]}. Was it saved from another architecture or with other model_args?"
        )
    model.load_state_dict(loaded, strict=False)


# ============================================================================================ registration
def register_entrypoint() -> None:
    """Register the "hf_vq" entrypoint with timm's model registry (once)."""
    from timm.models import generate_default_cfgs, is_model, register_model

    if is_model(ARCHITECTURE):
        return
    global default_cfgs
    default_cfgs = generate_default_cfgs({ARCHITECTURE: {
        "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None, "crop_pct": 0.875,
        "interpolation": "bilinear", "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
        "license": "apache-2.0",
    }})

    @register_model
    def hf_vq(pretrained: bool = False, *, base_architecture: str | None = None, quantization_config: Any = None,
              pretrained_cfg: Any = None, pretrained_cfg_overlay: dict | None = None,
              cache_dir: str | os.PathLike | None = None, **kwargs: Any) -> nn.Module:
        """A timm model compressed with hf_vq (vector quantization).

        Normally reached through `timm.create_model("hf-hub:org/name" | "local-dir:/path", pretrained=True)`
        on a folder written by `hf_vq.integrations.timm.save_compressed`. Directly,
        `timm.create_model("hf_vq", base_architecture="resnet18", quantization_config=cfg)` builds the
        empty compressed architecture described by a `VQConfig` layout. Other keyword arguments
        (`num_classes`, `features_only`, `in_chans`, `drop_rate`, ...) go to the base architecture.
        """
        return _build(pretrained, base_architecture, quantization_config, pretrained_cfg, pretrained_cfg_overlay,
                      cache_dir, kwargs)
