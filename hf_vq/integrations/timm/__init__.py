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
`block_size["depthwise"] > 0` (see [`fit_config`]) each subvector is one whole kernel (9 values for
3x3, 25 for 5x5), or part of one when d divides the kernel (d = 1: scalar codes). With bit
allocation to a target size they are candidates, and the allocator decides. Grouped convs that are
not depthwise are compressed like the dense conv of their kernel size, blocks running inside one
group's input channels. Layers whose row length the block size does not divide (e.g. a
squeeze-excite conv reading 6 channels) stay dense.
"""

from __future__ import annotations

from ...pipeline import fit_config
from .loading import ARCHITECTURE, BASE_ARG, register_entrypoint
from .saving import (base_architecture, eval_transform, is_architecture, load_dense, push_to_hub, save_compressed,
                     timm_config)

__all__ = ["ARCHITECTURE", "BASE_ARG", "load_dense", "fit_config", "timm_config", "save_compressed", "push_to_hub",
           "base_architecture", "eval_transform", "is_architecture", "register"]


def register() -> None:
    """Make `timm.create_model` load hf_vq checkpoints (the "hf_vq" entrypoint); called once timm is imported."""
    register_entrypoint()


register()  # importing the integration registers it (idempotent)
