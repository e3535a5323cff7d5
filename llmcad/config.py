"""Model hyperparameters, read from a Hugging Face config.json or from GGUF metadata.

What a family changes in the forward pass is described in `llmcad.families`; the numbers a
model of the family sets (its sliding window and which layers it covers, rotary
dimensions, rope scaling, soft-capping) are fields here."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from llmcad.errors import LlmcadError
from llmcad.families import (
    FAMILIES,
    WINDOW_ALL,
    WINDOW_PATTERN,
    WINDOW_QWEN,
    Family,
    family_of_gguf,
    family_of_hf,
    supported,
)

SLIDING, FULL = "sliding_attention", "full_attention"  # layer types, as Hugging Face names them


@dataclass(frozen=True)
class ModelConfig:
    arch: str  # the family (llmcad.families.FAMILIES)
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
    # a token at position p attends to positions p - sliding_window + 1 .. p in the layers
    # whose type is SLIDING (empty `layer_types`: every layer attends to everything)
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()
    partial_rotary_factor: float = 1.0  # the share of each head's leading dimensions that are rotated
    query_scale: float | None = None  # attention scores' scale (None: head_dim ** -0.5)
    attn_softcap: float | None = None  # scores -> tanh(scores / cap) * cap before the softmax
    final_softcap: float | None = None  # logits -> tanh(logits / cap) * cap
    rope_local_theta: float | None = None  # rotary base of the SLIDING layers, unscaled (None: as the others)

    def __post_init__(self):
        if self.arch not in FAMILIES:
            raise LlmcadError(f"unknown model family {self.arch!r} (known: {', '.join(FAMILIES)})")
        # a list when read back from JSON; longer than the layers in a miniature of the model
        # (engine.map_kernels): its first layers'
        object.__setattr__(self, "layer_types", tuple(self.layer_types)[: self.num_layers])
        if self.layer_types and len(self.layer_types) != self.num_layers:
            raise LlmcadError(f"{len(self.layer_types)} layer types for {self.num_layers} layers")

    @property
    def rotary_dim(self) -> int:
        """Leading dimensions of each head that are rotated (as transformers: the product
        rounded down; the margin keeps a GGUF's count, stored as count / head_dim, exact)."""
        return int(self.head_dim * self.partial_rotary_factor + 1e-6)

    @property
    def family(self) -> Family:
        return FAMILIES[self.arch]

    def layer_window(self, i: int) -> int | None:
        """The sliding window of layer `i` (None: it attends to everything before)."""
        return self.sliding_window if self.layer_types and self.layer_types[i] == SLIDING else None

    @property
    def windowed_layers(self) -> int:
        return sum(t == SLIDING for t in self.layer_types) if self.sliding_window else 0

    @staticmethod
    def from_hf(cfg: dict[str, Any], source: str = "config.json") -> ModelConfig:
        model_type = cfg.get("model_type", "?")
        family = family_of_hf(model_type)
        if family is None:
            raise LlmcadError(f"{source}: unsupported architecture {model_type!r} (supported: {supported()})")
        if isinstance(cfg.get("text_config"), dict):  # a multimodal checkpoint: its language model
            tie = {"tie_word_embeddings": cfg["tie_word_embeddings"]} if "tie_word_embeddings" in cfg else {}
            cfg = {**tie, **cfg["text_config"]}
        raw, cfg = cfg, {**family.hf_defaults, **cfg}
        if cfg.get("use_bidirectional_attention"):
            raise LlmcadError(f"{source}: bidirectional attention (an embedding model) is not supported")
        try:
            hidden = cfg["hidden_size"]
            heads = cfg["num_attention_heads"]
            layers = cfg["num_hidden_layers"]
            rope, local_rope = _hf_rope_parameters(cfg)
            head_dim = cfg.get("head_dim") or hidden // heads
            partial = cfg.get("partial_rotary_factor", rope.get("partial_rotary_factor", 1.0))
            window, types = _hf_windows(cfg, family, layers)
            local_theta = None
            if window and family.local_rope_theta is not None:  # the windowed layers' own rotary base
                if local_rope.get("rope_type", "default") != "default":
                    raise LlmcadError(f"{source}: unsupported rope scaling {local_rope['rope_type']!r} on the sliding-window layers")
                local_theta = local_rope.get("rope_theta") or cfg.get("rope_local_base_freq") or family.local_rope_theta
            scalar = cfg.get("query_pre_attn_scalar")
            return ModelConfig(
                arch=family.name,
                vocab_size=cfg["vocab_size"],
                hidden_size=hidden,
                intermediate_size=cfg["intermediate_size"],
                num_layers=layers,
                num_heads=heads,
                num_kv_heads=cfg.get("num_key_value_heads") or heads,
                head_dim=head_dim,
                rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
                # a top-level rope_theta, else rope_parameters', else the family's default
                rope_theta=raw.get("rope_theta") or rope.get("rope_theta") or cfg.get("rope_theta") or 10000.0,
                max_position_embeddings=cfg.get("max_position_embeddings", 4096),
                tie_word_embeddings=cfg.get("tie_word_embeddings", False),
                attention_bias=family.qkv_bias or cfg.get("attention_bias", False),
                rope_scaling=_rope_scaling(cfg.get("rope_scaling") or rope, cfg, source),
                sliding_window=window,
                layer_types=types,
                partial_rotary_factor=partial,
                query_scale=None if scalar in (None, head_dim) else scalar**-0.5,
                attn_softcap=cfg.get("attn_logit_softcapping") or None,
                final_softcap=cfg.get("final_logit_softcapping") or None,
                rope_local_theta=local_theta,
            )
        except KeyError as e:
            raise LlmcadError(f"{source}: missing field {e.args[0]!r}") from None

    @staticmethod
    def from_gguf(fields: dict[str, Any], source: str, tie_word_embeddings: bool, rope_factors: dict[str, list[float]] | None = None) -> ModelConfig:
        """`fields` maps GGUF metadata keys to plain Python values; `rope_factors` holds the
        file's rotary tensors by name (`rope_freqs`, `rope_factors_long`, `rope_factors_short`).
        Keys a file may leave out take llama.cpp's values for the family (`gguf_defaults`)."""
        prefix = fields.get("general.architecture", "?")
        family = family_of_gguf(prefix)
        if family is None:
            raise LlmcadError(f"{source}: unsupported architecture {prefix!r} (supported: {supported()})")

        def get(key: str, default: Any = None) -> Any:
            value = fields.get(f"{prefix}.{key}", family.gguf_defaults.get(key, default))
            if value is None:
                raise LlmcadError(f"{source}: GGUF metadata lacks {prefix}.{key}")
            return value

        hidden = get("embedding_length")
        heads = get("attention.head_count")
        layers = get("block_count")
        head_dim = get("attention.key_length", hidden // heads)
        vocab = fields.get(f"{prefix}.vocab_size") or len(fields.get("tokenizer.ggml.tokens") or [])
        if not vocab:
            raise LlmcadError(f"{source}: GGUF metadata lacks a vocabulary size")
        rotary = get("rope.dimension_count", head_dim)
        window = get("attention.sliding_window", 0) or None  # Phi-3 writes 0 for none
        pattern = fields.get(f"{prefix}.attention.sliding_window_pattern", family.window_period)
        types = _gguf_layer_types(pattern, layers) if window else ()
        windowed = SLIDING in types
        local_theta = None
        if windowed and family.local_rope_theta is not None:
            local_theta = get("rope.freq_base_swa", family.local_rope_theta)
        # llama.cpp's Gemma: queries scaled by head_dim ** -0.5, by (hidden / heads) ** -0.5 in the 27B models
        wide = hidden // heads if layers in family.gguf_wide_query_layers else head_dim
        return ModelConfig(
            arch=family.name,
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=get("feed_forward_length"),
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=get("attention.head_count_kv", heads),
            head_dim=head_dim,
            rms_norm_eps=get("attention.layer_norm_rms_epsilon"),
            rope_theta=get("rope.freq_base", 10000.0),
            max_position_embeddings=get("context_length", 4096),
            tie_word_embeddings=tie_word_embeddings,
            attention_bias=family.qkv_bias,
            rope_scaling=_gguf_rope_scaling(fields, prefix, rope_factors or {}, source),
            sliding_window=window if windowed else None,
            layer_types=types if windowed else (),
            partial_rotary_factor=rotary / head_dim,
            query_scale=None if wide == head_dim else float(wide) ** -0.5,
            attn_softcap=get("attn_logit_softcapping", 0.0) or None,
            final_softcap=get("final_logit_softcapping", 0.0) or None,
            rope_local_theta=local_theta,
        )

    # ---- rotary embeddings ----------------------------------------------------------------

    @property
    def rope_kind(self) -> str | None:
        return None if self.rope_scaling is None else self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))

    @property
    def rope_long_from(self) -> int | None:
        """longrope: the first position rotated with the long factors (None: no such switch)."""
        return self.rope_scaling["original_max_position_embeddings"] if self.rope_kind == "longrope" else None

    @property
    def rope_attention_factor(self) -> float:
        """What cos and sin are multiplied by (longrope's attention factor; else 1)."""
        return self.rope_scaling["attention_factor"] if self.rope_kind == "longrope" else 1.0

    def rope_inv_freq(self, long: bool = False, local: bool = False) -> torch.Tensor:
        """Per-pair rotary frequencies, with the scaling the config asks for: llama3, linear,
        GGUF `rope_freqs` factors, or longrope's short factors (`long`: its long ones).
        `local`: those of the sliding-window layers where they have their own base.
        Always on the CPU: a model built on the meta device gets real frequencies (and meta
        math would import 800 modules, 72 MB, the first time)."""
        dim = self.rotary_dim
        exponents = torch.arange(0, dim, 2, dtype=torch.float64, device="cpu") / dim
        if local and self.rope_local_theta is not None:
            return (1.0 / (self.rope_local_theta**exponents)).float()
        scaling, kind = self.rope_scaling, self.rope_kind
        if kind == "longrope":  # as transformers: float32 throughout
            factors = torch.tensor(scaling["long_factor" if long else "short_factor"], dtype=torch.float32, device="cpu")
            shape = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim
            return 1.0 / (factors * self.rope_theta**shape)
        inv_freq = 1.0 / (self.rope_theta**exponents)
        if scaling is None:
            return inv_freq.float()
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

    # ---- description ------------------------------------------------------------------------

    def num_parameters(self) -> int:
        h, f, d = self.hidden_size, self.intermediate_size, self.head_dim
        family = self.family
        attn = h * d * (self.num_heads * 2 + self.num_kv_heads * 2)
        if self.attention_bias:
            attn += d * (self.num_heads + 2 * self.num_kv_heads)
        if family.qk_norm:
            attn += 2 * d
        layer = attn + 3 * h * f + (4 if family.sandwich_norms else 2) * h
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return self.num_layers * layer + self.vocab_size * h + head + h

    def family_features(self) -> dict[str, Any]:
        """What of its family this model uses, for `llmcad info`: each entry None where unused."""
        family = self.family
        switches = [
            name
            for name, on in (
                ("QKV bias", self.attention_bias),
                ("q/k RMSNorm", family.qk_norm),
                ("norms around attention and MLP", family.sandwich_norms),
                (f"{family.activation} gate", family.activation != "silu"),
                ("embeddings scaled by sqrt(hidden)", family.embed_scale),
                (f"fused {', '.join(family.fused)} (split at load)", bool(family.fused)),
            )
            if on
        ]
        if self.query_scale is not None:
            switches.append(f"queries scaled by {self.query_scale:.4g}")
        window = None
        if self.windowed_layers:
            window = {"tokens": self.sliding_window, "layers": self.windowed_layers, "of": self.num_layers}
            pattern = _period(self.layer_types)
            if pattern is not None and FULL in pattern:  # local layers interleaved with global ones
                window["pattern"] = {"sliding": pattern.count(SLIDING), "full": pattern.count(FULL)}
            if self.rope_local_theta is not None:
                window["rope_theta"] = self.rope_local_theta
        rope = None
        if self.rope_kind is not None:
            rope = {"type": self.rope_kind}
            for key in ("factor", "original_max_position_embeddings", "attention_factor"):
                if key in self.rope_scaling:
                    rope[key] = self.rope_scaling[key]
        softcap = None
        if self.attn_softcap or self.final_softcap:
            softcap = {"attention": self.attn_softcap, "final": self.final_softcap}
        return {
            "family": family.name,
            "features": switches,
            "sliding_window": window,
            "rope_scaling": rope,
            "rotary_dim": self.rotary_dim if self.rotary_dim != self.head_dim else None,
            "soft_capping": softcap,
        }


def _period(types: tuple[str, ...]) -> tuple[str, ...] | None:
    """The shortest run of layer types that `types` repeats (the last repetition may be cut
    short), where it is sliding layers then full ones (Gemma's 5 local then 1 global); else None."""
    for n in range(1, len(types) + 1):
        run = types[:n]
        if all(t == run[i % n] for i, t in enumerate(types)):
            return run if list(run) == sorted(run, key=lambda t: t == FULL) else None
    return None


def _hf_windows(cfg: dict[str, Any], family: Family, layers: int) -> tuple[int | None, tuple[str, ...]]:
    """The sliding window and the layer types it applies to, as transformers reads them."""
    window = cfg.get("sliding_window")
    if family.windows == WINDOW_ALL:
        return (window, (SLIDING,) * layers) if window else (None, ())
    if family.windows == WINDOW_QWEN and window and cfg.get("use_sliding_window", False):
        types = cfg.get("layer_types")
        if not types:
            first = cfg.get("max_window_layers", layers)
            types = [SLIDING if i >= first else FULL for i in range(layers)]
        return (window, tuple(types)) if SLIDING in types else (None, ())
    if family.windows == WINDOW_PATTERN and window:
        types = cfg.get("layer_types")
        if not types:  # every n-th layer global (transformers: `(i + 1) % n` local)
            period = cfg.get("sliding_window_pattern") or cfg.get("_sliding_window_pattern") or family.window_period
            types = [SLIDING if (i + 1) % period else FULL for i in range(layers)]
        return (window, tuple(types)) if SLIDING in types else (None, ())
    return None, ()


def _hf_rope_parameters(cfg: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The rotary parameters of the global layers and of the sliding-window ones: one dict
    for both, or transformers 5's `rope_parameters` per layer type (Gemma 3)."""
    rope = cfg.get("rope_parameters") or {}
    if isinstance(rope.get(FULL), dict) or isinstance(rope.get(SLIDING), dict):
        return rope.get(FULL) or {}, rope.get(SLIDING) or {}
    return rope, {}


def _gguf_layer_types(pattern: Any, layers: int) -> tuple[str, ...]:
    """Which layers a GGUF's sliding window covers: all of them without a pattern; with
    `attention.sliding_window_pattern`, one flag per layer (True: windowed), or a period n
    whose last layer of every n attends to everything (llama.cpp's `set_swa_pattern`)."""
    if pattern is None:
        return (SLIDING,) * layers
    if isinstance(pattern, list):
        return tuple(SLIDING if flag else FULL for flag in pattern)
    return tuple(SLIDING if pattern == 0 or i % pattern < pattern - 1 else FULL for i in range(layers))


def _rope_scaling(scaling: dict[str, Any] | None, cfg: dict[str, Any], source: str) -> dict[str, Any] | None:
    """The scaling `scaling` (a config's `rope_scaling` or `rope_parameters`) asks for."""
    if not scaling:
        return None
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return None
    if kind in ("longrope", "su"):
        return _longrope(scaling, cfg, source)
    if kind not in ("llama3", "linear"):
        raise LlmcadError(f"{source}: unsupported rope scaling {kind!r} (supported: llama3, linear, longrope)")
    return dict(scaling)


def _longrope(scaling: dict[str, Any], cfg: dict[str, Any], source: str) -> dict[str, Any]:
    """Phi-3's su/longrope: short factors up to the original context, long ones past it, and
    cos/sin scaled by an attention factor (transformers' `_compute_longrope_parameters`)."""
    original = scaling.get("original_max_position_embeddings") or cfg.get("original_max_position_embeddings")
    if not original or "short_factor" not in scaling or "long_factor" not in scaling:
        raise LlmcadError(f"{source}: longrope scaling needs short_factor, long_factor and original_max_position_embeddings")
    factor = scaling.get("factor") or cfg.get("max_position_embeddings", original) / original
    attention = scaling.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    return {
        "rope_type": "longrope",
        "short_factor": list(scaling["short_factor"]),
        "long_factor": list(scaling["long_factor"]),
        "original_max_position_embeddings": original,
        "factor": factor,
        "attention_factor": attention,
    }


def _gguf_rope_scaling(fields: dict[str, Any], prefix: str, factors: dict[str, list[float]], source: str) -> dict[str, Any] | None:
    """Rotary scaling from a GGUF: llama.cpp's precomputed `rope_freqs` divisors (Llama 3.1),
    or Phi-3's long and short factors with the original context and attention factor."""
    if "rope_factors_long" in factors or "rope_factors_short" in factors:
        original = fields.get(f"{prefix}.rope.scaling.original_context_length")
        if original is None or "rope_factors_long" not in factors or "rope_factors_short" not in factors:
            raise LlmcadError(f"{source}: longrope needs rope_factors_long, rope_factors_short and {prefix}.rope.scaling.original_context_length")
        scaling = {"short_factor": factors["rope_factors_short"], "long_factor": factors["rope_factors_long"]}
        attention = fields.get(f"{prefix}.rope.scaling.attn_factor")
        if attention is not None:
            scaling["attention_factor"] = attention
        scaling["original_max_position_embeddings"] = original
        return _longrope(scaling, {"max_position_embeddings": fields.get(f"{prefix}.context_length", original)}, source)
    if "rope_freqs" in factors:
        return {"rope_type": "freq_factors", "factors": factors["rope_freqs"]}
    factor = fields.get(f"{prefix}.rope.scaling.factor")
    if fields.get(f"{prefix}.rope.scaling.type") == "linear" and factor and factor != 1.0:  # positions divided by factor
        return {"rope_type": "linear", "factor": factor}
    return None
