"""The model runtime against Hugging Face transformers, on tiny random models (fp32)."""

from __future__ import annotations

import pytest
import torch

from llmcad import kernels
from llmcad.model import KVCache
from llmcad.weights import load_model, open_checkpoint
from conftest import make_tiny_hf, random_blocks, write_gguf

TOL = 1e-4


def hf_logits(folder, ids: list[int], gguf_file: str | None = None) -> torch.Tensor:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, torch_dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def run(model, ids: list[int], chunks: list[int], max_len: int = 64) -> torch.Tensor:
    """Our logits for `ids`, fed through the KV cache in chunks of the given sizes."""
    cache = KVCache(model.config, max_len)
    out, start = [], 0
    for size in chunks:
        tokens = torch.tensor(ids[start : start + size])
        out.append(model(tokens, torch.arange(start, start + size), cache, start))
        start += size
    return torch.cat(out)


def prompt(vocab: int, n: int = 12, seed: int = 1) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_prefill_and_decode_match_transformers(tiny_model):
    ckpt = open_checkpoint(tiny_model)
    model = load_model(ckpt, "fp32")
    ids = prompt(ckpt.config.vocab_size)
    expected = hf_logits(tiny_model, ids)
    assert expected.abs().max() > 1.0  # the comparison is not between near-zero logits
    torch.testing.assert_close(run(model, ids, [len(ids)]), expected, atol=TOL, rtol=0)  # no cache reuse
    torch.testing.assert_close(run(model, ids, [5] + [1] * 7), expected, atol=TOL, rtol=0)  # step decode
    torch.testing.assert_close(run(model, ids, [4, 3, 5]), expected, atol=TOL, rtol=0)  # chunked prefill


def test_step_decode_matches_transformers_cache(tiny_llama):
    """transformers' own incremental decoding (with its KV cache) agrees with ours."""
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama, torch_dtype=torch.float32)
    model = load_model(open_checkpoint(tiny_llama))
    ids = prompt(model.config.vocab_size, 6)
    with torch.no_grad():
        out = hf(torch.tensor([ids]), use_cache=True)
        past, steps = out.past_key_values, [out.logits[0]]
        for t in [3, 7, 11]:
            out = hf(torch.tensor([[t]]), past_key_values=past, use_cache=True)
            past = out.past_key_values
            steps.append(out.logits[0])
    torch.testing.assert_close(run(model, ids + [3, 7, 11], [6, 1, 1, 1]), torch.cat(steps), atol=TOL, rtol=0)


def test_llama3_rope_scaling_matches_transformers(tmp_path):
    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    folder = make_tiny_hf(tmp_path / "m", "llama", rope_scaling=scaling, rope_theta=500000.0)
    model = load_model(open_checkpoint(folder))
    assert model.config.rope_scaling["rope_type"] == "llama3"
    ids = prompt(model.config.vocab_size, 40)
    torch.testing.assert_close(run(model, ids, [40], 80), hf_logits(folder, ids), atol=TOL, rtol=0)


def test_explicit_positions_and_mask_run_a_tree():
    """Two branches after a shared prefix, run in one pass with a tree mask, equal running
    each branch as a plain sequence; KVCache.move then commits one branch."""
    from llmcad.config import ModelConfig
    from llmcad.model import Transformer

    config = ModelConfig("llama", 50, 32, 48, 2, 4, 2, 8, 1e-5, 10000.0, 128, False, False)
    torch.manual_seed(0)
    model = Transformer(config)
    for p in model.parameters():
        torch.nn.init.normal_(p, 0, 0.3)
    prefix, a, b = [1, 2, 3], [4, 5], [6, 7]
    cache = KVCache(config, 32)
    model(torch.tensor(prefix), torch.arange(3), cache, 0)
    # slots 3..6 hold a0 a1 b0 b1; a1 sees a0, b1 sees b0
    tree = torch.tensor(a + b)
    positions = torch.tensor([3, 4, 3, 4])
    mask = torch.zeros(4, 7, dtype=torch.bool)
    mask[:, :3] = True
    for node, ancestors in {0: [0], 1: [0, 1], 2: [2], 3: [2, 3]}.items():
        mask[node, [3 + i for i in ancestors]] = True
    tree_logits = model(tree, positions, cache, 3, mask)
    for branch, rows in ((a, [0, 1]), (b, [2, 3])):
        linear = run(model, prefix + branch, [5], 32)[3:]
        torch.testing.assert_close(tree_logits[rows], linear, atol=1e-5, rtol=0)
    cache.move(torch.tensor([5, 6]), 3)  # keep branch b
    step = model(torch.tensor([9]), torch.tensor([5]), cache, 5)
    torch.testing.assert_close(step, run(model, prefix + b + [9], [6], 32)[-1:], atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_gguf_matches_transformers(tmp_path, arch):
    """A tiny GGUF with F32, F16 and quantized (Q8_0, Q4_0, Q5_0) tensors loads like
    transformers loads it (the same dequantized weights, llama's q/k permutation undone)."""
    folder = make_tiny_hf(tmp_path / "hf", arch)
    gguf_path = write_gguf(folder, tmp_path / "hf" / "tiny.gguf", {"ffn_up": "Q8_0", "ffn_gate": "Q4_0", "attn_output": "Q5_0", "token_embd": "F32"})
    ckpt = open_checkpoint(gguf_path)
    reference = open_checkpoint(folder).config
    assert ckpt.format == "gguf"
    for key in ("arch", "vocab_size", "num_layers", "num_kv_heads", "head_dim", "tie_word_embeddings"):
        assert getattr(ckpt.config, key) == getattr(reference, key)
    model = load_model(ckpt)
    ids = prompt(ckpt.config.vocab_size)
    expected = hf_logits(tmp_path / "hf", ids, gguf_file="tiny.gguf")
    torch.testing.assert_close(run(model, ids, [7, 1, 1, 1, 1, 1]), expected, atol=TOL, rtol=0)
    # quantization really happened: the GGUF model differs from the fp32 original
    assert (expected - hf_logits(folder, ids)).abs().max() > 1e-3


def test_int8_linear_and_embedding_match_fp32():
    from llmcad.quant import Int8Embedding, linear_from, linear_tensors

    torch.manual_seed(0)
    weight, bias = torch.randn(300, 200), torch.randn(300)
    x = torch.randn(5, 200)
    ref = torch.nn.functional.linear(x, weight, bias)
    out = linear_from(linear_tensors(weight, bias, "int8"))(x)
    assert out.shape == ref.shape
    assert (out - ref).norm() / ref.norm() < 0.02
    ids = torch.tensor([0, 7, 299])
    emb = Int8Embedding.quantize(weight)(ids)
    assert ((emb - weight[ids]).abs() <= weight[ids].abs().amax(1, keepdim=True) / 254 + 1e-6).all()


@pytest.mark.parametrize("precision", ["int8", "q4"])
def test_quantized_linear_rows_do_not_depend_on_the_batch_or_threads(precision):
    """A row's output is bit-identical alone or in any batch, at one thread or two (what
    lets a quantized target verify a token tree losslessly)."""
    from llmcad.quant import linear_from, linear_tensors

    torch.manual_seed(0)
    linear = linear_from(linear_tensors(torch.randn(96, 128), torch.randn(96), precision))
    x = torch.randn(17, 128) * torch.logspace(-2, 2, 17)[:, None]  # rows of very different ranges
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            batch = linear(x)
            for i in range(17):
                assert torch.equal(linear(x[i : i + 1]), batch[i : i + 1])
            assert torch.equal(linear(x[5:11]), batch[5:11])
            if n == 1:
                first = batch
        assert torch.equal(batch, first)
    finally:
        torch.set_num_threads(threads)


def test_q4_linear_is_near_fp32_and_falls_back_to_int8_where_the_kernel_cannot():
    from llmcad.quant import Q4_GROUP, Int8Linear, Q4Linear, linear_from, linear_tensors

    torch.manual_seed(0)
    weight, bias, x = torch.randn(256, 512), torch.randn(256), torch.randn(8, 512)
    ref = torch.nn.functional.linear(x, weight, bias)
    q4 = linear_from(linear_tensors(weight, bias, "q4"))
    assert isinstance(q4, Q4Linear)
    assert q4.qweight.nbytes + q4.qscales.nbytes == weight.numel() // 2 + weight.numel() // Q4_GROUP * 4  # 5 bits a weight
    err = ((q4(x) - ref).norm() / ref.norm()).item()
    assert 0.02 < err < 0.12  # 4-bit: coarser than int8 (about 0.01 here), but near
    # weights already on a 4-bit grid per group (as a Q4_K GGUF's are) keep it: only bf16 rounding is lost
    codes = torch.randint(0, 13, (256, 512)).float()  # 13 of the 16 levels used: a min-max fit would not land on them
    steps, lows = torch.rand(256, 512 // Q4_GROUP) + 0.1, torch.randn(256, 512 // Q4_GROUP)
    on_grid = (codes.view(256, -1, Q4_GROUP) * steps[..., None] + lows[..., None]).view(256, 512)
    ref = torch.nn.functional.linear(x, on_grid)
    assert ((linear_from(linear_tensors(on_grid, None, "q4"))(x) - ref).norm() / ref.norm()).item() < 0.006  # min-max: 0.03
    # constant groups (a zero block, one repeated value) are one level, reproduced exactly
    on_grid[:, :Q4_GROUP] = 0.0
    on_grid[:3, Q4_GROUP : 2 * Q4_GROUP] = 0.25
    dequantized = linear_from(linear_tensors(on_grid, None, "q4"))(torch.eye(512)).t()
    assert dequantized.isfinite().all()
    assert torch.equal(dequantized[:, :Q4_GROUP], torch.zeros(256, Q4_GROUP))
    assert torch.equal(dequantized[:3, Q4_GROUP : 2 * Q4_GROUP], torch.full((3, Q4_GROUP), 0.25))
    # rows not in 16s or columns not in whole groups: int8 instead
    assert isinstance(linear_from(linear_tensors(torch.randn(40, 512), None, "q4")), Int8Linear)
    assert isinstance(linear_from(linear_tensors(torch.randn(64, 100), None, "q4")), Int8Linear)


@pytest.mark.skipif(not kernels.available(), reason=kernels.unavailable_reason())
def test_q4_0_keeps_4_bit_blocks_and_requantizes_the_rest():
    """Precision q4_0: GGUF Q4_K blocks kept as they are, other formats' blocks (here Q6_K)
    requantized to Q4_0 from their own values in one native pass, float matrices quantized a
    few rows at a time: the same blocks either way."""
    from llmcad.quant import QuantBlocks, QuantLinear, linear_from, linear_tensors, packed_blocks

    x = torch.randn(5, 512, generator=torch.Generator().manual_seed(0))
    kept = QuantBlocks("q4_k", random_blocks("q4_k", 64, 512), 512)
    assert torch.equal(linear_tensors(kept, None, "q4_0")["q4_k"], kernels.pack(kept.data, "q4_k", 512))
    six = QuantBlocks("q6_k", random_blocks("q6_k", 64, 512), 512)
    source = kernels.dequantize(kernels.pack(six.data, "q6_k", 512), "q6_k", 512)
    for matrix in (six, source):
        linear = linear_from(linear_tensors(matrix, None, "q4_0"))
        assert isinstance(linear, QuantLinear) and linear.qtype == "q4_0"
        assert torch.equal(linear.blocks, kernels.pack(kernels.quantize(source), "q4_0", 512))
    assert torch.equal(packed_blocks(source, "q4_0", chunk=7), linear.blocks)  # floats a few rows at a time
    ref = x @ source.t()
    assert ((linear(x) - ref).norm() / ref.norm()).item() < 0.15  # 4 bits with one scale per 32


def test_int8_model_is_close_to_fp32(tiny_model):
    """A whole tiny random model in int8 stays near fp32 (its random activations are
    harsher on 8-bit quantization than a trained model's; the real-model figures are in
    bench/resident.py)."""
    ckpt = open_checkpoint(tiny_model)
    ids = prompt(ckpt.config.vocab_size, 16)
    ref = run(load_model(ckpt, "fp32"), ids, [16])
    q = run(load_model(ckpt, "int8"), ids, [10] + [1] * 6)
    assert (q - ref).norm() / ref.norm() < 0.1  # argmax agreement is not checked: random logits are near-ties


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_a_head_over_some_tokens_gives_their_logits_and_minus_infinity_elsewhere(tiny_model, precision):
    """A draft's truncated vocabulary: tied (qwen2) or not, with the embedding read on
    demand, the kept tokens' logits are the full model's and the others' -inf."""
    ckpt = open_checkpoint(tiny_model)
    vocab = ckpt.config.vocab_size
    ids = prompt(vocab)
    keep = sorted({*range(100), 150, 151, vocab - 1})  # a run, a pair and the last row
    # the reference reads its embedding the same way (from the checkpoint, not int8) and keeps every row
    full = run(load_model(ckpt, precision, embedding_on_demand=True, head_ids=range(vocab)), ids, [8, 1, 1, 1, 1])
    model = load_model(ckpt, precision, embedding_on_demand=True, head_ids=keep)
    part = run(model, ids, [8, 1, 1, 1, 1])
    assert model.lm_head.head.weight.shape[0] == len(keep)  # only those rows are held
    outside = torch.ones(vocab, dtype=torch.bool)
    outside[keep] = False
    assert torch.isneginf(part[:, outside]).all()
    torch.testing.assert_close(part[:, keep], full[:, keep], atol=1e-5, rtol=0)


def test_missing_tensor_and_repeated_tied_head(tmp_path):
    from safetensors.torch import load_file, save_file

    from llmcad.errors import LlmcadError

    folder = make_tiny_hf(tmp_path / "m", "qwen2")  # tied: the file has no lm_head
    weights = folder / "model.safetensors"
    state = load_file(weights)
    save_file({**state, "lm_head.weight": state["model.embed_tokens.weight"].clone()}, weights)
    ids = prompt(open_checkpoint(folder).config.vocab_size)
    torch.testing.assert_close(run(load_model(open_checkpoint(folder)), ids, [len(ids)]), hf_logits(folder, ids), atol=TOL, rtol=0)
    load_model(open_checkpoint(folder), "int8")  # a repeated tied head is skipped, not an error
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, weights)
    with pytest.raises(LlmcadError, match="missing tensors: layers.1.mlp.up_proj.weight"):
        load_model(open_checkpoint(folder))
