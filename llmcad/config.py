"""Model hyperparameters, read from a Hugging Face config.json or from GGUF metadata."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from llmcad.errors import LlmcadError

# Hugging Face model_type / GGUF general.architecture -> our family. Mistral and SmolLM
# are Llama-shaped; Qwen2 adds a bias to the q, k and v projections.
FAMILIES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}


@dataclass(frozen=True)
class ModelConfig:
    arch: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    rope_scaling: dict[str, Any] | None = field(default=None, compare=False)

    @staticmethod
    def from_hf(cfg: dict[str, Any], source: str = "config.json") -> ModelConfig:
        model_type = cfg.get("model_type", "?")
        arch = _family(model_type, source)
        try:
            hidden = cfg["hidden_size"]
            heads = cfg["num_attention_heads"]
            max_pos = cfg.get("max_position_embeddings", 4096)
            if cfg.get("sliding_window") and cfg.get("use_sliding_window", arch == "llama"):
                max_pos = min(max_pos, cfg["sliding_window"])  # full attention is exact up to the window
            return ModelConfig(
                arch=arch,
                vocab_size=cfg["vocab_size"],
                hidden_size=hidden,
                intermediate_size=cfg["intermediate_size"],
                num_layers=cfg["num_hidden_layers"],
                num_heads=heads,
                num_kv_heads=cfg.get("num_key_value_heads") or heads,
                head_dim=cfg.get("head_dim") or hidden // heads,
                rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
                rope_theta=cfg.get("rope_theta", (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)),
                max_position_embeddings=max_pos,
                tie_word_embeddings=cfg.get("tie_word_embeddings", False),
                attention_bias=arch == "qwen2" or cfg.get("attention_bias", False),
                rope_scaling=_rope_scaling(cfg),
            )
        except KeyError as e:
            raise LlmcadError(f"{source}: missing field {e.args[0]!r}") from None

    @staticmethod
    def from_gguf(fields: dict[str, Any], source: str, tie_word_embeddings: bool) -> ModelConfig:
        """`fields` maps GGUF metadata keys to plain Python values."""
        arch = _family(fields.get("general.architecture", "?"), source)
        prefix = fields["general.architecture"]

        def get(key: str, default: Any = None) -> Any:
            value = fields.get(f"{prefix}.{key}", default)
            if value is None:
                raise LlmcadError(f"{source}: GGUF metadata lacks {prefix}.{key}")
            return value

        hidden = get("embedding_length")
        heads = get("attention.head_count")
        vocab = fields.get(f"{prefix}.vocab_size") or len(fields.get("tokenizer.ggml.tokens") or [])
        if not vocab:
            raise LlmcadError(f"{source}: GGUF metadata gives no vocabulary size")
        return ModelConfig(
            arch=arch,
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=get("feed_forward_length"),
            num_layers=get("block_count"),
            num_heads=heads,
            num_kv_heads=get("attention.head_count_kv", heads),
            head_dim=get("attention.key_length", hidden // heads),
            rms_norm_eps=get("attention.layer_norm_rms_epsilon"),
            rope_theta=get("rope.freq_base", 10000.0),
            max_position_embeddings=get("context_length", 4096),
            tie_word_embeddings=tie_word_embeddings,
            attention_bias=arch == "qwen2",
        )

    def rope_inv_freq(self) -> torch.Tensor:
        """Per-pair rotary frequencies, with llama3-style scaling when the config asks for it.
        Always on the CPU: a model built on the meta device gets real frequencies (and meta
        math would import 800 modules, 72 MB, the first time)."""
        dim = self.head_dim
        inv_freq = 1.0 / (self.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device="cpu") / dim))
        scaling = self.rope_scaling
        if scaling is None:
            return inv_freq.float()
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind == "linear":
            return (inv_freq / scaling["factor"]).float()
        if kind == "freq_factors":  # GGUF rope_freqs.weight: llama.cpp's precomputed divisors
            return (inv_freq / torch.tensor(scaling["factors"], dtype=torch.float64, device="cpu")).float()
        # llama3: keep high frequencies, divide low ones by `factor`, blend in between.
        factor = scaling["factor"]
        low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        old_ctx = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = ((old_ctx / wavelen) - low) / (high - low)
        blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        out = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
        is_medium = (wavelen <= old_ctx / low) & (wavelen >= old_ctx / high)
        return torch.where(is_medium, blended, out).float()

    def num_parameters(self) -> int:
        h, f, d = self.hidden_size, self.intermediate_size, self.head_dim
        attn = h * d * (self.num_heads * 2 + self.num_kv_heads * 2)
        if self.attention_bias:
            attn += d * (self.num_heads + 2 * self.num_kv_heads)
        layer = attn + 3 * h * f + 2 * h
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return self.num_layers * layer + self.vocab_size * h + head + h


def _family(name: str, source: str) -> str:
    if name not in FAMILIES:
        known = ", ".join(sorted(FAMILIES))
        raise LlmcadError(f"{source}: unsupported architecture {name!r} (supported: {known})")
    return FAMILIES[name]


def _rope_scaling(cfg: dict[str, Any]) -> dict[str, Any] | None:
    scaling = cfg.get("rope_scaling") or cfg.get("rope_parameters")
    if not scaling:
        return None
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return None
    if kind not in ("llama3", "linear"):
        raise LlmcadError(f"config.json: unsupported rope scaling {kind!r} (supported: llama3, linear)")
    return dict(scaling)
