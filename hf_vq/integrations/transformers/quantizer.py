"""hf_vq as a transformers quantization method: `from_pretrained` compresses dense models and loads compressed ones.

`import hf_vq` registers [`HfVQQuantizer`] and the config under `quant_method = "hf_vq"` (as soon as transformers
is imported). Then

* `AutoModel.from_pretrained(dense, quantization_config=VQConfig(...))` loads the dense weights and
  compresses them in place with [`hf_vq.quantize_`] (progress bar per layer);
* `AutoModel.from_pretrained(compressed)` rebuilds the VQ modules on the meta device from the layout
  in config.json ([`hf_vq.nn.build_skeleton_`]) and loads codes and codebooks, nothing recomputed (on one
  device hf_vq reads the checkpoint itself, see [`hf_vq.integrations.transformers.loading`]);
* `save_pretrained` / `push_to_hub` write config.json with the `quantization_config`, safetensors
  (codebooks in fp16, tied modules once, sharded when large) and hf_vq's model card;
* `model.dequantize()` returns the dense model; `Trainer` fine-tunes the codebooks (codes stay frozen).

**Loading without hf_vq**: transformers skips an unknown `quant_method` with a warning and would return randomly
initialised layers. Every checkpoint written here carries two guard tensors: a one-element `<module>.weight`
whose shape mismatches the dense layer (transformers then raises), and a tensor whose *name* is the fix, listed in
transformers' load report. hf_vq ignores both.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.quantizers import HfQuantizer
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)

from ...config import VQConfig
from ...pipeline import dequantize_, hooks, quantize_
from ...nn import build_skeleton_
from ...nn import VQModuleMixin
from ...serialization import (CHECKSUMS_KEY, CheckpointError, checksums_json, disk_state_dict, metadata_for,
                              verify_files)
from .config import TransformersVQConfig
from .layers import register_layers
from .loading import (GUARD_NOTE_KEY, GUARD_SUFFIX, check_checkpoint_files, check_loaded, checkpoint_key_renamer,
                      compressed_biases, drop_keys, fit_layout, load_tensors_, names_pattern, pin_checkpoint_files,
                      pinned_config, readable_tensors, single_device, without_torch_function)
from .saving import install_savers_
from .tools import calibration_from_config
from .tying import pretrained_models, tie_, untie_

__all__ = ["QUANT_METHOD", "HfVQQuantizer", "register", "attach_", "detach_"]

logger = logging.getLogger(__name__)

QUANT_METHOD = "hf_vq"


# ---------------------------------------------------------------------------------------------- the quantizer
class HfVQQuantizer(HfQuantizer):
    """transformers quantizer of hf_vq (`quant_method = "hf_vq"`), registered by `import hf_vq`.

    Not instantiated by users: `from_pretrained` builds it from a [`VQConfig`] passed as
    `quantization_config=` (quantize on load) or read from config.json (pre-quantized checkpoint).

    Args:
        quantization_config ([`VQConfig`] or `dict`): the scheme, and for a compressed checkpoint the
            per-module layout (`modules`).
        pre_quantized (`bool`, defaults to `True`): whether the weights being loaded are already compressed.

    What the compression did (base model, calibration, fidelity) is the config's record
    ([`hf_vq.CompressionRecord`]), read back from the weights' metadata when loading.
    """

    requires_calibration = False

    def __init__(self, quantization_config: VQConfig | dict, **kwargs: Any) -> None:
        if isinstance(quantization_config, dict):
            quantization_config = VQConfig.from_dict(quantization_config)
        if not isinstance(quantization_config, VQConfig):
            raise TypeError(f"HfVQQuantizer needs a hf_vq.VQConfig, not {type(quantization_config).__name__}.")
        super().__init__(quantization_config, **kwargs)
        self._vq_hidden = None  # handle of the state-dict hook hiding the VQ tensors hf_vq reads itself
        self._pin = None  # the checkpoint folder, held at one version while it loads

    @property
    def base_model(self) -> str | None:
        """The dense model the weights come from (the config's record; `None` when unknown)."""
        record = getattr(self.quantization_config, "record", None)
        return None if record is None else record.base_model

    @property
    def fidelity(self) -> dict[str, Any]:
        """Agreement with the dense model recorded for these weights (the config's record)."""
        record = getattr(self.quantization_config, "record", None)
        return {} if record is None else dict(record.fidelity)

    # ------------------------------------------------------------------ abstract API
    def is_serializable(self, **kwargs: Any) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_compileable(self) -> bool:
        """VQ layers are a custom op under `torch.compile` (`hf_vq::vq_linear`): transformers may compile the
        forward (static-cache `generate`), as it does for dense models."""
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
        try:
            with without_torch_function():  # transformers calls this under its meta-device mode; devices are explicit
                return self._build_and_read(model, checkpoint_files, device_map)
        except BaseException:
            if self._pin is not None:  # the load fails: release the folder at once (a save may be waiting for it)
                self._pin.close()
                self._pin = None
            raise

    def _build_and_read(self, model: nn.Module, checkpoint_files: list[str] | None, device_map: Any) -> nn.Module:
        if checkpoint_files:  # one version of the folder for the whole load, even while a save replaces it
            self._pin = pin_checkpoint_files(checkpoint_files)
            if self._pin is not None:
                self.quantization_config = pinned_config(self._pin, self.quantization_config)
        config = self.quantization_config = fit_layout(model, self.quantization_config)
        build_skeleton_(model, config)
        # one pattern per kind of key (transformers compiles and tries every pattern on every unexpected key)
        unexpected = {"^" + re.escape(GUARD_NOTE_KEY.split(" - ")[0])}
        if checkpoint_files:
            device = single_device(device_map)
            if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
                device = None  # tensor parallelism shards tensors in transformers' loader
            keep_fp32 = getattr(model, "_keep_in_fp32_modules", None) or getattr(model, "_keep_in_fp32_modules_strict", None)
            if device is not None and keep_fp32 and getattr(model, "dtype", torch.float32) != torch.float32:
                device = None  # transformers' per-pattern dtype plan decides these tensors' dtypes
            state = model.state_dict(keep_vars=True)  # on meta: the skeleton's names, shapes and dtypes
            others = readable_tensors(model, config, state) if device is not None else None
            dense = {name for name, m in model.named_modules() if not isinstance(m, VQModuleMixin)}
            sources, foreign, record = check_checkpoint_files(
                checkpoint_files, config, others=others, rename=checkpoint_key_renamer(model, self, state),
                biases=compressed_biases(config, state), dense_modules=dense)
            config.record = record
            if device is not None:
                load_tensors_(model, sources, device)  # checksums checked while reading (HF_VQ_VERIFY)
                # transformers loads (or, absent from the file, re-initialises) what `model.state_dict()` lists:
                # what hf_vq read stays out of it until the weights are loaded ...
                register = getattr(model, "register_state_dict_post_hook", None) or model._register_state_dict_hook
                self._vq_hidden = register(drop_keys(set(sources)))  # older torch: only the private name
                # ... and is "unexpected" to it: every key but those the model has no tensor for (a dropped head,
                # reported as usual); one short pattern, whatever the number of keys hf_vq read
                unexpected.add(f"^(?!(?:{'|'.join(map(re.escape, sorted(foreign)))})$)" if foreign else "^")
            else:
                verify_files(checkpoint_files)  # transformers reads the tensors: check the files' bytes first
        unexpected.add(rf"^(?:{names_pattern(config.modules)}){re.escape(GUARD_SUFFIX)}$")
        tie_(model, config)
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
            if self._pin is not None:  # transformers has read the weights: a save may replace the folder now
                self._pin.close()
                self._pin = None
            if self._vq_hidden is not None:
                self._vq_hidden.remove()
                self._vq_hidden = None
            model.vq_config = config
            attach_(model, config)  # re-ties: every member of a shared set holds the one loaded parameter
            check_loaded(model, config)
        else:
            base = getattr(model.config, "name_or_path", None) or None
            calibration = calibration_from_config(self.quantization_config, base, model=model)
            config = quantize_(model, self.quantization_config, progress=True, base_model=base, calibration=calibration)
            attach_(model, config)
        return model

    def _dequantize(self, model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
        return dequantize_(model)  # also detaches the quantizer (see `detach_`)

    # ------------------------------------------------------------------ saving
    def get_state_dict_and_metadata(self, model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """What `save_pretrained` writes: hf_vq's one state-dict builder (codebooks and scales in fp16, tied modules
        and shared sets once) plus the two guard tensors; the metadata carries the format, the record and the
        checksum of every tensor ([`hf_vq.serialization.checksum`]).

        Raises:
            `ValueError`: if the model holds no compressed module (its config matched no layer).
        """
        config = self.quantization_config
        if not config.modules:
            raise ValueError(
                "This model holds no compressed module: its quantization config matched no layer (check "
                "modules_to_not_convert, overrides and block_size; 0 leaves a kind dense), so the checkpoint could not "
                "be loaded back. Nothing was written. Compress it with a config that selects layers, or call "
                "model.dequantize() and save the dense model."
            )
        state_dict = disk_state_dict(model, config, dedupe=False, to_cpu=False)  # transformers unties its own ties
        owner = next((name for name, layout in config.layouts.items() if layout.tied_to is None), None)
        if owner is not None:
            state_dict[owner + GUARD_SUFFIX] = torch.zeros(1, dtype=torch.float16)  # mismatches the dense [out, in]
            state_dict[GUARD_NOTE_KEY] = torch.zeros(1, dtype=torch.uint8)
        metadata = metadata_for(config)
        metadata.pop("format", None)  # transformers writes its own
        metadata["hf_vq_note"] = "load with transformers after `import hf_vq` (pip install hf_vq)"
        metadata[CHECKSUMS_KEY] = checksums_json(_as_stored(model, state_dict))
        return state_dict, metadata


def _as_stored(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors under the names (and in the form) transformers stores them: `save_pretrained` reverts the model's
    weight conversions (ViT's legacy key names, ...) after this quantizer hands it the state dict. Both namings are
    kept, so the checksums match the file either way (`save_original_format=False` keeps the model's names)."""
    try:
        from transformers.core_model_loading import revert_weight_conversion

        stored = revert_weight_conversion(model, dict(state_dict))
    except (ImportError, AttributeError, TypeError, ValueError, RuntimeError, KeyError):  # internals moved
        return state_dict
    return {**state_dict, **stored}


# ---------------------------------------------------------------------------------------------- registration
def register() -> None:
    """Register [`VQConfig`] and [`HfVQQuantizer`] with transformers under `"hf_vq"` (idempotent).

    transformers' `register_quantization_config` / `register_quantizer` refuse a name twice, so an
    existing registration is checked first (and replaced if it is a stale class, e.g. after a reload).
    """
    register_layers()
    hooks.register_model_hook("transformers", _TransformersHook())
    for mapping, cls, decorator in ((AUTO_QUANTIZATION_CONFIG_MAPPING, TransformersVQConfig, register_quantization_config),
                                    (AUTO_QUANTIZER_MAPPING, HfVQQuantizer, register_quantizer)):
        current = mapping.get(QUANT_METHOD)
        if current is cls:
            continue
        if current is not None:
            logger.warning("hf_vq: replacing %r registered with transformers under %r.", current, QUANT_METHOD)
            del mapping[QUANT_METHOD]
        decorator(QUANT_METHOD)(cls)


def attach_(model: nn.Module, config: VQConfig) -> HfVQQuantizer | None:
    """Make a transformers model compressed by [`hf_vq.quantize_`] a quantized transformers model (in place).

    Called when `quantize_` compresses a transformers model (through the pipeline's model hook) and by the
    quantizer itself: sets `model.hf_quantizer`, `model.config.quantization_config`, ties VQ modules that share a
    weight through their codebooks, and gives the model `save_pretrained` / `push_to_hub` that also write hf_vq's
    model card. A no-op (returns `None`) for models that are not transformers `PreTrainedModel`s.

    Raises:
        `ValueError`: if the model is already quantized with another method.
    """
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
    for _, sub in pretrained_models(model):
        sub.config._is_quantized = True
    tie_(model, config)
    install_savers_(model)
    return quantizer


def detach_(model: nn.Module) -> None:
    """Undo [`attach_`] on a model whose VQ modules were dequantized (restores the dense weight ties)."""
    quantizer = getattr(model, "hf_quantizer", None)
    if not isinstance(quantizer, HfVQQuantizer):
        return
    untie_(model)
    for _, sub in pretrained_models(model):
        sub.config._is_quantized = False
    for name in ("save_pretrained", "push_to_hub"):
        model.__dict__.pop(name, None)
    quantizer.remove_quantization_config(model)


class _TransformersHook:
    """Keeps a transformers `PreTrainedModel` in sync with its VQ state (registered with the pipeline)."""

    def compressed(self, model: nn.Module, config: VQConfig) -> None:
        attach_(model, config)

    def restored(self, model: nn.Module) -> None:
        detach_(model)
