"""The custom op `hf_vq::vq_linear` and compiled graphs: same outputs as eager, the fast kernel inside the graph.

CPU tests use a tiny model (`torch.compile` with inductor on a two-layer stack, `aot_eager` for the Llama
generation test) so the file runs in well under a minute; CUDA tests (CUDA graphs, `mode="reduce-overhead"`,
transformers' static cache) skip without a GPU.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hf_vq import kernels
from hf_vq.codec import decode
from hf_vq.kernels import dispatch
from hf_vq.nn import VQEmbedding, VQLinear

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _vq_linear(rows: int, cols: int, *, k: int = 16, d: int = 4, m: int = 1, seed: int = 0,
               dtype: torch.dtype = torch.float32, device: str = "cpu") -> VQLinear:
    gen = torch.Generator().manual_seed(seed)
    vq = VQLinear.from_float(nn.Linear(cols, rows, device="meta"), kind="linear", k=k, d=d, num_codebooks=m,
                             device="cpu", dtype=torch.float32)
    vq.set_codes_(torch.randint(0, k, (rows, cols // d, m), generator=gen), torch.randn(m, k, d, generator=gen))
    vq.bias = nn.Parameter(torch.randn(rows, generator=gen))
    return vq.to(device=device, dtype=dtype)


def _stack(**kwargs) -> nn.Module:
    """Two VQ linears: 4-bit codes (unpacked in the graph) and 2 x 8-bit codes (the stored bytes)."""
    return nn.Sequential(_vq_linear(32, 16, **kwargs), nn.GELU(),
                         _vq_linear(16, 32, k=256, d=8, m=2, seed=1, **kwargs)).eval().requires_grad_(False)


def _inputs(seed: int = 0, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------- the op
@pytest.mark.parametrize("case", ["3d-bias-scales", "2d-plain", "requires-grad"])
def test_opcheck(case):
    """Schema, fake tensor, autograd registration and AOT dispatch (dynamic shapes) of the custom op."""
    codes = torch.randint(0, 16, (24, 8, 2), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    books, x = _inputs(1, 2, 16, 4), _inputs(2, 3, 5, 32)
    bias, scales = _inputs(3, 24), _inputs(4, 24).abs() + 0.5
    args = {"3d-bias-scales": (x, codes, books, bias, scales), "2d-plain": (x[0], codes, books, None, None),
            "requires-grad": (x.requires_grad_(), codes, books.requires_grad_(), bias.requires_grad_(),
                              scales.requires_grad_())}[case]
    torch.library.opcheck(torch.ops.hf_vq.vq_linear.default, args)


def test_op_forward_and_backward_match_reference():
    codes = torch.randint(0, 16, (24, 8, 2), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    leaves = [t.requires_grad_() for t in (_inputs(1, 4, 32), _inputs(2, 2, 16, 4), _inputs(3, 24),
                                            _inputs(4, 24).abs() + 0.5)]
    x, books, bias, scales = leaves
    out = torch.ops.hf_vq.vq_linear(x, codes, books, bias, scales)
    ref = F.linear(x, decode(codes, books) * scales[:, None], bias)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    weights = _inputs(5, 4, 24)
    grads = torch.autograd.grad((out * weights).sum(), leaves)
    ref_grads = torch.autograd.grad((ref * weights).sum(), leaves)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------- torch.compile (CPU)
def test_compiled_stack_one_graph_with_the_op():
    """The modules trace without graph breaks and the graph calls the op (no in-graph decode)."""
    model, x = _stack(), _inputs(0, 3, 16)
    with torch.no_grad():
        explained = torch._dynamo.explain(model)(x)
    assert explained.graph_count == 1 and explained.graph_break_count == 0
    targets = [str(node.target) for node in explained.graphs[0].graph.nodes]
    assert sum("hf_vq.vq_linear" in t for t in targets) == 2
    assert not any("embedding" in t for t in targets)


def test_compiled_inductor_matches_eager(monkeypatch):
    """inductor, fullgraph: same outputs as eager for two batch sizes; the op's body (the fast kernels) runs."""
    model = _stack()
    calls = []
    impl = dispatch.linear_impl
    monkeypatch.setattr(dispatch, "linear_impl", lambda *a: calls.append(a[0].shape) or impl(*a))
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        for batch in (3, 5):
            x = _inputs(batch, batch, 16)
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
    assert len(calls) >= 2


def test_compiled_training_uses_reference_and_matches_eager():
    """With gradients the compiled module decodes in the graph (the reference path), like eager."""
    model = _stack().requires_grad_(True)
    x = _inputs(0, 3, 16)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    compiled(x).pow(2).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model(x).pow(2).sum().backward()
    for got, p in zip(grads, model.parameters()):
        torch.testing.assert_close(got, p.grad, rtol=1e-5, atol=1e-5)


def test_compiled_embedding_and_cache_decoded():
    emb = VQEmbedding.from_float(nn.Embedding(40, 16), kind="embedding", k=16, d=4)
    emb.set_codes_(torch.randint(0, 16, (40, 4, 1)), _inputs(0, 1, 16, 4))
    ids = torch.tensor([[1, 5, 39], [0, 2, 2]])
    model = _stack()
    for module in model.modules():
        if isinstance(module, VQLinear):
            module.cache_decoded = True
    x = _inputs(0, 3, 16)
    with torch.no_grad():
        want = model(x)  # fills the caches
        explained = torch._dynamo.explain(emb)(ids)
        assert explained.graph_break_count == 0
        torch.testing.assert_close(torch.compile(emb, backend="aot_eager", fullgraph=True)(ids), emb(ids))
        torch.testing.assert_close(torch.compile(model, backend="aot_eager", fullgraph=True)(x), want)


def _tiny_llama(device: str = "cpu", dtype: torch.dtype = torch.float32):
    import hf_vq
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    model = LlamaForCausalLM(config).eval()
    hf_vq.quantize_(model, hf_vq.VQConfig(k=256, n_iter=2, permute=False), progress=False)
    return model.to(device=device, dtype=dtype).requires_grad_(False)


def _allow_compile(monkeypatch, model) -> None:
    """transformers compiles static-cache generation only if the quantizer says the model is compileable."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and not quantizer.is_compileable:
        monkeypatch.setattr(type(quantizer), "is_compileable", property(lambda self: True))


def test_static_cache_generate_compiled_matches_eager(monkeypatch):
    """transformers' static cache compiles the decoding step; the graph calls the op and the tokens are eager's."""
    from transformers.generation.configuration_utils import CompileConfig

    model = _tiny_llama()
    _allow_compile(monkeypatch, model)
    ids = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(0))
    compile_config = CompileConfig(backend="aot_eager", fullgraph=True)
    compile_config._compile_all_devices = True  # transformers compiles on CPU only when asked to
    calls = []
    impl = dispatch.linear_impl
    monkeypatch.setattr(dispatch, "linear_impl", lambda *a: calls.append(1) or impl(*a))
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=5, do_sample=False)
        got = model.generate(ids, max_new_tokens=5, do_sample=False, cache_implementation="static",
                             compile_config=compile_config)
    assert hasattr(model, "_compiled_call")  # the decoding steps ran compiled
    assert calls  # ... through the op
    assert got.tolist() == want.tolist()


# ---------------------------------------------------------------------------------------------- CUDA
@CUDA
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_cuda_graph_replay_matches_eager(dtype):
    """After one eager call (the kernel choice), a CUDA-graph capture replays the fast kernel: same result."""
    vq = _vq_linear(256, 512, k=256, d=4, dtype=dtype, device="cuda").requires_grad_(False)
    x = torch.randn(1, 512, dtype=dtype, device="cuda")
    with torch.no_grad():
        want = vq(x)  # chooses (times the candidates) outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
            out = vq(x)
        torch.cuda.current_stream().wait_stream(stream)
        graph.replay()
        torch.cuda.synchronize()
    assert kernels.select_path(x, vq.unpacked_codes(), vq.codebooks) in ("triton", "decode")
    torch.testing.assert_close(out, want, rtol=2e-2, atol=2e-2)  # the graph may run another kernel (least GPU time)


@CUDA
def test_cuda_reduce_overhead_compile_matches_eager():
    model = _stack(dtype=torch.float16, device="cuda")
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    x = torch.randn(1, 16, dtype=torch.float16, device="cuda")
    with torch.no_grad():
        want = model(x)
        for _ in range(3):  # warm-up, recording, replay
            got = compiled(x)
    torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)


@CUDA
def test_cuda_static_cache_generate(monkeypatch):
    model = _tiny_llama("cuda", torch.float16)
    _allow_compile(monkeypatch, model)
    ids = torch.randint(0, 128, (1, 8), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=8, do_sample=False)
        got = model.generate(ids, max_new_tokens=8, do_sample=False, cache_implementation="static")
    assert hasattr(model, "_compiled_call")
    assert got.tolist() == want.tolist()


@CUDA
def test_cuda_no_host_sync_after_first_call():
    """Once a shape's kernel is chosen, eager calls launch without synchronising the host."""
    vq = _vq_linear(512, 1024, k=256, d=4, dtype=torch.float16, device="cuda").requires_grad_(False)
    x = torch.randn(2, 1024, dtype=torch.float16, device="cuda")
    with torch.no_grad():
        vq(x)
        torch.cuda.set_sync_debug_mode("error")
        try:
            vq(x)
        finally:
            torch.cuda.set_sync_debug_mode("default")
