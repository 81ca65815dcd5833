"""How a compression was computed ([`Recipe`]) and what came out of it ([`CompressionRecord`]).

Neither is needed to *load* a compressed model, so neither is written into config.json: the recipe and the
record travel in the safetensors metadata of the weights file (`hf_vq_record`, JSON) and in the model card. A
reloaded model gets its record back, so provenance (base model, licence, calibration data, permutation, fidelity)
survives load → fine-tune → save → push by any path.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Recipe", "CompressionRecord", "RECIPE_FIELDS", "ENCODERS", "DENSE_DTYPES", "AUTO_TUNE_BITS",
           "AUTO_TUNE_STEPS"]

#: How codes are computed: data-free / diagonal-weighted k-means, or the calibrated output-aware engine.
ENCODERS = ("kmeans", "output-aware")
#: The 16-bit widths the tensors left dense may be stored in (`Recipe.dense_dtype`).
DENSE_DTYPES = ("float16", "bfloat16")
#: Block-wise tuning is on by default (`AUTO_TUNE_STEPS` per block) when the output-aware engine allocates a budget
#: of at most this many bits per weight (`target_ratio` >= 32 / 2.5 = 12.8 of the fp32 file, or `bits_per_weight` <=
#: 2.5). Measured on MiniLM (benchmarks/results/experiment_block_tuning*.md, experiment_seeds_minilm.md): at 16x
#: (2 bits) tuning raised the held-out cosine by 0.012 over seeds 0-2 (0.9146 -> 0.9266, 2.6x the time), at 10x
#: (3.2 bits) by 0.001 in one run for twice the time, at 12x (2.67 bits) by 0.004 in one run for 2.3x the time
#: (experiment_block_tuning_12x.md); on EfficientNet-Lite0 at 6x (5.3 bits) it did not help in one run.
AUTO_TUNE_BITS = 2.5
AUTO_TUNE_STEPS = 400


@dataclass
class Recipe:
    """Settings of the algorithms that compute codes and codebooks; loading never needs them.

    Args:
        n_iter (`int`, defaults to 100): k-means iterations (AQ: of each residual k-means of its initialisation).
        aq_iters (`int`, defaults to 4): AQ alternations of beam-search encoding and least-squares codebook update.
        beam_size (`int`, defaults to 8): AQ partial sums kept per subvector by the beam search.
        anneal (`bool`, defaults to `True`): annealed k-means instead of Lloyd's.
        seed (`int`, defaults to 0): seed of the initialisation and annealing noise.
        permute (`bool`, defaults to `True`): PQF's channel permutation before quantizing.
        permute_iters (`int`, defaults to 1000): search steps per channel space.
        encoder (`str`, defaults to `"kmeans"`): how codes are computed. `"kmeans"`: (annealed) k-means on the
            weights — weighted by the input channels' second moments when calibration data is given; `"output-aware"`:
            the calibrated engine (block by block on inputs from the already-compressed prefix, GPTQ-style error
            feedback, codebooks and scales refitted under the layer's output error; needs calibration data).
        refit_rounds (`int`, defaults to 2): output-aware only: alternations of codebook/scale refit and re-assignment.
        tune_steps (`int`, defaults to 0): output-aware only: Adam steps of block-wise tuning per block (codebooks,
            scales, norms, biases trained toward the dense model's own outputs of the block, padding excluded; stops
            early on held-out batches). `VQConfig` defaults it to [`AUTO_TUNE_STEPS`] when the output-aware engine
            allocates at most [`AUTO_TUNE_BITS`] bits per weight (`target_ratio` >= 12.8 or `bits_per_weight` <= 2.5),
            where it was measured to pay for its time; pass 0 to turn it off.
        tune_lr (`float`, defaults to 3e-4): output-aware only: Adam learning rate of block-wise tuning.
        max_rows (`int`, defaults to 65,536): output-aware only: input rows per batch and layer kept for `XᵀX`.
        target_ratio (`float`, *optional*): bit allocation: choose each layer's (k, d, scales) so that the weights
            file is this many times smaller than the dense fp32 one (everything left dense counts).
        bits_per_weight (`float`, *optional*): bit allocation to an average budget instead: bits per weight of the
            compressible layers (codebooks and scales included).
        allocation_outputs (`tuple[str, ...]`, *optional*): bit allocation: the model outputs whose change counts
            (fields of its output, e.g. `("last_hidden_state",)`); `field:mean` counts the field averaged over each
            sequence's tokens (`("last_hidden_state:mean",)` for a mean-pooling sentence-embedding model, which never
            reads BERT's `pooler_output`); default: every floating-point output. A layer that only other outputs read
            gets the fewest bits.
        dense_dtype (`str`, *optional*): the width the weights file stores the floating-point tensors that stay
            dense in — norms, biases, BatchNorm statistics, position tables, layers the allocation or
            `modules_to_not_convert` leaves dense — when the model holds them wider: `"float16"` or `"bfloat16"`.
            The model keeps computing in its own dtype: `quantize_` rounds those tensors to the narrower dtype's
            values in place (fine-tuning rounds them again after training), the file stores them at 16 bits and
            loaders widen them back, so the saved model is the compressed one bit for bit. A tensor outside the
            dtype's range (or not finite) stays as it is. Default: `"float16"` with bit allocation (`target_ratio` /
            `bits_per_weight`: a whole-file budget is better spent on weights than on 32-bit norms and biases), else
            None (every tensor as the model holds it: the PQF paper's convention, other tensors at fp32).
        hessian_floor (`float` or `"auto"`, *optional*): output-aware only: the weight-space term of every layer's objective,
            `H + hessian_floor · mean(diag H) · I` — how little the encoder trusts the calibration inputs' second
            moments where they differ from what the model will see. Default None: `hf_vq.codec.output_aware.FLOOR`
            (1e-4, negligible where inputs were seen). Larger values help where the calibration inputs are few or
            unlike the real ones: EfficientNet-Lite0 at `--ratio 6` on its 9 bundled calibration photos, seeds 0-2,
            held-out top-1 agreement 0.820 -> 0.867 and KL 0.037 -> 0.033 at 0.3 (one seed's KL rises;
            benchmarks/results/experiment_hessian_floor_lite0_prior*.md); MiniLM at 16x on 1,024 Wikipedia sentences
            lost 0.003 of cosine at 0.1 (before the prior), so the default stays. `"auto"`: chosen per layer among
            `hf_vq.codec.output_aware.FLOOR_CANDIDATES` by the layer's output error on the half of the calibration
            batches its fit did not see (other photos, [`hf_vq.data.photo_batches`]), in 1.2-1.3x the compression
            time; recorded in the compression record (`calibration["hessian floor"]`). On Lite0 at `--ratio 6` it
            chose as the test photos would on single layers, but moved nothing the seeds resolve end to end (mean
            agreement 0.857 -> 0.826, KL 0.030 -> 0.029: benchmarks/results/experiment_hessian_floor_auto_lite0.md).
    """

    n_iter: int = 100
    aq_iters: int = 4
    beam_size: int = 8
    anneal: bool = True
    seed: int = 0
    permute: bool = True
    permute_iters: int = 1000
    encoder: str = "kmeans"
    refit_rounds: int = 2
    tune_steps: int = 0
    tune_lr: float = 3e-4
    max_rows: int = 65_536
    target_ratio: float | None = None
    bits_per_weight: float | None = None
    allocation_outputs: tuple[str, ...] | None = None
    dense_dtype: str | None = None
    hessian_floor: float | str | None = None

    def __post_init__(self) -> None:
        for name, low in (("n_iter", 1), ("seed", 0), ("permute_iters", 0), ("aq_iters", 0), ("beam_size", 1),
                          ("refit_rounds", 0), ("tune_steps", 0), ("max_rows", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"VQConfig.{name}={value!r} must be an integer >= {low}.")
        for name in ("anneal", "permute"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"VQConfig.{name}={getattr(self, name)!r} must be True or False.")
        if self.encoder not in ENCODERS:
            raise ValueError(f"VQConfig.encoder={self.encoder!r} is not one of {ENCODERS}.")
        for name, low in (("target_ratio", 1.0), ("bits_per_weight", 0.0), ("tune_lr", 0.0)):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value) or value <= low):
                optional = " (or None)" if getattr(Recipe, name) is None else ""
                raise ValueError(f"VQConfig.{name}={value!r} must be a number > {low:g}{optional}.")
        floor = self.hessian_floor
        if floor is not None and floor != "auto" and (isinstance(floor, bool) or not isinstance(floor, (int, float))
                                                      or not math.isfinite(floor) or floor < 0):
            raise ValueError(f"VQConfig.hessian_floor={floor!r} must be a number >= 0, 'auto' (chosen per layer on a "
                             "held-out half of the calibration data), or None (the default 1e-4).")
        names = self.allocation_outputs
        if names is not None:
            if isinstance(names, str) or not isinstance(names, (list, tuple)) or not names \
                    or not all(isinstance(n, str) and n.partition(":")[0] and n.partition(":")[2] in ("", "mean")
                               for n in names):
                raise ValueError(f"VQConfig.allocation_outputs={names!r} must be a non-empty list of output names, "
                                 "each optionally pooled over its tokens with ':mean', e.g. ['last_hidden_state'] or "
                                 "['last_hidden_state:mean'] (or None: every output counts).")
            self.allocation_outputs = tuple(names)
        if self.dense_dtype is not None and self.dense_dtype not in DENSE_DTYPES:
            raise ValueError(f"VQConfig.dense_dtype={self.dense_dtype!r} is not one of {DENSE_DTYPES} (or None: tensors "
                             "left dense are stored as the model holds them).")
        if self.target_ratio is not None and self.bits_per_weight is not None:
            raise ValueError("VQConfig: give target_ratio (the whole file) or bits_per_weight (the compressible "
                             "layers), not both.")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


#: The recipe's fields, which `VQConfig` also accepts as keyword arguments (and old config.json files carry).
RECIPE_FIELDS = tuple(f.name for f in dataclasses.fields(Recipe))


@dataclass
class CompressionRecord:
    """What a compression did, for model cards, `hf-vq info` and fine-tuning: the result besides the layouts.

    Attributes:
        base_model (`str`, *optional*): the dense model (Hub id or folder) the weights come from.
        license (`str`, *optional*): the dense model's licence, inherited by the compressed weights.
        library (`str`, *optional*): `"transformers"`, `"timm"` or None (a plain `nn.Module`).
        recipe (`dict`): the [`Recipe`] that ran.
        permutation (`dict`, *optional*): summary of the permutation step (`traced`, `spaces`, `permuted`,
            `refused`, `objective`, `reason`), or None when it was off.
        calibration (`dict`, *optional*): the data the error was measured on (`source`, `samples`, `statistics`);
            None for the data-free path.
        kmeans_weighted (`bool`): whether k-means weighted entries by calibration statistics.
        allocation (`dict`, *optional*): bit allocation: the target, the achieved bits and each layer's choice.
        fidelity (`dict`): agreement with the dense model on held-out inputs (name -> value).
        finetuning (`dict`, *optional*): how the codebooks were fine-tuned afterwards.
    """

    base_model: str | None = None
    license: str | None = None
    library: str | None = None
    recipe: dict[str, Any] = field(default_factory=dict)
    permutation: dict[str, Any] | None = None
    calibration: dict[str, Any] | None = None
    kmeans_weighted: bool = False
    allocation: dict[str, Any] | None = None
    fidelity: dict[str, Any] = field(default_factory=dict)
    finetuning: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, default=str)

    @classmethod
    def from_dict(cls, data: Any) -> "CompressionRecord":
        """A record from its dict; unknown keys (a newer release's) are ignored, malformed values dropped."""
        if not isinstance(data, dict):
            return cls()
        known = {f.name: f for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in data.items():
            if key not in known:
                continue
            if key in ("recipe", "fidelity") and not isinstance(value, dict):
                continue
            if key in ("permutation", "calibration", "finetuning", "allocation") and value is not None and not isinstance(value, dict):
                continue
            if key in ("base_model", "license", "library") and value is not None and not isinstance(value, str):
                continue
            kwargs[key] = bool(value) if key == "kmeans_weighted" else value
        return cls(**kwargs)

    @classmethod
    def from_json(cls, text: str | None) -> "CompressionRecord | None":
        """Parse the `hf_vq_record` metadata string; None when absent or not valid JSON."""
        if not text:
            return None
        try:
            return cls.from_dict(json.loads(text))
        except (ValueError, TypeError):
            return None

    def provenance(self) -> "CompressionRecord":
        """A record that keeps only where the weights come from (base model, licence, library)."""
        return CompressionRecord(base_model=self.base_model, license=self.license, library=self.library)
