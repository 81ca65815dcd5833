"""Keeping a transformers model and its VQ state in sync: the quantizer attached, and weight ties moved onto codebooks.

* **Tied modules** (input embedding ↔ LM head): transformers ties *parameters* named in
  `all_tied_weights_keys` (`lm_head.weight`), which a VQ module no longer has. The tie is moved to the
  `codebooks` parameter, and the tied copy of the uint8 `codes` buffer is aliased and kept out of the
  state dict, so the pair is stored once and stays one pair of tensors after loading and training.
* **Shared codebook sets** (`VQConfig(share="pool" | "global")`): the set is a parameter of the base model,
  `vq_shared_codebooks_<set>`, stored once; each member's `codebooks` is tied to it the same way (the tie
  mapping names `<member>.codebooks -> vq_shared_codebooks_<set>`), so loading re-ties every member to the
  one loaded parameter and the member keys are never reported missing.
"""

from __future__ import annotations

from torch import nn
from transformers import PreTrainedModel

from ...config import VQConfig, shared_codebooks_key
from ...nn import VQModuleMixin, shared_codebooks_owner
from ...serialization import CODEBOOKS, CODES, SCALES

__all__ = ["tie_", "untie_", "pretrained_models"]


def pretrained_models(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The transformers models in `model` (itself, its base model, ...) with their names ("" for `model`)."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, PreTrainedModel)]


def tie_(model: nn.Module, config: VQConfig) -> None:
    """Share codes and codebooks of tied VQ modules; move transformers' weight ties onto `codebooks`.

    The tied module's `codes` buffer aliases its owner's and is non-persistent (stored once); its
    `codebooks` is the owner's parameter, and transformers re-ties it after loading (`tie_weights`).
    """
    modules = dict(model.named_modules(remove_duplicate=False))
    for name, layout in config.layouts.items():
        if layout.tied_to is None or name not in modules or layout.tied_to not in modules:
            continue
        module, owner = modules[name], modules[layout.tied_to]
        module._buffers[CODES] = owner._buffers[CODES]  # uint8 [rows, packed_bytes]
        module._non_persistent_buffers_set.add(CODES)
        module._parameters[CODEBOOKS] = owner._parameters[CODEBOOKS]  # [M, k, d]
        if owner._parameters.get(SCALES) is not None:
            module._parameters[SCALES] = owner._parameters[SCALES]  # [rows]
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
    for prefix, sub in pretrained_models(model):
        original = sub.__dict__.get("_hf_vq_tied_keys")
        if original is None:
            original = dict(getattr(sub, "all_tied_weights_keys", None) or {})
            sub._hf_vq_tied_keys = original
        translated = {}
        for target, source in original.items():
            target_vq, source_vq = _vq_weight_owner(sub, target), _vq_weight_owner(sub, source)
            if target_vq and source_vq:
                translated[f"{target_vq}.{CODEBOOKS}"] = f"{source_vq}.{CODEBOOKS}"
                if sub.get_submodule(source_vq)._parameters.get(SCALES) is not None:
                    translated[f"{target_vq}.{SCALES}"] = f"{source_vq}.{SCALES}"
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


def untie_(model: nn.Module) -> None:
    """Undo [`tie_`]'s translation of transformers' weight ties (after the VQ modules were dequantized)."""
    for _, sub in pretrained_models(model):
        original = sub.__dict__.pop("_hf_vq_tied_keys", None)
        if original is not None:
            sub.all_tied_weights_keys = original
            sub.__dict__.pop("_tied_weights_keys", None)
