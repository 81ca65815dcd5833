"""Calibration: capture what each layer sees on real inputs (statistics such as per-channel second moments), in
a form that follows a channel permutation by indexing. Pure torch: no VQ modules, no Hugging Face."""

from .batches import as_args_kwargs, calibration_batches, mean_pool, to_device, token_mask
from .hessian import HessianCollector, LayerStatistics, merge_statistics, permute_hessian
from .moments import entry_moments, input_moments, permute_moments

__all__ = ["as_args_kwargs", "calibration_batches", "mean_pool", "to_device", "token_mask", "entry_moments", "input_moments",
           "permute_moments", "HessianCollector", "LayerStatistics", "merge_statistics", "permute_hessian"]
