"""timm integration: compressed timm models that `timm.create_model` loads like any other.

After `import hf_vq`, a folder written by [`save_compressed`] (or a Hub repo made by [`push_to_hub`])
loads with plain timm::

    model = timm.create_model("local-dir:/path/to/folder", pretrained=True)
    model = timm.create_model("hf-hub:org/name", pretrained=True)

How it works. The folder keeps timm's own layout — `config.json` with `architecture`, `num_classes`,
`model_args` and `pretrained_cfg` (so `timm.data.resolve_data_config` works unchanged), plus the
top-level `quantization_config` — and `model.safetensors`. Its `architecture` is `"hf_vq"`, a timm
entrypoint that `import hf_vq` registers (at once if timm is already imported, else when it is: timm
itself is not imported by `import hf_vq`); `model_args["base_architecture"]` names the timm
architecture underneath (`"resnet18"`, `"tf_efficientnet_lite0"`, ...). The entrypoint builds that
architecture with the saved and the caller's arguments, swaps in empty VQ modules from the
`quantization_config` layout ([`hf_vq.build_skeleton_`]), and fills them from `model.safetensors`
(safetensors only: nothing is ever unpickled).

What timm users get:

* `pretrained=True` loads the compressed weights; outputs are identical to the model that was saved.
* `pretrained=False` gives the same architecture with empty (zero) codes and codebooks, ready for
  `timm.models.load_checkpoint(model, ".../model.safetensors")` or `load_state_dict`.
* `num_classes=N` different from the checkpoint's gives a new, dense, freshly initialised classifier
  (as timm does for dense checkpoints); the backbone stays compressed. `num_classes=0` drops the head.
* `features_only=True` (with `out_indices`, `feature_cls`) gives timm's feature extractor for the
  architecture, its layers compressed and loaded from the checkpoint.
* `in_chans` different from the checkpoint's adapts the (dense) stem as timm does.

Convolutions follow the paper: 3x3 convs `d = 9` or `18`, pointwise convs and linear layers `d = 4`
or `8`, the stem, norms and biases dense. Depthwise convs are dense by default; with
`block_size["depthwise"] > 0` (see [`fit_config`]) each subvector is one whole kernel (9 values
for 3x3, 25 for 5x5). Grouped convs that are not depthwise are compressed like the dense conv of
their kernel size, blocks running inside one group's input channels. Layers whose row length the
block size does not divide (e.g. a squeeze-excite conv reading 6 channels) stay dense.
"""

from __future__ import annotations

import fnmatch
import importlib.abc
import importlib.util
import json
import logging
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint import (WEIGHTS_NAME, CheckpointError, atomic_folder, check_state_dict, load_weights, save_weights,
                          size_report)
from ..config import VQConfig, block_size_key
from .hub import compression_record, render_model_card

__all__ = ["ARCHITECTURE", "BASE_ARG", "load_dense", "fit_config", "timm_config", "save_compressed", "push_to_hub",
           "base_architecture"]

logger = logging.getLogger(__name__)

#: The timm architecture name of every hf_vq-compressed model (the entrypoint registered on import).
ARCHITECTURE = "hf_vq"
#: The `model_args` key naming the timm architecture under the compression.
BASE_ARG = "base_architecture"
# Keyword arguments of the entrypoint that are hf_vq's own, never passed to the base architecture.
_OWN_ARGS = (BASE_ARG, "quantization_config")


# ============================================================================================ dense models
def load_dense(ref: str, *, pretrained: bool = False) -> nn.Module:
    """A dense timm model from a folder written by `save_for_hf` / hf_vq, or from an architecture name."""
    import timm

    if Path(ref).is_dir():
        return timm.create_model(f"local-dir:{Path(ref).resolve()}", pretrained=True)
    if not timm.is_model(ref):
        raise ValueError(f"{ref!r} is neither a folder nor a timm architecture name (see timm.list_models()).")
    return timm.create_model(ref, pretrained=pretrained)


# ============================================================================================ the scheme
def _kernel_area(module: nn.Module) -> int:
    return int(math.prod(module.kernel_size)) if hasattr(module, "kernel_size") else 1


def fit_config(model: nn.Module, config: VQConfig | None = None) -> VQConfig:
    """`config` made to fit every layer of `model`, the way timm architectures need it.

    Returns a copy of `config` (default `VQConfig()`) with explicit per-module `overrides` appended:

    * depthwise convs (and convs of other kernel sizes, kind `"conv"`) whose configured block size
      is > 0 but not a multiple of their kernel area get `d` = the smallest multiple of the kernel
      area that is >= the configured d (one whole kernel per subvector: `depthwise=9` compresses
      3x3 depthwise convs with d = 9 and 5x5 ones with d = 25);
    * layers whose row length that block size does not divide (squeeze-excite convs reading 6
      channels, ...) are left dense (`{"skip": True}`) instead of failing.

    Modules with a user override that sets `d` are left alone ([`hf_vq.plan`] reports a misfit).
    The result is written into config.json with the model, so loading never needs this function.
    """
    from ..nn import layer_kind, vq_class_for
    from ..quantize import _head_module, _stem_module

    config = VQConfig() if config is None else config
    stem = _stem_module(model) if config.keep_stem_dense else None
    head = None if config.quantize_head else _head_module(model)
    added: dict[str, dict[str, Any]] = {}
    for name, module in model.named_modules():
        kind = layer_kind(module)
        if kind is None or not name or module is stem or module is head:
            continue
        if any(fnmatch.fnmatchcase(name, p) for p in config.modules_to_not_convert):
            continue
        d, skip, user_d = config.block_size[block_size_key(kind)], False, False
        for pattern, override in config.overrides.items():
            if fnmatch.fnmatchcase(name, pattern):
                if "d" in override:
                    d, user_d = override["d"], True
                skip = override.get("skip", skip)
        if skip or d == 0 or user_d:
            continue
        new_d = d
        if kind in ("depthwise", "conv"):
            area = _kernel_area(module)
            new_d = -(-d // area) * area  # smallest multiple of the kernel area >= d
        cols = vq_class_for(type(module)).matrix_shape(tuple(module._parameters["weight"].shape))[1]
        if cols % new_d:
            added[name] = {"skip": True}
            logger.info("hf_vq: %s (%s, row length %d) stays dense: block size %d does not divide it.",
                        name, kind, cols, new_d)
        elif new_d != d:
            added[name] = {"d": new_d}
    if not added:
        return config
    data = config.to_dict()
    data["overrides"] = {**data["overrides"], **added}
    return VQConfig.from_dict(data)


# ============================================================================================ saving
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
    from timm.models._hub import save_config_for_hf

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
    back with identical outputs. The folder is written atomically (a crash leaves the old one intact).

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
        `ValueError`: if the model is not compressed or not a whole timm model.
    """
    vq_config: VQConfig | None = getattr(model, "vq_config", None)
    if vq_config is None or not vq_config.is_quantized:
        raise ValueError("save_compressed needs a model compressed with hf_vq.quantize_ (it has no vq_config).")
    config = timm_config(model, model_args=model_args, data_config=data_config)
    with atomic_folder(save_directory) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_weights(model, tmp)
        license = license or config.get("pretrained_cfg", {}).get("license")  # timm records the weights' licence
        render_model_card(base_model=base_model, library_name="timm", config=vq_config, size=size_report(model),
                          fidelity=fidelity, repo_id=repo_id, license=license, metrics=metrics,
                          eval_dataset=eval_dataset, **compression_record(model),
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
    from .hub import upload_folder

    with tempfile.TemporaryDirectory() as tmp:
        folder = save_compressed(model, Path(tmp) / "model", base_model=base_model, fidelity=fidelity,
                                 model_args=model_args, repo_id=repo_id, license=license, metrics=metrics,
                                 eval_dataset=eval_dataset)
        return upload_folder(folder, repo_id, token=token, private=private, revision=revision,
                             commit_message=commit_message, create_pr=create_pr, endpoint=endpoint)


# ============================================================================================ loading
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
            raise CheckpointError(f"{path} does not exist: {where} is not a complete hf_vq checkpoint.{hint}")
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


def _fill_aliases(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> set[str]:
    """Keys of `model` that share storage with another key (tied weights, stored once on disk)."""
    groups: dict[tuple, list[str]] = {}
    for key, tensor in model.state_dict().items():
        ident = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        groups.setdefault(ident, []).append(key)
    aliases = set()
    for keys in groups.values():
        if len(keys) > 1 and any(k in state_dict for k in keys):
            aliases |= {k for k in keys if k not in state_dict}
    return aliases


def _build(pretrained: bool, base: str | None, qconfig: Any, pretrained_cfg: dict | None,
           pretrained_cfg_overlay: dict | None, cache_dir: Any, kwargs: dict[str, Any]) -> nn.Module:
    import timm
    from timm.models import is_model, model_entrypoint
    from timm.models._builder import resolve_pretrained_cfg

    from ..nn import layer_kind
    from ..quantize import _head_module, build_skeleton_

    cfg = resolve_pretrained_cfg(ARCHITECTURE, pretrained_cfg, pretrained_cfg_overlay).to_dict()
    loc = _read_source(cfg, cache_dir)
    saved: dict[str, Any] = {}
    if loc is not None and (qconfig is None or base is None or pretrained):
        try:
            saved = json.loads(_fetch(loc, "config.json", cache_dir).read_text())
        except json.JSONDecodeError as err:
            raise CheckpointError(f"config.json of {loc[1]} is not valid JSON ({err}).") from None
    if qconfig is None:
        qconfig = saved.get("quantization_config")
        if not isinstance(qconfig, dict) or qconfig.get("quant_method") != "hf_vq":
            raise CheckpointError(
                f"The timm architecture {ARCHITECTURE!r} is hf_vq's compressed-model loader, but no hf_vq "
                "quantization_config was found"
                + (f" in the config.json of {loc[1]}." if loc else ". Load a compressed checkpoint with "
                   "timm.create_model('hf-hub:org/name' or 'local-dir:/path', pretrained=True), or pass "
                   "base_architecture=... and quantization_config=...")
            )
    config = _as_config(qconfig)
    base = base or (saved.get("model_args") or {}).get(BASE_ARG)
    if not base:
        raise CheckpointError(f"config.json lacks model_args[{BASE_ARG!r}]: which timm architecture was compressed?")
    if not is_model(base):
        raise CheckpointError(
            f"The checkpoint was made from the timm architecture {base!r}, which this timm ({timm.__version__}) "
            "does not know. Upgrade timm."
        )
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
    src_args = kwargs.pop("pretrained_model_args", None) or {}
    src_args = {k: v for k, v in src_args.items() if k not in _OWN_ARGS}
    if src_args:
        kwargs["pretrained_model_args"] = src_args
    features_only = bool(kwargs.get("features_only", False))
    model = model_entrypoint(base)(pretrained=False, pretrained_cfg=base_cfg, cache_dir=cache_dir, **kwargs)
    kwargs.pop("pretrained_model_args", None)

    # Which compressed modules this model has, and under which names (feature wrappers rename).
    source_classes = saved.get("num_classes", cfg.get("num_classes"))
    target_classes = None if features_only else getattr(model, "num_classes", None)
    new_head = set()
    if not features_only and source_classes is not None and target_classes != source_classes:
        classifier = cfg.get("classifier") or ()
        new_head = {classifier} if isinstance(classifier, str) else set(classifier)
        if not new_head:  # no pretrained_cfg['classifier']: the module get_classifier() returns
            head = _head_module(model)
            new_head = {n for n, m in model.named_modules() if head is not None and m is head}
    layouts = config.to_dict()["modules"]
    by_norm = {_norm(n): n for n in layouts}
    target_modules = dict(model.named_modules())
    renamed: dict[str, dict] = {}
    if features_only:  # the extractor keeps a subset of the modules, maybe renamed; heads may become Identity
        for name, module in target_modules.items():
            src = _match_name(name, by_norm) if name else None
            weight = module._parameters.get("weight") if src is not None else None
            if (weight is not None and layer_kind(module) == layouts[src]["kind"]
                    and list(weight.shape) == list(layouts[src]["shape"])):
                renamed[name] = layouts[src]
    else:
        for name, layout in layouts.items():
            if name in new_head:
                continue
            renamed[name] = layout  # build_skeleton_ names a module the model lacks
    data = config.to_dict()
    data["modules"] = renamed
    if renamed:
        build_skeleton_(model, VQConfig.from_dict(data))
    else:
        model.vq_config = VQConfig.from_dict(data)

    if pretrained:
        _load_weights(model, loc, config, cfg, cache_dir, features_only=features_only, new_head=new_head,
                      kwargs=kwargs)
    return model


def _load_weights(model: nn.Module, loc: tuple[str, Any], config: VQConfig, cfg: dict[str, Any], cache_dir: Any, *,
                  features_only: bool, new_head: set[str], kwargs: dict[str, Any]) -> None:
    path = _fetch(loc, WEIGHTS_NAME, cache_dir)
    state_dict = load_weights(path)
    check_state_dict(state_dict, config, source=str(path))
    by_norm = {_norm(k): k for k in state_dict}
    own = model.state_dict()
    aliases = _fill_aliases(model, {k: None for k in own if (k in state_dict or _match_name(k, by_norm))})
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
def _register_entrypoint() -> None:
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


class _AfterImport(importlib.abc.MetaPathFinder):
    """A one-shot import hook: runs `callback` right after the top-level package `name` is first imported.

    timm takes over a second to import (it pulls in torchvision and torch._dynamo); `import hf_vq` should not
    pay that for users who never touch timm, yet `timm.create_model("hf-hub:...")` must find the "hf_vq"
    entrypoint whatever the import order. The hook wraps the package's loader and removes itself.
    """

    def __init__(self, name: str, callback) -> None:
        self.name, self.callback = name, callback

    def find_spec(self, fullname: str, path: Any = None, target: Any = None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)  # the real spec, found by the other finders
        if spec is not None and spec.loader is not None:
            spec.loader = _LoaderThen(spec.loader, self.callback)
        return spec


class _LoaderThen:
    """`loader`, then `callback()` once the module has executed (a failing callback is logged, not raised).

    After executing, the module's `__loader__` and `__spec__.loader` are the original loader again, so resource
    lookups (`importlib.resources`, `pkgutil.get_data`) never see this wrapper; until then it delegates to it."""

    def __init__(self, loader: Any, callback) -> None:
        self.loader, self.callback = loader, callback

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        module.__loader__ = self.loader
        if module.__spec__ is not None:
            module.__spec__.loader = self.loader
        self.loader.exec_module(module)
        try:
            self.callback()
        except Exception as err:  # noqa: BLE001 - an API change in timm must not break `import timm`
            logger.warning("hf_vq could not register its timm entrypoint (%s); timm.create_model will not load "
                           "hf_vq checkpoints.", err)


def register() -> None:
    """Make `timm.create_model` load hf_vq checkpoints: register the "hf_vq" entrypoint now if timm is imported,
    else as soon as it is (without importing it). Called by `import hf_vq`; idempotent."""
    if "timm" in sys.modules:
        _register_entrypoint()
    elif not any(isinstance(f, _AfterImport) and f.name == "timm" for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport("timm", _register_entrypoint))  # without timm installed: never fires
