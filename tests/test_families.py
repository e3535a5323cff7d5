"""The model families (llmcad.families) against Hugging Face transformers, on tiny random
models built here: Qwen3 (q/k norms, a head_dim that is not hidden/heads; also with its
sliding window on some layers), Mistral (a sliding window shorter than the prompts), Phi-3
(fused projections; also partial rotary, longrope and a window), Gemma 2 (GeGLU, scaled
embeddings, (1 + w) norms around both sublayers, soft-capped scores and logits, local and
global layers alternating) and Gemma 3 (q/k norms, 5 local layers then a global one, the
local ones with their own rotary base, linear rope scaling on the global ones; also with
its own query scale, pattern and local base, and as a multimodal checkpoint's language
model). Each from its folder and from a GGUF written the way llama.cpp's converter writes
it: logits within 1e-4 of transformers' in fp32 for prefill, step decode and a token tree
in one pass, past the window; greedy speculation equals the target alone; streamed equals
resident; `llmcad info`; the draft/target vocabulary check; Gemma's GGUF tokenizer."""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from llmcad import cli, kernels
from llmcad.config import ModelConfig
from llmcad.engine import Engine
from llmcad.errors import LlmcadError
from llmcad.gguf_file import GGUFFile
from llmcad.model import KVCache
from llmcad.store import LayerStore, convert
from llmcad.tokenizer import Tokenizer, token_strings_of_gguf
from llmcad.streaming import StreamedTransformer
from llmcad.tree import TokenTree
from llmcad.weights import load_model, open_checkpoint
from conftest import make_tiny_hf, varied_strings, write_gguf

# float32 throughout, attention included (the native kernel sums in its own fixed order,
# transformers in PyTorch's): logits agree to a few units in the 5th digit; garbage is far off
TOL = 2e-4
WINDOW = 16
PROMPT = 44  # longer than every window and than longrope's original context

LONGROPE = {
    "type": "longrope",
    "short_factor": [1.0 + 0.15 * i for i in range(6)],  # 6 pairs: 12 of the 16 head dims rotate
    "long_factor": [1.5 + 0.6 * i for i in range(6)],
}
VARIANTS = {
    "qwen3": dict(arch="qwen3", head_dim=24, tie_word_embeddings=True),
    # layer 0 attends to everything, layers 1 and 2 to a window
    "qwen3-window": dict(arch="qwen3", head_dim=24, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
    "mistral": dict(arch="mistral", sliding_window=WINDOW),
    "phi3": dict(arch="phi3", pad_token_id=None),
    "phi3-longrope": dict(
        arch="phi3", pad_token_id=None, partial_rotary_factor=0.75, rope_scaling=LONGROPE,
        max_position_embeddings=128, original_max_position_embeddings=32, sliding_window=24,
    ),
}
# Gemma: head_dim set (its default is 256); soft caps small enough to bite on these weights
GEMMA2 = dict(arch="gemma2", head_dim=16, query_pre_attn_scalar=16, sliding_window=WINDOW, num_hidden_layers=4,
              attn_logit_softcapping=8.0, final_logit_softcapping=15.0, tie_word_embeddings=True)
GEMMA3 = dict(arch="gemma3", head_dim=24, query_pre_attn_scalar=24, sliding_window=WINDOW, num_hidden_layers=7,
              rope_theta=1e6, rope_local_base_freq=10000.0, rope_scaling={"rope_type": "linear", "factor": 4.0},
              tie_word_embeddings=True)
VARIANTS |= {
    "gemma2": GEMMA2,
    "gemma3": GEMMA3,
    # what a config can set and llama.cpp's Gemma 3 fixes (query scale, pattern, local rotary base): folder only
    "gemma3-own": {**GEMMA3, "num_hidden_layers": 3, "query_pre_attn_scalar": 40, "sliding_window_pattern": 2,
                   "rope_local_base_freq": 500.0, "rope_scaling": None, "tie_word_embeddings": False},
}
FOLDER_ONLY = {"gemma3-own"}
STEPWISE = {"phi3-longrope"}  # transformers switches longrope's factors by the length seen: compared token by token


def build(root: Path, variant: str, **more) -> Path:
    options = dict(VARIANTS[variant])
    return make_tiny_hf(root, options.pop("arch"), **{**options, **more})


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {v: build(root / v, v, seed=5) for v in VARIANTS}


@pytest.fixture(scope="module")
def ggufs(folders) -> dict[str, Path]:
    """Every tensor F32: the same weights as the folder, so transformers on the folder is the reference."""
    return {v: write_gguf(f, f / "model.gguf", {"": "F32"}) for v, f in folders.items() if v not in FOLDER_ONLY}


_HF: dict[Path, object] = {}


def hf_model(folder: Path):
    import transformers

    if folder not in _HF:
        _HF[folder] = transformers.AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    return _HF[folder]


def hf_logits(folder: Path, ids: list[int], stepwise: bool = False) -> torch.Tensor:
    """transformers' logits for every position of `ids`: one call, or a token at a time
    through its KV cache."""
    from transformers import DynamicCache

    model = hf_model(folder)
    with torch.no_grad():
        if not stepwise:
            return model(torch.tensor([ids])).logits[0]
        cache, rows = DynamicCache(config=model.config), []
        for t in ids:
            rows.append(model(torch.tensor([[t]]), past_key_values=cache, use_cache=True).logits[0])
        return torch.cat(rows)


def run(model, ids: list[int], chunks: list[int], max_len: int = 96) -> torch.Tensor:
    cache = KVCache(model.config, max_len)
    out, start = [], 0
    for size in chunks:
        out.append(model(torch.tensor(ids[start : start + size]), torch.arange(start, start + size), cache, start))
        start += size
    return torch.cat(out)


def prompt(vocab: int, n: int = PROMPT, seed: int = 1) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def tree_for(root: int, vocab: int) -> TokenTree:
    """A tree of depth 4 with branches at the root and below."""
    tokens = prompt(vocab, 9, seed=7)
    tree = TokenTree(root, 16)
    a = tree.add(0, tokens[0], 0.5)
    b = tree.add(0, tokens[1], 0.3)
    a1 = tree.add(a, tokens[2], 0.5)
    tree.add(a, tokens[3], 0.2)
    tree.add(b, tokens[4], 0.6)
    a11 = tree.add(a1, tokens[5], 0.7)
    tree.add(a11, tokens[6], 0.9)
    tree.add(a1, tokens[7], 0.1)
    return tree


@pytest.mark.parametrize("variant, source", [(v, s) for v in VARIANTS for s in ("hf", "gguf") if s == "hf" or v not in FOLDER_ONLY])
def test_prefill_decode_and_tree_match_transformers(folders, ggufs, variant, source):
    folder = folders[variant]
    ckpt = open_checkpoint(folder if source == "hf" else ggufs[variant])
    reference_config = open_checkpoint(folder).config
    # the GGUF's metadata says what config.json says (its epsilon a float32; Mistral's GGUF calls it llama)
    assert ckpt.config.arch == ("llama" if (variant, source) == ("mistral", "gguf") else reference_config.arch)
    assert replace(ckpt.config, rms_norm_eps=reference_config.rms_norm_eps, arch=reference_config.arch) == reference_config
    assert ckpt.config.rope_scaling == reference_config.rope_scaling or source == "gguf"
    model = load_model(ckpt, "fp32")
    stepwise = variant in STEPWISE
    ids = prompt(ckpt.config.vocab_size)
    expected = hf_logits(folder, ids, stepwise)
    assert expected.abs().max() > 1.0  # not a comparison of near-zero logits
    torch.testing.assert_close(run(model, ids, [PROMPT]), expected, atol=TOL, rtol=0)  # prefill
    torch.testing.assert_close(run(model, ids, [20] + [1] * (PROMPT - 20)), expected, atol=TOL, rtol=0)  # step decode
    torch.testing.assert_close(run(model, ids, [9, 30, 5]), expected, atol=TOL, rtol=0)  # chunked prefill

    # a tree after the prompt in one pass: each node's row is what decoding its path gives
    prefix, root = ids[:-1], ids[-1]
    tree = tree_for(root, ckpt.config.vocab_size)
    cache = KVCache(model.config, 96)
    model(torch.tensor(prefix), torch.arange(len(prefix)), cache, 0)
    n = tree.size
    rows = model(tree.tokens[:n], len(prefix) + tree.depths[:n], cache, len(prefix), tree.attention_mask(len(prefix), slice(0, n)))
    for node in range(n):
        path = [int(tree.tokens[i]) for i in tree.path(node)]
        decoded = run(model, prefix + path, [len(prefix)] + [1] * len(path))[-1]
        # float32 rounding (an fp32 matmul's summation order depends on its rows): larger in
        # Gemma, whose hidden states are scaled by sqrt(hidden) and logits reach 30 here
        torch.testing.assert_close(rows[node], decoded, atol=TOL if ckpt.config.family.embed_scale else 3e-5, rtol=0)
        torch.testing.assert_close(rows[node], hf_logits(folder, prefix + path, stepwise)[-1], atol=TOL, rtol=0)


@pytest.mark.parametrize("variant", ["mistral", "gemma2", "gemma3"])
def test_the_window_is_honoured(folders, variant):
    """Past the window, the output differs from attending to everything: the test above
    would notice a window ignored (and one applied where transformers has none)."""
    ckpt = open_checkpoint(folders[variant])
    assert ckpt.config.sliding_window == WINDOW and ckpt.config.max_position_embeddings == 512  # no longer clipped
    ids = prompt(ckpt.config.vocab_size)
    windowed = run(load_model(ckpt), ids, [PROMPT])
    ckpt.config = replace(ckpt.config, sliding_window=10 * PROMPT)  # the same layers, each seeing everything
    full = run(load_model(ckpt), ids, [PROMPT])
    torch.testing.assert_close(windowed[:WINDOW], full[:WINDOW], atol=1e-5, rtol=0)
    assert (windowed[WINDOW:] - full[WINDOW:]).abs().max() > 1e-2


@pytest.mark.parametrize(
    "variant, change",
    [
        ("gemma2", dict(attn_softcap=None)),
        ("gemma2", dict(final_softcap=None)),
        ("gemma3-own", dict(query_scale=None)),
        ("gemma3-own", dict(rope_local_theta=None)),
        ("gemma3", dict(rope_scaling=None)),
    ],
    ids=lambda x: x if isinstance(x, str) else next(iter(x)),
)
def test_each_gemma_setting_changes_the_output(folders, variant, change):
    """Without any one of them the logits move, so the comparisons with transformers above
    would notice a setting read wrong or ignored."""
    ckpt = open_checkpoint(folders[variant])
    assert all(getattr(ckpt.config, k) is not None for k in change)
    ids = prompt(ckpt.config.vocab_size)
    used = run(load_model(ckpt), ids, [PROMPT])
    ckpt.config = replace(ckpt.config, **change)
    assert (run(load_model(ckpt), ids, [PROMPT]) - used).abs().max() > 1e-2


def test_gemma_configs_as_published(folders):
    """Gemma configs as the Hub has them (transformers 4.x: `rope_scaling`,
    `rope_local_base_freq`, `sliding_window_pattern`; a multimodal Gemma 3 whose
    `text_config` lists only what differs from the defaults) and GGUF metadata as llama.cpp
    reads it (its defaults where a key is missing; the 27B models' query scale)."""
    gemma3_4b = {  # google/gemma-3-4b-it, config.json
        "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3", "mm_tokens_per_image": 256,
        "text_config": {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text", "num_hidden_layers": 34,
                        "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "sliding_window": 1024},
        "vision_config": {"hidden_size": 1152, "model_type": "siglip_vision_model"},
    }
    c = ModelConfig.from_hf(gemma3_4b)
    assert (c.arch, c.num_heads, c.num_kv_heads, c.head_dim, c.vocab_size, c.tie_word_embeddings) == ("gemma3", 8, 4, 256, 262208, True)
    assert (c.rope_theta, c.rope_local_theta, c.rope_kind, c.rope_scaling["factor"]) == (1e6, 10000.0, "linear", 8.0)
    assert c.layer_types == (("sliding_attention",) * 5 + ("full_attention",)) * 5 + ("sliding_attention",) * 4
    assert (c.sliding_window, c.query_scale, c.attn_softcap, c.final_softcap) == (1024, None, None, None)
    gemma3_27b = {**gemma3_4b["text_config"], "hidden_size": 5376, "num_attention_heads": 32, "num_key_value_heads": 16,
                  "num_hidden_layers": 62, "query_pre_attn_scalar": 168, "sliding_window_pattern": 6}
    assert ModelConfig.from_hf(gemma3_27b).query_scale == 168**-0.5
    gemma2_2b = {"model_type": "gemma2", "hidden_size": 2304, "num_hidden_layers": 26, "vocab_size": 256000,
                 "query_pre_attn_scalar": 256, "sliding_window": 4096, "rope_theta": 10000.0}
    c = ModelConfig.from_hf(gemma2_2b)
    assert (c.attn_softcap, c.final_softcap, c.rope_local_theta, c.windowed_layers) == (50.0, 30.0, None, 13)
    assert c.layer_types[:2] == ("sliding_attention", "full_attention")

    gguf = {"general.architecture": "gemma2", "gemma2.embedding_length": 4608, "gemma2.attention.head_count": 32,
            "gemma2.block_count": 46, "gemma2.attention.key_length": 128, "gemma2.feed_forward_length": 36864,
            "gemma2.attention.layer_norm_rms_epsilon": 1e-6, "gemma2.vocab_size": 256000}
    c = ModelConfig.from_gguf(gguf, "27b.gguf", tie_word_embeddings=True)
    assert (c.sliding_window, c.attn_softcap, c.final_softcap, c.windowed_layers) == (4096, 50.0, 30.0, 23)  # llama.cpp's defaults
    assert c.query_scale == 144**-0.5  # 27B: (hidden / heads) ** -0.5, not head_dim's
    assert ModelConfig.from_gguf({**gguf, "gemma2.block_count": 42}, "9b.gguf", True).query_scale is None
    gguf3 = {**{k.replace("gemma2", "gemma3"): v for k, v in gguf.items()}, "general.architecture": "gemma3",
             "gemma3.block_count": 34, "gemma3.attention.sliding_window": 1024,
             "gemma3.rope.freq_base": 1e6, "gemma3.rope.scaling.type": "linear", "gemma3.rope.scaling.factor": 8.0}
    c = ModelConfig.from_gguf(gguf3, "4b.gguf", True)
    assert (c.attn_softcap, c.final_softcap, c.rope_local_theta, c.windowed_layers) == (None, None, 10000.0, 29)
    assert c.rope_scaling == {"rope_type": "linear", "factor": 8.0}
    no_window = {k: v for k, v in gguf3.items() if "sliding_window" not in k}
    assert ModelConfig.from_gguf(no_window, "x.gguf", True).windowed_layers == 0


def test_a_multimodal_gemma3_checkpoint_loads_its_language_model(tmp_path):
    """Gemma3ForConditionalGeneration saved by transformers: the text config and the
    `model.language_model.` tensors are read, the vision tower's skipped; logits on text are
    transformers'."""
    import transformers

    from conftest import train_tokenizer

    folder = tmp_path / "mm"
    folder.mkdir()
    vocab = train_tokenizer(folder)
    text = {k: v for k, v in GEMMA3.items() if k != "arch"}
    text.update(vocab_size=vocab, hidden_size=64, intermediate_size=112, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=512, rms_norm_eps=1e-5, eos_token_id=1, bos_token_id=None, pad_token_id=0)
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14)
    config = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_index=vocab - 1)
    torch.manual_seed(5)
    model = transformers.Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if "norm" in name else 0.0, 0.2 if p.dim() > 1 else 0.05)
    model.save_pretrained(folder)
    ckpt = open_checkpoint(folder)
    assert ckpt.config.arch == "gemma3" and ckpt.config.num_layers == 7 and ckpt.tensor_count == 2 + 7 * 13
    ids = prompt(vocab - 1)
    with torch.no_grad():
        expected = model(input_ids=torch.tensor([ids])).logits[0]
    torch.testing.assert_close(run(load_model(ckpt), ids, [20] + [1] * (PROMPT - 20)), expected, atol=TOL, rtol=0)


# what transformers assumes reading these GGUFs (its defaults: Qwen3's head_dim 128; Gemma's
# query_pre_attn_scalar 256 and soft caps 50 and 30; no rope scaling read), made true of the models
GGUF_AS_TRANSFORMERS_READS = {
    "qwen3": {"head_dim": 128},
    "phi3": {},
    "gemma2": {"head_dim": 256, "query_pre_attn_scalar": 256, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0},
    "gemma3": {"head_dim": 256, "query_pre_attn_scalar": 256, "rope_scaling": None},
}


@pytest.mark.parametrize("variant", GGUF_AS_TRANSFORMERS_READS)
def test_quantized_gguf_matches_transformers_reading_it(tmp_path, variant):
    """A GGUF with quantized tensors (Q8_0, Q4_0, Q5_0, F16) loads as transformers loads it:
    the same dequantized weights, Phi-3's fused ones split, Gemma's stored 1 + w norms."""
    folder = build(tmp_path / variant, variant, seed=5, **GGUF_AS_TRANSFORMERS_READS[variant])
    qtypes = {"attn_q_norm": "F32", "ffn_up": "Q8_0", "attn_q": "Q4_0", "attn_output": "Q5_0", "token_embd": "F32"}
    path = write_gguf(folder, tmp_path / "q.gguf", qtypes)
    model = load_model(open_checkpoint(path))
    ids = prompt(model.config.vocab_size, 20)
    import transformers

    # (transformers' Phi-3 default pad id, 32000, lies outside this vocabulary)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, torch_dtype=torch.float32, pad_token_id=None)
    with torch.no_grad():
        expected = hf(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(run(model, ids, [12] + [1] * 8), expected, atol=TOL, rtol=0)
    assert (expected - hf_logits(folder, ids)).abs().max() > 1e-3  # quantization really happened


@pytest.mark.skipif(not kernels.available(), reason="the native kernels did not build")
def test_fused_blocks_split_by_rows_in_precision_gguf(tmp_path):
    """Phi-3's fused GGUF matrices in their own blocks split into q/k/v and gate/up rows: each
    part dequantizes to the fp32 part, and the layer store streams them as resident."""
    from test_streaming import plan_for

    folder = build(tmp_path / "phi3", "phi3", seed=5, intermediate_size=128)
    ckpt = open_checkpoint(write_gguf(folder, tmp_path / "q.gguf", {"attn_qkv": "Q8_0", "ffn_up": "Q8_0", "ffn_down": "Q8_0"}))
    floats = dict(ckpt.tensors())
    blocks = dict(ckpt.tensors(blocks=True))
    assert floats.keys() == blocks.keys() and "layers.0.mlp.gate_proj.weight" in blocks
    split = [n for n in blocks if n.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "gate_proj.weight", "up_proj.weight"))]
    assert len(split) == 5 * ckpt.config.num_layers
    for name in split:
        part = blocks[name]
        assert part.qtype == "q8_0", name
        torch.testing.assert_close(kernels.dequantize(kernels.pack(part.data, part.qtype, part.cols), part.qtype, part.cols), floats[name], atol=0, rtol=0)
    resident = load_model(ckpt, "gguf")
    store = LayerStore.open(convert(ckpt, tmp_path / "store", "gguf"))
    streamed = StreamedTransformer(store, plan_for(store, (1,), False))
    try:
        ids = prompt(ckpt.config.vocab_size, 30)
        out = [m(torch.tensor(ids), torch.arange(30), KVCache(ckpt.config, 40), 0) for m in (resident, streamed)]
        assert torch.equal(out[0], out[1])
        reference = load_model(ckpt, "fp32")(torch.tensor(ids), torch.arange(30), KVCache(ckpt.config, 40), 0)
        assert (out[0] - reference).norm() / reference.norm() < 0.1  # int8 activations on a harsh random model
    finally:
        streamed.close()


# ---- speculation and streaming ---------------------------------------------------------------


@pytest.fixture(scope="module", params=["qwen3", "mistral", "phi3-longrope", "gemma2", "gemma3"])
def pair(request, tmp_path_factory) -> tuple[Engine, list[list[int]]]:
    """A tiny same-family pair (the draft: the target's weights perturbed), and prompts
    longer than the window."""
    root = tmp_path_factory.mktemp(f"pair-{request.param}")
    target = build(root / "target", request.param, seed=3)
    draft = build(root / "draft", request.param, seed=3, noise=0.03)
    engine = Engine.load(target, draft=draft, precision="fp32", progress=False)
    prompts = [prompt(300, n, seed) for seed, n in ((0, 5), (1, 40), (2, 47))]
    return engine, prompts


@pytest.mark.parametrize("mode", ["sd", "tree", "llmcad"])
def test_greedy_speculation_equals_the_target_alone(pair, mode):
    engine, prompts = pair
    accepted = 0
    for ids in prompts:
        ar = engine.generate(ids, max_tokens=24, ignore_eos=True, mode="ar").tokens
        result = engine.generate(ids, max_tokens=24, ignore_eos=True, mode=mode)
        assert result.tokens == ar, (mode, len(ids))
        accepted += result.stats.extra["accepted_per_verification"]
    assert accepted > 0  # the draft did real work


@pytest.mark.parametrize("precision", ["fp32", "int8"])
@pytest.mark.parametrize("variant", ["qwen3-window", "mistral", "phi3-longrope", "gemma2", "gemma3"])
def test_streamed_equals_resident(folders, tmp_path, variant, precision):
    from test_streaming import plan_for

    ckpt = open_checkpoint(folders[variant])
    store = LayerStore.open(convert(ckpt, tmp_path / "store", precision))
    assert store.config == ckpt.config and store.config.rope_scaling == ckpt.config.rope_scaling
    resident = load_model(ckpt, precision)
    streamed = StreamedTransformer(store, plan_for(store, (1,), False))  # layers 0 and 2 and the head streamed
    try:
        ids = prompt(ckpt.config.vocab_size, 70)
        out = [m(torch.tensor(ids), torch.arange(70), KVCache(ckpt.config, 80), 0) for m in (resident, streamed)]
        torch.testing.assert_close(out[1], out[0], atol=1e-5, rtol=0)
        steps = [run(m, ids, [40] + [1] * 30, 80) for m in (resident, streamed)]
        # float rounding only: PyTorch's fp32 matmul may sum in another order for a weight held
        # elsewhere in memory (on an AMD EPYC Zen 3 up to 2e-5 after 30 steps)
        torch.testing.assert_close(steps[1], steps[0], atol=1e-4, rtol=0)
    finally:
        streamed.close()


# ---- llmcad info -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "variant, source",
    [("qwen3-window", "hf"), ("mistral", "gguf"), ("phi3-longrope", "hf"), ("phi3-longrope", "gguf"), ("gemma2", "hf"), ("gemma3", "gguf")],
)
def test_info_names_the_family_and_what_of_it_is_in_use(folders, ggufs, variant, source, capsys):
    path = folders[variant] if source == "hf" else ggufs[variant]
    assert cli.main(["info", "--json", str(path)]) == 0
    facts = json.loads(capsys.readouterr().out)
    family = {"mistral": "llama"}.get(variant, variant.split("-")[0])  # a Mistral GGUF says llama
    assert facts["family"] == family
    if variant == "gemma2":
        assert facts["sliding_window"] == {"tokens": WINDOW, "layers": 2, "of": 4, "pattern": {"sliding": 1, "full": 1}}
        assert facts["soft_capping"] == {"attention": 8.0, "final": 15.0}
        assert {"gelu_tanh gate", "embeddings scaled by sqrt(hidden)", "norms around attention and MLP"} <= set(facts["features"])
    elif variant == "gemma3":
        assert facts["sliding_window"] == {"tokens": WINDOW, "layers": 6, "of": 7, "pattern": {"sliding": 5, "full": 1}, "rope_theta": 10000.0}
        assert facts["soft_capping"] is None and "q/k RMSNorm" in facts["features"]
        assert facts["rope_scaling"] == {"type": "linear", "factor": 4.0}
    elif variant == "qwen3-window":
        assert facts["sliding_window"] == {"tokens": WINDOW, "layers": 2, "of": 3}
        assert "q/k RMSNorm" in facts["features"] and facts["rope_scaling"] is None
    elif variant == "mistral":
        assert facts["sliding_window"] == {"tokens": WINDOW, "layers": 3, "of": 3}
    else:
        assert facts["sliding_window"] == {"tokens": 24, "layers": 3, "of": 3}
        assert facts["rope_scaling"]["type"] == "longrope" and facts["rope_scaling"]["original_max_position_embeddings"] == 32
        assert facts["rotary_dim"] == 12
    assert cli.main(["info", str(path)]) == 0
    text = dict(line.split(None, 1) for line in capsys.readouterr().out.splitlines())
    assert text["family"] == family and text["sliding_window"].startswith(f"{facts['sliding_window']['tokens']} tokens, on ")
    if variant == "gemma3":
        assert text["sliding_window"] == f"{WINDOW} tokens, on 6 of 7 layers (5 local then 1 global, repeated; local rotary base 10000)"
    if variant == "gemma2":
        assert text["soft_capping"] == "attention 8, final 15"


def test_info_says_whether_a_draft_can_draft_and_why_not(folders, ggufs, tmp_path, capsys):
    """`llmcad info TARGET --draft DRAFT`: the engine's own check. Same tokens across
    families and formats: usable (padded rows noted); other tokens: the first differing id;
    a draft that cannot be read: that reason. Exit status 1 when not usable."""
    padded = make_tiny_hf(tmp_path / "padded", "qwen3", seed=3, vocab_size=336)
    other = make_tiny_hf(tmp_path / "other", "qwen3", seed=3)
    tokenizer = json.loads((other / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    a, b = (next(t for t, i in vocab.items() if i == n) for n in (200, 201))
    vocab[a], vocab[b] = 201, 200
    (other / "tokenizer.json").write_text(json.dumps(tokenizer))
    target = str(ggufs["gemma3"])
    cases = [
        (folders["gemma2"], True, None),
        (padded, True, "vocabulary rows: target 320, draft 336"),
        (other, False, "their tokenizers differ at id 200"),
        (tmp_path / "missing.gguf", False, "no model at"),
    ]
    for draft, usable, says in cases:
        assert cli.main(["info", "--json", target, "--draft", str(draft)]) == (0 if usable else 1)
        facts = json.loads(capsys.readouterr().out)["draft"]
        assert facts["usable"] == usable
        assert says is None or says in (facts["note"] if usable else facts["reason"]), facts
        with pytest.raises(LlmcadError, match="differ at id 200") if draft == other else contextlib.nullcontext():
            if draft != tmp_path / "missing.gguf":
                Engine.load(target, draft=draft, precision="fp32", progress=False).close()
    assert cli.main(["info", target, "--draft", str(other)]) == 1
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("draft"))
    assert line.endswith(f"not usable: their tokenizers differ at id 200 (target {a!r}, draft {b!r})")


# ---- the draft/target vocabulary check -------------------------------------------------------


def test_padded_vocabularies_with_the_same_tokens_pair_up_and_the_draft_stays_within_the_target(tmp_path):
    """Vocabulary matrices of 320 and 336 rows over the same 320 tokens: accepted either way
    round, the draft's logits have the target's width, and output equals the target alone."""
    small = make_tiny_hf(tmp_path / "small", "qwen3", seed=3)
    big = make_tiny_hf(tmp_path / "big", "qwen3", seed=3, noise=0.03, vocab_size=336)
    big_gguf = write_gguf(big, tmp_path / "big.gguf", {"": "F32"})
    for target, draft in ((small, big), (big, small), (small, big_gguf)):
        engine = Engine.load(target, draft=draft, precision="fp32", progress=False)
        width = engine.model.config.vocab_size
        logits = engine.draft.model(torch.tensor([1, 2]), torch.arange(2), KVCache(engine.draft.model.config, 4), 0)
        assert logits.shape[-1] == width
        if width < engine.draft.model.config.vocab_size:
            assert logits.isfinite().all()  # cut to the target's ids
        else:
            assert torch.isneginf(logits[:, 320:]).all()  # ids the draft lacks: never proposed
        padding = False
        for ids in (prompt(300, 5), prompt(300, 30, seed=2)):
            ar = engine.generate(ids, max_tokens=16, ignore_eos=True, mode="ar").tokens
            assert engine.generate(ids, max_tokens=16, ignore_eos=True, mode="tree").tokens == ar
            padding |= any(t >= 320 for t in ar)
        # this random 336-row target commits ids of its padding, which the draft then runs (as zeros)
        assert padding == (width == 336)
        engine.close()


def test_pairs_whose_tokenizers_disagree_are_refused_naming_the_first_differing_id(tmp_path):
    target = make_tiny_hf(tmp_path / "target", "qwen3", seed=3)
    other = make_tiny_hf(tmp_path / "other", "qwen3", seed=3)
    tokenizer = json.loads((other / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    a, b = (next(t for t, i in vocab.items() if i == n) for n in (200, 201))
    vocab[a], vocab[b] = 201, 200  # two tokens' ids swapped
    (other / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(LlmcadError, match=rf"their tokenizers differ at id 200 \(target {re.escape(repr(a))}, draft {re.escape(repr(b))}\)"):
        Engine.load(target, draft=other, precision="fp32", progress=False)
    # across families: a Qwen3 target and a Phi-3 draft with the same tokenizer pair up; with another, refused
    phi3 = make_tiny_hf(tmp_path / "phi3", "phi3", seed=3, pad_token_id=None)
    Engine.load(target, draft=phi3, precision="fp32", progress=False).close()
    gguf = write_gguf(other, tmp_path / "other.gguf", {"": "F32"})
    with pytest.raises(LlmcadError, match="differ at id 200"):
        Engine.load(target, draft=gguf, precision="fp32", progress=False)


def test_token_strings_are_read_without_building_a_tokenizer(folders, ggufs):
    for variant in ("qwen3", "mistral"):
        hf, gguf = open_checkpoint(folders[variant]), open_checkpoint(ggufs[variant])
        strings = hf.token_strings(), gguf.token_strings()
        assert "tokenizer" not in vars(hf) and "tokenizer" not in vars(gguf)  # neither was built
        assert strings[0] == strings[1] == hf.tokenizer.token_strings() == gguf.tokenizer.token_strings()


# ---- Gemma's GGUF tokenizer ------------------------------------------------------------------


def gemma_vocabulary_gguf(path: Path) -> Path:
    """A small Gemma-style SentencePiece vocabulary as llama.cpp writes it (tokenizer.ggml.model
    "llama", no merges, scores that do not follow the merge order, runs of spaces and of
    newlines as user-defined tokens spelled with real spaces, byte tokens, control tokens)."""
    import collections

    import gguf

    from conftest import TEXT

    control = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
    user = ["[multimodal]", "\n", "\n\n", "\n\n\n", "  ", "   ", "    ", "<b>"]
    corpus = "".join(TEXT).replace(" ", "▁")
    counts = collections.Counter(corpus[i : i + n] for n in range(1, 6) for i in range(len(corpus) - n + 1))
    pieces = sorted((p for p, c in counts.items() if (c > 1 or len(p) == 1) and "\n" not in p), key=lambda p: (len(p), -counts[p], p))
    tokens = control + user + [f"<0x{i:02X}>" for i in range(256)] + [p for p in pieces if set(p) != {"▁"} or len(p) == 1]
    types = [3] * len(control) + [4] * len(user) + [6] * 256 + [1] * (len(tokens) - len(control) - len(user) - 256)
    w = gguf.GGUFWriter(str(path), "gemma3")
    for key, value in (("add_block_count", 1), ("add_context_length", 64), ("add_embedding_length", 8), ("add_feed_forward_length", 8),
                       ("add_head_count", 1), ("add_head_count_kv", 1), ("add_key_length", 8), ("add_value_length", 8),
                       ("add_layer_norm_rms_eps", 1e-6)):
        getattr(w, key)(value)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores([-1000.0 if k != 1 else -float(len(tokens) - i) * 0.37 % 50 for i, k in enumerate(types)])
    w.add_token_types(types)
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(False)
    w.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gemma_gguf_tokenizer_encodes_as_transformers(tmp_path):
    """Built from a Gemma GGUF's SentencePiece metadata, the tokenizer encodes (BOS first)
    and decodes as transformers' tokenizer from the same file; its token strings (spaces
    respelled as "▁") are the ones the vocabulary check compares, read without building it."""
    import transformers

    path = gemma_vocabulary_gguf(tmp_path / "gemma-vocab.gguf")
    ckpt_tokens = token_strings_of_gguf(GGUFFile(path))
    ours = Tokenizer.from_gguf(GGUFFile(path))
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    assert ours.token_strings() == ckpt_tokens and ckpt_tokens[10:14] == ["\n\n\n", "▁▁", "▁▁▁", "▁▁▁▁"]
    texts = varied_strings()
    for text in texts:
        ids = ours.encode(text)
        assert ids == theirs.encode(text), text
        assert ours.decode(ids) == theirs.decode(ids), text
    assert ours.encode("hi")[0] == ours.bos_token_id == 2 and ours.eos_token_ids == {1, 6}
    assert ours.encode("a  b\n\nc") == theirs.encode("a  b\n\nc") and ckpt_tokens.index("▁▁") in ours.encode("a  b")
