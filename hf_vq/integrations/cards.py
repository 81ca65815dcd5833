"""Model cards of compressed models, rendered from the Jinja template in `model_cards/` with huggingface_hub's
`ModelCard`, from the config and its [`hf_vq.CompressionRecord`] (never from attributes of the model)."""

from __future__ import annotations

import logging
import math
import os
import re
from importlib import resources
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from ..config import CompressionRecord, VQConfig
from ..serialization import SizeReport

__all__ = ["render_model_card", "base_model_license", "compression_summary", "complete_record_", "card_base_model",
           "hub_id"]

logger = logging.getLogger(__name__)

TEMPLATE = "hf_vq_model_card.md.j2"


def _template_text(name: str) -> str:
    """A template of `model_cards/`: installed as the `hf_vq.model_cards` package data, or the source tree's."""
    try:
        return resources.files("hf_vq.model_cards").joinpath(name).read_text()
    except (ModuleNotFoundError, FileNotFoundError):
        return (Path(__file__).resolve().parents[2] / "model_cards" / name).read_text()


def base_model_license(base_model: str | None, source_dir: str | os.PathLike | None = None) -> str | None:
    """The `license` in the dense model's card metadata, or None when it cannot be read.

    Looks at `source_dir/README.md` first, then the Hub cache, then the Hub (unless offline). Never raises:
    a card without a licence is better than no card.
    """
    candidates: list[Path] = []
    if source_dir is not None:
        candidates.append(Path(source_dir) / "README.md")
    if base_model and os.path.isdir(base_model):
        candidates.append(Path(base_model) / "README.md")
    elif base_model:
        from huggingface_hub import constants, try_to_load_from_cache

        cached = try_to_load_from_cache(base_model, "README.md")
        if isinstance(cached, str):
            candidates.append(Path(cached))
        elif not constants.HF_HUB_OFFLINE:
            from huggingface_hub import HfApi

            try:  # one metadata request, no retries: offline or unknown repos fail fast
                license = getattr(HfApi().model_info(base_model, timeout=5).card_data, "license", None)
            except Exception as err:  # unknown repo, no network, gated...: no licence to inherit
                logger.debug("hf_vq: no model card for %s (%s)", base_model, err)
                license = None
            if license:
                return str(license)
    for path in candidates:
        if path.is_file():
            try:
                license = ModelCard.load(path).data.to_dict().get("license")
            except Exception:  # a malformed card: ignore it
                continue
            if license:
                return str(license)
    return None


def hub_id(ref: Any) -> str | None:
    """`ref` if it names a Hub repo (`org/name`), not a local folder or path."""
    if not isinstance(ref, str) or os.path.isdir(ref) or ref.startswith((".", "/", "~")):
        return None
    return ref if re.fullmatch(r"[\w.-]+/[\w.-]+", ref) else None


def complete_record_(config: VQConfig, *, base_model: str | None = None, fidelity: dict[str, Any] | None = None,
                     library: str | None = None, source_dir: str | os.PathLike | None = None,
                     license: str | None = None) -> CompressionRecord:
    """Fill what `config.record` does not know yet (base model, licence, library, fidelity), in place; returns it.

    Given values win; a missing licence is looked up from the base model's card (see [`base_model_license`]) so it
    is recorded in the weights' metadata and survives reloading and re-publishing.
    """
    record = config.record if config.record is not None else CompressionRecord(recipe=config.recipe.to_dict())
    record.base_model = base_model or record.base_model
    record.library = library or record.library
    if fidelity:
        record.fidelity = {**record.fidelity, **fidelity}
    if license:
        record.license = license
    elif record.license is None and (record.base_model or source_dir):
        record.license = base_model_license(record.base_model, source_dir)
    config.record = record
    return record


def compression_summary(config: VQConfig | None, size: SizeReport) -> list[tuple[str, str]]:
    """Rows (field, value) describing how a model was compressed, from its config and record, for cards and reports."""
    record = getattr(config, "record", None) if config is not None else None
    layers = [layer for layer in size.layers if layer.compressed_bits]
    compressed_weights = sum(math.prod(layer.shape) for layer in layers)
    methods = {lay.method for lay in config.layouts.values()} if config is not None and config.modules else {
        getattr(config, "method", "pq")}
    codebooks = sorted({layer.num_codebooks for layer in size.layers}) or [1]
    rows: list[tuple[str, str]] = []
    names = {"aq": f"additive quantization, {'/'.join(map(str, codebooks))} codebooks per subvector (Sun et al. 2021)",
             "pq": "product quantization with k-means codebooks (PQF, Martinez et al. 2021)"}
    rows.append(("method", "; ".join(names[m] for m in sorted(methods, reverse=True))))
    share = getattr(config, "share", None) if config is not None else None
    rows.append(("codebook sharing", {None: "per layer", "layer": "per layer", "pool": "per pool of layers with the same d",
                                      "global": "one set for the whole network"}.get(share, str(share))))
    rows.append(("k (codewords per codebook)", _values(layer.k for layer in size.layers)))
    rows.append(("d (subvector length)", _values(layer.d for layer in size.layers)))
    rows.append(("compressed layers", f"{len(size.layers)}"))
    if any(layer.scales for layer in size.layers):
        rows.append(("per-output-channel scales", f"{sum(layer.scales for layer in size.layers)} layers (fp16)"))
    if compressed_weights:
        bits = sum(layer.compressed_bits for layer in layers) / compressed_weights
        rows.append(("bits per weight (compressed layers)", f"{bits:.3f}"))
    rows += _record_rows(config, record)
    return rows


def _record_rows(config: VQConfig | None, record: CompressionRecord | None) -> list[tuple[str, str]]:
    """The rows only the record knows: permutation, calibration, k-means recipe."""
    if config is None:
        return []
    rows = []
    perm = record.permutation if record is not None else None
    if perm is not None and perm.get("traced"):
        rows.append(("permutation", f"{perm['permuted']} of {perm['spaces']} channel spaces permuted "
                                    f"({perm['refused']} refused; {perm.get('objective', 'weights')} objective)"))
    elif perm is not None:
        rows.append(("permutation", f"skipped ({perm.get('reason')})"))
    else:
        rows.append(("permutation", "off" if record is not None or not config.permute else "unknown"))
    if record is not None:
        calib = record.calibration
        rows.append(("calibration data", "none (data-free: weights only)" if not calib else
                     ", ".join(f"{k} {v}" for k, v in calib.items())))
    recipe = record.recipe if record is not None and record.recipe else config.recipe.to_dict()
    weighted = bool(record.kmeans_weighted) if record is not None else False
    rows.append(("k-means", f"{'annealed' if recipe.get('anneal', True) else 'Lloyd'}, {recipe.get('n_iter')} iterations"
                 + (", weighted by the input channels' second moments (calibration data)" if weighted else "")))
    if recipe.get("dense_dtype"):
        rows.append(("tensors left dense", f"stored in {recipe['dense_dtype']} (norms, biases, statistics, dense "
                                           "layers; the model computes in its own dtype)"))
    return rows


def _values(values) -> str:
    unique = sorted(set(values))
    return ", ".join(map(str, unique)) if unique else "-"


def render_model_card(
    *,
    base_model: str | None = None,
    library_name: str,
    size: SizeReport,
    config: VQConfig | None = None,
    config_spec: str | None = None,
    repo_id: str | None = None,
    license: str | None = None,
    metrics: dict[str, Any] | None = None,
    fidelity: dict[str, Any] | None = None,
    extra_tags: list[str] | None = None,
    eval_dataset: dict[str, str] | None = None,
    task_type: str | None = None,
    source_dir: str | os.PathLike | None = None,
    finetuning: dict[str, Any] | None = None,
) -> ModelCard:
    """Render the model card of a compressed model from the Jinja template in `model_cards/`.

    Args:
        base_model (`str`, *optional*): Hub id (or folder) of the dense model; recorded as `base_model`
            with `base_model_relation: quantized`. Default: the config's record.
        library_name (`str`): `"transformers"` or `"timm"`; picks the loading snippet.
        size ([`SizeReport`]): the accounted sizes (per-layer table and totals).
        config ([`VQConfig`], *optional*): the filled config; gives the method, sharing, and through its record
            ([`hf_vq.CompressionRecord`]) the base model, licence, permutation, calibration and fidelity.
        config_spec (`str`, *optional*): the scheme name; defaults to `config.spec`.
        repo_id (`str`, *optional*): the Hub repo, for the title and the loading snippet.
        license (`str`, *optional*): licence of the weights; by default inherited from the base model's card
            (see [`base_model_license`]).
        metrics (`dict`, *optional*): task metrics (e.g. `{"accuracy": 0.91}`); with `eval_dataset` they also go
            into the `model-index` metadata.
        fidelity (`dict`, *optional*): agreement with the dense model (cosine, top-1 agreement, KL...); default: the
            record's.
        extra_tags (`list[str]`, *optional*): more tags.
        eval_dataset (`dict`, *optional*): `{"name": ..., "type": ..., "split": ...}` of the data the metrics
            were measured on.
        task_type (`str`, *optional*): task of the `model-index` entry (default: image-classification for timm,
            feature-extraction for transformers).
        source_dir (`str` or `os.PathLike`, *optional*): the dense model's local folder (licence lookup).
        finetuning (`dict`, *optional*): how the codebooks were fine-tuned (data, steps, ...), listed in the card.

    Returns:
        `huggingface_hub.ModelCard`: the card; `.save(folder / "README.md")` writes it.
    """
    record = getattr(config, "record", None)
    if record is not None:
        base_model = base_model or record.base_model
        license = license or record.license
        fidelity = fidelity or record.fidelity or None
        finetuning = finetuning or record.finetuning
    if license is None:
        license = base_model_license(base_model, source_dir)
    repo_id = repo_id or "<your-org>/<this-repo>"
    task_type = task_type or ("image-classification" if library_name == "timm" else "feature-extraction")
    eval_results = None
    numeric = {key: value for key, value in (metrics or {}).items() if isinstance(value, (int, float))}
    if eval_dataset and numeric:
        from huggingface_hub import EvalResult

        eval_results = [
            EvalResult(task_type=task_type, dataset_type=eval_dataset.get("type", eval_dataset["name"]),
                       dataset_name=eval_dataset["name"], dataset_split=eval_dataset.get("split"),
                       metric_type=key, metric_value=value)
            for key, value in numeric.items()
        ]
    hub_base = hub_id(base_model)  # a local folder is no Hub id
    card_data = ModelCardData(
        base_model=hub_base,
        base_model_relation="quantized" if hub_base else None,
        library_name=library_name,
        license=license,
        tags=["hf_vq", "vector-quantization", "pqf", "compressed", *(extra_tags or [])],
        model_name=repo_id.split("/")[-1] if eval_results else None,
        eval_results=eval_results,
        pipeline_tag=task_type if library_name == "timm" else None,
    )
    template = _template_text(TEMPLATE)
    return ModelCard.from_template(
        card_data,
        template_str=template,
        repo_id=repo_id,
        base_model=hub_base,
        library_name=library_name,
        spec=config_spec or (config.spec if config is not None else "?"),
        size=size,
        summary=compression_summary(config, size),
        metrics=metrics or {},
        fidelity=fidelity or {},
        finetuning=finetuning or {},
        eval_dataset=eval_dataset,
    )


def card_base_model(path: str | os.PathLike) -> str | list[str] | None:
    """The `base_model` of a model card file's metadata, or None (no file, no metadata, malformed)."""
    if not Path(path).is_file():
        return None
    try:
        return ModelCard.load(path).data.to_dict().get("base_model")
    except Exception:  # noqa: BLE001 - a card without (valid) metadata
        return None
