"""Size accounting of compressed models: the paper's convention, per layer and in total, and where a file's bytes go.

Accounted sizes: codes at ceil(log2 k) bits, fp16 codebooks and scales, every other tensor at its stored width,
BatchNorm running statistics folded away; the dense reference is fp32. [`SizeReport.file_breakdown`] says how the
bytes of the weights file split (codes, codebooks, other tensors, folded statistics the file still stores, the
safetensors header), so the ratio of file to accounted size is explained, not only stated.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import LayerLayout, VQConfig
from ..nn import VQModuleMixin
from .format import (CODEBOOKS, CODES, FOLDED_SUFFIXES, SAFETENSORS_DTYPES, SCALES, WEIGHTS_NAME,
                     is_shared_codebooks_key)
from .pin import PinnedFolder, shown
from .read import check_same_save, read_header, read_quantization_config, weight_files
from .state_dict import disk_state_dict
from .validate import check_stored_tensors

__all__ = ["LayerSize", "SizeReport", "size_report", "checkpoint_size_report"]


@dataclass
class LayerSize:
    """Size of one compressed module."""

    name: str
    kind: str
    shape: tuple[int, ...]
    k: int
    d: int
    num_codebooks: int
    dense_bits: int
    compressed_bits: int
    rel_error: float | None = None
    scales: bool = False

    @property
    def bits_per_weight(self) -> float:
        return self.compressed_bits / max(1, math.prod(self.shape))


@dataclass
class SizeReport:
    """Accounted sizes, paper convention: codes at ceil(log2 k) bits, fp16 codebooks, every other tensor at
    its stored width, BatchNorm running statistics folded away; the dense reference is fp32.

    A codebook set shared by several modules is counted once: its bits are split over its modules in
    proportion to their subvectors (so the rows add up to the total and `bits_per_weight` stays meaningful),
    and `shared` lists each set with its shape, bits and number of modules."""

    layers: list[LayerSize] = field(default_factory=list)
    dense_bits: int = 0
    compressed_bits: int = 0
    file_bytes: int | None = None
    #: Shared codebook sets (already included, once, in the layers' bits): set name -> (shape `[M, k, d]`,
    #: accounted bits, number of modules).
    shared: dict[str, tuple[tuple[int, int, int], int, int]] = field(default_factory=dict)
    #: Bytes of the weights file(s) by what they hold (see [`checkpoint_size_report`]); None for in-memory reports.
    file_breakdown: dict[str, int] | None = None

    @property
    def dense_mb(self) -> float:
        return self.dense_bits / 2**23

    @property
    def compressed_mb(self) -> float:
        return self.compressed_bits / 2**23

    @property
    def ratio(self) -> float:
        return self.dense_bits / max(1, self.compressed_bits)

    @property
    def file_over_accounted(self) -> float | None:
        return None if self.file_bytes is None else self.file_bytes * 8 / max(1, self.compressed_bits)

    def to_dict(self) -> dict[str, Any]:
        return {
            "dense_mb": round(self.dense_mb, 4), "compressed_mb": round(self.compressed_mb, 4),
            "ratio": round(self.ratio, 3), "file_bytes": self.file_bytes,
            "file_over_accounted": None if self.file_bytes is None else round(self.file_over_accounted, 4),
            "layers": [{"name": l.name, "kind": l.kind, "shape": list(l.shape), "k": l.k, "d": l.d,
                        "num_codebooks": l.num_codebooks, "bits_per_weight": round(l.bits_per_weight, 4),
                        "rel_error": l.rel_error, "scales": l.scales} for l in self.layers],
            "shared_codebooks": {name: {"shape": list(shape), "bits": bits, "modules": n}
                                 for name, (shape, bits, n) in self.shared.items()},
            "file_breakdown": self.file_breakdown,
        }

    def table(self) -> str:
        """A fixed-width per-layer table with totals."""
        lines = [f"{'module':<48} {'kind':<9} {'shape':<18} {'d':>3} {'k':>6} {'bits/w':>6} {'rel.err':>8}"]
        for l in self.layers:
            err = "" if l.rel_error is None else f"{l.rel_error:.4f}"
            lines.append(f"{l.name:<48} {l.kind:<9} {'x'.join(map(str, l.shape)):<18} {l.d:>3} {l.k:>6} "
                         f"{l.bits_per_weight:>6.3f} {err:>8}")
        for set_name, (shape, bits, n) in self.shared.items():
            lines.append(f"shared codebook set {set_name!r} {'x'.join(map(str, shape))} (fp16, stored once): "
                         f"{bits / 8 / 1024:.1f} KB for {n} modules (split over their rows above)")
        ratio = round(self.ratio, 3)  # the JSON's figure, so that both say the same
        lines.append(f"dense {self.dense_mb:.2f} MB (fp32) -> compressed {self.compressed_mb:.2f} MB: {ratio:.1f}x smaller")
        if self.file_bytes is not None:
            lines.append(f"{WEIGHTS_NAME}: {self.file_bytes / 2**20:.2f} MB on disk "
                         f"({self.file_over_accounted:.3f}x the accounted size)")
        if self.file_breakdown:
            parts = ", ".join(f"{what} {n / 2**20:.3f} MB" for what, n in self.file_breakdown.items() if n)
            lines.append(f"  file bytes: {parts}")
        return "\n".join(lines)


def _is_vq_key(key: str) -> bool:
    """A compressed module's own tensor or a shared set, by its name (also under renamed / legacy prefixes)."""
    return key.endswith((f".{CODES}", f".{CODEBOOKS}", f".{SCALES}")) or is_shared_codebooks_key(key)


def _set_shares(layouts: dict[str, LayerLayout], report: SizeReport) -> dict[str, int]:
    """Bits of each shared codebook set attributed to each member module (in proportion to its subvectors; the
    last member takes the rest, so the rows add up to the set); also records the sets in `report.shared`."""
    members: dict[str, list[str]] = {}
    for name, layout in layouts.items():
        if layout.codebook_set is not None and not layout.tied_to:
            members.setdefault(layout.codebook_set, []).append(name)
    shares: dict[str, int] = {}
    for set_name, names in members.items():
        first = layouts[names[0]]
        bits = first.num_codebooks * first.k * first.d * 16
        report.shared[set_name] = ((first.num_codebooks, first.k, first.d), bits, len(names))
        total = sum(layouts[n].n_subvectors for n in names)
        left = bits
        for i, name in enumerate(names):
            share = left if i == len(names) - 1 else min(left, bits * layouts[name].n_subvectors // max(1, total))
            shares[name], left = share, left - share
    return shares


def _report(layouts: dict[str, LayerLayout], tensors: dict[str, tuple[torch.dtype, tuple[int, ...]]]) -> SizeReport:
    report = SizeReport()
    shares = _set_shares(layouts, report)
    for name, layout in layouts.items():
        dense = 0 if layout.tied_to else math.prod(layout.shape) * 32
        compressed = layout.own_bits() + shares.get(name, 0)
        report.layers.append(LayerSize(name, layout.kind, layout.shape, layout.k, layout.d, layout.num_codebooks,
                                       dense, compressed, layout.rel_error, layout.scales))
        report.dense_bits += dense
        report.compressed_bits += compressed
    for key, (dtype, shape) in tensors.items():
        if _is_vq_key(key) or key.endswith(FOLDED_SUFFIXES) or not dtype.is_floating_point:
            continue
        if key.endswith(".weight") and f"{key[:-len('.weight')]}.{CODES}" in tensors:
            continue  # a compressed module has no weight: this is a loader's guard tensor (transformers)
        n = math.prod(shape)
        report.dense_bits += n * 32
        report.compressed_bits += n * torch.finfo(dtype).bits
    return report


def _breakdown(tensors: dict[str, tuple[torch.dtype, tuple[int, ...]]], file_bytes: int) -> dict[str, int]:
    """How the bytes of the weights file(s) split: codes, codebooks + scales, folded statistics (stored, not
    accounted), other tensors, and the rest (the safetensors header: tensor names, offsets, metadata)."""
    out = {"codes": 0, "codebooks and scales": 0, "other tensors": 0, "batchnorm statistics (folded when accounting)": 0}
    for key, (dtype, shape) in tensors.items():
        n = math.prod(shape) * dtype.itemsize
        if key.endswith(f".{CODES}"):
            out["codes"] += n
        elif _is_vq_key(key):
            out["codebooks and scales"] += n
        elif key.endswith(FOLDED_SUFFIXES):
            out["batchnorm statistics (folded when accounting)"] += n
        else:
            out["other tensors"] += n
    out["safetensors header and metadata"] = file_bytes - sum(out.values())
    return out


def size_report(model: nn.Module) -> SizeReport:
    """Accounted size of an in-memory compressed model (see [`SizeReport`])."""
    config: VQConfig | None = getattr(model, "vq_config", None)
    layouts = dict(config.layouts) if config is not None else {}
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, VQModuleMixin) and name not in layouts:
            layouts[name] = LayerLayout(module.vq_kind, module.weight_shape, module.k, module.d, module.num_codebooks,
                                        scales=module.scales is not None)
    tensors = {key: (t.dtype, tuple(t.shape)) for key, t in disk_state_dict(model).items()}
    return _report(layouts, tensors)


def checkpoint_size_report(folder: str | os.PathLike) -> SizeReport:
    """Accounted and on-disk size of a saved compressed folder (reads only the safetensors headers, after checking
    them against the layout: every compressed module's tensors present with their dtypes and shapes, all shards of
    one save).

    Raises:
        [`CheckpointError`]: if the folder is not a readable, complete hf_vq checkpoint (naming the file or tensor).
    """
    with PinnedFolder(folder) as pin:
        return _checkpoint_size_report(pin.root)


def _checkpoint_size_report(folder: Path) -> SizeReport:
    config = read_quantization_config(folder, with_record=False)
    paths = weight_files(folder)
    headers = [read_header(path) for path in paths]
    where = shown(paths[0]) if len(paths) == 1 else f"the checkpoint shards of {shown(folder)}"
    check_same_save(headers, where)
    entries = {key: entry for header in headers for key, entry in header.items()}
    check_stored_tensors(entries, config, where=where)
    tensors = {}
    for header in headers:
        for key, (dtype, shape) in header.items():
            tensors[key] = (SAFETENSORS_DTYPES.get(dtype, torch.uint8), shape)
    report = _report(config.layouts, tensors)
    report.file_bytes = sum(path.stat().st_size for path in paths)
    report.file_breakdown = _breakdown(tensors, report.file_bytes)
    return report
