"""What is written to disk: the hf_vq checkpoint format, its size accounting, and safe loading.

A compressed folder is a regular Hugging Face model folder:

* `config.json` — the model's own config (transformers' or timm's) plus `quantization_config`, the
  full [`VQConfig`] including the per-module layout;
* `model.safetensors` — for every compressed module `<name>.codes` (uint8 `[rows, packed_bytes]`, codes
  bit-packed to exactly `ceil(log2 k)` bits) and `<name>.codebooks` (fp16 `[M, k, d]`), and every other
  tensor as-is. Tied modules are stored once. Nothing is ever pickled. A codebook set shared by several
  modules (`VQConfig(share="pool" | "global")`, format version 2) is one tensor `vq_shared_codebooks_<set>`
  (fp16 `[M, k, d]`; under the base-model prefix for transformers heads, e.g. `bert.vq_shared_codebooks_d4`)
  and its modules have no `<name>.codebooks`; `quantization_config.modules[<name>].codebook_set` says which
  set each module decodes with.

Folders are written atomically: into a temporary sibling first, then renamed into place, so a crash
mid-save leaves the previous folder intact.
"""

from __future__ import annotations

import contextlib
import json
import math
import mmap
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Container, Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .codec.packing import bits_for, packed_row_bytes, unpack_codes
from .config import SHARED_CODEBOOKS, LayerLayout, VQConfig, shared_codebooks_key
from .nn import VQModuleMixin

__all__ = [
    "WEIGHTS_NAME", "CheckpointError", "SizeReport", "LayerSize", "disk_state_dict", "atomic_folder",
    "save_weights", "load_weights", "check_state_dict", "size_report", "checkpoint_size_report", "load_compressed_",
    "read_quantization_config", "is_shared_codebooks_key", "find_shared_key", "expected_shapes",
]

WEIGHTS_NAME = "model.safetensors"
CODES, CODEBOOKS = "codes", "codebooks"
# BatchNorm running statistics fold into the affine vectors (the paper's size convention).
_FOLDED_SUFFIXES = (".running_mean", ".running_var", ".num_batches_tracked")


class CheckpointError(ValueError):
    """A checkpoint file or folder that cannot be loaded as it is (names the file or tensor and the fix)."""


def is_shared_codebooks_key(key: str) -> bool:
    """Whether a state-dict key is a shared codebook set (`[prefix.]vq_shared_codebooks_<set>`)."""
    return key.rpartition(".")[2].startswith(SHARED_CODEBOOKS)


def find_shared_key(keys: Any, codebook_set: str) -> str | None:
    """The key of shared set `codebook_set` among `keys` (at the top level or under a base-model prefix)."""
    name = shared_codebooks_key(codebook_set)
    return next((key for key in keys if key == name or key.endswith("." + name)), None)


# ---------------------------------------------------------------------------------------------- writing
def disk_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors written to `model.safetensors`: codebooks cast to fp16, tied tensors kept once, contiguous.

    A shared codebook set is written once, under its own key `vq_shared_codebooks_<set>`, never under the
    `<module>.codebooks` keys of the modules holding it."""
    out: dict[str, torch.Tensor] = {}
    state = model.state_dict()
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    ordered = sorted(state.items(), key=lambda item: not is_shared_codebooks_key(item[0]))  # shared keys win
    for key, tensor in ordered:
        ident = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if ident in seen:
            continue
        seen.add(ident)
        if (key.endswith("." + CODEBOOKS) or is_shared_codebooks_key(key)) and tensor.is_floating_point():
            tensor = tensor.to(torch.float16)
        out[key] = tensor.detach().to("cpu").contiguous()
    return {key: out[key] for key in state if key in out}  # the model's own key order


@contextlib.contextmanager
def atomic_folder(save_directory: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder next to `save_directory`; on success it replaces `save_directory`.

    On any exception the temporary folder is removed and `save_directory` is left as it was.
    """
    target = Path(save_directory).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    try:
        yield tmp
        tmp.chmod(0o777 & ~umask)  # mkdtemp creates 0700; give the folder the permissions of a normal one
        for path in tmp.rglob("*"):
            path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
        backup = None
        if target.exists():
            backup = target.with_name(f".{target.name}.old-{os.getpid()}")
            shutil.rmtree(backup, ignore_errors=True)
            target.rename(backup)
        tmp.rename(target)
        if backup is not None:
            shutil.rmtree(backup, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def save_weights(model: nn.Module, folder: str | os.PathLike, *, metadata: dict[str, str] | None = None) -> Path:
    """Write `model.safetensors` (see [`disk_state_dict`]) into `folder`."""
    path = Path(folder) / WEIGHTS_NAME
    save_file(disk_state_dict(model), str(path), metadata={"format": "pt", **(metadata or {})})
    return path


# ---------------------------------------------------------------------------------------------- reading
#: safetensors' dtype names and the torch dtypes hf_vq reads them as
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


def load_weights(path: str | os.PathLike, keys: Container[str] | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file (those in `keys`, default all) as CPU tensors, without copying them.

    A compressed checkpoint is mostly small tensors, which `safe_open` copies one call at a time: here the file is
    mapped once, privately (copy-on-write: pages are read from the page cache when first touched, writes stay in
    this process), and each tensor wraps its own slice of the map (separate storages, so savers never take them
    for tied tensors). Files this reader cannot wrap (a dtype it does not know, a big-endian machine) are read
    with `safetensors.safe_open`.

    Raises:
        [`CheckpointError`]: if the file is missing, truncated or corrupted.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist: the folder is not a complete hf_vq checkpoint (expected {WEIGHTS_NAME}).")
    try:
        with open(path, "rb") as f:
            total, size = os.fstat(f.fileno()).st_size, int.from_bytes(f.read(8), "little")
            if not 0 < size <= total - 8:
                raise ValueError(f"a header of {size} bytes does not fit a file of {total} bytes")
            header = json.loads(f.read(size))
            header.pop("__metadata__", None)
            wanted = [key for key in header if keys is None or key in keys]
            if sys.byteorder != "little" or any(header[key]["dtype"] not in SAFETENSORS_DTYPES for key in wanted):
                with safe_open(str(path), framework="pt") as g:
                    return {key: g.get_tensor(key) for key in wanted}
            # private (copy-on-write) map: pages come from the page cache when first touched, writes stay in memory
            data = memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY))[8 + size:]
        got = len(data)
        out = {}
        for key in wanted:
            info = header[key]
            dtype, (start, end) = SAFETENSORS_DTYPES[info["dtype"]], info["data_offsets"]
            count = math.prod(info["shape"])
            if not 0 <= start <= end <= got or end - start != count * dtype.itemsize:
                raise ValueError(f"tensor {key!r} lies outside the file's {got} data bytes")
            flat = torch.frombuffer(data[start:end], dtype=dtype) if count else torch.empty(0, dtype=dtype)
            out[key] = flat.view(info["shape"])
        return out
    except (SafetensorError, OSError, RuntimeError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(
            f"{path} is truncated or corrupted ({err}). Re-download it or save the model again."
        ) from None


def expected_shapes(name: str, layout: LayerLayout, keys: Container[str]) -> dict[str, tuple[int, ...]]:
    """The stored tensors of compressed module `name` and their shapes: `{codes key: shape, codebooks key: shape}`.

    Codes are bit-packed uint8 `[rows, packed_bytes]`; codebooks `[M, k, d]`, under the module's own key or,
    for a shared set, the set's key as found in `keys` (the checkpoint's tensor names).
    """
    rows, cols = layout.matrix_shape
    n_codes = (cols // layout.d) * layout.num_codebooks
    codebooks_key = f"{name}.{CODEBOOKS}"
    if layout.codebook_set is not None:  # stored once for the set
        codebooks_key = find_shared_key(keys, layout.codebook_set) or shared_codebooks_key(layout.codebook_set)
    return {f"{name}.{CODES}": (rows, packed_row_bytes(n_codes, bits_for(layout.k))),
            codebooks_key: (layout.num_codebooks, layout.k, layout.d)}


def check_state_dict(state_dict: dict[str, torch.Tensor], config: VQConfig, *, source: str = WEIGHTS_NAME) -> None:
    """Check that every compressed module has its codes and codebooks, with the right shapes and codes < k.

    Raises:
        `CheckpointError`: naming the tensor, what was expected, and the fix.
    """
    for name, layout in config.layouts.items():
        if layout.tied_to is not None:
            continue
        (codes_key, codes_shape), (codebooks_key, codebooks_shape) = expected_shapes(name, layout, state_dict).items()
        expected = {codes_key: (torch.uint8, codes_shape), codebooks_key: (None, codebooks_shape)}
        for key, (dtype, shape) in expected.items():
            tensor = state_dict.get(key)
            if tensor is None:
                raise CheckpointError(
                    f"{source} lacks the tensor {key!r} of compressed module {name!r}; the file is incomplete or was "
                    "written for another config. Re-save the model."
                )
            if tuple(tensor.shape) != shape or (dtype is not None and tensor.dtype != dtype):
                raise CheckpointError(
                    f"{source}: tensor {key!r} is {tensor.dtype} {list(tensor.shape)}, expected "
                    f"{dtype or 'float'} {list(shape)} for module {name!r} (k={layout.k}, d={layout.d}, weight "
                    f"{list(layout.shape)}). The checkpoint does not match its config.json."
                )
        n_codes = (layout.matrix_shape[1] // layout.d) * layout.num_codebooks
        codes = unpack_codes(state_dict[codes_key], bits_for(layout.k), n_codes)
        if codes.numel() and int(codes.max()) >= layout.k:
            raise CheckpointError(
                f"{source}: tensor '{name}.{CODES}' holds code {int(codes.max())} >= k={layout.k}; the file is corrupted. "
                "Re-download it or compress the model again."
            )


# ---------------------------------------------------------------------------------------------- accounting
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
                        "rel_error": l.rel_error} for l in self.layers],
            "shared_codebooks": {name: {"shape": list(shape), "bits": bits, "modules": n}
                                 for name, (shape, bits, n) in self.shared.items()},
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
        lines.append(f"dense {self.dense_mb:.2f} MB (fp32) -> compressed {self.compressed_mb:.2f} MB: {self.ratio:.1f}x smaller")
        if self.file_bytes is not None:
            lines.append(f"{WEIGHTS_NAME}: {self.file_bytes / 2**20:.2f} MB on disk "
                         f"({self.file_over_accounted:.3f}x the accounted size)")
        return "\n".join(lines)


def _report(layouts: dict[str, LayerLayout], tensors: dict[str, tuple[torch.dtype, tuple[int, ...]]]) -> SizeReport:
    report = SizeReport()
    vq_keys = set()
    # a shared set is counted once: its bits are split over its modules in proportion to their subvectors
    set_subvectors: dict[str, int] = {}
    set_members: dict[str, int] = {}
    for layout in layouts.values():
        if layout.codebook_set is not None and not layout.tied_to:
            rows, cols = layout.matrix_shape
            set_subvectors[layout.codebook_set] = set_subvectors.get(layout.codebook_set, 0) + rows * (cols // layout.d)
            set_members[layout.codebook_set] = set_members.get(layout.codebook_set, 0) + 1
    set_left: dict[str, int] = {}  # bits of each set not yet attributed
    for name, layout in layouts.items():
        vq_keys |= {f"{name}.{CODES}", f"{name}.{CODEBOOKS}"}
        rows, cols = layout.matrix_shape
        dense = math.prod(layout.shape) * 32
        codebook_bits = layout.num_codebooks * layout.k * layout.d * 16
        if layout.codebook_set is not None and not layout.tied_to:
            shape, bits, n = report.shared.get(layout.codebook_set, ((layout.num_codebooks, layout.k, layout.d),
                                                                     codebook_bits, 0))
            report.shared[layout.codebook_set] = (shape, bits, n + 1)
            left = set_left.setdefault(layout.codebook_set, bits)
            share = bits * rows * (cols // layout.d) // max(1, set_subvectors[layout.codebook_set])
            codebook_bits = min(left, share) if n + 1 < set_members[layout.codebook_set] else left  # last: the rest
            set_left[layout.codebook_set] = left - codebook_bits
        compressed = 0 if layout.tied_to else (
            rows * (cols // layout.d) * layout.num_codebooks * bits_for(layout.k) + codebook_bits)
        report.layers.append(LayerSize(name, layout.kind, layout.shape, layout.k, layout.d, layout.num_codebooks,
                                       0 if layout.tied_to else dense, compressed, layout.rel_error))
        report.dense_bits += 0 if layout.tied_to else dense
        report.compressed_bits += compressed
    for key, (dtype, shape) in tensors.items():
        if (key in vq_keys or is_shared_codebooks_key(key) or key.endswith(_FOLDED_SUFFIXES)
                or not dtype.is_floating_point):
            continue
        n = math.prod(shape)
        report.dense_bits += n * 32
        report.compressed_bits += n * torch.finfo(dtype).bits
    return report


def size_report(model: nn.Module) -> SizeReport:
    """Accounted size of an in-memory compressed model (see [`SizeReport`])."""
    config: VQConfig | None = getattr(model, "vq_config", None)
    layouts = dict(config.layouts) if config is not None else {}
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, VQModuleMixin) and name not in layouts:
            layouts[name] = LayerLayout(module.vq_kind, module.weight_shape, module.k, module.d, module.num_codebooks)
    tensors = {key: (t.dtype, tuple(t.shape)) for key, t in disk_state_dict(model).items()}
    return _report(layouts, tensors)


def checkpoint_size_report(folder: str | os.PathLike) -> SizeReport:
    """Accounted and on-disk size of a saved compressed folder (reads only the safetensors header)."""
    folder = Path(folder)
    config = read_quantization_config(folder)
    paths = [folder / WEIGHTS_NAME]
    index = folder / (WEIGHTS_NAME + ".index.json")  # sharded by save_pretrained(max_shard_size=...)
    if not paths[0].is_file() and index.is_file():
        paths = [folder / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    tensors = {}
    for path in paths:
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    sl = f.get_slice(key)
                    tensors[key] = (_DTYPES[sl.get_dtype()], tuple(sl.get_shape()))
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{path} cannot be read ({err}); re-download it or save the model again.") from None
    report = _report(config.layouts, tensors)
    report.file_bytes = sum(path.stat().st_size for path in paths)
    return report


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def read_config_json(folder: str | os.PathLike) -> dict[str, Any]:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist: {folder} is not a model folder.")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON ({err}); fix or re-download it.") from None


def read_quantization_config(folder: str | os.PathLike) -> VQConfig:
    """The [`VQConfig`] stored in `folder/config.json`, validated."""
    data = read_config_json(folder).get("quantization_config")
    if not isinstance(data, dict) or data.get("quant_method") != "hf_vq":
        raise CheckpointError(f"{Path(folder) / 'config.json'} has no hf_vq quantization_config: not an hf_vq checkpoint.")
    return VQConfig.from_dict(data)


# ---------------------------------------------------------------------------------------------- loading
def load_compressed_(model: nn.Module, folder: str | os.PathLike, *, strict: bool = True) -> nn.Module:
    """Rebuild the VQ modules of a dense-architecture `model` from `folder` and load its weights (in place).

    This is the library-agnostic loader (timm models, plain `nn.Module`s); transformers models load
    through `from_pretrained`. Nothing is recomputed and nothing is unpickled.

    Raises:
        `CheckpointError`: for a missing, truncated or corrupt file, a missing tensor, a wrong shape or codes >= k.
        `ValueError`: if the config names modules the model lacks.
    """
    from .quantize import build_skeleton_

    folder = Path(folder)
    config = read_quantization_config(folder)
    build_skeleton_(model, config)  # validates the layout against the model before changing anything
    state_dict = load_weights(folder / WEIGHTS_NAME)
    check_state_dict(state_dict, config, source=str(folder / WEIGHTS_NAME))
    own = model.state_dict()
    groups: dict[int, list[str]] = {}
    for key, tensor in own.items():
        groups.setdefault(tensor.untyped_storage().data_ptr(), []).append(key)
    missing = []
    for keys in groups.values():
        if not any(k in state_dict for k in keys):
            missing += keys
    unexpected = sorted(set(state_dict) - set(own))
    if strict and (missing or unexpected):
        raise CheckpointError(
            f"{folder / WEIGHTS_NAME} does not match the model: missing tensors {missing[:5]}, unexpected "
            f"tensors {unexpected[:5]}. Was it saved from another architecture or config?"
        )
    for key, tensor in state_dict.items():
        if key in own and tuple(own[key].shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"{folder / WEIGHTS_NAME}: tensor {key!r} has shape {list(tensor.shape)}, the model expects "
                f"{list(own[key].shape)}. The checkpoint was saved from a different model configuration."
            )
    model.load_state_dict(state_dict, strict=False)
    return model
