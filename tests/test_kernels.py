"""The native kernels (llmcad.kernels) on every dispatch path this CPU runs: packed matrices
dequantize to the gguf package's reference, products equal the dequantized fp32 product within
the activations' int8 rounding, every path gives the portable path's bits, and each output row
is bit-identical whatever the rows in the call and the thread count."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from llmcad import kernels
from conftest import random_blocks

pytestmark = pytest.mark.skipif(not kernels.available(), reason=kernels.unavailable_reason())
PATHS = kernels.supported_paths() or ("portable",)
SHAPES = [(48, 512), (18, 512), (40, 896), (160, 1536)]  # out x in: 18 and 40 end in a narrower tile; 896 = 3.5 super-blocks


def reference_weights(blocks: torch.Tensor, qtype: str, cols: int) -> torch.Tensor:
    kind = GGMLQuantizationType(kernels.QTYPES[qtype][2])
    return torch.from_numpy(np.asarray(gguf_dequantize(blocks.numpy(), kind), dtype=np.float32).reshape(-1, cols))


def cases():
    return [(q, n, k) for q in kernels.QTYPES for n, k in SHAPES if kernels.fits(q, k)]


@pytest.mark.parametrize("qtype, rows, cols", cases())
def test_packed_matrix_dequantizes_to_the_gguf_reference(qtype, rows, cols):
    blocks = random_blocks(qtype, rows, cols)
    packed = kernels.pack(blocks, qtype, cols)
    assert packed.shape == (rows, kernels.packed_row_bytes(qtype, cols))
    assert torch.equal(kernels.dequantize(packed, qtype, cols), reference_weights(blocks, qtype, cols))


def test_q4_0_quantizer_gives_the_gguf_packages_bits():
    """Blocks of every magnitude from subnormal halves to past the largest half (a scale that
    rounds to infinity), all-zero and constant blocks, ties in magnitude of either sign."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(6000, 64, generator=g) * torch.exp2(torch.randint(-40, 20, (6000, 1), generator=g).float())
    x[0], x[1], x[2, :32], x[3, 7], x[3, 9] = 0.0, 0.25, -3.0, 5.0, -5.0
    with np.errstate(over="ignore"):
        reference = gguf_quantize(x.numpy(), GGMLQuantizationType.Q4_0)
    assert torch.equal(kernels.quantize(x, "q4_0"), torch.from_numpy(np.ascontiguousarray(reference)))
    with pytest.raises(ValueError, match="cannot quantize"):
        kernels.quantize(torch.randn(2, 48), "q4_0")
    with pytest.raises(ValueError, match="cannot quantize"):
        kernels.quantize(torch.randn(2, 256), "q4_k")


@pytest.mark.parametrize("qtype", list(kernels.QTYPES))
def test_packing_into_q4_0_requantizes_each_block_as_the_two_steps_would(qtype):
    cols = 1536 if kernels.fits(qtype, 1536) else 896
    blocks = random_blocks(qtype, 40, cols, seed=6)
    weights = kernels.dequantize(kernels.pack(blocks, qtype, cols), qtype, cols)
    assert torch.equal(kernels.pack(blocks, qtype, cols, into="q4_0"), kernels.pack(kernels.quantize(weights, "q4_0"), "q4_0", cols))
    with pytest.raises(ValueError, match="cannot pack"):
        kernels.pack(blocks, qtype, cols, into="q8_0" if qtype != "q8_0" else "q6_k")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("qtype, rows, cols", cases())
def test_matmul_is_the_dequantized_product(path, qtype, rows, cols):
    """Within the int8 rounding of the activations (per row, one scale per 256 values), and
    with the portable path's very bits (exact integer sums, the same float operations)."""
    blocks = random_blocks(qtype, rows, cols)
    packed = kernels.pack(blocks, qtype, cols)
    x = torch.randn(33, cols, generator=torch.Generator().manual_seed(1))
    exact = x @ reference_weights(blocks, qtype, cols).t()
    y = kernels.matmul(x, packed, qtype, path)
    assert ((y - exact).norm() / exact.norm()).item() < 0.012
    assert torch.equal(y, kernels.matmul(x, packed, qtype, "portable"))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("qtype", list(kernels.QTYPES))
def test_rows_are_bit_identical_at_any_batch_and_thread_count(path, qtype):
    """What speculation rests on: row r of a 128-row call equals row r computed alone, in
    a call of any other size (tiles of 64 rows, odd remainders), with 1 or 2 threads, and
    a column's value does not depend on where it falls among the columns a thread takes."""
    cols = 1536 if kernels.fits(qtype, 1536) else 896
    blocks = random_blocks(qtype, 96, cols, seed=2)
    packed = kernels.pack(blocks, qtype, cols)
    x = torch.randn(128, cols, generator=torch.Generator().manual_seed(3))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        full = kernels.matmul(x, packed, qtype, path)
        for count in (1, 2, 3, 7, 16, 63, 64, 65, 100):
            assert torch.equal(kernels.matmul(x[:count], packed, qtype, path), full[:count]), count
        torch.set_num_threads(1)
        assert torch.equal(kernels.matmul(x, packed, qtype, path), full)
        assert torch.equal(kernels.matmul(x[77:78], packed, qtype, path), full[77:78])
        for first in (1, 3):  # every column shifted to another lane of its tile
            assert torch.equal(kernels.matmul(x, kernels.pack(blocks[first:], qtype, cols), qtype, path), full[:, first:])
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("path", PATHS)
def test_a_product_of_several_matrices_is_each_ones_own_product(path):
    """One call for matrices that share an input (a layer's q, k, v in Q4_K, Q4_K, Q6_K: one
    ends in a narrower tile) gives each column the bits of its matrix's own call, side by
    side, at any row count and thread count."""
    matrices = [(kernels.pack(random_blocks(q, n, 512, seed=i), q, 512), q) for i, (q, n) in enumerate([("q4_k", 48), ("q4_k", 18), ("q6_k", 32)])]
    product = kernels.Product(matrices)
    x = torch.randn(70, 512, generator=torch.Generator().manual_seed(5))
    threads = torch.get_num_threads()
    try:
        for count in (1, 3, 70):
            for n in (1, 2):
                torch.set_num_threads(n)
                alone = torch.cat([kernels.matmul(x[:count], p, q, path) for p, q in matrices], dim=1)
                assert torch.equal(product(x[:count], path), alone), (count, n)
    finally:
        torch.set_num_threads(threads)
    assert product.widths == [48, 18, 32] and product(x[:0]).shape == (0, 98)
    with pytest.raises(ValueError, match="do not hold"):
        kernels.Product([matrices[0], (kernels.pack(random_blocks("q4_k", 16, 256), "q4_k", 256), "q4_k")])


def test_pack_and_matmul_refuse_blocks_that_do_not_hold_the_columns():
    blocks = random_blocks("q4_k", 16, 512)
    packed = kernels.pack(blocks, "q4_k", 512)
    assert kernels.matmul(torch.randn(0, 512), packed, "q4_k").shape == (0, 16)  # no rows: nothing to do
    with pytest.raises(ValueError, match="do not hold"):
        kernels.matmul(torch.randn(2, 768), packed, "q4_k")
    with pytest.raises(ValueError, match="do not hold"):
        kernels.matmul(torch.randn(2, 512), blocks, "q4_k")  # GGUF's own layout, not packed
    with pytest.raises(ValueError, match="do not hold"):
        kernels.pack(blocks, "q4_k", 768)


def test_forced_path_must_be_supported(monkeypatch):
    monkeypatch.setenv(kernels.PATH_ENV, "portable")
    assert kernels.active_path() == "portable"
    monkeypatch.setenv(kernels.PATH_ENV, "neon")
    with pytest.raises(RuntimeError, match="runs only"):
        kernels.active_path()


def test_own_thread_pool_gives_the_same_bits_as_pytorchs_threads():
    """Where no OpenMP runtime is found the library splits columns over a pool of its own;
    a column is computed the same way on any thread, so the bits do not change."""
    lib = kernels._library()[0]
    blocks = kernels.pack(random_blocks("q4_k", 160, 1536), "q4_k", 1536)
    x = torch.randn(20, 1536, generator=torch.Generator().manual_seed(4))
    on_openmp = kernels.matmul(x, blocks, "q4_k")
    lib.llmcad_use_openmp(None, None, None)
    try:
        assert torch.equal(kernels.matmul(x, blocks, "q4_k"), on_openmp)
        assert torch.equal(kernels.matmul(x[:1], blocks, "q4_k"), on_openmp[:1])
    finally:
        lib.llmcad_use_openmp(*kernels._torch_openmp())


def test_without_the_library_the_cli_says_so_and_gguf_is_refused(monkeypatch, capsys, tiny_llama):
    """A machine where the library did not build: one line from the CLI, and precision gguf
    refused with the reason (its reference fallback is not batch-invariant)."""
    from llmcad import cli
    from llmcad.engine import Engine
    from llmcad.errors import LlmcadError

    monkeypatch.setattr(kernels, "_library", lambda: (None, "the native kernel library was not built"))
    assert cli.main(["info", str(tiny_llama)]) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not built; computing with PyTorch's kernels instead" in err
    with pytest.raises(LlmcadError, match="precision gguf needs the native kernels: the native kernel library was not built"):
        Engine.load(tiny_llama, precision="gguf", progress=False)
    assert Engine.load(tiny_llama, precision="int8", progress=False).precision == "int8"


def float64_attention(q, k, v, slots, mask, scale, softcap=None):
    """The reference: grouped-query attention in float64 over the first `slots` cache entries
    (keys transposed: [kv_heads, dim, slots])."""
    rows, heads, dim = q.shape
    group = heads // k.shape[0]
    keys, values = k[..., :slots].transpose(1, 2).double().repeat_interleave(group, 0), v[:, :slots].double().repeat_interleave(group, 0)
    scores = torch.einsum("thd,hsd->hts", q.double(), keys) * scale
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("hts,hsd->thd", torch.softmax(scores, -1), values).reshape(rows, heads * dim).float()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("heads, kv_heads, dim, softcap", [(14, 2, 64, None), (4, 4, 40, None), (8, 2, 256, 50.0)])
def test_attention_rows_are_exact_at_any_batch_thread_count_and_path(path, heads, kv_heads, dim, softcap):
    """Each query row gives the same bits alone as beside others (a tree's verification sees
    what one-token decoding sees), on any thread count and path, and matches float64 attention."""
    g = torch.Generator().manual_seed(heads + dim)
    k, v = torch.randn(kv_heads, dim, 300, generator=g), torch.randn(kv_heads, 300, dim, generator=g)
    q = torch.randn(12, heads, dim, generator=g)
    slots = 257
    mask = torch.rand(12, slots, generator=g) > 0.25
    mask[:, 0] = True
    scale = dim**-0.5
    out = kernels.attention(q, k, v, slots, mask, scale, softcap, path=path)
    assert torch.allclose(out, float64_attention(q, k, v, slots, mask, scale, softcap), atol=2e-6, rtol=1e-5)
    assert torch.equal(out, kernels.attention(q, k, v, slots, mask, scale, softcap, path="portable"))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        for r in (0, 5, 11):
            assert torch.equal(kernels.attention(q[r : r + 1], k, v, slots, mask[r : r + 1], scale, softcap, path=path), out[r : r + 1])
    finally:
        torch.set_num_threads(threads)
    unmasked = kernels.attention(q[:3], k, v, slots, None, scale, softcap, path=path)
    assert torch.equal(unmasked, kernels.attention(q[:3], k, v, slots, torch.ones(3, slots, dtype=torch.bool), scale, softcap, path=path))


def test_attention_refuses_mismatched_shapes():
    k, v = torch.zeros(2, 32, 64), torch.zeros(2, 64, 32)
    with pytest.raises(ValueError, match="do not match"):
        kernels.attention(torch.zeros(1, 4, 16), k, v, 10, None, 1.0)  # head dims differ
    with pytest.raises(ValueError, match="do not match"):
        kernels.attention(torch.zeros(1, 4, 32), k, v, 65, None, 1.0)  # more slots than the cache holds
    with pytest.raises(ValueError, match="is not bool"):
        kernels.attention(torch.zeros(1, 4, 32), k, v, 10, torch.ones(1, 9, dtype=torch.bool), 1.0)
    with pytest.raises(ValueError, match="refused"):
        kernels.attention(torch.zeros(1, 3, 32), k, v, 10, None, 1.0)  # 3 heads over 2 key/value heads


def test_rms_norm_rows_are_their_own_and_as_accurate_as_pytorch_s():
    """The native norm: each row's bits alone as in a batch or a strided view, within an ulp of
    PyTorch's formula and no farther from the float64 value than it."""
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(9, 4, 96, generator=g) * 5, torch.randn(96, generator=g)
    out = kernels.rms_norm(x, w, 1e-6)
    exact = x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-6) * w.double()
    torch_out = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w
    assert (out.double() - exact).abs().max() <= (torch_out.double() - exact).abs().max()
    assert torch.allclose(out, torch_out, rtol=1e-6, atol=0)
    assert torch.equal(kernels.rms_norm(x[4, 2], w, 1e-6), out[4, 2])
    wide = torch.randn(9, 4, 200, generator=g)
    wide[..., 50:146] = x
    assert torch.equal(kernels.rms_norm(wide[..., 50:146], w, 1e-6), out)  # rows 200 floats apart
    with pytest.raises(ValueError, match="not float32"):
        kernels.rms_norm(x, w[:95], 1e-6)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("heads, kv_heads, dim, rot", [(12, 2, 128, 128), (4, 4, 40, 24)])
def test_rotary_attention_is_the_model_s_rotation_cache_writes_and_attention(path, heads, kv_heads, dim, rot):
    """The one-call path the model takes with the library gives the bits of its PyTorch
    rotation (whole or partial), its cache writes and `attention`, from strided views of one
    product's output; cache slots outside the pass's are left alone."""
    from llmcad.model import rotate

    g = torch.Generator().manual_seed(dim)
    rows, start, capacity = 5, 37, 64
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * dim + 3, generator=g)  # the columns of one product, padded
    q, k, v = qkv[:, 3:].split([heads * dim, kv_heads * dim, kv_heads * dim], dim=1)
    q, k, v = q.view(rows, heads, dim), k.view(rows, kv_heads, dim), v.view(rows, kv_heads, dim)
    angles = torch.randn(rows, 1, rot // 2, generator=g).repeat(1, 1, 2) * 3
    cos, sin = angles.cos(), angles.sin()
    k_cache, v_cache = torch.randn(kv_heads, dim, capacity, generator=g), torch.randn(kv_heads, capacity, dim, generator=g)
    mask = torch.rand(rows, start + rows, generator=g) > 0.3
    mask[:, 0] = True
    want_k, want_v = k_cache.clone(), v_cache.clone()
    want_k[:, :, start : start + rows] = rotate(k, cos, sin).permute(1, 2, 0)
    want_v[:, start : start + rows] = v.transpose(0, 1)
    want = kernels.attention(rotate(q, cos, sin), want_k, want_v, start + rows, mask, 0.1, path=path)
    got = kernels.rotary_attention(q, k, v, cos, sin, k_cache, v_cache, start, mask, 0.1, path=path)
    assert torch.equal(got, want) and torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)
    with pytest.raises(ValueError, match="cannot take"):
        kernels.rotary_attention(q, k, v, cos, sin, k_cache, v_cache, capacity - 2, None, 0.1, path=path)
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)


@pytest.mark.parametrize("path", PATHS)
def test_attention_does_not_depend_on_where_the_attended_slots_lie(path):
    """A tree node attends to the prefix and to its ancestors, scattered among other nodes'
    slots; once its path is committed the same keys sit next to each other. Both give the
    same bits (the order of every sum counts only the attended slots)."""
    g = torch.Generator().manual_seed(7)
    heads, kv_heads, dim = 6, 2, 48
    k, v = torch.randn(kv_heads, dim, 200, generator=g), torch.randn(kv_heads, 200, dim, generator=g)
    q = torch.randn(1, heads, dim, generator=g)
    attended = list(range(90)) + [97, 131, 160]
    mask = torch.zeros(1, 161, dtype=torch.bool)
    mask[0, attended] = True
    scattered = kernels.attention(q, k, v, 161, mask, dim**-0.5, path=path)
    packed_k, packed_v = torch.zeros_like(k), torch.zeros_like(v)
    packed_k[..., : len(attended)], packed_v[:, : len(attended)] = k[..., attended], v[:, attended]
    assert torch.equal(kernels.attention(q, packed_k, packed_v, len(attended), None, dim**-0.5, path=path), scattered)


def quant_block(seed: int = 0):
    """A Qwen2-style layer (q, k and v with biases; grouped-query attention) whose linears are
    packed GGUF blocks of several types (those the gguf package quantizes, so the weights are
    of a real model's size), with random norm weights: 4 heads of 128 over 2 key/value heads,
    hidden 512, MLP 768."""
    from llmcad.config import ModelConfig
    from llmcad.model import Block
    from llmcad.quant import QuantLinear

    config = ModelConfig("qwen2", 64, 512, 768, 1, 4, 2, 128, 1e-6, 10000.0, 256, False, True)
    block = Block(config).eval()
    types = {"q_proj": "q4_0", "k_proj": "q4_0", "v_proj": "q8_0", "o_proj": "q5_0", "gate_proj": "q4_0", "up_proj": "q5_0", "down_proj": "q8_0"}
    g = torch.Generator().manual_seed(seed)
    for i, (name, qtype) in enumerate(types.items()):
        parent = block.self_attn if name[0] in "qkvo" else block.mlp
        linear = getattr(parent, name)
        packed = kernels.pack(random_blocks(qtype, linear.out_features, linear.in_features, seed=seed * 10 + i), qtype, linear.in_features)
        bias = torch.randn(linear.out_features, generator=g) * 0.1 if linear.bias is not None else None
        setattr(parent, name, QuantLinear(qtype, packed, bias))
    for norm in (block.input_layernorm, block.post_attention_layernorm):
        norm.weight.data = 1 + 0.1 * torch.randn(512, generator=g)
    return block


def rotary_tables(positions: torch.Tensor, dim: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    angles = positions.float()[:, None] * 10000.0 ** (-torch.arange(0, dim, 2) / dim)
    angles = torch.cat((angles, angles), dim=-1)[:, None, :]
    return angles.cos(), angles.sin()


@pytest.mark.parametrize("path", PATHS)
def test_native_layer_is_the_modules_calls_one_by_one(path, monkeypatch):
    """The whole-layer call the model makes where its family allows writes the cache entries
    the modules' calls write (the same bits) and gives their output, but for silu's exp (a
    polynomial, within two ulps of PyTorch's; an ulp may move an activation's int8 rounding)."""
    monkeypatch.setenv(kernels.PATH_ENV, path)
    block = quant_block()
    assert block.native_family and block._native_layer() is not None
    g = torch.Generator().manual_seed(1)
    rows, start = 6, 20
    x = torch.randn(rows, 512, generator=g)
    cos, sin = rotary_tables(torch.arange(start, start + rows))
    mask = torch.ones(rows, start + rows, dtype=torch.bool).tril(start)
    caches = {}
    for native in (True, False):
        block.native_family = native
        k, v = torch.randn(2, 128, 32, generator=torch.Generator().manual_seed(2)), torch.randn(2, 32, 128, generator=torch.Generator().manual_seed(3))
        caches[native] = block(x, cos, sin, k, v, start, mask), k, v
    (native_out, native_k, native_v), (modules_out, modules_k, modules_v) = caches[True], caches[False]
    assert torch.equal(native_k, modules_k) and torch.equal(native_v, modules_v)
    atol = 2e-3 * float(modules_out.abs().max())
    torch.testing.assert_close(native_out, modules_out, rtol=0, atol=atol)
    assert float((modules_out - x).abs().max()) > 20 * atol  # the layer's own part far outweighs the tolerance


@pytest.mark.parametrize("path", PATHS)
def test_native_layer_rows_are_bit_identical_to_one_token_decoding(path):
    """What verification rests on, for the whole layer: a pass of 9 rows (a causal prefix,
    then tree-like rows that skip a sibling) gives each row the bits of that row run on its
    own over the same cache entries, with 1 or 2 threads; a refused pass leaves the cache alone."""
    block = quant_block(seed=1)
    layer = block._native_layer()
    g = torch.Generator().manual_seed(4)
    rows, start = 9, 11
    x = torch.randn(rows, 512, generator=g)
    cos, sin = rotary_tables(torch.arange(start, start + rows))
    mask = torch.ones(rows, start + rows, dtype=torch.bool).tril(start)
    mask[6:, start + 5] = False  # rows 6.. do not see row 5 (a sibling in a tree)
    base_k, base_v = torch.randn(2, 128, 40, generator=g), torch.randn(2, 40, 128, generator=g)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        k, v = base_k.clone(), base_v.clone()
        full = layer(x, cos, sin, k, v, start, mask, path=path)
        for n in (1, 2):
            torch.set_num_threads(n)
            for r in range(rows):
                k_r, v_r = k.clone(), v.clone()  # every row's entry in place, as after the pass
                one = layer(x[r : r + 1], cos[r : r + 1], sin[r : r + 1], k_r, v_r, start + r, mask[r : r + 1, : start + r + 1], path=path)
                assert torch.equal(one, full[r : r + 1]), (n, r)
                assert torch.equal(k_r, k) and torch.equal(v_r, v)
    finally:
        torch.set_num_threads(threads)
    before_k, before_v = k.clone(), v.clone()
    with pytest.raises(ValueError, match="cannot take"):
        layer(x, cos, sin, k, v, 35, None, path=path)  # 9 rows from slot 35 of 40
    assert torch.equal(k, before_k) and torch.equal(v, before_v)
