"""Channel spaces of any model, found by tracing: which parameters must share one permutation.

Two adjacent layers compute the same function when the output channels of the first (the *parents*:
conv / linear weight rows and bias, the norms and per-channel scales that follow) and the input
channels of the second (the *children*: weight columns) are permuted by the same permutation. A
*channel space* is everything that must share one permutation. hf_vq finds the spaces from the model
itself: it traces the model with `torch.export` on example inputs and propagates, through the ATen
graph, which tensor dimension carries which space ([`hf_vq.graph.rules`]):

* `linear` / `conv` / `addmm` (GPT-2's Conv1D) / `embedding` **create** a space (their output rows);
  what reads a tagged dimension through a weight is a **child**;
* per-channel operations pass a space through and their parameters follow it: BatchNorm (affine and
  running statistics), LayerNorm / RMSNorm over the channel dimension, depthwise convolutions,
  elementwise activations, per-channel scales and biases (layer scale, class token, position
  embeddings), pooling, padding and reductions over other dimensions;
* elementwise operations between two spaces **merge** them (residual additions, squeeze-excitation
  gates, gated MLPs); a contraction of two tagged dimensions (attention scores `q·k`) merges them too
  and gives an untagged result;
* reshapes keep a space when its channels stay contiguous; splitting it into heads (`[H*hd] -> [H, hd]`)
  restricts it to one permutation of `hd` shared by every head (so value rows and output-projection
  columns are permuted within each head, consistently, grouped-query attention included);
* anything else — an operation not understood, a concatenation or slice across channels, mixing with
  an unpermuted tensor, a parameter used in an unexpected way, an output returned to the user —
  **closes** the space: it is left in its original order (safe by default). The report says why.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..calibrate.batches import as_args_kwargs
from .analysis import Analysis
from .tags import ChannelSpace

__all__ = ["default_example_inputs", "find_channel_spaces"]


def default_example_inputs(model: nn.Module) -> tuple[tuple, dict] | None:
    """Example inputs to trace `model`: timm's `pretrained_cfg['input_size']`, transformers' main input.

    Transformers models are traced with `output_hidden_states=True` (the hidden states a user may ask for
    must keep their order) and `use_cache=False` (the key/value cache is internal state).

    Returns:
        `(args, kwargs)` or None when the inputs cannot be guessed (pass `example_inputs=`).
    """
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if isinstance(cfg, dict) and cfg.get("input_size"):
        return (torch.randn(2, *cfg["input_size"], device=device),), {}
    config = getattr(model, "config", None)
    main = getattr(model, "main_input_name", None)
    if config is None or main is None:
        return None
    import inspect

    params = inspect.signature(model.forward).parameters
    kwargs: dict[str, Any] = {}
    if main == "input_ids":
        vocab = getattr(config, "vocab_size", None) or 2
        ids = torch.randint(0, min(int(vocab), 1000), (2, 8), generator=torch.Generator().manual_seed(0)).to(device)
        kwargs["input_ids"] = ids
        if "attention_mask" in params:
            kwargs["attention_mask"] = torch.ones_like(ids)
        if getattr(config, "is_encoder_decoder", False) and "decoder_input_ids" in params:
            kwargs["decoder_input_ids"] = ids
    elif main == "pixel_values":
        size = getattr(config, "image_size", 224)
        size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
        kwargs["pixel_values"] = torch.randn(2, getattr(config, "num_channels", 3), *size, device=device)
    else:
        return None
    open_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    if "use_cache" in params or (open_kwargs and hasattr(config, "use_cache")):
        kwargs["use_cache"] = False
    if "output_hidden_states" in params or (open_kwargs and hasattr(config, "output_hidden_states")):
        kwargs["output_hidden_states"] = True
    return (), kwargs



def find_channel_spaces(model: nn.Module, example_inputs: Any = None) -> list[ChannelSpace]:
    """Trace `model` with `torch.export` and find every channel space (open or refused).

    Args:
        model (`nn.Module`): the dense model.
        example_inputs (*optional*): a tensor, a tuple of positional inputs, a dict of keyword inputs or
            `(args, kwargs)`; by default [`default_example_inputs`].

    Returns:
        `list[ChannelSpace]`: in graph order; `space.open` is False for refused ones (`space.reasons`).

    Raises:
        `ValueError`: if no example inputs are given and none can be guessed.
        `RuntimeError`: if `torch.export` cannot trace the model.
    """
    if example_inputs is None:
        inputs = default_example_inputs(model)
        if inputs is None:
            raise ValueError("no example inputs: pass example_inputs= (a tensor, a tuple or a dict of model inputs).")
    else:
        inputs = as_args_kwargs(example_inputs)
    args, kwargs = inputs
    was_training = model.training
    model.eval()
    try:
        ep = torch.export.export(model, args, kwargs, strict=False)
    except Exception as err:  # noqa: BLE001 - any tracing failure means: do not permute
        raise RuntimeError(f"torch.export could not trace the model: {type(err).__name__}: {str(err)[:300]}") from err
    finally:
        model.train(was_training)
    analysis = Analysis(ep)
    analysis.run()
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(dict(model.named_buffers(remove_duplicate=False)))
    return analysis.spaces(tensors)


