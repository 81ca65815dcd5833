"""Tracing and channel-space discovery: which parameters of a model must share one permutation (PQF's coupled
layers), found from the model itself with `torch.export`. Knows nothing of VQ modules or the Hub."""

from .spaces import default_example_inputs, find_channel_spaces
from .tags import ChannelSpace, Ref

__all__ = ["ChannelSpace", "Ref", "default_example_inputs", "find_channel_spaces"]
