#!/usr/bin/env python
"""Generation as users run it: `model.generate()` tokens/s, prefill time and peak memory, dense vs hf_vq.

A Llama-shaped model with random weights built from `transformers.LlamaConfig` (GPU: hidden 2048, 22 layers,
intermediate 5632, 32 heads / 4 KV heads, vocabulary 32000: ~1.1 B parameters, fp16; CPU: a ~30 M-parameter
one, fp32). The compressed variants replace every linear of the decoder layers by a `VQLinear` holding random
codes and codebooks (speed does not depend on the values; k-means on a 1 B model would take minutes), embeddings
and the LM head stay dense: 2 bits/weight (M=1, k=256, d=4) and 1 bit/weight (M=1, k=256, d=8).

Modes, each `generate(do_sample=False)` of `--new-tokens` tokens after a `--prompt`-token prompt, batch 1:

* `eager-dynamic`: the default `DynamicCache`, no compilation;
* `eager-static`: `cache_implementation="static"` with `disable_compile=True`;
* `compiled-static`: `cache_implementation="static"`, which transformers compiles (`torch.compile`,
  `mode="reduce-overhead"`: CUDA graphs on a GPU; on CPU only when asked, as here) — decoding steps run the
  compiled graph, in which hf_vq's layers are the custom op `hf_vq::vq_linear`.

Reported: tokens/s over the whole call (new tokens / wall time; median of `--repeats` timed calls after one
untimed call that compiles and lets the kernels be chosen), decode tokens/s (the same difference with a
call stopped after 1 token removed: prefill excluded), prefill ms (one forward of `--prefill` tokens, eager), peak memory
during generation (the model's weights plus what the call allocates: KV cache, activations, decoded weights)
and the weights' size. Rows are written after each measurement (a time limit keeps what was
measured); a failing row is recorded as an error.

    python benchmarks/bench_generate.py --device cuda --out $OUT/generate     # the H200 run (scripts/gpu_checks.sh)
    python benchmarks/bench_generate.py --device cpu                          # results/generate_cpu.{json,md,png}
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from _common import RESULTS, loadavg, machine, write

from hf_vq import kernels
from hf_vq.nn import VQLinear

MODELS = {  # device: LlamaConfig arguments
    "cuda": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
             "num_key_value_heads": 4, "vocab_size": 32000, "max_position_embeddings": 2048},
    "cpu": {"hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 6, "num_attention_heads": 8,
            "num_key_value_heads": 4, "vocab_size": 8000, "max_position_embeddings": 1024},
}
VARIANTS = {"dense": None, "hf_vq 2 bits/weight (d=4)": (1, 256, 4), "hf_vq 1 bit/weight (d=8)": (1, 256, 8)}
MODES = ("eager-dynamic", "compiled-static", "eager-static")


def build_dense(device: str, dtype: torch.dtype, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**MODELS[device])
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    return model.eval().requires_grad_(False)


def compress_(model, layout: tuple[int, int, int], seed: int = 0) -> int:
    """Replace every linear of the decoder layers by a `VQLinear` with random codes `[out, in/d, M]` and codebooks
    `[M, k, d]` (std 0.02 per weight, like the dense init). Returns the number of replaced modules."""
    m, k, d = layout
    gen = torch.Generator().manual_seed(seed)
    replaced = 0
    for layer in model.model.layers:
        for name, module in list(layer.named_modules()):
            if type(module) is not torch.nn.Linear:
                continue
            weight = module.weight
            vq = VQLinear.from_float(module, kind="linear", k=k, d=d, num_codebooks=m, device="cpu", dtype=torch.float32)
            rows, cols = weight.shape
            vq.set_codes_(torch.randint(0, k, (rows, cols // d, m), generator=gen),
                          0.02 * torch.randn(m, k, d, generator=gen) / m ** 0.5)
            vq = vq.to(device=weight.device, dtype=weight.dtype).requires_grad_(False)
            parent_name, _, child = name.rpartition(".")
            (layer.get_submodule(parent_name) if parent_name else layer)._modules[child] = vq
            replaced += 1
    return replaced


def quantizer_is_compileable() -> bool | None:
    """Whether transformers may compile models that hf_vq's quantizer manages (`quantize_`, `from_pretrained`)."""
    try:
        import hf_vq
        from hf_vq.integrations.transformers_quantizer import HfVQQuantizer

        return bool(HfVQQuantizer(hf_vq.VQConfig()).is_compileable)
    except Exception:  # noqa: BLE001 - reported as unknown
        return None


def weight_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _stop_after(prompt: int, tokens: int):
    """A stopping criterion ending generation after `tokens` new tokens (the static cache keeps its length, so a
    compiled model is not recompiled for the shorter call, as a smaller `max_new_tokens` would)."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StopAfter(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
            done = input_ids.shape[1] >= prompt + tokens
            return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([StopAfter()])


def _generate(model, ids: torch.Tensor, new_tokens: int, mode: str, stop_after: int | None = None):
    from transformers.generation.configuration_utils import CompileConfig

    kwargs = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False,
              "pad_token_id": model.config.eos_token_id}
    if stop_after is not None:
        kwargs["stopping_criteria"] = _stop_after(ids.shape[1], stop_after)
    if mode != "eager-dynamic":
        kwargs["cache_implementation"] = "static"
    if mode == "eager-static":
        kwargs["disable_compile"] = True
    if mode == "compiled-static" and ids.device.type != "cuda":
        config = CompileConfig(fullgraph=False, mode=None)  # no CUDA graphs on a CPU
        config._compile_all_devices = True  # transformers compiles on CPU only when asked to
        kwargs["compile_config"] = config
    return model.generate(ids, **kwargs)


def time_generate(model, ids: torch.Tensor, new_tokens: int, mode: str, repeats: int) -> dict:
    device = ids.device.type
    start = time.perf_counter()
    out = _generate(model, ids, new_tokens, mode)  # compiles, chooses kernels
    _sync(device)
    first_s = time.perf_counter() - start
    totals, ones = [], []
    if device == "cuda":  # other variants stay resident: count this call's own allocations on top of its weights
        torch.cuda.synchronize()
        resident = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    for _ in range(repeats):
        for stop, store in ((None, totals), (1, ones)):
            _sync(device)
            start = time.perf_counter()
            _generate(model, ids, new_tokens, mode, stop_after=stop)
            _sync(device)
            store.append(time.perf_counter() - start)
    total, one = statistics.median(totals), statistics.median(ones)
    result = {"tokens_per_s": round(new_tokens / total, 2), "first_call_s": round(first_s, 2),
              "decode_tokens_per_s": round((new_tokens - 1) / (total - one), 2) if total > one else None,
              "generate_s_median": round(total, 4), "tokens": out[0, ids.shape[1]:].tolist()[:8]}
    if device == "cuda":
        extra = torch.cuda.max_memory_allocated() - resident  # KV cache, activations, decoded weights, workspaces
        result["peak_memory_gb"] = round((weight_bytes(model) + extra) / 1e9, 3)
        result["call_memory_gb"] = round(extra / 1e9, 3)
    result["compiled"] = hasattr(model, "_compiled_call") and mode == "compiled-static"
    return result


def time_prefill(model, tokens: int, repeats: int, device: str) -> dict:
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), device=device,
                        generator=torch.Generator(device).manual_seed(1))
    with torch.inference_mode():
        model(ids)  # kernels chosen for this batch
        _sync(device)
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(ids)
            _sync(device)
            samples.append(time.perf_counter() - start)
    return {"prefill_ms": round(statistics.median(samples) * 1e3, 3), "prefill_tokens": tokens}


# ---------------------------------------------------------------------------------------------- plan, report
def plan(variants: list[str], modes: list[str]) -> list[tuple[str, str]]:
    """(variant, measurement) in priority order, so that a time limit cuts the least important: eager generation
    of the first two variants, the compressed one compiled (the static-cache case), the dense one compiled, the
    prefills, the remaining variants, the eager static-cache rows."""
    first, second = variants[:2], variants[2:]
    tasks = [(v, "eager-dynamic") for v in first]
    tasks += [(v, "compiled-static") for v in reversed(first)]
    tasks += [(v, "prefill") for v in first]
    tasks += [(v, w) for v in second for w in ("eager-dynamic", "compiled-static", "prefill")]
    tasks += [(v, "eager-static") for v in variants]
    return [(v, w) for v, w in tasks if w == "prefill" or w in modes]


def markdown(data: dict) -> str:
    m, s = data["machine"], data["settings"]
    cfg = data["model_config"]
    lines = [f"# generate(): dense vs hf_vq ({m['device']})\n",
             f"{m['device']}, torch {m['torch']}, transformers {m.get('transformers')}, {m['date']}. Llama-shaped model "
             f"with random weights (hidden {cfg['hidden_size']}, {cfg['num_hidden_layers']} layers, intermediate "
             f"{cfg['intermediate_size']}, {cfg['num_attention_heads']} heads / {cfg['num_key_value_heads']} KV heads, "
             f"vocabulary {cfg['vocab_size']}; {data['parameters'] / 1e9:.2f} B parameters), {s['dtype']}, batch 1, "
             f"{s['prompt']}-token prompt, {s['new_tokens']} new tokens, greedy"
             + (f"; {s['threads']} threads, load average {data['loadavg_start']} at start, {data.get('loadavg_now')} at "
                "the last row (shared machine)" if m["device"].startswith("cpu") else "") + ". hf_vq: every decoder linear a `VQLinear` "
             "(random codes), embeddings and LM head dense. tok/s = new tokens / wall time of the call (median of "
             f"{s['repeats']}); decode tok/s excludes the prefill (the same call stopped after 1 token subtracted). Prefill: one eager forward "
             f"of {s['prefill']} tokens. `compiled-static` = transformers' static cache, which compiles the decoding "
             "step (CUDA graphs on a GPU). The compressed models here are built directly (no quantizer attached); models "
             "made by `quantize_` or loaded by `from_pretrained` carry hf_vq's transformers quantizer, whose "
             f"`is_compileable` is {data['quantizer_is_compileable']}"
             + (": transformers then does not compile them and their static-cache generation runs like `eager-static`."
                if data['quantizer_is_compileable'] is False else ".") + "\n",
             "| model | weights GB | mode | tok/s | decode tok/s | vs dense | prefill ms | vs dense | peak GB | first call s "
             "| first 8 tokens = eager's |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    dense = {r["mode"]: r for r in data["rows"] if r["variant"] == "dense" and "error" not in r}
    for r in data["rows"]:
        if "error" in r:
            lines.append(f"| {r['variant']} | | {r['mode']} | error: {r['error']} | | | | | | | |")
            continue
        base = dense.get(r["mode"], {})
        if r["mode"] == "prefill":
            ratio = f"{r['prefill_ms'] / base['prefill_ms']:.2f}×" if "prefill_ms" in base else ""
            lines.append(f"| {r['variant']} | {r['weights_gb']} | prefill | | | | {r['prefill_ms']} | {ratio} | | | |")
            continue
        ratio = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}×" if "tokens_per_s" in base else ""
        eager = next((e for e in data["rows"] if e["variant"] == r["variant"] and e["mode"] == "eager-dynamic"
                      and "tokens" in e), None)
        same = "" if eager is None or r["mode"] == "eager-dynamic" else ("yes" if eager["tokens"] == r["tokens"] else "no")
        lines.append(f"| {r['variant']} | {r['weights_gb']} | {r['mode']}{'' if r['compiled'] or 'compiled' not in r['mode'] else ' (NOT compiled)'} "
                     f"| {r['tokens_per_s']} | {r['decode_tokens_per_s']} | {ratio} | | | {r.get('peak_memory_gb', '–')} "
                     f"| {r['first_call_s']} | {same} |")
    if data.get("cuda_kernels"):
        lines += ["\n## Kernels the dispatcher chose (key: codes shape, …, batch bucket)\n"]
        lines += [f"- `{k}`: {v}" for k, v in data["cuda_kernels"].items()]
    if data.get("dispatch_errors"):
        lines += ["\n## Kernel candidates skipped\n"] + [f"- {k}: {v}" for k, v in data["dispatch_errors"].items()]
    lines.append(f"\n```bash\n{data['command']}\n```\n")
    return "\n".join(lines)


def _plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in data["rows"] if "tokens_per_s" in r]
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    width = 0.8 / max(1, len(variants))
    for i, variant in enumerate(variants):
        values = [next((r["tokens_per_s"] for r in rows if r["variant"] == variant and r["mode"] == mode), 0) for mode in modes]
        ax.bar([j + (i - (len(variants) - 1) / 2) * width for j in range(len(modes))], values, width, label=variant)
    ax.set_xticks(range(len(modes)), modes)
    ax.set_ylabel("tokens/s (batch 1)")
    ax.set_title(f"generate(), {data['machine']['device']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def run_task(models: dict, variant: str, task: str, args, dense_builder) -> dict:
    if variant not in models:  # each variant from a fresh dense model (same seed): a compiled model cannot be copied
        model = dense_builder()
        if VARIANTS[variant] is not None:
            compress_(model, VARIANTS[variant])
        models[variant] = model
    model = models[variant]
    row = {"variant": variant, "mode": task, "weights_gb": round(weight_bytes(model) / 1e9, 3)}
    if task == "prefill":
        return {**row, **time_prefill(model, args.prefill, args.repeats, args.device)}
    ids = torch.randint(0, model.config.vocab_size, (1, args.prompt), device=args.device,
                        generator=torch.Generator(args.device).manual_seed(0))
    return {**row, **time_generate(model, ids, args.new_tokens, task, args.repeats)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--modes", nargs="*", default=list(MODES), choices=list(MODES))
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prefill", type=int, default=None, help="prefill tokens (default 512 on GPU, 128 on CPU)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch threads on CPU")
    parser.add_argument("--out", default=None, help="output path without suffix (default results/generate_<device>)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device; use --device cpu", file=sys.stderr)
        return 1
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    args.prefill = args.prefill or (512 if args.device == "cuda" else 128)
    out = Path(args.out or RESULTS / f"generate_{args.device}")
    dtype = torch.float16 if args.device == "cuda" else torch.float32
    models: dict = {}
    dense_builder = lambda: build_dense(args.device, dtype)  # noqa: E731
    data = {"machine": machine(), "model_config": MODELS[args.device], "command": " ".join(["python", *sys.argv]),
            "settings": {"dtype": str(dtype).replace("torch.", ""), "prompt": args.prompt, "new_tokens": args.new_tokens,
                         "prefill": args.prefill, "repeats": args.repeats, "threads": torch.get_num_threads()},
            "quantizer_is_compileable": quantizer_is_compileable(), "loadavg_start": loadavg(), "rows": []}
    for variant, task in plan(args.variants, args.modes):
        try:
            row = run_task(models, variant, task, args, dense_builder)
        except Exception as err:  # noqa: BLE001 - record and go on
            row = {"variant": variant, "mode": task, "error": f"{type(err).__name__}: {str(err)[:300]}"}
        data["rows"].append(row)
        data["parameters"] = sum(p.numel() for p in build_params(models))
        data["loadavg_now"] = loadavg()
        if args.device == "cuda":
            data["cuda_kernels"] = {str(k): f"graphs: {v}; eager: {kernels.cuda_kernels(eager=True).get(k)}"
                                    for k, v in kernels.cuda_kernels().items()}
            data["dispatch_errors"] = {str(k): v for k, v in kernels.cuda_errors().items()}
        print(f"[generate] {row}", flush=True)
        write(out, data, markdown(data), quiet=True)  # after every row: a time limit keeps what was measured
    print(markdown(data))
    try:
        _plot(data, out.with_suffix(".png"))
    except Exception as err:  # noqa: BLE001 - the numbers are written already
        print(f"no plot ({type(err).__name__}: {err})")
    return 0


def build_params(models: dict):
    """The parameters of the dense model (or of the first model built) for the parameter count."""
    model = models.get("dense") or next(iter(models.values()), None)
    return [] if model is None else list(model.parameters())


if __name__ == "__main__":
    sys.exit(main())
