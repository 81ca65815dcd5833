"""hf_vq as a transformers quantization method: `from_pretrained` compresses dense models and loads compressed ones.

`import hf_vq` registers [`HfVQQuantizer`] and [`VQConfig`] under `quant_method = "hf_vq"`. Then

* `AutoModel.from_pretrained(dense, quantization_config=VQConfig(...))` loads the dense weights and
  compresses them in place with [`hf_vq.quantize_`] (data-free k-means, progress bar per layer);
* `AutoModel.from_pretrained(compressed)` rebuilds the VQ modules on the meta device from the layout
  in config.json ([`hf_vq.build_skeleton_`]) and loads codes and codebooks, nothing recomputed (on one
  device hf_vq reads the checkpoint itself, see [`load_tensors_`]);
* `save_pretrained` / `push_to_hub` write config.json with the full `quantization_config`, safetensors
  (codebooks in fp16, tied modules once, sharded when large) and hf_vq's model card;
* `model.dequantize()` returns the dense model; `Trainer` fine-tunes the codebooks (codes stay frozen).

Two transformers behaviours are handled here rather than left to the user:

* **Tied modules** (input embedding ↔ LM head): transformers ties *parameters* named in
  `all_tied_weights_keys` (`lm_head.weight`), which a VQ module no longer has. The tie is moved to the
  `codebooks` parameter, and the tied copy of the uint8 `codes` buffer is aliased and kept out of the
  state dict, so the pair is stored once and stays one pair of tensors after loading and training.
* **Shared codebook sets** (`VQConfig(share="pool" | "global")`): the set is a parameter of the base model,
  `vq_shared_codebooks_<set>`, stored once; each member's `codebooks` is tied to it the same way (the tie
  mapping names `<member>.codebooks -> vq_shared_codebooks_<set>`), so loading re-ties every member to the
  one loaded parameter and the member keys are never reported missing.
* **Loading without hf_vq**: transformers skips an unknown `quant_method` with a warning and would
  return randomly initialised layers. Every checkpoint written here carries two guard tensors: a
  one-element `<module>.weight` whose shape mismatches the dense layer (transformers then raises), and
  a tensor whose *name* is the fix, listed in transformers' load report. hf_vq ignores both.

The algorithms live in `hf_vq.quantize` / `hf_vq.codec`; this module only adapts them to transformers.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import tempfile
import types
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn
from transformers.quantizers import HfQuantizer
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)

from ..checkpoint import (CODEBOOKS, CODES, SAFETENSORS_DTYPES, CheckpointError, expected_shapes,
                          is_shared_codebooks_key, load_weights)
from ..codec.packing import bits_for
from ..config import SHARED_CODEBOOKS, VQConfig, shared_codebooks_key
from ..nn import CodesError, VQModuleMixin

__all__ = ["QUANT_METHOD", "GUARD_NOTE_KEY", "HfVQQuantizer", "register", "attach_", "detach_",
           "check_checkpoint_files", "load_tensors_"]

logger = logging.getLogger(__name__)

QUANT_METHOD = "hf_vq"

#: Name of a one-element guard tensor in every hf_vq transformers checkpoint. Loaded without hf_vq,
#: transformers lists it in its load report (next to the failing guard `<module>.weight`), so the fix is on screen.
#: (Plain words only: transformers' per-architecture key renamings rewrite words such as "layer" or "model".)
GUARD_NOTE_KEY = ("HF_VQ REQUIRED - pip install hf_vq - then import hf_vq before from_pretrained - otherwise this "
                  "checkpoint loads as random values")
_GUARD_SUFFIX = ".weight"

_DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}  # torch.int64 -> "I64", ...
_FLOAT_DTYPES = {name for name, dtype in SAFETENSORS_DTYPES.items() if dtype.is_floating_point}  # F16, BF16, ...


# ---------------------------------------------------------------------------------------------- the quantizer
class HfVQQuantizer(HfQuantizer):
    """transformers quantizer of hf_vq (`quant_method = "hf_vq"`), registered by `import hf_vq`.

    Not instantiated by users: `from_pretrained` builds it from a [`VQConfig`] passed as
    `quantization_config=` (quantize on load) or read from config.json (pre-quantized checkpoint).

    Args:
        quantization_config ([`VQConfig`] or `dict`): the scheme, and for a compressed checkpoint the
            per-module layout (`modules`).
        pre_quantized (`bool`, defaults to `True`): whether the weights being loaded are already compressed.

    Attributes:
        base_model (`str`, *optional*): Hub id of the dense model, written into the model card
            (`base_model`, `base_model_relation: quantized`). Set when quantizing on load from a Hub id.
        fidelity (`dict`, *optional*): figures printed in the model card's fidelity section.
    """

    requires_calibration = False

    def __init__(self, quantization_config: VQConfig | dict, **kwargs: Any) -> None:
        if isinstance(quantization_config, dict):
            quantization_config = VQConfig.from_dict(quantization_config)
        if not isinstance(quantization_config, VQConfig):
            raise TypeError(f"HfVQQuantizer needs a hf_vq.VQConfig, not {type(quantization_config).__name__}.")
        super().__init__(quantization_config, **kwargs)
        self.base_model: str | None = None
        self.fidelity: dict[str, Any] | None = None
        self._vq_hidden = None  # handle of the state-dict hook hiding the VQ tensors hf_vq reads itself

    # ------------------------------------------------------------------ abstract API
    def is_serializable(self, **kwargs: Any) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_qat_trainable(self) -> bool:
        """Codebooks (and every dense parameter) train with `Trainer`; the uint8 codes are buffers and stay frozen."""
        return True

    # ------------------------------------------------------------------ loading
    def update_parallel_plan(self, model: nn.Module, plan: dict[str, str]) -> None:
        """Nothing to add: hf_vq declares no `serialized_names`, so the base method (which walks every
        parameter name through a regex, twice per load) would only confirm an unchanged plan."""
        if self.serialized_names:  # pragma: no cover - hf_vq declares none
            super().update_parallel_plan(model, plan)

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        if self.pre_quantized and not self.quantization_config.is_quantized:
            raise CheckpointError(
                "config.json has an hf_vq quantization_config without 'modules' (the per-module layout), so the "
                "compressed layers cannot be rebuilt. Re-save the model with save_pretrained, or to compress a dense "
                "model pass quantization_config=VQConfig(...) to from_pretrained on the dense checkpoint."
            )

    def _process_model_before_weight_loading(self, model: nn.Module, checkpoint_files: list[str] | None = None,
                                             device_map: Any = None, **kwargs: Any) -> nn.Module:
        """Pre-quantized: swap in empty VQ modules (on meta) for codes and codebooks to be loaded into.

        On one device (no `device_map`, or one that puts everything on a single device) hf_vq reads the checkpoint
        itself, here, straight from the safetensors files ([`load_tensors_`]): codes, codebooks and every other
        tensor stored under the model's own name and shape, which it keeps out of the state dict transformers loads
        (transformers' loader costs about as much per tensor however small the tensor, and a compressed checkpoint
        is mostly small tensors). Tied weights, tensors the file stores under another shape or dtype, and
        everything with a multi-device or offloading `device_map`, under tensor parallelism, or with fp32 modules
        kept in a half-precision model (`_keep_in_fp32_modules`) load through transformers as usual.
        """
        if not self.pre_quantized:
            return model  # dense weights load as usual; they are compressed after loading
        with _without_torch_function():  # transformers calls this under its meta-device mode; devices are explicit here
            return self._build_and_read(model, checkpoint_files, device_map)

    def _build_and_read(self, model: nn.Module, checkpoint_files: list[str] | None, device_map: Any) -> nn.Module:
        from ..quantize import build_skeleton_

        config = self.quantization_config = _fit_layout(model, self.quantization_config)
        build_skeleton_(model, config)
        # one pattern per kind of key (transformers compiles and tries every pattern on every unexpected key)
        unexpected = {"^" + re.escape(GUARD_NOTE_KEY.split(" - ")[0])}
        if checkpoint_files:
            device = _single_device(device_map)
            if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
                device = None  # tensor parallelism shards tensors in transformers' loader
            keep_fp32 = getattr(model, "_keep_in_fp32_modules", None) or getattr(model, "_keep_in_fp32_modules_strict", None)
            if device is not None and keep_fp32 and getattr(model, "dtype", torch.float32) != torch.float32:
                device = None  # transformers' per-pattern dtype plan decides these tensors' dtypes
            state = model.state_dict(keep_vars=True)  # on meta: the skeleton's names, shapes and dtypes
            others = _readable_tensors(model, config, state) if device is not None else None
            sources, foreign = check_checkpoint_files(checkpoint_files, config, others=others,
                                                      rename=_checkpoint_key_renamer(model, self, state))
            if device is not None:
                load_tensors_(model, sources, device)
                # transformers loads (or, absent from the file, re-initialises) what `model.state_dict()` lists:
                # what hf_vq read stays out of it until the weights are loaded ...
                register = getattr(model, "register_state_dict_post_hook", None) or model._register_state_dict_hook
                self._vq_hidden = register(_drop_keys(set(sources)))  # older torch: only the private name
                # ... and is "unexpected" to it: every key but those the model has no tensor for (a dropped head,
                # reported as usual); one short pattern, whatever the number of keys hf_vq read
                unexpected.add(f"^(?!(?:{'|'.join(map(re.escape, sorted(foreign)))})$)" if foreign else "^")
        unexpected.add(rf"^(?:{_names_pattern(config.modules)}){re.escape(_GUARD_SUFFIX)}$")
        _tie_(model, config)
        for name in config.modules:
            # codes and codebooks come from the checkpoint, never from `_init_weights` (which would decode
            # the still-empty codes of tied modules, re-aliased to their owner's after loading)
            model.get_submodule(name)._is_hf_initialized = True
        model._keys_to_ignore_on_load_unexpected = set(model._keys_to_ignore_on_load_unexpected or ()) | unexpected
        return model

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        """Pre-quantized: re-tie and check what was loaded. Otherwise: compress the loaded dense model."""
        if self.pre_quantized:
            config = self.quantization_config
            if self._vq_hidden is not None:
                self._vq_hidden.remove()
                self._vq_hidden = None
            attach_(model, config)  # re-ties: every member of a shared set holds the one loaded parameter
            _check_loaded(model, config)
        else:
            from ..quantize import quantize_

            self.base_model = _hub_id(getattr(model.config, "name_or_path", None))
            config = quantize_(model, self.quantization_config, progress=True)
            attach_(model, config)
        return model

    def _dequantize(self, model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
        from ..quantize import dequantize_

        return dequantize_(model)  # also detaches the quantizer (see `detach_`)

    # ------------------------------------------------------------------ saving
    def get_state_dict_and_metadata(self, model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """The tensors `save_pretrained` writes: codebooks in fp16, tied modules once, plus the two guard tensors."""
        config = self.quantization_config
        vq = {name for name, m in model.named_modules(remove_duplicate=False) if isinstance(m, VQModuleMixin)}
        tied = {name for name, layout in config.layouts.items() if layout.tied_to is not None}
        skip = {f"{name}.{suffix}" for name in tied for suffix in (CODES, CODEBOOKS)}
        skip |= {f"{name}.{CODEBOOKS}" for name, layout in config.layouts.items() if layout.codebook_set is not None}
        codebooks = {f"{name}.{CODEBOOKS}" for name in vq}
        state_dict: dict[str, torch.Tensor] = {}
        for key, tensor in model.state_dict().items():
            if key in skip:
                continue  # tied modules and members of a shared set: their tensors are stored once, elsewhere
            if (key in codebooks or is_shared_codebooks_key(key)) and tensor.is_floating_point():
                tensor = tensor.to(torch.float16)  # [M, k, d]; quantize_ already rounded them to fp16
            state_dict[key] = tensor
        owner = next((name for name in config.modules if name not in tied), None)
        if owner is not None:
            state_dict[owner + _GUARD_SUFFIX] = torch.zeros(1, dtype=torch.float16)  # mismatches the dense [out, in]
            state_dict[GUARD_NOTE_KEY] = torch.zeros(1, dtype=torch.uint8)
        metadata = {"hf_vq_format_version": str(config.version), "hf_vq_spec": config.spec,
                    "hf_vq_note": "load with transformers after `import hf_vq` (pip install hf_vq)"}
        return state_dict, metadata


# ---------------------------------------------------------------------------------------------- registration
def register() -> None:
    """Register [`VQConfig`] and [`HfVQQuantizer`] with transformers under `"hf_vq"` (idempotent).

    transformers' `register_quantization_config` / `register_quantizer` refuse a name twice, so an
    existing registration is checked first (and replaced if it is a stale class, e.g. after a reload).
    """
    for mapping, cls, decorator in ((AUTO_QUANTIZATION_CONFIG_MAPPING, VQConfig, register_quantization_config),
                                    (AUTO_QUANTIZER_MAPPING, HfVQQuantizer, register_quantizer)):
        current = mapping.get(QUANT_METHOD)
        if current is cls:
            continue
        if current is not None:
            logger.warning("hf_vq: replacing %r registered with transformers under %r.", current, QUANT_METHOD)
            del mapping[QUANT_METHOD]
        decorator(QUANT_METHOD)(cls)


# ---------------------------------------------------------------------------------------------- model state
def _pretrained_models(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The transformers models in `model` (itself, its base model, ...) with their names ("" for `model`)."""
    from transformers import PreTrainedModel

    return [(name, m) for name, m in model.named_modules() if isinstance(m, PreTrainedModel)]


def attach_(model: nn.Module, config: VQConfig) -> HfVQQuantizer | None:
    """Make a transformers model compressed by [`hf_vq.quantize_`] a quantized transformers model (in place).

    Called by `quantize_` and by the quantizer itself: sets `model.hf_quantizer`,
    `model.config.quantization_config`, ties VQ modules that share a weight through their codebooks,
    and installs `save_pretrained` / `push_to_hub` that also write hf_vq's model card. A no-op (returns
    `None`) for models that are not transformers `PreTrainedModel`s.

    Raises:
        `ValueError`: if the model is already quantized with another method.
    """
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        return None
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        quantizer = HfVQQuantizer(config, pre_quantized=True)
        model.hf_quantizer = quantizer
    elif not isinstance(quantizer, HfVQQuantizer):
        raise ValueError(
            f"This model is already quantized with {quantizer.quantization_config.quant_method!r}; hf_vq compresses "
            "dense models only. Load the dense checkpoint instead."
        )
    quantizer.quantization_config = config
    model.config.quantization_config = config
    model.is_quantized = True
    model.quantization_method = QUANT_METHOD
    for _, sub in _pretrained_models(model):
        sub.config._is_quantized = True
    _tie_(model, config)
    model.save_pretrained = types.MethodType(_save_pretrained, model)
    model.push_to_hub = types.MethodType(_push_to_hub, model)
    return quantizer


def detach_(model: nn.Module) -> None:
    """Undo [`attach_`] on a model whose VQ modules were dequantized (restores the dense weight ties)."""
    quantizer = getattr(model, "hf_quantizer", None)
    if not isinstance(quantizer, HfVQQuantizer):
        return
    for _, sub in _pretrained_models(model):
        original = sub.__dict__.pop("_hf_vq_tied_keys", None)
        if original is not None:
            sub.all_tied_weights_keys = original
            sub.__dict__.pop("_tied_weights_keys", None)
        sub.config._is_quantized = False
    for name in ("save_pretrained", "push_to_hub"):
        model.__dict__.pop(name, None)
    quantizer.remove_quantization_config(model)


def _tie_(model: nn.Module, config: VQConfig) -> None:
    """Share codes and codebooks of tied VQ modules; move transformers' weight ties onto `codebooks`.

    The tied module's `codes` buffer aliases its owner's and is non-persistent (stored once); its
    `codebooks` is the owner's parameter, and transformers re-ties it after loading (`tie_weights`).
    """
    from ..quantize import shared_codebooks_owner

    modules = dict(model.named_modules(remove_duplicate=False))
    for name, layout in config.layouts.items():
        if layout.tied_to is None or name not in modules or layout.tied_to not in modules:
            continue
        module, owner = modules[name], modules[layout.tied_to]
        module._buffers[CODES] = owner._buffers[CODES]  # uint8 [rows, packed_bytes]
        module._non_persistent_buffers_set.add(CODES)
        module._parameters[CODEBOOKS] = owner._parameters[CODEBOOKS]  # [M, k, d]
    holder = shared_codebooks_owner(model)
    holder_name = next((n for n, m in modules.items() if m is holder), "")
    shared_ties: dict[str, str] = {}  # "<member>.codebooks" -> "<holder>.vq_shared_codebooks_<set>", from the model
    for set_name, names in config.codebook_sets.items():
        key = shared_codebooks_key(set_name)
        param = holder._parameters.get(key)
        if param is None:
            continue
        for name in names:
            if isinstance(modules.get(name), VQModuleMixin):
                modules[name].share_codebooks_(param, set_name)  # [M, k, d], the one Parameter of the set
                shared_ties[f"{name}.{CODEBOOKS}"] = f"{holder_name}.{key}" if holder_name else key
    for prefix, sub in _pretrained_models(model):
        original = sub.__dict__.get("_hf_vq_tied_keys")
        if original is None:
            original = dict(getattr(sub, "all_tied_weights_keys", None) or {})
            sub._hf_vq_tied_keys = original
        translated = {}
        for target, source in original.items():
            target_vq, source_vq = _vq_weight_owner(sub, target), _vq_weight_owner(sub, source)
            if target_vq and source_vq:
                translated[f"{target_vq}.{CODEBOOKS}"] = f"{source_vq}.{CODEBOOKS}"
            elif not (target_vq or source_vq):
                translated[target] = source
        for target, source in shared_ties.items():
            if not prefix:
                translated[target] = source
            elif target.startswith(prefix + ".") and source.startswith(prefix + "."):
                translated[target[len(prefix) + 1:]] = source[len(prefix) + 1:]
        sub.all_tied_weights_keys = translated
        sub._tied_weights_keys = dict(translated)  # what tie_weights(recompute_mapping=True) expands


def _vq_weight_owner(model: nn.Module, key: str) -> str | None:
    """`"lm_head"` for `key = "lm_head.weight"` when `lm_head` is a VQ module, else None."""
    module_name, _, attr = key.rpartition(".")
    if attr != "weight":
        return None
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        return None
    return module_name if isinstance(module, VQModuleMixin) else None


# ---------------------------------------------------------------------------------------------- checks
def _fit_layout(model: nn.Module, config: VQConfig) -> VQConfig:
    """The layout with module names as `model` has them (transformers' `base_model_prefix` rule).

    A checkpoint of `BertForMaskedLM` names `bert.encoder...`; loaded as `BertModel` the modules are
    `encoder...` (and the other way round). Head modules of the checkpoint that a base model lacks are
    dropped, as transformers drops their weights. Other unknown names are kept: `build_skeleton_` refuses them.
    """
    names = {name for name, _ in model.named_modules(remove_duplicate=False)}
    prefix = getattr(model, "base_model_prefix", "") or ""
    if not prefix or all(name in names for name in config.modules):
        return config
    is_base = getattr(model, "base_model", model) is model
    renamed: dict[str, str | None] = {}
    for name in config.modules:
        if name in names:
            renamed[name] = name
        elif name.startswith(prefix + ".") and name[len(prefix) + 1:] in names:
            renamed[name] = name[len(prefix) + 1:]
        elif f"{prefix}.{name}" in names:
            renamed[name] = f"{prefix}.{name}"
        else:
            renamed[name] = None if is_base and not name.startswith(prefix + ".") else name
    modules = {}
    for name, data in config.modules.items():
        if renamed[name] is None:
            continue
        data = dict(data)
        if data.get("tied_to") is not None:
            data["tied_to"] = renamed.get(data["tied_to"], data["tied_to"])
            if data["tied_to"] is None:  # the owner was a dropped head: this module owns the tensors now
                raise CheckpointError(f"quantization_config.modules[{name!r}] is tied to a head module that "
                                      f"{type(model).__name__} does not have; load it with the checkpoint's own class.")
        modules[renamed[name]] = data
    dropped = sorted(n for n, new in renamed.items() if new is None)
    if dropped:
        logger.warning("hf_vq: %s has no module %s of the checkpoint (a head); its tensors are not loaded.",
                       type(model).__name__, dropped)
    return VQConfig.from_dict({**config.to_dict(), "modules": modules})


def _checkpoint_key_renamer(model: nn.Module, quantizer: HfQuantizer, state: Mapping[str, Any]):
    """Map a checkpoint key to the model's name for it, as transformers' loader does (renamings, prefix).

    Keys that already name a tensor of the model (a key of its `state`, `model.state_dict(keep_vars=True)` on
    meta) are returned as they are; transformers' conversion mapping (which costs a few ms to build) is only
    built for the first key that does not.
    """

    @functools.cache
    def transformers_rename():
        try:
            from transformers.conversion_mapping import get_model_conversion_mapping
            from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

            mapping = get_model_conversion_mapping(model, None, quantizer)
        except (ImportError, AttributeError, TypeError):  # internals moved: compare names as they are
            return lambda key: key
        renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
        converters = [m for m in mapping if isinstance(m, WeightConverter)]
        prefix = getattr(model, "base_model_prefix", None)

        return lambda key: rename_source_key(key, renamings, converters, prefix, state)[0]

    return lambda key: key if key in state else transformers_rename()(key)


def _names_pattern(names: Any) -> str:
    """A regex alternation matching every module name in `names` (layer indices generalised to `\\d+`, so a
    deep model gives a short pattern: transformers compiles the ignore patterns on every load)."""
    generic = dict.fromkeys(re.sub(r"\\\.\d+(?=\\\.|$)", r"\\.\\d+", re.escape(name)) for name in names)
    return "|".join(generic)


def check_checkpoint_files(files: list[str], config: VQConfig, *, rename=None,
                           others: dict[str, torch.Tensor] | None = None
                           ) -> tuple[dict[str, tuple[str, str]], set[str]]:
    """Check, from the safetensors headers only, that every compressed module has its codes and codebooks.

    Args:
        files (`list[str]`): the checkpoint's safetensors files (all shards).
        config ([`VQConfig`]): the quantization config with the per-module layout.
        rename (`Callable[[str], str]`, *optional*): maps a key as stored to the model's name for it
            (transformers renames legacy keys, e.g. ViT's, and adds or strips `base_model_prefix`).
        others (`dict[str, torch.Tensor]`, *optional*): the model's other tensors to locate too, model key ->
            its empty (meta) tensor. One stored with that shape and a matching dtype (float for float, the same
            otherwise) is located; one of a compressed module (its bias) stored otherwise is an error; any other
            is left out (transformers loads it, or reports the mismatch).

    Returns:
        `tuple[dict[str, tuple[str, str]], set[str]]`: for every stored VQ tensor (codes, own codebooks, shared
        sets) and every located tensor of `others`, the model's key -> (file, key as stored); and the stored
        keys (as the model would name them) that are neither, nor hf_vq's guard tensors.

    Raises:
        [`CheckpointError`]: naming the missing or misshapen tensor, its module and the fix.
    """
    from safetensors import SafetensorError, safe_open

    others = others or {}
    entries: list[tuple[str, str, tuple[int, ...], str]] = []  # (stored key, dtype, shape, file)
    for file in files:
        if not str(file).endswith(".safetensors"):
            raise CheckpointError(
                f"{file}: hf_vq checkpoints are safetensors only (nothing pickled is loaded); re-save the model "
                "with save_pretrained."
            )
        try:
            with safe_open(str(file), framework="pt") as f:
                for stored in f.keys():
                    sl = f.get_slice(stored)
                    entries.append((stored, sl.get_dtype(), tuple(sl.get_shape()), str(file)))
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{file} is truncated or corrupted ({err}); re-download it or save the model again.") from None
    header: dict[str, tuple[str, tuple[int, ...], str, str]] = {}  # model key -> (dtype, shape, file, stored key)
    renamed = False  # whether the checkpoint names VQ tensors differently from the model (prefix, legacy names)
    plain = []  # entries of tensors other than codes / codebooks
    for entry in entries:
        stored = entry[0]
        if stored.endswith((f".{CODES}", f".{CODEBOOKS}")) or is_shared_codebooks_key(stored):
            key = stored if rename is None else rename(stored)
            renamed |= key != stored
            header[key] = (*entry[1:], stored)
        else:
            plain.append(entry)
    guards = {GUARD_NOTE_KEY} | {name + _GUARD_SUFFIX for name in config.modules}
    for stored, dtype, shape, file in plain:
        if stored not in guards:  # renamed VQ keys mean the other tensors are named differently too
            header[rename(stored) if renamed else stored] = (dtype, shape, file, stored)
    where = os.path.basename(str(files[0])) if len(files) == 1 else "the checkpoint shards"
    sources: dict[str, tuple[str, str]] = {}
    for name, layout in config.layouts.items():
        if layout.tied_to is not None:
            continue
        (codes_key, codes_shape), (codebooks_key, codebooks_shape) = expected_shapes(name, layout, header).items()
        expected = {codes_key: ({"U8"}, codes_shape), codebooks_key: (_FLOAT_DTYPES, codebooks_shape)}
        for key, (dtypes, shape) in expected.items():
            if key not in header:
                raise CheckpointError(
                    f"{where} lacks the tensor {key!r} of compressed module {name!r} (config.json lists it in "
                    "quantization_config.modules). The file is incomplete or belongs to another config; re-download "
                    "or re-save the model."
                )
            dtype, got, file, stored = header[key]
            if got != shape or dtype not in dtypes:
                raise CheckpointError(
                    f"{os.path.basename(file)}: tensor {key!r} is {dtype} {list(got)}, expected "
                    f"{'/'.join(sorted(dtypes))} {list(shape)} for module {name!r} (k={layout.k}, d={layout.d}, weight "
                    f"{list(layout.shape)}). The checkpoint does not match its config.json; re-save the model."
                )
            sources[key] = (file, stored)
    for key, empty in others.items():
        if key not in header:
            continue
        dtype, got, file, stored = header[key]
        dtypes = _FLOAT_DTYPES if empty.is_floating_point() else {_DTYPE_NAMES.get(empty.dtype)}
        if got == tuple(empty.shape) and dtype in dtypes:
            sources[key] = (file, stored)
        elif key.rpartition(".")[0] in config.modules:
            raise CheckpointError(
                f"{os.path.basename(file)}: tensor {key!r} is {dtype} {list(got)}, expected "
                f"{'a float tensor' if empty.is_floating_point() else dtypes.pop()} {list(empty.shape)} (of compressed "
                f"module {key.rpartition('.')[0]!r}). The checkpoint does not match its config.json; re-save the model."
            )
    return sources, set(header) - set(sources)


def _readable_tensors(model: nn.Module, config: VQConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors of `model` hf_vq can read itself besides codes and codebooks, model key -> empty tensor, from
    its `state` (`state_dict(keep_vars=True)`): all but tied weights (transformers ties them after loading)."""
    tied = set()
    for prefix, sub in _pretrained_models(model):
        for target, source in (getattr(sub, "all_tied_weights_keys", None) or {}).items():
            tied |= {f"{prefix}.{target}" if prefix else target, f"{prefix}.{source}" if prefix else source}
    vq = {f"{name}.{attr}" for name in config.layouts for attr in (CODES, CODEBOOKS)}
    return {key: t for key, t in state.items() if key not in tied and key not in vq and not is_shared_codebooks_key(key)}


def _single_device(device_map: Any) -> torch.device | None:
    """The one device a (normalised) `device_map` loads everything on, or None (several, offloading, or "auto")."""
    if device_map is None:
        return torch.device("cpu")  # transformers' default
    if isinstance(device_map, (torch.device, int, str)):
        device_map = {"": device_map}
    if not isinstance(device_map, dict):
        return None
    devices = {str(torch.device(d) if isinstance(d, int) and not isinstance(d, bool) else d) for d in device_map.values()}
    if len(devices) != 1 or devices & {"disk", "auto", "balanced", "balanced_low_0", "sequential"}:
        return None
    return torch.device(devices.pop())


def _without_torch_function():
    """A context without `__torch_function__` handling: transformers builds the model under a meta-device mode that
    intercepts every torch call (a Python round trip each); the skeleton names its devices itself."""
    disable = getattr(torch._C, "DisableTorchFunction", None)  # private, stable since torch 1.x; optional
    return disable() if disable is not None else contextlib.nullcontext()


def _drop_keys(keys: set[str]):
    """A state-dict post hook leaving `keys` out of the model's own (top-level) `state_dict()`."""

    def hook(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
        if not prefix:
            for key in keys & state_dict.keys():
                del state_dict[key]

    return hook


def load_tensors_(model: nn.Module, sources: dict[str, tuple[str, str]], device: torch.device) -> None:
    """Read tensors straight from the safetensors files into the (meta) skeleton of `model`, marked as initialised.

    Float tensors take the dtype (and parameters their `requires_grad`) of the empty tensor they replace (the
    dtype the model is loaded in); others (codes, integer buffers) keep their stored dtype. Tied modules and
    members of shared sets are (re-)tied afterwards (`_tie_`).

    Args:
        sources (`dict[str, tuple[str, str]]`): model key -> (file, key as stored), from [`check_checkpoint_files`].
        device (`torch.device`): where the tensors go (the one device the model is loaded on).

    Raises:
        [`CheckpointError`]: if a file cannot be read.
    """
    by_file: dict[str, list[tuple[str, str]]] = {}
    for key, (file, stored) in sources.items():
        by_file.setdefault(file, []).append((key, stored))
    modules = dict(model.named_modules(remove_duplicate=False))
    for file, items in by_file.items():
        tensors = load_weights(file, keys={stored for _, stored in items})  # CPU, one read per file
        for key, stored in items:
            module_name, _, attr = key.rpartition(".")
            module = modules[module_name]
            tensor = tensors[stored] if device.type == "cpu" else tensors[stored].to(device)
            is_buffer = attr in module._buffers  # codes uint8 [rows, packed_bytes], running statistics, ...
            empty = module._buffers[attr] if is_buffer else module._parameters[attr]  # on meta, in the load dtype
            if empty.is_floating_point() and tensor.dtype != empty.dtype:
                tensor = tensor.to(empty.dtype)
            if is_buffer:
                module._buffers[attr] = tensor
            else:  # codebooks [M, k, d] (shared sets on their holder), biases, norms, embeddings, ...
                tensor = module._parameters[attr] = nn.Parameter(tensor, requires_grad=empty.requires_grad)
            tensor._is_hf_initialized = True


def _check_loaded(model: nn.Module, config: VQConfig) -> None:
    """After loading: every VQ module is filled (not meta) and its codes are < k."""
    modules = dict(model.named_modules(remove_duplicate=False))
    for name, layout in config.layouts.items():
        module = modules[name]
        for key, tensor in ((CODES, module.codes), (CODEBOOKS, module.codebooks)):
            if layout.tied_to is None and not getattr(tensor, "_is_hf_initialized", False):
                raise CheckpointError(
                    f"The checkpoint did not provide '{name}.{key}' of compressed module {name!r} (the loader left "
                    "it uninitialised). The file is incomplete or belongs to another config; re-save the model."
                )
        if layout.tied_to is None and layout.k != 2 ** bits_for(layout.k):  # with k = 2**bits every code is valid
            try:
                module.unpacked_codes()
            except CodesError as err:
                raise CheckpointError(
                    f"Tensor '{name}.{CODES}' of compressed module {name!r} is corrupted: {err} Re-download the "
                    "checkpoint or compress the model again."
                ) from None


def _hub_id(ref: Any) -> str | None:
    """`ref` if it names a Hub repo (`org/name`), not a local folder."""
    if not isinstance(ref, str) or os.path.isdir(ref) or ref.startswith((".", "/", "~")):
        return None
    return ref if re.fullmatch(r"[\w.-]+/[\w.-]+", ref) else None


# ---------------------------------------------------------------------------------------------- saving with a card
def _local_dir(ref: Any) -> str | None:
    return ref if isinstance(ref, str) and os.path.isdir(ref) else None


def _model_card(model: nn.Module, folder: str | os.PathLike, *, repo_id: str | None = None,
                tags: list[str] | None = None):
    from ..checkpoint import checkpoint_size_report
    from .hub import compression_record, render_model_card

    quantizer: HfVQQuantizer = model.hf_quantizer
    return render_model_card(
        base_model=quantizer.base_model, library_name="transformers", config=quantizer.quantization_config,
        size=checkpoint_size_report(folder), repo_id=repo_id, fidelity=quantizer.fidelity, extra_tags=tags,
        **compression_record(model),
        source_dir=_local_dir(getattr(model.config, "_name_or_path", None)),  # the dense folder: licence lookup
    )


def _save_pretrained(self, save_directory: str | os.PathLike, *args: Any, push_to_hub: bool = False,
                     **kwargs: Any) -> None:
    """`PreTrainedModel.save_pretrained`, then hf_vq's model card (README.md) next to the weights.

    With `push_to_hub=True` the card is written before the upload, so the Hub repo gets it too.
    """
    from transformers.utils.hub import hf_api

    card_tags = kwargs.pop("tags", None)
    if push_to_hub:
        repo_id = kwargs.pop("repo_id", None) or Path(os.fspath(save_directory)).name
        commit_message = kwargs.pop("commit_message", None)
        create_pr = kwargs.pop("create_pr", False)
        token = kwargs.get("token")
        repo_id = hf_api().create_repo(repo_id, exist_ok=True, token=token,
                                       private=kwargs.pop("private", None)).repo_id
        timestamps = self._get_files_timestamps(save_directory) if os.path.isdir(save_directory) else {}
    type(self).save_pretrained(self, save_directory, *args, **kwargs)
    if self.should_save_on_this_rank(kwargs.get("is_main_process", True)):
        card = _model_card(self, save_directory, repo_id=repo_id if push_to_hub else None, tags=card_tags)
        card.save(os.path.join(save_directory, "README.md"))
    if push_to_hub:
        self._upload_modified_files(save_directory, repo_id, timestamps, commit_message=commit_message, token=token,
                                    create_pr=create_pr)


def _push_to_hub(self, repo_id: str, *, commit_message: str | None = None, commit_description: str | None = None,
                 private: bool | None = None, token: bool | str | None = None, revision: str | None = None,
                 create_pr: bool = False, max_shard_size: int | str | None = "50GB",
                 tags: list[str] | None = None) -> Any:
    """`PushToHubMixin.push_to_hub` that uploads hf_vq's model card instead of transformers' generic one."""
    from transformers.utils.hub import hf_api

    repo_id = hf_api().create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory() as tmp:
        type(self).save_pretrained(self, tmp, max_shard_size=max_shard_size)
        _model_card(self, tmp, repo_id=repo_id, tags=tags).save(os.path.join(tmp, "README.md"))
        return self._upload_modified_files(tmp, repo_id, files_timestamps={}, commit_message=commit_message,
                                           token=token, create_pr=create_pr, revision=revision,
                                           commit_description=commit_description)
