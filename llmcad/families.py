"""Model families: what each one changes in the shared transformer, in one place.

A family is a `Family` entry in `FAMILIES`: which Hugging Face `model_type`s and GGUF
`general.architecture`s it reads, the switches the forward pass honours (q/k norms, QKV
bias, activation, norms around the sublayers, embedding scale), how its tensors are named
and stored (fused projections split at load, llama.cpp names that differ from the base
map, norm weights stored as offsets) and which layers its config's sliding window covers.
Per-model numbers (the window's size, rotary dimensions, rope scaling, soft-capping) are
`ModelConfig` fields; `config.family` is this description. `docs/ARCHITECTURE.md`
("Adding a family") says how to add one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# llama.cpp's per-layer and model-level tensor names -> Hugging Face names (without
# `model.`), shared by every family; a family's `gguf_names` overrides or extends it.
GGUF_NAMES: dict[str, str] = {
    "token_embd": "embed_tokens",
    "output_norm": "norm",
    "output": "lm_head",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# GGUF tensors that carry rotary settings, read into the config instead of the model
GGUF_ROPE_TENSORS = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")

# which layers a config's `sliding_window` covers
WINDOW_NONE = "none"  # none (Llama ignores the field)
WINDOW_ALL = "all"  # every layer (Mistral, Phi-3)
WINDOW_QWEN = "qwen"  # `use_sliding_window`: layers from `max_window_layers` on (or the config's `layer_types`)
WINDOW_PATTERN = "pattern"  # local layers interleaved with global ones (Gemma): the config's `layer_types`, else
# its `sliding_window_pattern` n, else the family's `window_period` n: every n-th layer global, the others local


@dataclass(frozen=True, eq=False)
class Family:
    name: str
    hf_model_types: tuple[str, ...]  # config.json `model_type`s read as this family
    gguf_archs: tuple[str, ...] = ()  # GGUF `general.architecture`s read as this family
    # forward pass
    qkv_bias: bool = False  # q, k and v projections carry a bias (Qwen2)
    qk_norm: bool = False  # per-head RMSNorm on queries and keys, before the rotation (Qwen3, Gemma 3)
    sandwich_norms: bool = False  # norms after attention and after the MLP too, the MLP's own before it (Gemma 2/3)
    activation: str = "silu"  # the gate's activation: "silu" (SwiGLU) or "gelu_tanh" (GeGLU)
    embed_scale: bool = False  # embeddings multiplied by sqrt(hidden_size) (Gemma)
    windows: str = WINDOW_NONE  # which layers the config's sliding window covers
    window_period: int | None = None  # WINDOW_PATTERN: n where neither the config nor the GGUF names the layers (llama.cpp's swa pattern)
    local_rope_theta: float | None = None  # rotary base of the windowed layers where the config names none (Gemma 3: 10000)
    # config.json
    hf_defaults: dict[str, Any] = field(default_factory=dict)  # transformers' defaults for fields a config may leave out
    hf_prefixes: tuple[str, ...] = ("model.",)  # tensor name prefixes stripped (the first that matches)
    hf_ignored: tuple[str, ...] = ()  # tensor name prefixes not read (a multimodal checkpoint's vision tower)
    # tensors
    fused: dict[str, tuple[str, ...]] = field(default_factory=dict)  # fused linear (HF name; a GGUF maps to it) -> its parts, in row order, split at load
    hf_norm_offset: float = 0.0  # added to every norm weight of a Hugging Face folder (Gemma stores w for 1 + w; its GGUFs store 1 + w)
    gguf_names: dict[str, str] = field(default_factory=dict)  # llama.cpp names that differ from GGUF_NAMES
    gguf_rope_permuted: bool = False  # llama.cpp stores q/k rows with rotary pairs interleaved (its "llama" arch)
    # GGUF metadata
    gguf_defaults: dict[str, Any] = field(default_factory=dict)  # llama.cpp's values for keys a file may leave out (without the arch prefix)
    gguf_wide_query_layers: tuple[int, ...] = ()  # block counts at which llama.cpp scales queries by (hidden / heads) ** -0.5, not head_dim's (Gemma 27B)
    sentencepiece: str = "llama"  # how a GGUF's SentencePiece vocabulary (tokenizer.ggml.model "llama") is rebuilt: "llama" or "gemma"

    def gguf_name_map(self) -> dict[str, str]:
        return {**GGUF_NAMES, **self.gguf_names}


# Gemma's norms scale by (1 + weight): a Hugging Face folder stores the weight, llama.cpp's GGUF 1 + weight
_GEMMA = dict(
    sandwich_norms=True,
    activation="gelu_tanh",
    embed_scale=True,
    windows=WINDOW_PATTERN,
    hf_norm_offset=1.0,
    gguf_names={"ffn_norm": "pre_feedforward_layernorm", "post_attention_norm": "post_attention_layernorm", "post_ffw_norm": "post_feedforward_layernorm"},
    sentencepiece="gemma",
)
# transformers' Gemma2Config / Gemma3TextConfig defaults (a multimodal Gemma 3's text_config lists only what differs)
_GEMMA_HF = dict(
    hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4, head_dim=256,
    rms_norm_eps=1e-6, tie_word_embeddings=True, query_pre_attn_scalar=256, sliding_window=4096,
)
_PHI3_FUSED = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
}

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        # Llama 2/3.x, SmolLM; Mistral GGUFs say "llama" too (llama.cpp converts them as such)
        Family("llama", ("llama",), ("llama",), gguf_rope_permuted=True),
        Family("mistral", ("mistral",), windows=WINDOW_ALL, gguf_rope_permuted=True),
        Family("qwen2", ("qwen2",), ("qwen2",), qkv_bias=True, windows=WINDOW_QWEN),
        Family("qwen3", ("qwen3",), ("qwen3",), qk_norm=True, windows=WINDOW_QWEN),
        # Phi-3, Phi-3.5, Phi-4 (dense): fused projections, partial rotary (Phi-4-mini), longrope
        Family(
            "phi3",
            ("phi3",),
            ("phi3",),
            windows=WINDOW_ALL,
            fused=_PHI3_FUSED,
            gguf_names={"attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"},
        ),
        # Gemma 2: local and global layers alternate (the first local), soft-capped scores and logits
        Family(
            "gemma2",
            ("gemma2",),
            ("gemma2",),
            window_period=2,
            hf_defaults={**_GEMMA_HF, "vocab_size": 256000, "max_position_embeddings": 8192, "rope_theta": 10000.0,
                         "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0},
            gguf_defaults={"attention.sliding_window": 4096, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0},
            gguf_wide_query_layers=(46,),
            **_GEMMA,
        ),
        # Gemma 3 (text; a multimodal checkpoint's language model): q/k norms, 5 local layers
        # then 1 global, the local ones with a rotary base of their own
        Family(
            "gemma3",
            ("gemma3_text", "gemma3"),
            ("gemma3",),
            qk_norm=True,
            window_period=6,
            local_rope_theta=10000.0,
            hf_defaults={**_GEMMA_HF, "vocab_size": 262208, "max_position_embeddings": 131072, "rope_theta": 1000000.0},
            hf_prefixes=("model.language_model.", "language_model.model.", "language_model.", "model."),
            hf_ignored=("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector."),
            gguf_wide_query_layers=(62,),
            **_GEMMA,
        ),
    )
}
_BY_HF = {t: f for f in FAMILIES.values() for t in f.hf_model_types}
_BY_GGUF = {a: f for f in FAMILIES.values() for a in f.gguf_archs}


def family_of_hf(model_type: Any) -> Family | None:
    return _BY_HF.get(model_type)


def family_of_gguf(arch: Any) -> Family | None:
    return _BY_GGUF.get(arch)


def supported() -> str:
    """The model types and architectures read, for error messages."""
    return ", ".join(sorted({*_BY_HF, *_BY_GGUF}))
